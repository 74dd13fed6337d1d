"""LoftQ. Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv 2310.08659.

    W: (d_out, d_in) fp32;  res = W;  repeat loftq_iter times:     (variant_kwargs loftq_bits 4 | 8, loftq_iter >= 1)
        Q = deq(quant(res))                 nf4 (blocks of 64, absmax) or int8 (per row), bitsandbytes' formats
        U S Vᵀ = svd(W − Q),  L R = U_r S_r V_rᵀ  top-r part of the quantization error
        res = W − L R
    B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ,  W_res = Q      B: (d_out, r), A: (r, d_in), written into layer.weight
    y' = x W_resᵀ + b + s · (drop(x) Aᵀ) Bᵀ          (LoRA's forward on top of W_res)

W_res holds exactly representable quantized values: quantizing it again (bnb Linear4bit / Linear8bitLt) gives
the same codes, so the trained adapter runs on the quantized residual base unchanged (docs/variants/loftq.md).
Init: W_res + s·B A = W − (the quantization error left after the rank-r correction): NOT the identity; it is
LoftQ's point to start from the quantized model corrected towards W. s·B A = L R for any alpha (peft keeps
B = L, A = R whatever s: the same tensors at alpha = r, which the paper uses). Deterministic: `ll.load`
re-derives W_res from the original weight. Needs a dense float W (a quantized base is refused: attach to the
full-precision model, LoftQ quantizes it itself, as peft's docs say).

Merge (`ll.merge`): W_eff = W_res + s·B A. Steering (`ll.scaled(model, c)`): pissa's y₀ + c·(y' − y₀) with
y₀ from the ORIGINAL W kept for detach: c = 0 is exactly the base layer.
peft export: rank r, init_lora_weights="loftq" + loftq_config: peft re-runs its LoftQ init on the base on load.

Checked against peft 0.21.2 `peft/utils/loftq_utils.py` (`loftq_init`, run on CPU) and `tuners/lora/layer.py`
(`loftq_init`): bit-exact W_res, A, B at alpha = r where bitsandbytes' CPU nf4 is right (d_in % 64 == 0).

Notes: docs/variants/loftq.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import dense_weight, set_dense_weight
from ..variant import register
from .lora import LoRA, nonzero_alpha, peft_lora_config
from .pissa import PiSSA

# QLoRA's NormalFloat4 code (bitsandbytes `get_4bit_type("nf4")`); a value goes to the nearest code (midpoints)
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
BLOCK = 64  # bitsandbytes' default 4-bit blocksize (peft's LoftQ: compress_statistics=False, fp32 absmax)


def nf4_roundtrip(W: torch.Tensor) -> torch.Tensor:
    """deq(quant_nf4(W)) of a fp32 tensor: absmax blocks of 64 over the flat tensor, as bitsandbytes' formula."""
    code = NF4.to(W.device)
    mid = (code[:-1] + code[1:]) / 2
    flat, out = W.reshape(-1), torch.empty(W.numel(), dtype=torch.float32, device=W.device)
    full = flat.numel() - flat.numel() % BLOCK
    blk = flat[:full].view(-1, BLOCK)
    am = blk.abs().amax(1)
    scaled = torch.clamp(blk * (1.0 / am.clamp(min=1e-38))[:, None], -1, 1)
    out[:full] = (code[torch.bucketize(scaled, mid)] * am[:, None]).reshape(-1)
    if full < flat.numel():  # the last, shorter block (divided, as bitsandbytes does)
        am = flat[full:].abs().max().clamp(min=1e-38)
        out[full:] = code[torch.bucketize(torch.clamp(flat[full:] / am, -1, 1), mid)] * am
    return out.view(W.shape)


def int8_roundtrip(W: torch.Tensor) -> torch.Tensor:
    """deq(quant_int8(W)): LLM.int8()'s per-row absmax of the fp16-cast weight, as bitsandbytes' Int8Params."""
    H = W.half()
    stats = H.abs().amax(1).float()
    q = torch.round(H * (127.0 / torch.where(stats > 0, stats, 1.0)[:, None])).to(torch.int8)  # (0 rows: 0, not NaN)
    return q * stats[:, None] * 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant: ·SCB/127


def loftq(W: torch.Tensor, r: int, bits: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_res, U_r, S_r, Vh_r) of LoftQ's alternating quantization / rank-r SVD, as peft's `loftq_init`."""
    roundtrip = nf4_roundtrip if bits == 4 else int8_roundtrip
    res = W
    for i in range(n_iter):
        Q = roundtrip(res)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        if i + 1 < n_iter:
            res = W - (U[:, :r] * S[:r].sqrt()) @ (S[:r].sqrt()[:, None] * Vh[:r])  # peft's L @ R
    return Q, U[:, :r], S[:r], Vh[:r]


@register
class LoftQ(PiSSA):
    name = "loftq"
    kwargs = ("loftq_bits", "loftq_iter", "use_rslora")
    residual_factors = None  # W − W_res is the (full-rank) quantization error: the runtime keeps a dense copy

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        nonzero_alpha(cfg)
        bits, n = cfg.variant_kwargs.get("loftq_bits", 4), cfg.variant_kwargs.get("loftq_iter", 1)
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
            raise ConfigError(f"loftq: loftq_bits must be 4 (nf4) or 8 (int8), as peft's LoftQConfig, got {bits!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"loftq: loftq_iter must be an integer >= 1 (alternating steps), got {n!r}")

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        st = layer._lora_lite
        W = dense_weight(layer)
        if cfg.r > min(W.shape):
            raise ConfigError(
                f"{st.name}: loftq needs r <= min(d_out, d_in) = {min(W.shape)} (the rank of the SVD), got r={cfg.r}; "
                "lower r or exclude this layer"
            )
        kw = cfg.variant_kwargs
        Q, U, S, Vh = loftq(W, cfg.r, kw.get("loftq_bits", 4), kw.get("loftq_iter", 1))
        sqrt_s = (S / st.scale).sqrt()  # s·B A = L R for any alpha (= peft's B = L, A = R at s = 1)
        layer.lora_B.copy_(U * sqrt_s)
        layer.lora_A.copy_(sqrt_s[:, None] * Vh)
        set_dense_weight(layer, Q)

    peft_tensors = staticmethod(LoRA.peft_tensors)  # rank r as it is (peft re-derives W_res on load)

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        kw = cfg.variant_kwargs
        return {
            **peft_lora_config(cfg, cfg.r, cfg.alpha),
            "init_lora_weights": "loftq",
            "loftq_config": {"loftq_bits": kw.get("loftq_bits", 4), "loftq_iter": kw.get("loftq_iter", 1)},
        }
