"""`LoraLiteConfig`: every knob of an adapter, validated on construction, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ROLES = ("reader", "writer", "inner")


class ConfigError(ValueError):
    """A `LoraLiteConfig` field has an invalid value."""


# name -> variant class. Filled by `variant.register`; it lives here because the config is what names a variant
# (its validation looks the name up), and the config must not import the contract that imports it.
REGISTRY: dict[str, type] = {}


def get_variant(name: str) -> type:
    """The registered variant class called `name`; a ConfigError listing the registered names otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown variant {name!r}; registered variants: {sorted(REGISTRY)}")
    return REGISTRY[name]


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(f"dtype {name} is not supported for adapters; use one of {sorted(_DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class LoraLiteConfig:
    """What to attach and where. See SPEC.md / README for each field."""

    variant: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32
    target_roles: tuple[str, ...] = ("reader", "writer")
    target_names: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ("lm_head", "embed_tokens")
    layers: tuple[int, ...] | None = None
    variant_kwargs: dict[str, Any] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()  # regexes over "<module>.<param>" of 3-D expert weights (lora only)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> r of the layers it matches (peft's rule)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha of the layers it matches
    modules_to_save: tuple[str, ...] = ()  # regexes over module names: trained whole, saved with the adapter

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str):
            raise ConfigError(f"variant must be a registered variant name (str), got {self.variant!r}")
        get_variant(self.variant)  # raises with the registered names
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.dtype = dtype_from_name(self.dtype)
        for fname in ("target_roles", "target_names", "exclude_names", "target_parameters", "modules_to_save"):
            val = getattr(self, fname)
            if isinstance(val, str):
                raise ConfigError(f"{fname} must be a tuple of strings, not the string {val!r} (write ({val!r},))")
            try:
                setattr(self, fname, tuple(val))
            except TypeError:
                raise ConfigError(f"{fname} must be a tuple of strings, got {val!r}") from None
        for fname in ("target_names", "exclude_names", "target_parameters", "modules_to_save"):
            for pat in getattr(self, fname):
                if not isinstance(pat, str):
                    raise ConfigError(f"{fname} must hold regex strings, got {pat!r}")
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ConfigError(f"{fname}: {pat!r} is not a valid regular expression ({e})") from None
        self._check_patterns()
        bad = [r for r in self.target_roles if r not in ROLES]
        if bad:
            raise ConfigError(f"unknown target_roles {bad}; roles are {ROLES}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = (self.layers,)
            if not isinstance(self.layers, (tuple, list, range)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ConfigError(f"layers must be a tuple of block indices (ints), got {self.layers!r}")
            self.layers = tuple(self.layers)
        if not isinstance(self.variant_kwargs, dict):
            raise ConfigError(f"variant_kwargs must be a dict, got {type(self.variant_kwargs).__name__}")
        try:
            json.dumps(self.variant_kwargs)
        except TypeError as e:
            raise ConfigError(f"variant_kwargs must be JSON-serialisable (it is saved with the adapter): {e}") from None
        variant = get_variant(self.variant)
        accepted = variant.kwargs  # None: the variant checks its own (custom variants)
        unknown = [] if accepted is None else sorted(set(self.variant_kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{self.variant}: unknown variant_kwargs {unknown}; {self.variant} accepts "
                f"{sorted(accepted) if accepted else 'none'}"
            )
        rs = self.variant_kwargs.get("use_rslora", False)
        if not isinstance(rs, bool):
            raise ConfigError(f"{self.variant}: variant_kwargs['use_rslora'] must be True or False, got {rs!r}")
        if self.target_parameters and (self.variant != "lora" or self.dropout):
            raise ConfigError(
                f"target_parameters adapts expert weights with variant 'lora' and dropout=0 only (the update is "
                f"folded into the weight, so there is no adapter input to drop out), got variant={self.variant!r} "
                f"dropout={self.dropout}; use variant='lora', dropout=0.0, or target the experts' linear layers"
            )
        variant.validate(self)

    def _check_patterns(self) -> None:
        for fname in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, fname)
            if not isinstance(pat, dict):
                raise ConfigError(f"{fname} must be a dict {{regex: value}}, got {type(pat).__name__}")
            for key, val in pat.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{fname}: keys must be regex strings, got {key!r}")
                try:
                    re.compile(key)
                except re.error as e:
                    raise ConfigError(f"{fname}: {key!r} is not a valid regular expression ({e})") from None
                if fname == "rank_pattern" and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                    raise ConfigError(f"rank_pattern[{key!r}] must be an integer >= 1, got {val!r}")
                if fname == "alpha_pattern" and (
                    isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val)
                ):
                    raise ConfigError(f"alpha_pattern[{key!r}] must be a finite number, got {val!r}")
            setattr(self, fname, {k: (int(v) if fname == "rank_pattern" else float(v)) for k, v in pat.items()})

    def pattern_key(self, fname: str, name: str) -> str | None:
        """The key of rank_pattern / alpha_pattern that applies to layer `name`, or None: peft's rule
        (`get_pattern_key`): the first key, in order, that matches a dot-separated suffix of the name."""
        for key in getattr(self, fname):
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        return None

    def for_layer(self, name: str) -> LoraLiteConfig:
        """The config of one layer: r and alpha from rank_pattern / alpha_pattern (this config itself when
        neither pattern applies)."""
        rk, ak = self.pattern_key("rank_pattern", name), self.pattern_key("alpha_pattern", name)
        if rk is None and ak is None:
            return self
        r = self.r if rk is None else self.rank_pattern[rk]
        alpha = self.alpha if ak is None else self.alpha_pattern[ak]
        return dataclasses.replace(self, r=r, alpha=alpha, rank_pattern={}, alpha_pattern={})

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with variant_kwargs use_rslora=True."""
        if self.variant_kwargs.get("use_rslora", False):
            return self.alpha / math.sqrt(self.r)
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        for k in ("target_roles", "target_names", "exclude_names", "layers", "target_parameters", "modules_to_save"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraLiteConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> LoraLiteConfig:
        return cls.from_dict(json.loads(s))
