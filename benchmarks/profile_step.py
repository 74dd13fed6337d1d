"""Where an adapter's train-step time goes: an op-level profile, the runtime's own cost, and py-spy.

Issue 6 asks to profile the hook path (torch.profiler, py-spy) and remove waste. This script makes those
measurements reproducible on the benchmark's model (`bench_vs_peft.py`: same Llama, batch, targets, step).

1. Op profile (torch.profiler): `--steps` train steps of the frozen base and of the adapted model, alternating,
   each op's self CPU time summed per phase (forward, backward, optimizer), the median over the steps. Matmuls with an r-sized operand
   (2-D mm/addmm whose inputs have a dimension equal to r) are the adapter's low-rank products; everything
   else the adapter adds shows up as the difference between the two profiles, by op name. The profiler adds
   a few microseconds per op, so this apportions time; the ratios to trust come from the timed rounds below.

2. Runtime cost without arithmetic: the frozen base with (a) a do-nothing forward hook on every targeted
   projection and (b) lora-lite attached with a variant whose forward returns y unchanged (the whole hook
   path: state lookup, dtype checks, in-place vetting, the variant call), timed in interleaved rounds with the
   base and the real variant (bench_vs_peft.time_rounds). (a) and (b) over the base are what Python costs.

3. `--py-spy` (needs py-spy on PATH): samples a process that trains the adapted model for `--spy-steps` steps
   (`py-spy record --native`), and reports the share of samples under a lora-lite frame, split into time
   inside torch ops called from lora-lite and the Python interpreter's own time on lora-lite lines.

    python benchmarks/profile_step.py --threads 2                      # lora, full size, ~2 minutes
    python benchmarks/profile_step.py --variant dora --py-spy
    python benchmarks/profile_step.py --quick                          # tiny model, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import lora_lite as ll

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_peft as bench  # noqa: E402  (the same model, batch, arms and step as the main benchmark)

PHASES = ("forward", "backward", "optimizer")
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


class _NullVariant(ll.Variant):
    """No tensors, no arithmetic: forward returns the base output. Times the runtime's hook path alone.

    Registered only for the attach in `overhead_arms` (tests iterate over `ll.REGISTRY`).
    """

    name = "_profile_null"

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: ll.LoraLiteConfig) -> dict[str, ll.ParamSpec]:
        return {}

    @staticmethod
    def forward(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y


# ---------------------------------------------------------------- 1. op profile


def _phased_step(arm: bench.Arm, ids: torch.Tensor) -> None:
    """bench.step, with each phase in a profiler range."""
    from torch.profiler import record_function

    if arm.opt is not None:
        arm.opt.zero_grad(set_to_none=True)
    with record_function("forward"):
        loss = arm.model(input_ids=ids, labels=ids).loss
    with record_function("backward"):
        loss.backward()
    if arm.opt is not None:
        with record_function("optimizer"):
            arm.opt.step()


def _is_lowrank(name: str, shapes: list, r: int) -> bool:
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2]
    return name in MATMULS and any(r in s[-2:] for s in mats)


def _attribute(events, r: int) -> dict[str, Any]:
    """Self CPU ms of one profiled step: per phase, per op name, and of the r-sized matmuls per phase."""
    phase, by_op, lowrank = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in events:
        if ev.name in PHASES:
            continue
        top = ev
        while top.cpu_parent is not None:
            top = top.cpu_parent
        ph = top.name if top.name in PHASES else "other"
        us = ev.self_cpu_time_total
        phase[ph] += us
        by_op[ev.name] += us
        if _is_lowrank(ev.name, ev.input_shapes or [], r):
            lowrank[ph] += us
    return {"phase": phase, "op": by_op, "lowrank": lowrank}


def op_profile(arms: list[bench.Arm], ids: torch.Tensor, steps: int, r: int) -> dict[str, dict[str, Any]]:
    """Per arm, the median over `steps` profiled steps (the arms alternate, so drift hits both alike) of the
    self CPU ms per phase, per op name and of the r-sized matmuls; total = the sum of the phase medians."""
    from torch.profiler import ProfilerActivity, profile

    for arm in arms:
        _phased_step(arm, ids)  # warm-up outside the profile
    per: dict[str, list[dict[str, Any]]] = {arm.label: [] for arm in arms}
    for i in range(steps):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                _phased_step(arm, ids)
            per[arm.label].append(_attribute(prof.events(), r))

    def med(rows: list[collections.Counter]) -> dict[str, float]:
        keys = sorted(set().union(*rows), key=lambda k: -sum(row[k] for row in rows))
        return {k: statistics.median(row[k] for row in rows) / 1e3 for k in keys}

    out = {}
    for label, rows in per.items():
        phase = med([row["phase"] for row in rows])
        out[label] = {
            "total_ms": sum(phase.values()),
            "phase_ms": phase,
            "lowrank_matmul_ms": med([row["lowrank"] for row in rows]),
            "op_ms": med([row["op"] for row in rows]),
        }
    return out


# ---------------------------------------------------------------- 2. the runtime's own cost


def _noop_hooks(model: torch.nn.Module) -> None:
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in bench.PROJ:
            m.register_forward_hook(lambda _m, _a, _y: None)


def overhead_arms(tmpl: torch.nn.Module, case: bench.Case, size: bench.Size) -> list[bench.Arm]:
    """base; base + a do-nothing hook per target; base + lora-lite with the null variant; the variant itself.

    The middle two keep the base's output marking (so their backward is the base's) and have no optimizer.
    """
    base = bench.build("base", None, tmpl, size, None)
    arms = [base]
    for label in ("noop_hook", "null_variant"):
        model = copy.deepcopy(tmpl).train()
        if label == "noop_hook":
            _noop_hooks(model)
        else:
            ll.register(_NullVariant)
            try:
                ll.attach(model, ll.LoraLiteConfig(variant=_NullVariant.name, r=size.r, target_names=bench.TARGET_RE))
            finally:
                del ll.REGISTRY[_NullVariant.name]
        for p in model.parameters():
            p.requires_grad_(False)
        bench._mark_outputs(model)  # after ours: our hook runs first, as in an adapted model
        arms.append(bench.Arm(label, case.name, model, None, 0.0, 0))
    arms.append(bench.build("ours", case, tmpl, size, bench.calibration(size) if case.calib else None))
    return arms


# ---------------------------------------------------------------- 3. py-spy


def parse_pyspy(raw: str, within: str | None = None) -> dict[str, Any]:
    """Shares of py-spy samples (`--format raw`: 'frame;frame;...;leaf count' per line).

    Only samples with a frame containing `within` count (the training loop: not imports, model building).
    A sample is "under lora-lite" if any frame is in a lora_lite/ file; of those, "interpreter" if the leaf
    (innermost) frame is itself a lora_lite/ line (Python executing our code), else "torch ops" (native code
    called from our lines). Also the lora-lite lines with the most samples.
    """
    total = ours = interp = 0
    lines = collections.Counter()
    for row in raw.splitlines():
        stack, _, n = row.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        frames = stack.split(";")
        if within is not None and not any(within in f for f in frames):
            continue
        total += k
        mine = [f for f in frames if "lora_lite/" in f]
        if not mine:
            continue
        ours += k
        interp += k * ("lora_lite/" in frames[-1])
        lines[mine[-1]] += k
    share = (lambda k: k / total) if total else (lambda k: float("nan"))
    return {
        "samples": total,
        "under_lora_lite": share(ours),
        "lora_lite_interpreter": share(interp),
        "lora_lite_torch_ops": share(ours - interp),
        "top_lines": [[f, share(k)] for f, k in lines.most_common(8)],
    }


def run_pyspy(variant: str, quick: bool, threads: int, steps: int, rate: int = 50) -> dict[str, Any]:
    """py-spy on a child process training `variant`. `--native` sampling stops the process for each sample
    (milliseconds): at 250 Hz the child ran ~60x slower, hence the low default rate."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("--py-spy needs py-spy on PATH (pip install py-spy)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "spy.txt"
        child = [sys.executable, __file__, "--_train", variant, "--steps", str(steps), "--threads", str(threads)]
        cmd = [exe, "record", "--native", "--format", "raw", "--rate", str(rate), "-o", str(raw), "--", *child]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True, capture_output=True, text=True)
        return {**parse_pyspy(raw.read_text(), within="_train_loop ("), "rate": rate}


def _train_only(variant: str, size: bench.Size, steps: int) -> None:
    """The py-spy child: build the adapted model and train it."""
    case = next(c for c in bench.CASES if c.name == variant)
    arm = bench.build("ours", case, bench.make_base(size), size, bench.calibration(size) if case.calib else None)
    _train_loop(arm, bench.make_batch(size, 0), steps)


def _train_loop(arm: bench.Arm, ids: torch.Tensor, steps: int) -> None:
    """The part py-spy's shares are computed over (by this function's name)."""
    for _ in range(steps):
        bench.step(arm, ids)


# ---------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    base, ours, v = res["profile"]["base"], res["profile"]["ours"], res["variant"]
    lines = [
        f"Op profile (torch.profiler, self CPU ms per step, median of {res['steps']} steps of each, alternating; "
        f"{res['threads']} thread(s)): frozen base vs {v}.",
        "",
        f"| phase | base | {v} | + | of which r-sized matmuls |",
        "|---|---:|---:|---:|---:|",
    ]
    for ph in (*PHASES, "other"):
        b, o = base["phase_ms"].get(ph, 0.0), ours["phase_ms"].get(ph, 0.0)
        if b or o:
            lines.append(f"| {ph} | {b:.1f} | {o:.1f} | {o - b:+.1f} | {ours['lowrank_matmul_ms'].get(ph, 0.0):.1f} |")
    lr = sum(ours["lowrank_matmul_ms"].values())
    lines.append(
        f"| total | {base['total_ms']:.1f} | {ours['total_ms']:.1f} | {ours['total_ms'] - base['total_ms']:+.1f} | {lr:.1f} |"
    )
    lines += [
        "",
        "Ops that grew most (self CPU ms per step, all phases):",
        "",
        f"| op | base | {v} | + |",
        "|---|---:|---:|---:|",
    ]
    for name, d in res["op_delta_ms"][:10]:
        lines.append(
            f"| `{name}` | {base['op_ms'].get(name, 0.0):.2f} | {ours['op_ms'].get(name, 0.0):.2f} | {d:+.2f} |"
        )
    oh = res["overhead"]
    lines += [
        "",
        f"Train step over the frozen base ({res['rounds']} interleaved rounds, median of per-round ratios): "
        f"do-nothing hook on every target {oh['noop_hook']:.3f}, lora-lite's hook path with a variant that "
        f"returns y {oh['null_variant']:.3f}, {v} {oh['ours']:.3f}.",
    ]
    spy = res.get("py_spy")
    if spy:
        lines += [
            "",
            f"py-spy ({spy['samples']} samples of {v}'s training loop, `--native`, {spy['rate']} Hz): {100 * spy['under_lora_lite']:.1f}% under "
            f"a lora-lite frame: {100 * spy['lora_lite_torch_ops']:.1f}% in torch ops called from it, "
            f"{100 * spy['lora_lite_interpreter']:.2f}% the interpreter on lora-lite lines.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="lora", help="a bench_vs_peft variant (default lora)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps per arm (default 15, quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds for the overhead arms (default 20, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--py-spy", action="store_true", help="also sample a training process with py-spy")
    ap.add_argument("--spy-steps", type=int, default=None, help="steps the py-spy child trains (default 10, quick 5)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--_train", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    size = bench.QUICK if a.quick else bench.FULL
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._train:
        _train_only(a._train, size, a.steps or 5)
        return {}
    names = [c.name for c in bench.CASES]
    if a.variant not in names:
        ap.error(f"unknown variant {a.variant!r}; choose from {names}")
    case = bench.CASES[names.index(a.variant)]
    steps = a.steps or (1 if a.quick else 15)
    rounds = a.rounds or (2 if a.quick else 20)

    tmpl, ids = bench.make_base(size), bench.make_batch(size, 0)
    arms = overhead_arms(tmpl, case, size)
    prof = op_profile([arms[0], arms[-1]], ids, steps, size.r)
    bench.time_rounds(arms, ids, 1 if a.quick else 2, rounds, random.Random(0))
    base_t = arms[0].times
    ops = set(prof["base"]["op_ms"]) | set(prof["ours"]["op_ms"])
    delta = {k: prof["ours"]["op_ms"].get(k, 0.0) - prof["base"]["op_ms"].get(k, 0.0) for k in ops}
    res: dict[str, Any] = {
        "command": " ".join(["python benchmarks/profile_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "variant": a.variant,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rounds": rounds,
        "size": vars(size),
        "versions": {"torch": torch.__version__},
        "profile": prof,
        "op_delta_ms": sorted(delta.items(), key=lambda kv: -kv[1]),
        "ms_per_step": {arm.label: 1e3 * statistics.median(arm.times) for arm in arms},
        "step_s_all": {arm.label: arm.times for arm in arms},
        "overhead": {arm.label: bench._paired(arm.times, base_t) for arm in arms[1:]},
    }
    if a.py_spy:
        res["py_spy"] = run_pyspy(a.variant, a.quick, torch.get_num_threads(), a.spy_steps or (5 if a.quick else 10))
    md = markdown(res)
    print(md)
    out = a.out or bench.HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{a.variant}" + ("_quick" if a.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(md)
    return res


if __name__ == "__main__":
    main()
