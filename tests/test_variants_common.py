"""The contract every variant must meet (issue 3), on a tiny Llama and on a toy model with biased layers.

Each variant adds one entry to CASES:
  cfg:     LoraLiteConfig kwargs (variant name is the key)
  rtol:    None = identity at init is bit-exact; else max|y' - y| <= rtol * max|y| (justify it in a comment)
  lr:      AdamW learning rate for the loss-falls check
  calib:   optional callable(model, kind) -> calibration_data for data-initialised variants ("llama" or "toy")
"""

from __future__ import annotations

import pytest
import torch
from _models import Toy, llama_batch, lm_loss, tiny_llama

import lora_lite as ll

ALL_ROLES = ("reader", "writer", "inner")

CASES: dict[str, dict] = {
    "lora": dict(cfg=dict(r=4, alpha=8.0), rtol=None, lr=1e-2),
    # pissa/antipasto: W is split into W_res + (rank-r part) in fp32, so y' = y only to rounding: the split
    # rounds each weight once (eps|W|) and the extra adapter matmul rounds a dot of length d_in <= 64;
    # the worst-case dot bound d_in*eps = 64*1.19e-7 = 7.6e-6 < 1e-5 of max|y| (measured: ~2 ulps).
    "pissa": dict(cfg=dict(r=4, alpha=16.0), rtol=1e-5, lr=1e-2),  # alpha != r on purpose
    "antipasto": dict(cfg=dict(r=4, variant_kwargs={"block_size": 2}), rtol=1e-5, lr=1e-1),  # r + r/2 params: lr 1e-1
    "dora": dict(cfg=dict(r=4, alpha=8.0), rtol=None, lr=1e-2),
    "delora": dict(cfg=dict(r=4), rtol=None, lr=1e-2),
    # hra: paired reflections cancel to fp32 rounding (~r*eps per layer through the WY form), not bit-exact
    "hra": dict(cfg=dict(r=4), rtol=1e-5, lr=1e-2),
    "ia3": dict(cfg=dict(variant_kwargs={"feedforward_roles": ["writer"]}), rtol=None, lr=1e-1),
    "ia3_ff": dict(cfg=dict(), rtol=None, lr=1e-1),
    "eva": dict(cfg=dict(r=4, alpha=8.0), rtol=None, lr=1e-2, calib=lambda model, kind: _eva_calib(kind)),
    # road: group_size 8 divides every out_features of both models (Toy: 16, 40; Llama: 16, 32, 64)
    "road": dict(cfg=dict(variant_kwargs={"variant": "road_2", "group_size": 8}), rtol=None, lr=1e-1),  # 2·d_out params
    "adalora": dict(cfg=dict(r=4, alpha=8.0, variant_kwargs={"target_r": 2, "total_step": 20}), rtol=None, lr=1e-2),
    # olora: W = W_res + s·B A split in fp32, as pissa: identity to rounding (same bound as pissa's)
    "olora": dict(cfg=dict(r=4, alpha=16.0), rtol=1e-5, lr=1e-2),  # alpha != r on purpose
    # loftq is not the identity by design: W_res + s·B A = W minus the quantization error the rank-r correction
    # leaves. int8 (per-row absmax/127: <= 0.4% of each row's largest weight per entry): measured 0.29% of max|y|
    "loftq": dict(cfg=dict(r=4, alpha=8.0, variant_kwargs={"loftq_bits": 8, "loftq_iter": 2}), rtol=0.01, lr=1e-2),
    "oft": dict(cfg=dict(variant_kwargs={"block_size": 4}), rtol=None, lr=5e-2),  # rotations only: lr 5e-2
    "boft": dict(cfg=dict(variant_kwargs={"block_size": 4, "n_butterfly_factor": 2}), rtol=None, lr=1e-2),
    "loha": dict(cfg=dict(r=4, alpha=8.0), rtol=None, lr=1e-2),
    "lokr": dict(cfg=dict(r=2, alpha=4.0), rtol=None, lr=1e-2),
    "vera": dict(cfg=dict(r=4), rtol=None, lr=1e-1),  # only r + d_out trainable numbers per layer: lr 1e-1
}


def _eva_calib(kind: str) -> list:
    """A few batches: random input_ids with some padding (llama), or a list of (n, 16) tensors (toy)."""
    g = torch.Generator().manual_seed(7)
    if kind == "toy":
        return [torch.randn(8, 16, generator=g) for _ in range(3)]
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _model(kind: str):
    if kind == "llama":
        return tiny_llama()
    return Toy(bias=True)


def _inputs(kind: str):
    return llama_batch() if kind == "llama" else torch.randn(6, 16, generator=torch.Generator().manual_seed(3))


def _out(model, kind: str, x) -> torch.Tensor:
    return model(x).logits if kind == "llama" else model(x)


def _loss(model, kind: str, x) -> torch.Tensor:
    if kind == "llama":
        return lm_loss(model, x)
    target = torch.sin(torch.arange(7.0)).expand(x.shape[0], 7)
    return ((model(x) - target) ** 2).mean()


def _attach(model, name: str, kind: str):
    case = CASES[name]
    cfg = ll.LoraLiteConfig(variant=name, target_roles=ALL_ROLES, **case["cfg"])
    calib = case["calib"](model, kind) if "calib" in case else None
    ll.attach(model, cfg, calibration_data=calib)
    return cfg


def _train(model, kind, x, lr, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, kind, x)
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        losses.append(loss.item())
    return losses, grads


PARAMS = [(n, k) for n in CASES for k in ("llama", "toy")]


@pytest.mark.parametrize("name, kind", PARAMS)
def test_identity_at_init(name, kind) -> None:
    model = _model(kind)
    x = _inputs(kind)
    with torch.no_grad():
        y0 = _out(model, kind, x)
        _attach(model, name, kind)
        y1 = _out(model, kind, x)
    rtol = CASES[name]["rtol"]
    if rtol is None:
        assert torch.equal(y1, y0)
    else:
        err = (y1 - y0).abs().max().item()
        assert err <= rtol * y0.abs().max().item(), f"max abs err {err:.3g} vs scale {y0.abs().max().item():.3g}"


@pytest.mark.parametrize("name, kind", PARAMS)
def test_gradients_live_and_loss_falls(name, kind) -> None:
    model = _model(kind)
    x = _inputs(kind)
    _attach(model, name, kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1].startswith("lora_") for n in trainable)
    losses, grads = _train(model, kind, x, CASES[name]["lr"], steps=20)
    for n in trainable:  # non-zero and finite within the first 2 optimizer steps
        assert all(torch.isfinite(g[n]).all() for g in grads[:2]), n
        assert any(g[n].abs().sum() > 0 for g in grads[:2]), f"{n} has zero gradient in the first 2 steps"
    assert losses[-1] < losses[0] * 0.98, f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("name, kind", PARAMS)
def test_save_fresh_load_reproduces_and_detach_restores(name, kind, tmp_path) -> None:
    model = _model(kind)
    x = _inputs(kind)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    _attach(model, name, kind)
    _train(model, kind, x, CASES[name]["lr"], steps=3)
    model.eval()
    with torch.no_grad():
        y = _out(model, kind, x)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = _model(kind)
    ll.load(fresh, path)  # no calibration data needed
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(_out(fresh, kind, x), y)
    ll.detach(model)
    sd1 = model.state_dict()
    assert sd1.keys() == sd0.keys()
    for k in sd0:
        assert torch.equal(sd1[k], sd0[k]), f"detach did not restore {k}"
    assert not any(hasattr(m, "_lora_lite") or m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("variant", sorted(ll.REGISTRY))
def test_unknown_variant_kwargs_are_refused_by_every_variant(variant: str) -> None:
    """A typo in variant_kwargs must not silently train the default (SPEC: nothing falls back silently)."""
    r = 4
    with pytest.raises(ll.ConfigError, match=rf"{variant}.*(unknown variant_kwargs \['use_rs_lora'\]|takes no)"):
        ll.LoraLiteConfig(variant=variant, r=r, variant_kwargs={"use_rs_lora": True})


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa", "eva"])
def test_use_rslora_must_be_a_bool(variant: str) -> None:
    with pytest.raises(ll.ConfigError, match=r"use_rslora'\] must be"):
        ll.LoraLiteConfig(variant=variant, r=4, variant_kwargs={"use_rslora": "yes"})
    cfg = ll.LoraLiteConfig(variant=variant, r=4, alpha=12.0, variant_kwargs={"use_rslora": True})
    assert cfg.scale == 12.0 / 2.0  # alpha / sqrt(r)
