"""Half-precision bases (issue 5, part 3): a tiny Llama in bf16 or fp16, adapters in fp32 or bf16.

For every variant: identity at init, the model's and every target layer's output keep the base's dtype,
and no base tensor is ever upcast (attach, forward, a training step and detach leave every base
parameter's dtype and bytes as they were). Adapter gradients arrive in the adapter dtype.
"""

from __future__ import annotations

import pytest
import torch
from _models import ad, llama_batch, lm_loss, tiny_llama

import lora_lite as ll

VARIANTS = {
    "lora": dict(r=4, alpha=8.0),
    "dora": dict(r=4, alpha=8.0),
    "delora": dict(r=4),
    "ia3": dict(variant_kwargs={"feedforward_roles": ["writer"]}),
    "ia3_ff": dict(),
    "hra": dict(r=4),
    "eva": dict(r=4, alpha=8.0, variant_kwargs={"show_progress_bar": False}),
    "pissa": dict(r=4, alpha=8.0),
    "antipasto": dict(r=4, variant_kwargs={"block_size": 2}),
    "road": dict(variant_kwargs={"variant": "road_4", "group_size": 16}),
    "adalora": dict(r=4, alpha=8.0, variant_kwargs={"target_r": 2, "total_step": 10}),
    "oft": dict(variant_kwargs={"block_size": 4}),
    "boft": dict(variant_kwargs={"block_size": 4, "n_butterfly_factor": 2}),
    "loha": dict(r=4, alpha=8.0),
    "lokr": dict(r=2, alpha=4.0),
    "vera": dict(r=4),
}
ALL_ROLES = ("reader", "writer", "inner")
_EPS = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}


def _rtol(variant: str, base: torch.dtype, adapter: torch.dtype) -> float | None:
    """None: bit-exact identity. Otherwise the rounding the variant's identity argument allows.

    pissa/antipasto store W_res = W - (principal part) in the base dtype: every weight is rounded once more
    (eps_base relative to |W|, i.e. up to the principal part's size), and the principal part computed in the
    adapter dtype adds eps_adapter; through 2 blocks that is a few eps_base of the logits' scale.
    hra's pairs cancel to a few eps of the adapter dtype, and the pre-hook hands x' = Q x back in x's dtype.
    Pre-hook variants (hra, ia3_ff, oft, boft) also round x through the adapter dtype when it is narrower than the base's
    (bf16 adapter on an fp16 base: eps_bf16).
    """
    eps = max(_EPS[base], _EPS[adapter])
    if variant in ("pissa", "antipasto"):
        return 16 * eps
    if variant == "hra" or (
        variant in ("ia3", "ia3_ff", "oft", "boft") and _EPS[adapter] > _EPS[base]
    ):  # ia3 routes down_proj to ia3_ff
        return 16 * eps
    return None


def _calib() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g)} for _ in range(2)]


@pytest.mark.parametrize("adapter", [torch.float32, torch.bfloat16], ids=["ad_fp32", "ad_bf16"])
@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16], ids=["base_bf16", "base_fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_half_precision_base(variant: str, base: torch.dtype, adapter: torch.dtype) -> None:
    model = tiny_llama().to(base)
    ids = llama_batch()
    raw0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y0 = model(ids).logits
    assert y0.dtype == base
    cfg = ll.LoraLiteConfig(variant=variant, dtype=adapter, target_roles=ALL_ROLES, **VARIANTS[variant])
    names = ll.attach(model, cfg, calibration_data=_calib() if variant == "eva" else None)

    def base_params() -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if not n.rsplit(".", 1)[1].startswith("lora_")}

    assert all(p.dtype == base for p in base_params().values())
    for n, p in model.named_parameters():
        if n.rsplit(".", 1)[1].startswith("lora_"):
            assert p.dtype == adapter, n
    out_dtypes = {}
    layers = ll.targets(model)
    for name, layer in layers.items():  # registered after lora-lite's hook: sees what the adapter returns
        layer.base_layer.register_forward_hook(lambda m, a, y, name=name: out_dtypes.__setitem__(name, y.dtype))
    with torch.no_grad():
        y1 = model(ids).logits
    assert y1.dtype == base
    assert out_dtypes == dict.fromkeys(names, base)
    rtol = _rtol(variant, base, adapter)
    if rtol is None:
        assert torch.equal(y1, y0)
    else:
        err = (y1.float() - y0.float()).abs().max().item()
        assert err <= rtol * y0.float().abs().max().item(), f"max abs err {err:.3g}, scale {y0.abs().max().item():.3g}"

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        loss = lm_loss(model, ids)  # transformers computes the loss in fp32 from the base-dtype logits
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == adapter and torch.isfinite(p.grad).all() for p in trainable)
        opt.step()
    assert sum(p.grad.float().abs().sum() for p in trainable) > 0
    assert all(p.dtype == base for p in base_params().values())  # never upcast, not even after a step

    ll.detach(model)
    for n, p in model.named_parameters():
        assert p.dtype == raw0[n].dtype and torch.equal(p, raw0[n]), n


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_autocast_bf16_training_step(variant: str) -> None:
    """fp32 model and adapter under torch.autocast(bf16), the usual mixed-precision recipe.

    Autocast runs the matmuls in bf16 while the adapter parameters stay fp32, so every variant must accept
    bf16 activations next to fp32 tensors (lora's fused update used to raise on the dtype mismatch). The
    adapter is moved well off its init, so that it shifts the logits by 13-170% of their scale. Under
    autocast: (1) the logits differ from the fp32 run's by at most 10% of that shift (bf16 rounds each
    matmul input by up to 2^-8 ≈ 4e-3; measured 1-3.4% of the shift; an update dropped under autocast would
    give 100%); (2) the adapter gradients arrive in fp32, finite, and point the fp32 run's way (cosine >
    0.995; measured >= 0.9994).
    """
    model = tiny_llama()
    ids = llama_batch()
    cfg = ll.LoraLiteConfig(variant=variant, target_roles=ALL_ROLES, **VARIANTS[variant])
    ll.attach(model, cfg, calibration_data=_calib() if variant == "eva" else None)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
        with ll.disabled(model):
            base = model(ids).logits
    model.train()
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    g_ref = _flat_grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    g = _flat_grads(model)
    shift = (ref.logits - base).abs().max().item()
    err = (out.logits.float() - ref.logits).abs().max().item()
    assert err <= 0.1 * shift, f"autocast moved the logits by {err:.3g}, the adapter's shift is {shift:.3g}"
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(g, g_ref, dim=0).item()
    assert cos > 0.995, cos


@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16], ids=["base_bf16", "base_fp16"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fp32_adapter_on_a_half_base_rounds_the_output_once(variant: str, base: torch.dtype) -> None:
    """y' = y + Δ with y in half precision and Δ from an fp32 adapter is added in fp32 and rounded once (as peft):
    nearly every element equals the correctly rounded fp64 sum. Rounding Δ to half precision before the add
    (two roundings) missed it for ~30% of the elements where |Δ| ≈ |y|."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(base)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, r=8, alpha=16.0, target_names=("0",), dtype=torch.float32))
    layer = model[0]
    with torch.no_grad():
        ad(layer).lora_B.normal_(0, 0.3)  # an update about as large as the base output
        if variant == "dora":
            ad(layer).lora_m.mul_(1.5)
    x = torch.randn(2048, 64).to(base)
    with torch.no_grad():
        got = model(x)
        y, b = torch.nn.functional.linear(x, layer.weight, layer.bias).double(), layer.bias.double()
        A, B, s = ad(layer).lora_A.double(), ad(layer).lora_B.double(), ad(layer)._lora_lite.scale
        z = y + s * (x.double() @ A.T) @ B.T
        if variant == "dora":  # y' = b + g ⊙ (y − b + s·h Bᵀ), g = m / ‖W + s·B A‖_row
            g = ad(layer).lora_m.double() / (layer.weight.double() + s * B @ A).norm(dim=1)
            z = b + g * (z - b)
        want = z.to(base)
    assert got.dtype == base
    assert (got != want).double().mean() < 0.005, (got != want).double().mean()
