"""Hostile inputs to `ll.load` and crashes during `ll.save` (issue 9).

Every bad file gives a LoadError that says what is wrong, and leaves the model exactly as it was
(state_dict, requires_grad, no hooks, no lora_* tensors, no _lora_lite attributes). A save that
crashes half way (error, KeyboardInterrupt) leaves the previous adapter intact and no temporary
files. Cases already in test_foundation.py (a plain safetensors file, zero bytes of garbage, a
missing path, a missing/unexpected key, a shape mismatch, a fingerprint mismatch) are not repeated.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from _models import Toy, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_robustness import assert_pristine, snapshot

import lora_lite as ll


def _cfg(**kw) -> ll.LoraLiteConfig:
    kw.setdefault("r", 4)
    return ll.LoraLiteConfig(**kw)


@pytest.fixture
def good(tmp_path):
    """A valid lora adapter for Toy(), with non-trivial values."""
    m = Toy()
    ll.attach(m, _cfg())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in ll.adapter_state_dict(m).values():
            t.copy_(torch.randn(t.shape, generator=g))
    return ll.save(m, tmp_path / "good.safetensors")


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _refused(path, match: str, model=None, **kw) -> None:
    """load(path) raises LoadError matching `match` and leaves the model untouched."""
    m = model if model is not None else Toy()
    next(m.parameters()).requires_grad_(False)  # a non-default requires_grad that must survive
    snap = snapshot(m)
    with pytest.raises(ll.LoadError, match=match):
        ll.load(m, path, **kw)
    assert_pristine(m, snap)


# ---------------------------------------------------------------- not a readable file


@pytest.mark.parametrize("keep", [4, 60, 0.5, -1], ids=["in-length", "in-header", "in-tensors", "last-byte"])
def test_truncated_file(tmp_path, good, keep) -> None:
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    _refused(bad, "not a readable safetensors file")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b'{"format": "lora-lite"}',
        b"PK\x03\x04 zip archive",
        (2**60).to_bytes(8, "little") + b"{}",  # header length beyond the file
        (10).to_bytes(8, "little") + b"not json!!",
        (2).to_bytes(8, "little") + b"[]",
    ],
    ids=["empty", "json", "zip", "huge-header-length", "bad-header-json", "header-not-a-dict"],
)
def test_not_a_safetensors_file(tmp_path, payload) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    _refused(bad, "not a readable safetensors file")


def test_pickle_file_is_never_unpickled(tmp_path) -> None:
    """A torch.save (pickle) file is refused as unreadable; nothing is unpickled (no pickle on load)."""
    bad = tmp_path / "adapter.pt"
    torch.save({"layers.0.up.lora_A": torch.zeros(4, 16)}, bad)
    _refused(bad, "not a readable safetensors file")


def test_directory_path(tmp_path) -> None:
    _refused(tmp_path, "is a directory; pass the adapter's .safetensors file itself")


# ---------------------------------------------------------------- files from other libraries


def test_peft_adapter_file_is_refused(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    _refused(tmp_path / "peft" / "adapter_model.safetensors", "not a lora-lite adapter.*another library", tiny_llama())
    _refused(tmp_path / "peft", "is a directory", tiny_llama())


def test_plain_state_dict_without_metadata_is_refused(tmp_path) -> None:
    p = _write(tmp_path / "sd.safetensors", {k: v.contiguous() for k, v in Toy().state_dict().items()}, None)
    _refused(p, "not a lora-lite adapter")


def test_lora_lite_metadata_on_foreign_tensors_is_refused(tmp_path, good) -> None:
    """Right metadata, tensors under peft's key names: the first missing key is named."""
    tensors, meta = _read(good)
    peftish = {f"base_model.model.{k[:-7]}.{k[-6:]}.weight": v for k, v in tensors.items()}
    p = _write(tmp_path / "x.safetensors", peftish, meta)
    _refused(p, r"missing tensor 'layers\.0\.up\.lora_A'")


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version="3"), "format version '3'.*reads versions 1, 2"),
        (lambda m: m.update(format_version="banana"), "format version 'banana'"),
        (lambda m: m.pop("format_version"), "format version None"),
        (lambda m: m.pop("config"), "config in its metadata is invalid.*KeyError"),
        (lambda m: m.update(config=m["config"][:-7]), "config in its metadata is invalid.*JSONDecodeError"),
        (lambda m: m.update(config="[1, 2]"), "config in its metadata is invalid"),
        (lambda m: m.update(config="null"), "config in its metadata is invalid"),
        (lambda m: m.update(config='"lora"'), "config in its metadata is invalid"),
        (lambda m: _cfg_edit(m, variant="lora_from_the_future"), "unknown variant 'lora_from_the_future'"),
        (lambda m: _cfg_edit(m, r=0), "r must be an integer >= 1"),
        (lambda m: _cfg_edit(m, dtype="int8"), "unknown dtype 'int8'"),
        (lambda m: _cfg_edit(m, target_names=["("]), "not a valid regular expression"),
        (lambda m: _cfg_edit(m, future_field=1), r"unknown config fields \['future_field'\]"),
        (lambda m: m.update(fingerprints="{not json"), "config in its metadata is invalid"),
        (lambda m: m.update(fingerprints='["layers.0.up"]'), "fingerprints must map layer names to strings"),
        (lambda m: m.update(fingerprints='{"layers.0.up": 3}'), "fingerprints must map layer names to strings"),
    ],
    ids=[
        "future-version",
        "garbage-version",
        "no-version",
        "no-config",
        "truncated-config-json",
        "config-a-list",
        "config-null",
        "config-a-string",
        "unknown-variant",
        "invalid-r",
        "invalid-dtype",
        "invalid-regex",
        "unknown-field",
        "fingerprints-not-json",
        "fingerprints-a-list",
        "fingerprint-not-a-string",
    ],
)
def test_bad_metadata(tmp_path, good, edit, match) -> None:
    tensors, meta = _read(good)
    edit(meta)
    _refused(_write(tmp_path / "bad.safetensors", tensors, meta), match)


def _cfg_edit(meta: dict, **kw) -> None:
    d = json.loads(meta["config"])
    d.update(kw)
    meta["config"] = json.dumps(d)


def test_config_for_another_model_is_refused(tmp_path, good) -> None:
    """A config whose targeting matches nothing in this model: LoadError, listing what is there."""
    tensors, meta = _read(good)
    _cfg_edit(meta, target_names=["^nothing_here$"])
    _refused(_write(tmp_path / "bad.safetensors", tensors, meta), "does not fit this model.*no module matched")


@pytest.mark.parametrize("variant", ["pissa", "antipasto"])
@pytest.mark.parametrize("drop", ["all", "one"])
def test_rewriting_variant_without_fingerprint_is_refused(tmp_path, variant: str, drop: str) -> None:
    """pissa/antipasto re-derive W_res from the base: a file missing a layer's fingerprint must not load
    onto an unchecked (e.g. different) base."""
    m = Toy()
    ll.attach(m, _cfg(variant=variant))
    tensors, meta = _read(ll.save(m, tmp_path / "good.safetensors"))
    fps = json.loads(meta["fingerprints"])
    gone = sorted(fps)[0]
    meta["fingerprints"] = json.dumps({} if drop == "all" else {k: v for k, v in fps.items() if k != gone})
    bad = _write(tmp_path / "bad.safetensors", tensors, meta)
    _refused(bad, "fingerprint", model=Toy(seed=1))  # another base: a missing or a differing fingerprint
    only = gone if drop == "one" else ""  # on the right base too: the file is damaged, and says where
    _refused(bad, rf"no base-weight fingerprint for {only}", model=Toy())


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.__setitem__("layers.0.up.lora_A", t["layers.0.up.lora_A"].half()), "dtype torch.float16"),
        (lambda t: t.__setitem__("layers.0.up.lora_A", t["layers.0.up.lora_A"].double()), "dtype torch.float64"),
        (lambda t: t.__setitem__("layers.0.up.lora_A", t["layers.0.up.lora_A"].to(torch.int32)), "dtype torch.int32"),
        (lambda t: t.__setitem__("layers.0.up.lora_A", t["layers.0.up.lora_A"].T.contiguous()), r"shape \(16, 4\)"),
        (lambda t: t.__setitem__("layers.1.down.lora_B", t["layers.1.down.lora_B"][None]), r"shape \(1, 16, 4\)"),
        (lambda t: t.__setitem__("layers.1.down.lora_B", torch.tensor(0.0)), r"shape \(\) in the file"),
        (lambda t: t.__setitem__("layers.1.up.weight", torch.zeros(40, 16)), "unexpected tensor 'layers.1.up.weight'"),
    ],
    ids=["fp16", "fp64", "int32", "transposed", "extra-dim", "scalar", "base-weight-smuggled-in"],
)
def test_bad_tensors(tmp_path, good, edit, match) -> None:
    tensors, meta = _read(good)
    edit(tensors)
    _refused(_write(tmp_path / "bad.safetensors", tensors, meta), match)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_refused_unless_allowed(tmp_path, value, dtype) -> None:
    m = Toy()
    ll.attach(m, _cfg(dtype=dtype))
    p = ll.save(m, tmp_path / "a.safetensors")
    tensors, meta = _read(p)
    tensors["layers.1.down.lora_B"][3, 1] = value
    bad = _write(tmp_path / "bad.safetensors", tensors, meta)
    _refused(bad, r"layers\.1\.down\.lora_B: contains NaN or inf values; pass allow_nonfinite=True")
    fresh = Toy()
    ll.load(fresh, bad, allow_nonfinite=True)  # the user opted in: loaded as is
    got = ll.adapter_state_dict(fresh)["layers.1.down.lora_B"]
    assert got[3, 1].isnan() if value != value else got[3, 1].item() == value


# ---------------------------------------------------------------- fuzz


@settings(max_examples=int(os.environ.get("LL_HYPOTHESIS_EXAMPLES", 40)), deadline=None)
@given(data=st.data())
def test_random_byte_corruption_is_refused_or_loads_cleanly(tmp_path_factory, data) -> None:
    """Flip random bytes anywhere (header or tensor data): a LoadError and an untouched model, or a clean load."""
    src = tmp_path_factory.getbasetemp() / "fuzz_src.safetensors"
    if not src.exists():
        m = Toy()
        ll.attach(m, _cfg())
        ll.save(m, src)
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    bad = tmp_path_factory.mktemp("fuzz") / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    m = Toy()
    snap = snapshot(m)
    try:
        ll.load(m, bad)
    except ll.LoadError as e:
        assert str(bad) in str(e) or "lora_" in str(e) or "fingerprint" in str(e), e
        assert_pristine(m, snap)
        return
    assert all(torch.isfinite(t).all() for t in ll.adapter_state_dict(m).values())
    ll.detach(m)
    assert_pristine(m, snap)


# ---------------------------------------------------------------- atomic save


def _crashing_save(tmp_path, monkeypatch, target: str, exc: BaseException) -> None:
    """Save once, then save again with `target` raising `exc` half way: the first file must survive."""
    m = Toy()
    ll.attach(m, _cfg())
    p = ll.save(m, tmp_path / "a.safetensors")
    good = p.read_bytes()
    if target == "writer":

        def boom(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(good[: len(good) // 2])  # a half-written file
            raise exc

        monkeypatch.setattr("safetensors.torch.save_file", boom)
    else:

        def boom(src, dst):
            raise exc

        monkeypatch.setattr(os, "replace", boom)
    with torch.no_grad():
        for t in ll.adapter_state_dict(m).values():
            t.add_(1.0)
    with pytest.raises(type(exc)):
        ll.save(m, p)
    monkeypatch.undo()
    assert p.read_bytes() == good
    assert sorted(tmp_path.iterdir()) == [p], "temporary file left behind"
    fresh = Toy()
    ll.load(fresh, p)  # the old adapter still loads


@pytest.mark.parametrize("target", ["writer", "rename"])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_save_crash_keeps_old_adapter_and_leaves_no_temp_file(tmp_path, monkeypatch, target, exc) -> None:
    _crashing_save(tmp_path, monkeypatch, target, exc)


def test_save_crash_on_a_new_path_leaves_nothing(tmp_path, monkeypatch) -> None:
    m = Toy()
    ll.attach(m, _cfg())

    def boom(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ll.save(m, tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_directory_fails_cleanly(tmp_path) -> None:
    m = Toy()
    ll.attach(m, _cfg())
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        ll.save(m, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and not list((tmp_path / "d").iterdir())


def test_saved_file_has_ordinary_permissions(tmp_path) -> None:
    """The temp file behind the atomic rename is created 0600; the adapter must get the umask's mode."""
    m = Toy()
    ll.attach(m, _cfg())
    p = ll.save(m, tmp_path / "a.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
