"""Mixed-batch inference, lora-lite vs peft: one forward of a batch whose rows use different LoRA adapters.

    ours:  with ll.per_sample(model, names): model(input_ids)
    peft:  peft_model(input_ids, adapter_names=names)

A Llama-style model built from a config (no download), n LoRA adapters (r=8, alpha=16, every linear
projection of every block), identical tensors on both sides (B random, so the adapters differ), a batch
of 32 rows where row i uses adapter i mod n. For n in 2, 8, 32: eval mode, no_grad, one forward per arm
per round in a random order, after warm-up. Reported: the median time per forward, and peft/ours as the
median over rounds of the two arms' ratio in the same round (machine drift cancels). The outputs of
both are compared (max |difference| relative to max |logit|). Our time includes entering the
`per_sample` block (the per-layer row plans); peft builds its row lists inside every layer call too.

    python benchmarks/bench_mixed_batch.py                       # CPU, writes benchmarks/results/bench_mixed_batch.md
    python benchmarks/bench_mixed_batch.py --device cuda --hidden 1024 --layers 4 --rounds 30
    python benchmarks/bench_mixed_batch.py --quick               # tiny, 2 rounds (smoke)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lora_lite as ll  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hidden: int, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(device).eval()


def pair(base, n: int, r: int = 8, alpha: float = 16.0):
    """(ours, peft) with the same n adapters a0..a{n-1}."""
    from peft import LoraConfig, get_peft_model

    pc = LoraConfig(r=r, lora_alpha=alpha, target_modules=MODULES, lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base), pc, adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", pc)
    ours = copy.deepcopy(base)
    cfg = ll.LoraLiteConfig(r=r, alpha=alpha, target_names=tuple(rf"\.{m}$" for m in MODULES))
    for i in range(n):
        ll.attach(ours, cfg, name=f"a{i}")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in pm.base_model.model.named_modules():
            if not hasattr(m, "lora_A") or not isinstance(m.lora_A, torch.nn.ModuleDict):
                continue
            stack = ours.get_submodule(name).lora_lite
            for i in range(n):
                a = f"a{i}"
                m.lora_B[a].weight.copy_(0.02 * torch.randn(m.lora_B[a].weight.shape, generator=g))
                stack[a].lora_A.copy_(m.lora_A[a].weight)
                stack[a].lora_B.copy_(m.lora_B[a].weight)
    return ours.eval(), pm.eval()


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def arms(ours, pm, names: list[str], ids: torch.Tensor):
    """The two timed calls: a per_sample block around our forward, peft's forward with adapter_names."""

    def f_ours():
        with ll.per_sample(ours, names):
            return ours(input_ids=ids).logits

    def f_peft():
        return pm(input_ids=ids, adapter_names=names).logits

    return f_ours, f_peft


def run(args) -> list[dict]:
    base = build(args.hidden, args.layers, args.device)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(2)).to(args.device)
    rows = []
    for n in args.adapters:
        ours, pm = pair(base, n)
        names = [f"a{i % n}" for i in range(args.batch)]

        f_ours, f_peft = arms(ours, pm, names, ids)
        with torch.no_grad():
            a, b = f_ours(), f_peft()
            diff = ((a - b).abs().max() / b.abs().max()).item()
            for _ in range(args.warmup):
                f_ours(), f_peft()
            t = {k: [] for k in ("ours", "peft", "ratio", "ours_cpu", "peft_cpu", "ratio_cpu")}
            for _ in range(args.rounds):
                order = [("ours", f_ours), ("peft", f_peft)]
                random.shuffle(order)
                got = {k: timed(f, args.device) for k, f in order}
                for i, sfx in ((0, ""), (1, "_cpu")):
                    t["ours" + sfx].append(got["ours"][i])
                    t["peft" + sfx].append(got["peft"][i])
                    t["ratio" + sfx].append(got["peft"][i] / got["ours"][i])
        med = {k: statistics.median(v) for k, v in t.items()}
        row = dict(
            adapters=n,
            ours_ms=1e3 * med["ours"],
            peft_ms=1e3 * med["peft"],
            peft_over_ours=med["ratio"],
            ours_cpu_ms=1e3 * med["ours_cpu"],
            peft_cpu_ms=1e3 * med["peft_cpu"],
            peft_over_ours_cpu=med["ratio_cpu"],
            max_rel_diff=diff,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
        del ours, pm
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="2,8,32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="hidden 64, seq 16, 2 rounds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_mixed_batch"))
    args = p.parse_args()
    args.adapters = [int(x) for x in args.adapters.split(",")]
    if args.quick:
        args.hidden, args.seq, args.rounds, args.warmup = 64, 16, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    rows = run(args)
    import peft

    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    head = (
        f"Mixed-batch forward (batch {args.batch}, seq {args.seq}, Llama hidden {args.hidden}, {args.layers} layers, "
        f"LoRA r=8 on every projection, row i uses adapter i mod n), {args.device} ({dev}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, peft {peft.__version__}, median of "
        f"{args.rounds} rounds. `python benchmarks/bench_mixed_batch.py " + " ".join(sys.argv[1:]) + "`"
    )
    lines = [
        "# lora-lite `ll.per_sample` vs peft `adapter_names`",
        "",
        head,
        "",
        "| adapters | ours (ms) | peft (ms) | peft / ours | ours CPU (ms) | peft CPU (ms) | peft / ours (CPU) "
        "| max rel. diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapters']} | {r['ours_ms']:.2f} | {r['peft_ms']:.2f} | {r['peft_over_ours']:.2f}x "
            f"| {r['ours_cpu_ms']:.2f} | {r['peft_cpu_ms']:.2f} | {r['peft_over_ours_cpu']:.2f}x | {r['max_rel_diff']:.1e} |"
        )
    lines += [
        "",
        "Wall time per forward and, next to it, this process's CPU time (`time.process_time`): with `--threads 1` the",
        "CPU time hardly moves when other processes compete for the cores, so on a busy machine it is the number to",
        "trust. Ratios are medians over rounds of the two arms' times in the same round.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
