"""Worker for tests/test_distributed.py: the same tiny-Llama training, single-process or on 2 gloo ranks.

`train(variant, engine, rank, world)` is the one training recipe; the test runs it once in the pytest
process (engine=None, the whole global batch) and `spawn_main` runs it on every rank (engine="ddp" or
"fsdp2", each rank its half of the global batch). Everything a rank wants the test to check goes into a
dict that is `torch.save`d to `<outdir>/rank<k>.pt` (tensors only, read back with weights_only=True).
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from _models import ad, llama_batch, lm_loss, tiny_llama

import lora_lite as ll

ALL_ROLES = ("reader", "writer", "inner")
# r=4 everywhere (HRA needs an even r). Every variant targets all 7 linear layers of each block.
CFG: dict[str, dict] = {v: dict(r=4, alpha=8.0) for v in ("lora", "dora", "hra", "eva", "pissa", "antipasto", "ia3")}
CFG["delora"] = dict(r=4, alpha=8.0)
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 12, 3, 0.5
EVAL_IDS_SEED = 99


def cfg_for(variant: str) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(variant=variant, target_roles=ALL_ROLES, **CFG[variant])


def calibration(rank: int = 0, world: int = 1, n_batches: int = 4) -> list[dict[str, torch.Tensor]]:
    """EVA calibration data, HF-style dicts of 2 sequences whose last 3 tokens are padding: batch i of
    `n_batches` goes to rank i % world (world=1: all of them), as a DistributedSampler would split it."""
    out = []
    for i in range(rank, n_batches, world):
        ids = llama_batch(seed=7 + i, batch=2, seq=SEQ)
        mask = torch.ones_like(ids)
        mask[:, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def step_batch(step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's slice of the global batch of `step` (world=1: the whole global batch)."""
    ids = llama_batch(seed=100 + step, batch=GLOBAL_BATCH, seq=SEQ)
    per = GLOBAL_BATCH // world
    return ids[rank * per : (rank + 1) * per]


def eval_ids() -> torch.Tensor:
    return llama_batch(seed=EVAL_IDS_SEED, batch=2, seq=SEQ)


TWO = "two_adapters"  # pseudo-variant: a fixed lora adapter "frozen" runs under a trained dora "default"


def _two_adapters(model) -> None:
    """Adapter "frozen" (lora, B moved off 0 so it changes the outputs) runs but does not train; "default"
    (dora) trains on top of it: ll.set_active(model, both, trainable="default")."""
    torch.manual_seed(4321)
    ll.attach(model, cfg_for("lora"), name="frozen")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for a in ll.targets(model, "frozen").values():
            a.lora_B.copy_(0.1 * torch.randn(a.lora_B.shape, generator=g))
    torch.manual_seed(1234)
    ll.attach(model, cfg_for("dora"))
    ll.set_active(model, ["frozen", "default"], trainable="default")


def attached_model(variant: str, rank: int = 0, world: int = 1, calibration_data=None):
    """The same base and the same adapter init on every rank (same seeds) -- attach BEFORE wrapping.

    eva: each rank calibrates on its own shard of `calibration()` unless `calibration_data` is given.
    """
    model = tiny_llama()
    if variant == TWO:
        _two_adapters(model)
        return model
    torch.manual_seed(1234)  # adapter init (kaiming A, HRA's U) is identical on every rank
    if variant == "eva" and calibration_data is None:
        calibration_data = calibration(rank, world)
    ll.attach(model, cfg_for(variant), calibration_data=calibration_data)
    return model


def shard(model, mesh, ignored: bool = True) -> None:
    """FSDP2: each decoder layer is its own unit, then the root (embeddings, norm, lm_head).

    As the README says: `ignored_params=ll.fsdp_ignored_params(model)` (delora's 0-dim λ; empty otherwise).
    `ignored=False`: plain `fully_shard`, which refuses 0-dim parameters."""
    from torch.distributed.fsdp import fully_shard

    kw = {"ignored_params": ll.fsdp_ignored_params(model)} if ignored else {}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every adapter's live tensors, keyed "<adapter>/<layer path>.<tensor>"."""
    return {f"{n}/{k}": v for n in ll.adapters(model) for k, v in ll.adapter_state_dict(model, n).items()}


def full_state(model) -> dict[str, torch.Tensor]:
    """The adapter tensors as full plain tensors (`full_tensor()` all-gathers FSDP2 shards: collective)."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in adapter_tensors(model).items()
    }


def train(variant: str, engine: str | None = None, rank: int = 0, world: int = 1, mesh=None):
    """STEPS of plain SGD on the LM loss; return (the model as trained, possibly wrapped; the bare model).

    SGD, not Adam: Adam's first step is ~lr·sign(g), which turns a 1-ulp difference in a near-zero
    gradient into a difference of lr; SGD keeps reduction-order noise at rounding level.
    """
    model = attached_model(variant, rank, world)
    model.train()
    wrapped = model
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    elif engine == "fsdp2":
        shard(model, mesh)
    elif engine is not None:
        raise ValueError(engine)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        loss = lm_loss(wrapped, step_batch(step, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return wrapped, model


def scalar_grads(rank: int = 0, world: int = 1, mesh=None) -> dict[str, torch.Tensor]:
    """delora's 0-dim λ gradients after 2 backward passes (accumulated, as with gradient accumulation) on
    batches 0 and 1, this rank's slice of them: under FSDP2 (`mesh` given, with `ll.fsdp_ignored_params`),
    else in this process alone (world=1: the whole batches)."""
    model = attached_model("delora", rank, world)
    model.train()
    torch.manual_seed(5)
    with torch.no_grad():  # B != 0, or λ has no gradient yet (the update is λ·(…)·Bᵀ)
        for layer in ll.targets(model).values():
            ad(layer).lora_B.normal_(std=0.1)
    if mesh is not None:
        shard(model, mesh)
    for step in range(2):
        lm_loss(model, step_batch(step, rank, world)).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.dim() == 0}


# ---------------------------------------------------------------- what each rank runs


def _count_writes():
    """Count safetensors writes on this rank (ll.save imports save_file at call time)."""
    import safetensors.torch as st

    calls = []
    real = st.save_file

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    st.save_file = counting
    return calls


def _run_rank(rank: int, world: int, outdir: Path, variants: list[str]) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    res: dict[str, torch.Tensor] = {}
    refused: dict[str, str] = {}
    writes = _count_writes()
    for v in variants:
        for engine in ("ddp", "fsdp2"):
            try:
                wrapped, model = train(v, engine, rank, world, mesh)
            except ValueError as e:  # e.g. fully_shard refusing a parameter: before any collective, on every rank
                refused[f"{v}/{engine}"] = f"{type(e).__name__}: {e}"
                continue
            for k, t in full_state(model).items():
                res[f"{v}/{engine}/{k}"] = t
            if engine == "fsdp2":
                with torch.no_grad():
                    res[f"{v}/fsdp2/logits"] = wrapped(eval_ids()).logits.detach().clone()
                before = len(writes)
                for n in ll.adapters(model):  # every rank calls save: the all-gather is collective
                    ll.save(model, outdir / (f"{v}.safetensors" if n == "default" else f"{v}.{n}.safetensors"), name=n)
                res[f"{v}/fsdp2/save_writes"] = torch.tensor(len(writes) - before)
                # the files are complete on every rank once save returns: load them BEFORE sharding, then shard
                fresh = tiny_llama()
                for n in ll.adapters(model):
                    ll.load(fresh, outdir / (f"{v}.safetensors" if n == "default" else f"{v}.{n}.safetensors"))
                shard(fresh, mesh)
                with torch.no_grad():
                    res[f"{v}/fsdp2/loaded_logits"] = fresh(eval_ids()).logits.detach().clone()
    if "delora" in variants:  # without fsdp_ignored_params: torch refuses λ before any collective
        try:
            shard(attached_model("delora", rank, world), mesh, ignored=False)
        except ValueError as e:
            refused["delora/fsdp2-plain"] = f"{type(e).__name__}: {e}"
        for k, g in scalar_grads(rank, world, mesh).items():
            res[f"delora/fsdp2/grad/{k}"] = g
    if "eva" in variants:  # A right after attach: from this rank's shard (summed over ranks), and from all data
        for case, calib in (("shard", calibration(rank, world)), ("same", calibration())):
            model = attached_model("eva", calibration_data=calib)
            for k, t in ll.adapter_state_dict(model).items():
                res[f"eva/{case}/{k}"] = t.detach().clone()
    (outdir / f"rank{rank}.refused.json").write_text(json.dumps(refused))
    return res


def spawn_main(rank: int, world: int, port: int, outdir: str, variants: list[str]) -> None:
    """torch.multiprocessing.spawn entry point: gloo on 127.0.0.1:port, CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    out = Path(outdir)
    # a short timeout: if one rank fails, the other must not wait 30 minutes in a collective
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        res = _run_rank(rank, world, out, variants)
        torch.save(res, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
