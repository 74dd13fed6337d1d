"""OFT. Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", arXiv 2306.07280, in
peft's Cayley–Neumann form (Qiu et al. 2025, "Orthogonal Finetuning Made Scalable", arXiv 2506.19847).

    x' = x R,  y' = x' Wᵀ + b          R = blockdiag(R_1 … R_n): (d_in, d_in), n blocks of size bs = d_in / n
    Q_k = T_k − T_kᵀ                    T_k: (bs, bs), strictly upper triangle = lora_R[k] (bs(bs−1)/2 numbers)
    R_k = I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)   use_cayley_neumann (default), t = num_cayley_neumann_terms
    R_k = (I − Q)(I + Q)⁻¹                        use_cayley_neumann=False: the exact Cayley transform

A pre-hook rotates x block by block, one batched (n, bs, bs) matmul on x viewed as (…, n, bs): O(d_in·bs) per
token, no d_in × d_in matrix; any base works (quantized, Conv1D). variant_kwargs (peft's names): block_size
(peft oft_block_size; default None: r is the number of blocks), use_cayley_neumann (True),
num_cayley_neumann_terms (5), block_share (False; True: one R_1 for all blocks), coft (False) and eps (6e-5):
COFT scales each Q_k back to ‖Q_k‖_F ≤ eps/√rows before every use, in place, as peft. No dropout.

Init: lora_R = 0 ⇒ Q = 0 ⇒ R = I exactly, so x' = x bit for bit; ∂R/∂Q ≠ 0 at Q = 0, so lora_R trains.
Merge (`ll.merge`): W_eff = W Rᵀ (R built densely once), bias unchanged.
Steering (`ll.scaled(model, c)`): Q → c·Q, a fractional rotation: c = 0 is the base model, c = 1 the adapter,
R(−c) = R(c)ᵀ exactly (both forms are functions of Q), = R(c)⁻¹ exactly for the exact Cayley transform.

Checked against peft 0.21.2 `peft/tuners/oft/layer.py` (OFTRotationModule, Linear.forward and merge).
Notes: docs/variants/oft.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, register
from .orthogonal import BOOL, INT1, INT2, check_options, refuse_peft_options, rotate, skew

DEFAULTS: dict[str, Any] = dict(
    block_size=None, use_cayley_neumann=True, num_cayley_neumann_terms=5, block_share=False, coft=False, eps=6e-5
)
CHECKS = dict(
    block_size=(lambda v: v is None or INT2[0](v), "None or an integer >= 2"),
    use_cayley_neumann=BOOL,
    num_cayley_neumann_terms=INT1,
    block_share=BOOL,
    coft=BOOL,
    eps=(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
    module_dropout=(lambda v: v == 0, "0.0 (peft 0.21.2 creates this block dropout but never applies it)"),
)


def opt(cfg: LoraLiteConfig, key: str) -> Any:
    return cfg.variant_kwargs.get(key, DEFAULTS[key])


def blocks(d_in: int, cfg: LoraLiteConfig) -> tuple[int, int]:
    """(n blocks, block size) on a layer of input width d_in; ConfigError when they do not tile it."""
    bs = opt(cfg, "block_size")
    n = cfg.r if bs is None else d_in // bs
    if d_in % (n if bs is None else bs) or d_in // n < 2:
        what = f"r={cfg.r} blocks" if bs is None else f"block_size={bs}"
        ok = [d for d in range(2, d_in + 1) if d_in % d == 0]
        raise ConfigError(
            f"oft: {what} does not tile d_in={d_in} into blocks of size >= 2; pass variant_kwargs block_size in "
            f"{ok} (or r = d_in / block_size), or exclude this layer"
        )
    return n, d_in // n


def cayley(Q: torch.Tensor, neumann: bool = True, terms: int = 5) -> torch.Tensor:
    """peft's two parametrisations of a batch of skew Q (k, bs, bs); see the module docstring."""
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype)
    if not neumann:
        dt = torch.promote_types(Q.dtype, torch.float32)  # no half-precision solve on CPU
        return torch.linalg.solve((eye + Q).to(dt), (eye - Q).to(dt), left=False).to(Q.dtype)
    if terms < 3:
        return eye.expand_as(Q) if terms == 1 else eye + 2 * Q
    top = max(3, terms - 1)  # peft: the last power has coefficient 1 (t = 3 and t = 4 both end at Q³)
    R, P = eye + 2 * Q, Q
    for i in range(2, top + 1):
        P = P @ Q
        R = R + (P if i == top else 2 * P)
    return R


@torch.no_grad()
def coft_project(v: torch.Tensor, eps: float) -> None:
    """COFT, in place as peft: blocks with ‖Q_k‖_F > eps/√rows are scaled back onto that sphere."""
    lim, norm = eps / math.sqrt(v.shape[0]), skew(v).norm(dim=(1, 2))[:, None]
    v.copy_(torch.where(norm <= lim, v, v * (lim / norm)))


def rotation(layer: nn.Module, c: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The blocks R_k of R(c), (n or 1, bs, bs), in `dtype` (default: the adapter's)."""
    cfg, v = layer._lora_lite.cfg, layer.lora_R
    if opt(cfg, "coft"):
        coft_project(v, opt(cfg, "eps"))
    Q = skew(v if dtype is None else v.to(dtype))
    return cayley(Q if c == 1.0 else c * Q, opt(cfg, "use_cayley_neumann"), opt(cfg, "num_cayley_neumann_terms"))


@register
class OFT(Variant):
    name = "oft"
    kwargs = tuple(CHECKS)
    peft_type = "OFT"

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        check_options(cfg, "oft", CHECKS)

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        n, bs = blocks(d_in, cfg)
        return {"lora_R": ParamSpec((1 if opt(cfg, "block_share") else n, bs * (bs - 1) // 2), init="zeros")}

    @staticmethod
    def forward_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, rotation(layer))

    @staticmethod
    def scaled_forward_input(layer: nn.Module, x: torch.Tensor, c: float) -> torch.Tensor:
        """`ll.scaled`: the fractional rotation R(c) (Q → c·Q), not an interpolation of x."""
        return rotate(x, rotation(layer, c))

    @staticmethod
    def merged_weight(layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """W Rᵀ (x' = x R feeds W); bias unchanged."""
        return W @ rotate(torch.eye(W.shape[1], device=W.device, dtype=W.dtype), rotation(layer, dtype=W.dtype)).T, b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": layer.lora_R}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        bs, kw = opt(cfg, "block_size"), {k: opt(cfg, k) for k in DEFAULTS if k != "block_size"}
        return dict(r=0 if bs else cfg.r, oft_block_size=bs or 0, module_dropout=0.0, bias="none", init_weights=True,
                    peft_version="0.21.2", **kw)  # fmt: skip

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        refuse_peft_options(pc, "OFT")
        per = {}
        for key, t in tensors.items():
            if not key.endswith(".oft_R.weight"):
                raise ValueError(f"tensor {key!r} is not an OFT linear-layer tensor (<module>.oft_R.weight)")
            per[key.removesuffix(".oft_R.weight")] = {"lora_R": t}
        r, bs = int(pc.get("r", 0)), int(pc.get("oft_block_size", 0))
        kw = {k: pc[k] for k in DEFAULTS if k in pc and k != "block_size"}  # module_dropout: peft never applies it
        return {"variant": "oft", "r": r or 1, "variant_kwargs": {**kw, **({"block_size": bs} if bs else {})}}, per
