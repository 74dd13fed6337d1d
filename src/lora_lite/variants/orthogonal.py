"""Shared by the orthogonal variants (oft, boft): option checks, skew-symmetric blocks, block rotations of x.

Not a variant (registers nothing). Shapes: a batch of k blocks of size bs, applied to x (…, k·bs).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ..config import ConfigError, LoraLiteConfig

INT2 = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an integer >= 2")
INT1 = (lambda v: INT2[0](v + 1), "an integer >= 1")
BOOL = (lambda v: isinstance(v, bool), "True or False")


def check_options(cfg: LoraLiteConfig, name: str, checks: dict[str, tuple[Any, str]], exclusive: tuple = ()) -> None:
    """ConfigError for the first variant_kwargs value that fails its check, for dropout > 0, or for more than
    one of the `exclusive` keys."""
    if len(set(exclusive) & set(cfg.variant_kwargs)) > 1:
        raise ConfigError(f"{name}: pass only one of variant_kwargs {' and '.join(exclusive)}")
    for key, (ok, what) in checks.items():
        if key in cfg.variant_kwargs and not ok(cfg.variant_kwargs[key]):
            raise ConfigError(f"{name}: variant_kwargs[{key!r}] must be {what}, got {cfg.variant_kwargs[key]!r}")
    if cfg.dropout:
        raise ConfigError(
            f"{name}: dropout={cfg.dropout} is not supported (the rotation acts on the base layer's input: "
            "dropout there would drop the base path too). Use dropout=0.0"
        )


def refuse_peft_options(pc: dict, kind: str) -> None:
    """ValueError naming the peft options (of an adapter_config.json) lora-lite's oft/boft have no equivalent for."""
    bad = [k for k in ("modules_to_save", "layers_pattern") if pc.get(k)]
    bad += ["bias"] if pc.get("bias", "none") != "none" else []
    if bad:
        raise ValueError(f"peft {kind} option(s) {bad} = {[pc[k] for k in bad]} are not supported by lora-lite")


@functools.cache
def _triu(bs: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.triu_indices(bs, bs, 1, device=device))


def skew(v: torch.Tensor) -> torch.Tensor:
    """(k, bs(bs−1)/2) -> (k, bs, bs): T − Tᵀ with T's strict upper triangle = v (row-major, as peft's OFT)."""
    bs = (1 + math.isqrt(1 + 8 * v.shape[-1])) // 2
    T = v.new_zeros(v.shape[0], bs, bs)
    T[(slice(None), *_triu(bs, v.device))] = v
    return T - T.transpose(-1, -2)


def rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x blockdiag(R) for x (…, k·bs) and R (k, bs, bs), or (1, bs, bs) shared by every block: O(k·bs²) per row."""
    if R.shape[0] == 1:
        return (x.reshape(-1, R.shape[-1]) @ R[0]).view(x.shape)
    return torch.einsum("nkh,khc->nkc", x.reshape(-1, *R.shape[:2]), R).reshape(x.shape)  # (faster than a bmm)
