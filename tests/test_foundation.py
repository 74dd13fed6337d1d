"""Foundation: hook runtime, LoRA, save/load, detach, errors (issue 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _models import Toy, ad, llama_batch, lm_loss, tiny_llama
from safetensors.torch import save_file

import lora_lite as ll


def _cfg(**kw) -> ll.LoraLiteConfig:
    kw.setdefault("r", 4)
    return ll.LoraLiteConfig(**kw)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _perturb(model) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for t in ll.adapter_state_dict(model).values():
            t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1)


# ------------------------------------------------------------------ config


def test_config_json_roundtrip_keeps_every_field() -> None:
    cfg = ll.LoraLiteConfig(
        r=3,
        alpha=5.0,
        dropout=0.1,
        dtype=torch.bfloat16,
        target_names=(r"q$",),
        layers=(1,),
        variant_kwargs={"use_rslora": True},
    )
    back = ll.LoraLiteConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.dtype is torch.bfloat16
    assert json.loads(cfg.to_json())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"alpha": float("inf")}, "alpha must be a finite number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"dtype": torch.int8}, "not supported for adapters"),
        ({"variant": "nope"}, r"unknown variant 'nope'; registered variants: \[.*'lora'"),
        ({"target_roles": ("reader", "bogus")}, "unknown target_roles"),
        ({"target_names": "q_proj"}, "must be a tuple of strings"),
        ({"variant_kwargs": {"x": object()}}, "JSON-serialisable"),
    ],
)
def test_config_rejects_bad_values(kw, msg) -> None:
    with pytest.raises(ll.ConfigError, match=msg):
        ll.LoraLiteConfig(**kw)


def test_rslora_scale() -> None:
    assert _cfg(alpha=8.0).scale == 2.0
    assert _cfg(alpha=8.0, variant_kwargs={"use_rslora": True}).scale == 8.0 / math.sqrt(4)


# ------------------------------------------------------------------ targeting


def test_roles_on_toy() -> None:
    m = Toy()
    got = {(n, role) for n, _, role in ll.find_targets(m, _cfg(target_roles=("reader", "writer", "inner")))}
    want = {(f"layers.{i}.{k}", r) for i in (0, 1) for k, r in (("q", "inner"), ("up", "reader"), ("down", "writer"))}
    assert got == want  # lm_head excluded by default


def test_default_targets_on_llama_are_readers_and_writers() -> None:
    """With GQA, k/v project 32 -> 16: they read the residual stream, so they are readers too."""
    m = tiny_llama()
    got = {n for n, _, _ in ll.find_targets(m, _cfg())}
    parts = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj")
    want = {f"model.layers.{i}.{p}" for i in (0, 1) for p in parts}
    assert got == want


def test_target_names_override_roles_and_layers_filter() -> None:
    m = tiny_llama()
    got = {n for n, _, _ in ll.find_targets(m, _cfg(target_names=(r"q_proj$", r"v_proj$"), layers=(1,)))}
    assert got == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_nothing_matched_lists_the_modules() -> None:
    with pytest.raises(ll.TargetError, match=r"(?s)no module matched.*layers\.\{0\.\.1\}\.up  reader  16->40"):
        ll.attach(Toy(), _cfg(target_names=("does_not_exist",)))


# ------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init_is_exact_on_toy(bias) -> None:
    m = Toy(bias=bias)
    x = torch.randn(5, 16)
    y0 = m(x)
    ll.attach(m, _cfg(target_roles=("reader", "writer", "inner")))
    assert torch.equal(m(x), y0)


def test_identity_at_init_is_exact_on_llama() -> None:
    m = tiny_llama()
    ids = llama_batch()
    y0 = m(ids).logits
    ll.attach(m, _cfg(target_roles=("reader", "writer", "inner")))
    assert torch.equal(m(ids).logits, y0)


def test_every_lora_tensor_is_live() -> None:
    """Perturbing any single lora_* tensor changes the output: no dead hooks, no skipped targets."""
    m = tiny_llama()
    ids = llama_batch()
    names = ll.attach(m, _cfg(target_roles=("reader", "writer", "inner")))
    want = {
        f"model.layers.{i}.{p}"
        for i in (0, 1)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert set(names) == want
    with torch.no_grad():  # make B non-zero so A matters too
        for layer in ll.targets(m).values():
            ad(layer).lora_B.normal_()
    base = m(ids).logits
    for key, t in ll.adapter_state_dict(m).items():
        with torch.no_grad():
            t.add_(0.5)
            changed = not torch.allclose(m(ids).logits, base)
            t.sub_(0.5)
        assert changed, f"perturbing {key} did not change the output"
    assert len(ll.adapter_state_dict(m)) == 2 * len(want)


def test_only_lora_tensors_get_gradients_and_loss_falls() -> None:
    m = tiny_llama()
    ids = llama_batch()
    ll.attach(m, _cfg(alpha=8.0))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(8):
        opt.zero_grad()
        loss = lm_loss(m, ids)
        loss.backward()
        if step == 1:  # B moved on step 0, so A has a gradient from step 1 on
            for n, p in m.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
                else:
                    assert p.grad is None, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_dropout_only_in_training_mode() -> None:
    m = Toy()
    ll.attach(m, _cfg(dropout=0.5))
    _perturb(m)
    x = torch.randn(4, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))


def test_adapter_dtype_bf16_keeps_base_output_dtype_and_identity() -> None:
    m = Toy()
    x = torch.randn(3, 16)
    y0 = m(x)
    ll.attach(m, _cfg(dtype=torch.bfloat16))
    assert ll.targets(m)["layers.0.up"].lora_A.dtype == torch.bfloat16
    y = m(x)
    assert y.dtype == torch.float32 and torch.equal(y, y0)


# ------------------------------------------------------------------ detach


def test_detach_restores_model_exactly() -> None:
    m = tiny_llama()
    sd0 = _state(m)
    grads0 = {n: p.requires_grad for n, p in m.named_parameters()}
    ids = llama_batch()
    y0 = m(ids).logits
    ll.attach(m, _cfg(target_roles=("reader", "writer", "inner")))
    _perturb(m)
    assert not torch.allclose(m(ids).logits, y0)
    ll.detach(m)
    sd1 = m.state_dict()
    assert sd1.keys() == sd0.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grads0
    assert torch.equal(m(ids).logits, y0)
    for name, mod in m.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, name
        assert not [a for a in vars(mod) if "lora" in a], name
        assert not [k for k in list(mod._parameters) + list(mod._buffers) if k.startswith("lora_")], name
    assert not ll.is_attached(m)


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("rslora", [False, True])
def test_save_fresh_model_load_reproduces_outputs(tmp_path, rslora) -> None:
    m = tiny_llama()
    ids = llama_batch()
    ll.attach(m, _cfg(target_roles=("reader", "writer", "inner"), alpha=8.0, variant_kwargs={"use_rslora": rslora}))
    _perturb(m)
    y = m(ids).logits
    p = ll.save(m, tmp_path / "a.safetensors")
    fresh = tiny_llama()
    ll.load(fresh, p)
    assert torch.equal(fresh(ids).logits, y)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in m.named_parameters() if p.requires_grad
    }


def test_saved_file_format(tmp_path) -> None:
    from safetensors import safe_open

    m = Toy()
    cfg = _cfg()
    ll.attach(m, cfg)
    p = ll.save(m, tmp_path / "a.safetensors")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "lora-lite" and meta["format_version"] == "2" and meta["name"] == "default"
    assert ll.LoraLiteConfig.from_json(meta["config"]) == cfg
    assert keys == {f"layers.{i}.{k}.lora_{ab}" for i in (0, 1) for k in ("up", "down") for ab in "AB"}
    assert list(tmp_path.iterdir()) == [p]  # no temp file left behind


def test_save_is_atomic_when_write_fails(tmp_path, monkeypatch) -> None:
    m = Toy()
    ll.attach(m, _cfg())
    p = ll.save(m, tmp_path / "a.safetensors")
    good = p.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    _perturb(m)
    with pytest.raises(OSError, match="disk full"):
        ll.save(m, p)
    assert p.read_bytes() == good
    assert list(tmp_path.iterdir()) == [p]


# ------------------------------------------------------------------ errors


def test_attach_twice_raises() -> None:
    m = Toy()
    ll.attach(m, _cfg())
    with pytest.raises(ll.AdapterError, match="already attached.*ll.detach"):
        ll.attach(m, _cfg())


def test_save_with_nothing_attached_raises(tmp_path) -> None:
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter is attached"):
        ll.save(Toy(), tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_detach_with_nothing_attached_raises() -> None:
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter is attached"):
        ll.detach(Toy())


def test_failed_attach_leaves_model_as_before() -> None:
    @ll.register
    class Explodes(ll.Variant):
        name = "_explodes_test"
        param_specs = staticmethod(lambda d_in, d_out, cfg: {"lora_x": ll.ParamSpec((d_out,), init="ones")})
        forward = staticmethod(lambda layer, x, y: y)

        @staticmethod
        def init(layer, cfg):
            if layer.out_features == 16:  # the second target (layers.0.down) fails
                raise RuntimeError("init failed")

    try:
        m = Toy()
        sd0 = _state(m)
        grads0 = {n: p.requires_grad for n, p in m.named_parameters()}
        with pytest.raises(RuntimeError, match="init failed"):
            ll.attach(m, _cfg(variant="_explodes_test"))
        assert m.state_dict().keys() == sd0.keys()
        assert {n: p.requires_grad for n, p in m.named_parameters()} == grads0
        assert not ll.is_attached(m)
        assert not any(hasattr(mod, "_lora_lite") or hasattr(mod, "lora_x") for mod in m.modules())
        ll.attach(m, _cfg())  # and the model is usable again
    finally:
        ll.REGISTRY.pop("_explodes_test")


def _saved(tmp_path, **kw):
    m = Toy()
    ll.attach(m, _cfg(**kw))
    _perturb(m)
    return ll.save(m, tmp_path / "a.safetensors"), m


def _assert_untouched(m, sd0) -> None:
    assert not ll.is_attached(m)
    sd = m.state_dict()
    assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd0)


def test_load_not_a_lora_lite_file(tmp_path) -> None:
    p = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    m = Toy()
    sd0 = _state(m)
    with pytest.raises(ll.LoadError, match="not a lora-lite adapter"):
        ll.load(m, p)
    _assert_untouched(m, sd0)


def test_load_garbage_and_missing_files(tmp_path) -> None:
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00" * 50)
    with pytest.raises(ll.LoadError, match="not a readable safetensors file"):
        ll.load(Toy(), p)
    with pytest.raises(ll.LoadError, match="does not exist"):
        ll.load(Toy(), tmp_path / "nope.safetensors")


def _rewrite(src, dst, fn) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)


def test_load_missing_key_names_it(tmp_path) -> None:
    p, _ = _saved(tmp_path)
    bad = tmp_path / "bad.safetensors"
    _rewrite(p, bad, lambda t, m: t.pop("layers.1.down.lora_B"))
    m = Toy()
    sd0 = _state(m)
    with pytest.raises(ll.LoadError, match="missing tensor 'layers.1.down.lora_B'"):
        ll.load(m, bad)
    _assert_untouched(m, sd0)


def test_load_unexpected_key_names_it(tmp_path) -> None:
    p, _ = _saved(tmp_path)
    bad = tmp_path / "bad.safetensors"
    _rewrite(p, bad, lambda t, m: t.__setitem__("layers.0.q.lora_A", torch.zeros(4, 16)))
    with pytest.raises(ll.LoadError, match="unexpected tensor 'layers.0.q.lora_A'"):
        ll.load(Toy(), bad)


def test_load_shape_mismatch_names_the_layer(tmp_path) -> None:
    p, _ = _saved(tmp_path)
    m = Toy()
    m.layers[1].up = torch.nn.Linear(16, 24)  # different hidden size
    m.layers[1].down = torch.nn.Linear(24, 16)
    sd0 = _state(m)
    with pytest.raises(
        ll.LoadError, match=r"layers\.1\.up\.lora_B: shape \(40, 4\) in the file, this model needs \(24, 4\)"
    ):
        ll.load(m, p)
    _assert_untouched(m, sd0)


def test_load_onto_attached_model_raises(tmp_path) -> None:
    p, m = _saved(tmp_path)
    with pytest.raises(ll.AdapterError, match="already attached"):
        ll.load(m, p)


def test_fingerprint_mismatch_for_weight_dependent_variant(tmp_path) -> None:
    @ll.register
    class Rewrites(ll.Variant):
        name = "_rewrites_test"
        rewrites_weight = True
        param_specs = staticmethod(lambda d_in, d_out, cfg: {"lora_g": ll.ParamSpec((d_out,), init="ones")})
        forward = staticmethod(lambda layer, x, y: y * ad(layer).lora_g)

        @staticmethod
        def init(layer, cfg):
            layer.weight.data = layer.weight.data * 2

    try:
        m = Toy()
        w0 = m.layers[0].up.weight.clone()
        ll.attach(m, _cfg(variant="_rewrites_test"))
        assert torch.equal(m.layers[0].up.weight, 2 * w0)
        p = ll.save(m, tmp_path / "a.safetensors")
        ll.detach(m)
        assert torch.equal(m.layers[0].up.weight, w0)  # detach restores the rewritten weight
        ll.load(m, p)  # same base: fine
        ll.detach(m)
        other = Toy(seed=5)
        sd0 = _state(other)
        with pytest.raises(ll.LoadError, match=r"layers\.0\.up: base weight fingerprint .* differs"):
            ll.load(other, p)
        _assert_untouched(other, sd0)
    finally:
        ll.REGISTRY.pop("_rewrites_test")


def test_layers_that_no_block_has_are_refused() -> None:
    """`layers=(0, 7)` on a 2-block model silently targeted block 0 only (and saved layers=[0, 7])."""
    m = Toy()
    with pytest.raises(ll.TargetError, match=r"layers=\(0, 7\): no block has index \[7\] .*\[0, 1\]"):
        ll.attach(m, _cfg(layers=(0, 7)))
    assert not ll.is_attached(m)
