"""How fast could LoRA be without hooks? A fused-module prototype, timed beside lora-lite, peft and the frozen base.

Issue 6 asks for every variant at most 1.10x the frozen base. On the 2-core CPU our LoRA hook costs
about 1.13x (peft about 1.20x). This script measures the ceiling of the one design that saves more
memory passes than hooks can: a module that owns the base GEMM. SPEC rules it out ("no module
replacement"), so it lives here, as a measurement, not in the library.

The trick: one buffer per layer holds the frozen weight and both factors,

    buf = [[W (d_out, d_in), B (d_out, r)],
           [A (r, d_in),     unused     ]]        (d_out + r, d_in + r), fp32

so that both passes are single GEMMs over strided views of it:

    forward   x · buf[:, :d_in]ᵀ = [x Wᵀ | x Aᵀ]       then  y += s·(x Aᵀ) Bᵀ   (in place)
    backward  g · buf[:d_out, :] = [g W | g B]         then  g_x += s·(g B) A   (in place)

With hooks, x Aᵀ and g B are extra reads of the (tokens, d) activations, and the adapter's input
gradient is a separate tensor that autograd adds to the base's. The fused module removes those three
passes; what stays is the same as ours (y += h Bᵀ, Bᵀ's and A's gradients, the optimizer).

    python benchmarks/fused_ceiling.py --rounds 40 --threads 2     # full size, ~1.5 minutes
    python benchmarks/fused_ceiling.py --quick                     # tiny model, seconds

Before timing, the prototype is checked against lora-lite on the tiny model: same loss and the same
gradients for every lora_A / lora_B (to fp32 rounding), so both arms compute the same thing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_lite as ll

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_peft as bench  # noqa: E402  (the same model, batch, arms and step as the main benchmark)


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, A, B, buf, s: float):  # noqa: ANN001, ANN205
        d_out, d_in = B.shape[0], A.shape[1]
        out = x2.mm(buf[:, :d_in].t())  # (n, d_out + r) = [x Wᵀ | x Aᵀ]
        y, h = out[:, :d_out], out[:, d_out:] * s  # h = s·x Aᵀ
        y.addmm_(h, B.t())
        ctx.save_for_backward(x2, h)
        ctx.buf, ctx.s = buf, s
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x2, h = ctx.saved_tensors
        buf, s = ctx.buf, ctx.s
        d_in, d_out = x2.shape[1], g.shape[1]
        gout = g.mm(buf[:d_out, :])  # (n, d_in + r) = [g W | g B]
        gx, gh = gout[:, :d_in], gout[:, d_in:] * s  # gh = dL/d(x Aᵀ)
        gx.addmm_(gh, buf[d_out:, :d_in])  # + s·(g B) A
        return gx, gh.t().mm(x2), h.t().mm(g).t(), None, None


class FusedLoRALinear(nn.Module):
    """Replaces an nn.Linear: W, A and B are views of one buffer (see the module docstring)."""

    def __init__(self, lin: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        d_out, d_in = lin.weight.shape
        buf = torch.zeros(d_out + r, d_in + r, dtype=lin.weight.dtype)
        with torch.no_grad():
            buf[:d_out, :d_in] = lin.weight
            nn.init.kaiming_uniform_(buf[d_out:, :d_in], a=math.sqrt(5))
        self.buf, self.s, self.d_in, self.d_out = buf, alpha / r, d_in, d_out
        self.weight = nn.Parameter(buf[:d_out, :d_in], requires_grad=False)
        self.lora_A = nn.Parameter(buf[d_out:, :d_in])
        self.lora_B = nn.Parameter(buf[:d_out, d_in:])  # zeros: identity at init, as LoRA
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FusedLoRA.apply(x.reshape(-1, self.d_in), self.lora_A, self.lora_B, self.buf, self.s)
        y = y.view(*x.shape[:-1], self.d_out)
        return y if self.bias is None else y + self.bias


def fuse(model: nn.Module, names: tuple[str, ...], r: int, alpha: float) -> nn.Module:
    """Swap every nn.Linear child called one of `names` for a FusedLoRALinear; train only lora_A / lora_B."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                setattr(parent, child_name, FusedLoRALinear(child, r, alpha))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def check(size: bench.Size, seed: int = 0) -> float:
    """Worst relative gradient difference between the prototype and lora-lite on one batch (same A, B ≠ 0)."""
    torch.manual_seed(seed)
    tmpl, ids = bench.make_base(size), bench.make_batch(size, seed)
    ours = copy.deepcopy(tmpl)
    ll.attach(ours, bench.ours_cfg(bench.CASES[0], size))
    fused = fuse(copy.deepcopy(tmpl), bench.PROJ, size.r, size.alpha)
    with torch.no_grad():
        for name, layer in ll.targets(ours).items():
            nn.init.normal_(layer.lora_B, std=0.02)
            fused.get_submodule(name).lora_A.copy_(layer.lora_A)
            fused.get_submodule(name).lora_B.copy_(layer.lora_B)
    losses = [m(input_ids=ids, labels=ids).loss for m in (ours, fused)]
    for loss in losses:
        loss.backward()
    if not torch.allclose(losses[0], losses[1], rtol=1e-5, atol=0):
        raise AssertionError(f"fused prototype's loss {losses[1].item()} != lora-lite's {losses[0].item()}")
    worst = 0.0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            q = fused.get_parameter(name.replace(".lora_lite.default.", "."))
            worst = max(worst, ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item())
    return worst


def markdown(res: dict[str, Any]) -> str:
    ms, ob, size = res["ms_per_step"], res["over_base"], res["size"]
    v = res["versions"]
    return (
        f"_Generated by `{res['command']}`; torch {v['torch']}, peft {v['peft']}._\n\n"
        f"LoRA r={size['r']}, Llama h{size['hidden']} x{size['layers']}, batch {size['batch']}x{size['seq']}, fp32, "
        f"{res['threads']} thread(s), median of {res['rounds']} interleaved rounds (paired ratios).\n\n"
        "| arm | ms/step | / frozen base |\n|---|---:|---:|\n"
        f"| frozen base | {ms['base']:.1f} | 1 |\n"
        + "".join(f"| {k} | {ms[k]:.1f} | {ob[k]:.3f} |\n" for k in ("ours", "peft", "fused"))
        + f"\nfused / ours: {res['fused_over_ours']:.3f}; prototype vs lora-lite gradients: "
        f"{res['check_worst_rel_grad_diff']:.1e} relative.\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    size = bench.QUICK if a.quick else bench.FULL
    rounds = a.rounds if a.rounds is not None else (3 if a.quick else 20)
    if a.threads:
        torch.set_num_threads(a.threads)
    worst = check(bench.QUICK)
    if worst > 1e-4:
        raise AssertionError(f"fused prototype's gradients differ from lora-lite's by {worst:.2e} (relative)")

    tmpl, ids = bench.make_base(size), bench.make_batch(size, 0)
    lora = bench.CASES[0]
    arms = {
        label: bench.build(label, None if label == "base" else lora, tmpl, size, None)
        for label in ("base", "ours", "peft")
    }
    fused = fuse(copy.deepcopy(tmpl).train(), bench.PROJ, size.r, size.alpha)
    params = [p for p in fused.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    arms["fused"] = bench.Arm("fused", "lora", fused, opt, 0.0, sum(p.numel() for p in params))
    bench.time_rounds(list(arms.values()), ids, 1 if a.quick else 2, rounds, random.Random(0))
    times = {k: arm.times for k, arm in arms.items()}

    def ratio(k: str, ref: str) -> float:
        return bench._paired(times[k], times[ref])

    res = {
        "command": " ".join(["python benchmarks/fused_ceiling.py", *(sys.argv[1:] if argv is None else argv)]),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "size": vars(size),
        "versions": {"torch": torch.__version__, "peft": _version("peft")},
        "check_worst_rel_grad_diff": worst,
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "step_s_all": times,
        "over_base": {k: ratio(k, "base") for k in arms if k != "base"},
        "fused_over_ours": ratio("fused", "ours"),
    }
    md = markdown(res)
    print(md)
    out = a.out or bench.HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "fused_ceiling_quick" if a.quick else "fused_ceiling"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(md)
    return res


if __name__ == "__main__":
    main()
