"""BOFT. Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", arXiv 2311.06243.

    y' = s ⊙ ((x M) Wᵀ) + b               (peft: s ⊙ (base(x M) − b) + b),        s = lora_s: (d_out,)
    M = B_m ⋯ B_1,  B_i = P_i blockdiag(R_i1 … R_iD) P_iᵀ   (m = n_butterfly_factor, D·H = d_in, P_1 = I)
    R_ij = (I − S)(I + S)⁻¹,  S = ½ (A − Aᵀ),  A = lora_R[i, j]: (H, H)        lora_R: (m, D, H, H)

P_i: peft's butterfly permutations. A pre-hook applies x → x M factor by factor (gather, batched (D, H, H)
matmul, gather: O(m·d_in·H) per token, no d_in × d_in matrix); the forward hook scales the output around the
base bias. Any base works. variant_kwargs (peft's names without boft_): block_size (H, default 4) or
block_num (D), n_butterfly_factor (m, default 1), boft_dropout (0.0; in training, int(p·D) random blocks of one
random factor become I, peft's RNG calls). No dropout.

Init: lora_R = 0 ⇒ S = 0 ⇒ M = I exactly; lora_s = 1 ⇒ y' = y bit for bit. Both train from step 1.
Merge (`ll.merge`): W_eff = diag(s) W Mᵀ, b_eff = s ⊙ (b − b_base) + b_base (= b for a lone adapter).
Steering (`ll.scaled(model, c)`): S → c·S in every block (a fractional rotation; c = −1 inverts each block
exactly, so M(−1) = M⁻¹ when m = 1) and s → 1 + c·(s − 1); c = 0 is the base model.

Checked against peft 0.21.2 `peft/tuners/boft/layer.py` (Linear.forward, get_delta_weight, cayley_batch); peft
on CPU forces n_butterfly_factor to 1, so m > 1 is tested with its CUDA block-diagonal kernel replaced by a
dense one. Notes: docs/variants/boft.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, register
from .orthogonal import INT1, INT2, check_options, refuse_peft_options, rotate

_P = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)")
CHECKS = dict(block_size=INT2, block_num=INT1, n_butterfly_factor=INT1, boft_dropout=_P)


def shape(d_in: int, cfg: LoraLiteConfig) -> tuple[int, int, int]:
    """(m, D, H) on a layer of input width d_in, with peft's checks; ConfigError naming the fix."""
    kw, m = cfg.variant_kwargs, cfg.variant_kwargs.get("n_butterfly_factor", 1)
    D = kw["block_num"] if "block_num" in kw else d_in // kw.get("block_size", 4)
    H = d_in // D if D else 0
    if not D or D * H != d_in or H < 2 or (m > 1 and (D % 2 or H % 2 or D % 2 ** (m - 1))):
        what = f"block_num={D}" if "block_num" in kw else f"block_size={kw.get('block_size', 4)}"
        raise ConfigError(
            f"boft: {what} with n_butterfly_factor={m} does not tile d_in={d_in}: need block_num * block_size = d_in, "
            "block_size >= 2 and, for a factor m > 1, both even and block_num a multiple of 2^(m-1); change them "
            "or exclude this layer"
        )
    return m, D, H


def blocks(layer: nn.Module, c: float = 1.0, dtype: torch.dtype | None = None, drop: bool = True) -> torch.Tensor:
    """The Cayley blocks R_ij of M(c), (m, D, H, H); `drop`: boft_dropout applies (in training mode)."""
    A = layer.lora_R if dtype is None else layer.lora_R.to(dtype)
    S, eye = (0.5 * c) * (A - A.transpose(-1, -2)), torch.eye(A.shape[-1], device=A.device, dtype=A.dtype)
    dt = torch.promote_types(A.dtype, torch.float32)  # no half-precision solve on CPU
    R = torch.linalg.solve((eye + S).to(dt), (eye - S).to(dt), left=False).to(A.dtype)
    p = layer._lora_lite.cfg.variant_kwargs.get("boft_dropout", 0.0)
    if p and drop and layer.training:  # peft's MultiplicativeDropoutLayer, same draws in the same order
        i, m, D = torch.randint(0, R.shape[0], (1,)).item(), R.shape[0], R.shape[1]
        off = (torch.randperm(D) < int(p * D)).to(R.device)[:, None, None]
        R = torch.stack([torch.where(off, eye, R[k]) if k == i else R[k] for k in range(m)])
    return R


def factor(x: torch.Tensor, R: torch.Tensor, g: int) -> torch.Tensor:
    """x B_i = x P_i blockdiag(R) P_iᵀ; g = 2^(i−1) for i > 1, g = 0 for P_1 = I. In chunks of 2·g·h features
    (h = H/2), P_i puts the even h-wide pieces first, then the odd ones: a (2, g) -> (g, 2) transpose."""
    if not g:
        return rotate(x, R)
    D, h = R.shape[0], R.shape[-1] // 2  # block (c, g) of x P_i holds pieces (c, 0, g) and (c, 1, g) of x
    xv, Rv = x.reshape(-1, D // g, 2, g, h), R.view(D // g, g, 2, h, 2, h)
    return torch.einsum("ncbge,cgbefk->ncfgk", xv, Rv).reshape(x.shape)  # · P_iᵀ: back to (c, f, g) pieces


def butterfly(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x M = x B_m ⋯ B_1 for x (…, d_in), the last factor first: one einsum per factor, no gather."""
    for i in reversed(range(R.shape[0])):
        x = factor(x, R[i], 2**i if i else 0)  # R[i] is B_(i+1): chunks of 2^(i+1) half-blocks
    return x


@register
class BOFT(Variant):
    name = "boft"
    kwargs = tuple(CHECKS)
    peft_type = "BOFT"

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        check_options(cfg, "boft", CHECKS, exclusive=("block_size", "block_num"))  # block_num·block_size = d_in

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        m, D, H = shape(d_in, cfg)
        return {"lora_R": ParamSpec((m, D, H, H), init="zeros"), "lora_s": ParamSpec((d_out,), init="ones")}

    @staticmethod
    def forward_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return butterfly(x, blocks(layer))

    @staticmethod
    def scaled_forward_input(layer: nn.Module, x: torch.Tensor, c: float) -> torch.Tensor:
        """`ll.scaled`: the fractional rotation (S → c·S in every block), not an interpolation of x."""
        return butterfly(x, blocks(layer, c))

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s, b = layer.lora_s, layer.bias
        return y * s if b is None else torch.addcmul(b.to(y.dtype) * (1 - s), y, s)  # s ⊙ (y − b) + b

    @staticmethod
    def merged_weight(layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """diag(s) W Mᵀ; b' = s ⊙ (b − b_base) + b_base."""
        M = butterfly(torch.eye(W.shape[1], device=W.device, dtype=W.dtype), blocks(layer, dtype=W.dtype, drop=False))
        s, b0 = layer.lora_s.to(W.dtype), 0 if layer.bias is None else layer.bias.to(W.dtype)
        return s[:, None] * (W @ M.T), None if b is None else s * (b - b0) + b0

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"boft_R": layer.lora_R, "boft_s": layer.lora_s[:, None]}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        kw, num = cfg.variant_kwargs, cfg.variant_kwargs.get("block_num", 0)
        return dict(boft_block_size=0 if num else kw.get("block_size", 4), boft_block_num=num, bias="none",
                    boft_n_butterfly_factor=kw.get("n_butterfly_factor", 1), boft_dropout=kw.get("boft_dropout", 0.0),
                    init_weights=True)  # fmt: skip

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        refuse_peft_options(pc, "BOFT")
        per: dict[str, dict] = {}
        for key, t in tensors.items():
            mod, _, tname = key.rpartition(".")
            if tname not in ("boft_R", "boft_s"):
                raise ValueError(f"tensor {key!r} is not a BOFT linear-layer tensor (<module>.boft_R / .boft_s)")
            per.setdefault(mod, {})["lora_R" if tname == "boft_R" else "lora_s"] = t if tname == "boft_R" else t[:, 0]
        m = next(ts["lora_R"].shape[0] for ts in per.values() if "lora_R" in ts)  # peft on CPU: 1, whatever the config
        num, size = int(pc.get("boft_block_num", 0)), int(pc.get("boft_block_size", 0))
        kw = {"block_num": num} if num else {"block_size": size}
        kw |= {"n_butterfly_factor": m, "boft_dropout": pc.get("boft_dropout", 0.0)}
        return {"variant": "boft", "variant_kwargs": kw}, per
