"""Hotswap: ll.load(model, path, name="x", replace=True) copies a file's tensors into adapter "x" in place, for
every variant; lora's smaller rank is zero-padded and its scale folded; a compiled model does not recompile;
mismatches raise and leave the adapter unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import Toy, perturb_trained

import lora_lite as ll

TARGETS = (r"layers\.\d+\.(q|up|down)$",)
from test_variants_common import CASES as _CASES  # noqa: E402

VARIANTS = sorted(_CASES)  # every registered variant
CALIB = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _cfg(variant, **kw):
    from test_variants_common import CASES

    return ll.LoraLiteConfig(variant=variant, target_names=TARGETS, **{**CASES[variant]["cfg"], **kw})


def _adapted(base, cfg, seed, name="x"):
    model = copy.deepcopy(base)
    ll.attach(model, cfg, calibration_data=CALIB if cfg.variant == "eva" else None, name=name)
    perturb_trained(model, name, seed)
    return model


def _hooks(model):
    return [(id(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in model.modules()]


def _snapshot(model, name="x"):
    return {k: (v.data_ptr(), v.clone()) for k, v in ll.adapter_state_dict(model, name).items()}


X = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_swaps_in_place(variant, tmp_path):
    base = Toy()
    cfg = _cfg(variant)
    model, other = _adapted(base, cfg, 0), _adapted(base, cfg, 1)
    ll.save(other, tmp_path / "other.safetensors")
    want = other(X)
    hooks, before = _hooks(model), _snapshot(model)
    assert not torch.equal(model(X), want)
    assert ll.load(model, tmp_path / "other.safetensors", name="x", replace=True) == list(ll.targets(model, "x"))
    torch.testing.assert_close(model(X), want, rtol=0, atol=0)  # the same tensors: bit for bit
    assert _hooks(model) == hooks and ll.adapters(model) == ["x"]
    assert {k: v.data_ptr() for k, v in ll.adapter_state_dict(model, "x").items()} == {
        k: p for k, (p, _) in before.items()
    }


def test_lora_smaller_rank_other_alpha_is_padded_and_folded(tmp_path):
    base = Toy()
    model = _adapted(base, ll.LoraLiteConfig(r=8, alpha=16.0, target_names=TARGETS), 0)
    small = _adapted(
        base, ll.LoraLiteConfig(r=4, alpha=3.0, target_names=TARGETS, variant_kwargs={"use_rslora": True}), 1
    )
    with torch.no_grad():  # B != 0: a real update
        for a in ll.targets(small, "x").values():
            a.lora_B.normal_()
    ll.save(small, tmp_path / "small.safetensors")
    ll.load(model, tmp_path / "small.safetensors", name="x", replace=True)
    want = small(X)
    got = model(X)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    a = ll.targets(model, "x")["layers.0.q"]
    assert a.lora_A.shape == (8, 16) and torch.all(a.lora_A[4:] == 0) and torch.all(a.lora_B[:, 4:] == 0)
    assert a._lora_lite.scale == 2.0  # the slot's float: nothing a compiled graph guards on changed


def test_compiled_model_does_not_recompile(tmp_path):
    torch._dynamo.reset()
    base = Toy()
    model = _adapted(base, ll.LoraLiteConfig(r=8, alpha=16.0, target_names=TARGETS), 0)
    for i, (r, alpha) in enumerate(((8, 16.0), (4, 2.0))):
        other = _adapted(base, ll.LoraLiteConfig(r=r, alpha=alpha, target_names=TARGETS), i + 1)
        ll.save(other, tmp_path / f"o{i}.safetensors")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(X)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(2):
                ll.load(model, tmp_path / f"o{i}.safetensors", name="x", replace=True)
                got = compiled(X)
                want = ll.merged_state_dict(model)
                ref = copy.deepcopy(base)
                ref.load_state_dict(want)
                torch.testing.assert_close(got, ref(X), rtol=1e-5, atol=1e-5)
            for a in ll.targets(model, "x").values():  # the control: a changed scale float does recompile
                a._lora_lite.scale = 3.0
            with pytest.raises(Exception, match="[Rr]ecompil"):
                compiled(X)
    torch._dynamo.reset()


# ---------------------------------------------------------------- refusals: the adapter unchanged


def _refused(model, path, match, name="x", **kw):
    before = _snapshot(model)
    with pytest.raises((ll.LoadError, ll.AdapterError), match=match):
        ll.load(model, path, name=name, replace=True, **kw)
    after = ll.adapter_state_dict(model, "x")
    assert all(torch.equal(after[k], v) for k, (_, v) in before.items())


def test_mismatches_are_refused(tmp_path):
    base = Toy()
    model = _adapted(base, ll.LoraLiteConfig(r=4, target_names=TARGETS), 0)
    cases = {
        "variant": _adapted(base, _cfg("dora", r=4), 1),
        "rank": _adapted(base, ll.LoraLiteConfig(r=8, target_names=TARGETS), 1),
        "layers": _adapted(base, ll.LoraLiteConfig(r=4, target_names=TARGETS, layers=(0,)), 1),
        "dropout": _adapted(base, ll.LoraLiteConfig(r=4, dropout=0.1, target_names=TARGETS), 1),
        "nan": _adapted(base, ll.LoraLiteConfig(r=4, target_names=TARGETS), 1),
    }
    with torch.no_grad():
        ll.targets(cases["nan"], "x")["layers.1.up"].lora_A[0, 0] = float("nan")
    for k, m in cases.items():
        ll.save(m, tmp_path / f"{k}.safetensors")
    _refused(model, tmp_path / "variant.safetensors", r"holds a 'dora' adapter, the slot is 'lora'")
    _refused(
        model,
        tmp_path / "rank.safetensors",
        r"lora_A: shape \(8, 16\) in the file, the slot holds \(4, 16\) \(rank 8 is beyond the slot's 4",
    )
    _refused(
        model,
        tmp_path / "layers.safetensors",
        r"target different layers: layers\.1\.down is not in the file \(3 missing, 0 extra\)",
    )
    _refused(model, tmp_path / "dropout.safetensors", r"the config differs in \['dropout'\]")
    _refused(model, tmp_path / "nan.safetensors", r"layers\.1\.up\.lora_A: contains NaN")
    _refused(model, tmp_path / "rank.safetensors", "no adapter named 'y'", name="y")
    dora = _adapted(base, _cfg("dora", r=4), 0)
    other = _adapted(base, _cfg("dora", r=4, alpha=2.0), 1)
    ll.save(other, tmp_path / "dora_alpha.safetensors")
    with pytest.raises(ll.LoadError, match=r"config differs in \['alpha'\].*only dora's tensor values"):
        ll.load(dora, tmp_path / "dora_alpha.safetensors", name="x", replace=True)


def test_antipasto_with_another_residual_split_is_refused(tmp_path):
    base, other_base = Toy(seed=0), Toy(seed=1)
    cfg = _cfg("antipasto")
    model = _adapted(base, cfg, 0)
    ll.save(_adapted(other_base, cfg, 1), tmp_path / "o.safetensors")
    _refused(model, tmp_path / "o.safetensors", "another base weight")
