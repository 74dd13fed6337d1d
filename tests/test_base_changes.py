"""The base changing under an attached adapter, tied weights, and first use in unusual autograd modes.

- DoRA's cached ‖W‖²_row follows the base weight: a cast (`model.to(bf16)`) and an in-place write
  (`load_state_dict` of a full checkpoint) give the outputs of an adapter attached to that weight.
- pissa / antipasto rebuild the original weight from W_res: if W_res was overwritten since attach,
  `detach`, `ll.disabled` and `ll.scaled` refuse (naming the layer) instead of restoring garbage, and
  leave the model as it was.
- pissa / antipasto refuse a weight tied to another module (lm_head <-> embeddings): writing W_res
  into it would change the embedding too.
- A first call under `torch.inference_mode()` caches nothing that breaks later training.
- Forward-mode AD (`torch.autograd.forward_ad`) works with grad enabled; the tangent equals the
  effective weight's product (every variant is affine in x).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _models import ad, llama_batch, tiny_llama
from test_ecosystem import CFGS, _attached, _cfg
from test_merge import perturb, rel
from test_robustness import assert_pristine, snapshot

import lora_lite as ll

REWRITING = ["pissa", "antipasto"]


def _attached_with_snapshot(key: str, calib=None):
    """(a tiny Llama with `key` attached, the snapshot of the base before attach)."""
    base = tiny_llama()
    snap = snapshot(base)
    m = copy.deepcopy(base)
    torch.manual_seed(4)
    ll.attach(m, _cfg(key), calibration_data=calib)
    return m, snap


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- DoRA's cached norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_after_a_cast_equals_dora_loaded_onto_the_cast_base(tmp_path, dtype) -> None:
    """model.to(dtype) after attach: the same bits as the saved adapter loaded onto a base built in dtype."""
    ids = llama_batch()
    m = _attached("dora").to(dtype)
    y = _logits(m, ids)
    ll.save(m, tmp_path / "a.safetensors")
    g = tiny_llama().to(dtype)
    ll.load(g, tmp_path / "a.safetensors")
    assert torch.equal(_logits(g, ids), y)


def test_dora_follows_an_in_place_write_of_the_base_weight() -> None:
    """A full checkpoint (base + lora_*) loaded into a model attached to another base: the source's outputs."""
    src = _attached("dora")
    dst = tiny_llama(seed=3)  # other base weights
    ll.attach(dst, _cfg("dora"))
    ids = llama_batch()
    _logits(dst, ids)  # cache the norms of the old weights
    dst.load_state_dict(src.state_dict())
    assert torch.equal(_logits(dst, ids), _logits(src, ids))


# ---------------------------------------------------------------- rewritten weights overwritten since attach


def _overwritten(variant: str):
    """A pissa/antipasto model whose W_res was replaced by another attach's (a full-checkpoint load)."""
    src = _attached(variant)
    dst = tiny_llama(seed=3)
    ll.attach(dst, _cfg(variant))
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize("variant", REWRITING)
def test_detach_refuses_when_the_residual_was_overwritten(variant: str) -> None:
    dst = _overwritten(variant)
    snap = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ll.AdapterError, match=r"layer.weight is no longer the residual W_res .* ll.merge"):
        ll.detach(dst)
    assert ll.is_attached(dst)  # nothing was changed
    assert all(torch.equal(v, snap[k]) for k, v in dst.state_dict().items())
    with pytest.raises(ll.AdapterError, match="no longer the residual"):
        with ll.disabled(dst):
            pass
    assert all(torch.equal(v, snap[k]) for k, v in dst.state_dict().items())
    assert all(ad(layer)._lora_lite.enabled and not ad(layer)._lora_lite.cache for layer in ll.targets(dst).values())
    ids = llama_batch()
    y = _logits(dst, ids)
    ll.merge(dst)  # the way out the message gives: the adapted model as plain weights
    assert rel(_logits(dst, ids), y) < 1e-5


def test_pissa_scaled_refuses_when_the_residual_was_overwritten() -> None:
    dst = _overwritten("pissa")
    with pytest.raises(ll.AdapterError, match="no longer the residual"), ll.scaled(dst, 0.5):
        dst(input_ids=llama_batch())


@pytest.mark.parametrize("variant", REWRITING)
def test_restores_still_exact_after_moves_widening_casts_and_identical_rewrites(variant: str) -> None:
    """The residual check accepts what does not change W_res: .to(float64), and writing the same values."""
    m, snap = _attached_with_snapshot(variant)
    perturb(m)
    m.load_state_dict(m.state_dict())  # an in-place write of the same bits
    m.double()
    with ll.disabled(m):
        pass
    ll.detach(m)
    m.float()
    assert_pristine(m, snap)


# ---------------------------------------------------------------- tied weights


@pytest.mark.parametrize("variant", REWRITING)
def test_rewriting_variant_refuses_a_tied_weight(variant: str) -> None:
    m = tiny_llama(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    snap = snapshot(m)
    cfg = ll.LoraLiteConfig(variant=variant, r=4, target_names=("lm_head",), exclude_names=())
    with pytest.raises(ll.ConfigError, match=r"lm_head: .* shared with \['model.embed_tokens'\] \(tied weights\)"):
        ll.attach(m, cfg)
    assert_pristine(m, snap)


def test_lora_on_a_tied_weight_is_still_allowed() -> None:
    """Output-hook variants leave the shared weight alone: nothing to refuse."""
    m = tiny_llama(tie_word_embeddings=True)
    ids = llama_batch()
    y0 = _logits(m, ids)
    emb = m.model.embed_tokens.weight.clone()
    ll.attach(m, ll.LoraLiteConfig(variant="lora", r=4, target_names=("lm_head",), exclude_names=()))
    assert torch.equal(_logits(m, ids), y0) and torch.equal(m.model.embed_tokens.weight, emb)


# ---------------------------------------------------------------- unusual autograd modes on first use


@pytest.mark.parametrize("key", [k for k in CFGS if k != "lora_dropout"])
def test_first_use_under_inference_mode_then_train_steer_and_detach(key: str) -> None:
    """An inference-mode evaluation (plain, disabled, scaled) before training must not poison any cache."""
    calib = [{"input_ids": llama_batch(seed=9 + i)} for i in range(2)] if key == "eva" else None
    m, snap = _attached_with_snapshot(key, calib)
    ids = llama_batch()
    with torch.inference_mode():
        m(input_ids=ids)
        with ll.disabled(m):
            m(input_ids=ids)
        with ll.scaled(m, 0.5):
            m(input_ids=ids)
    m.train()
    for ctx in (ll.disabled, lambda mm: ll.scaled(mm, 0.5), lambda mm: ll.scaled(mm, 1.0)):
        with ctx(m):
            out = m(input_ids=ids).logits
            if out.requires_grad:
                out.square().mean().backward()
    assert any(p.grad is not None for p in m.parameters() if p.requires_grad)
    ll.detach(m)
    assert_pristine(m, snap)
    assert not any(t.is_inference() for t in m.state_dict().values())


@pytest.mark.parametrize("key", [k for k in CFGS if k != "lora_dropout"])
def test_forward_mode_ad_with_grad_enabled(key: str) -> None:
    """jvp through every targeted layer: tangent = t W_effᵀ (the layer is affine in x), with grad enabled."""
    m = _attached(key).float()
    torch.manual_seed(0)
    for name, layer in ll.targets(m).items():
        d_in = layer.in_features
        x, t = torch.randn(3, d_in), torch.randn(3, d_in)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent
        with torch.no_grad():
            expected = layer(t) - layer(torch.zeros_like(t))  # affine: f(t) - f(0) = t W_effᵀ
        assert tangent is not None and rel(tangent, expected) < 1e-5, name
        break  # one layer per variant is enough: all share the hook path


def test_forward_mode_ad_through_the_whole_model() -> None:
    m = _attached("lora")
    ids = llama_batch()
    emb = m.model.embed_tokens(ids)
    t = torch.randn_like(emb)
    with fwAD.dual_level():
        out = m(inputs_embeds=fwAD.make_dual(emb, t)).logits
        tangent = fwAD.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda e: m(inputs_embeds=e).logits, (emb,), (t,))
    assert rel(tangent, ref) < 1e-5


@pytest.mark.parametrize("variant", REWRITING)
def test_detach_after_an_overwrite_restores_from_the_cached_original(variant: str) -> None:
    """Once ll.disabled has rebuilt (and cached) the true original, detach restores it even if W_res changed."""
    m, snap = _attached_with_snapshot(variant)
    with ll.disabled(m):
        pass
    with torch.no_grad():
        for layer in ll.targets(m).values():
            layer.weight.add_(1.0)  # W_res overwritten
    ll.detach(m)
    assert_pristine(m, snap)
