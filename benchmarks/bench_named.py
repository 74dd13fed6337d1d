"""Several named LoRA adapters on one model: k active adapters, lora-lite vs peft, in one run.

For k = 1, 2, 4 LoRA adapters (rank r each, every projection), both libraries train all k at once:
lora-lite with `ll.set_active(model, names)`, peft with `model.base_model.set_adapter(names)` (its
multiple-active-adapters mode: each LoraLayer sums the active adapters' updates). One more arm per
library has 4 adapters attached and only 1 active: inactive adapters should cost nothing. The frozen
base runs in the same rounds. Timing and ratios as in bench_vs_peft.py (one train step per arm per
round, fresh random order each round, ratios = median over rounds of same-round ratios).

    python benchmarks/bench_named.py                  # full size, writes benchmarks/results/bench_named.{json,md}
    python benchmarks/bench_named.py --quick          # tiny model, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_peft as bv  # noqa: E402

import lora_lite as ll  # noqa: E402

ARMS = [("1 active", 1, 1), ("2 active", 2, 2), ("4 active", 4, 4), ("4 attached, 1 active", 4, 1)]


def build(lib: str, template: torch.nn.Module, size: bv.Size, n: int, active: int) -> bv.Arm:
    names = [f"a{i}" for i in range(n)]
    model = copy.deepcopy(template).train()
    torch.manual_seed(0)
    if lib == "ours":
        for nm in names:
            ll.attach(model, ll.LoraLiteConfig(r=size.r, alpha=size.alpha, target_names=bv.TARGET_RE), name=nm)
        ll.set_active(model, names[:active])
    else:
        from peft import get_peft_model

        model = get_peft_model(model, bv._lora(size), adapter_name=names[0])
        for nm in names[1:]:
            model.add_adapter(nm, bv._lora(size))
        model.base_model.set_adapter(names[:active])
    with torch.no_grad():  # B != 0 so every adapter's full update runs (both libraries skip nothing at B = 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return bv.Arm(lib, f"{n}/{active}", model, opt, 0.0, sum(p.numel() for p in params))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(bv.HERE / "results" / "bench_named"))
    a = ap.parse_args(argv)
    size = bv.QUICK if a.quick else bv.FULL
    rounds = a.rounds or (3 if a.quick else 10)
    if a.threads:
        torch.set_num_threads(a.threads)
    template = bv.make_base(size)
    ids = bv.make_batch(size, 0)
    base = bv.build("base", None, template, size, None)
    arms = {("base", "-"): base}
    for label, n, k in ARMS:
        for lib in ("ours", "peft"):
            arms[(lib, label)] = build(lib, template, size, n, k)
    keys = list(arms)
    bv.time_rounds([arms[k] for k in keys], ids, a.warmup, rounds, random.Random(0))

    def ratio(x: bv.Arm, y: bv.Arm) -> float:
        return statistics.median(p / q for p, q in zip(x.times, y.times, strict=True))

    rows = []
    for label, _n, _k in ARMS:
        o, p = arms[("ours", label)], arms[("peft", label)]
        rows.append(
            {
                "arm": label,
                "ours_ms": 1e3 * statistics.median(o.times),
                "peft_ms": 1e3 * statistics.median(p.times),
                "ours_over_peft": ratio(o, p),
                "ours_over_base": ratio(o, base),
                "peft_over_base": ratio(p, base),
                "trainable": o.trainable,
                "peft_trainable": p.trainable,
            }
        )
    extra1 = rows[0]["ours_over_base"] - 1
    for row in rows:  # the adapters' extra work relative to one active adapter's
        row["ours_extra_vs_1"] = (row["ours_over_base"] - 1) / extra1 if extra1 > 0 else float("nan")
    meta = {"size": vars(size), "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"k LoRA adapters (r={size.r}, every projection), {rounds} rounds, {meta['threads']} threads, "
        f"hidden {size.hidden}, {size.layers} layers, batch {size.batch}x{size.seq}; base step "
        f"{1e3 * statistics.median(base.times):.1f} ms",
        "",
        "| adapters | ours ms | peft ms | ours/peft | ours/base | peft/base | ours extra work vs 1 active |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['ours_ms']:.1f} | {r['peft_ms']:.1f} | {r['ours_over_peft']:.3f} | "
            f"{r['ours_over_base']:.3f} | {r['peft_over_base']:.3f} | {r['ours_extra_vs_1']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
