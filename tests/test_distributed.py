"""DDP and FSDP2 on 2 CPU processes (gloo) give the single-process result; FSDP2 save/load; eva (issue 8).

One start of 2 ranks (module fixture `ranks`) runs every case of `_dist_worker._run_rank`; the tests
compare what the ranks recorded with the same recipe run here in one process on the whole global batch.
The ranks are forked where the platform allows it: they inherit the already imported torch and
transformers and start in about a second instead of re-importing them (~10 s each on 2 busy cores).

Tolerance: the single-process and distributed runs do the same fp32 math on the same data; the only
difference is the order of float additions (the gradient is the mean of two half-batch means, summed by
an all-reduce / reduce-scatter, instead of one mean over the whole batch; 1 vs 2 threads in matmuls;
eva's float64 statistics summed over ranks). That is a few ulps of each tensor's scale per step, and
3 plain SGD steps keep it there, so we require max|dist - single| <= 1e-5·max|single| + 1e-6 per tensor
(measured: <= 5e-7·max|single|, i.e. >= 20x headroom), while each test also asserts that what it
compares moved by far more than that (without eva's sum over ranks, its A is off by ~0.9).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _dist_worker import TWO, adapter_tensors, attached_model, calibration, eval_ids, scalar_grads, spawn_main, train
from _models import ad, tiny_llama

import lora_lite as ll

WORLD = 2
VARIANTS = ["lora", "dora", "hra", "eva", "pissa", "antipasto", "ia3", "delora"]
REGISTERED = [v for v in VARIANTS if v in ll.REGISTRY] + [TWO]
ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registered(v: str) -> str:
    if v not in ll.REGISTRY and v != TWO:
        pytest.skip(f"variant {v!r} is not registered")
    return v


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in adapter_tensors(model).items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict[str, torch.Tensor]], Path]:
    """Run the 2 ranks once; return what each recorded and the folder they saved adapters to."""
    out = tmp_path_factory.mktemp("dist")
    tiny_llama()  # import transformers' Llama here, so forked ranks inherit it
    method = "fork" if sys.platform == "linux" else "spawn"
    args = (WORLD, _free_port(), str(out), REGISTERED)
    mp.start_processes(spawn_main, args=args, nprocs=WORLD, join=True, start_method=method)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        results[r]["refused"] = json.loads((out / f"rank{r}.refused.json").read_text())
    return results, out


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, torch.Tensor]]:
    """The reference: the same recipe in this process, on the whole global batch (eva: all calibration data)."""
    res = {}
    for v in REGISTERED:
        _, model = train(v)
        res[v] = _adapter(model)
        with torch.no_grad():
            res[v]["logits"] = model.eval()(eval_ids()).logits
    return res


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """max|got - want| <= RTOL·max|want| + ATOL: summation-order error scales with the tensor, not the element."""
    err, bound = (got - want).abs().max().item(), RTOL * want.abs().max().item() + ATOL
    assert err <= bound, f"{what}: max abs difference {err:.3g} > {bound:.3g}"


def _refused(results, v: str, engine: str) -> None:
    """Every variant trains under both engines (FSDP2 with `ll.fsdp_ignored_params`): any refusal fails."""
    why = results[0]["refused"].get(f"{v}/{engine}")
    if why is not None:
        pytest.fail(f"{v} under {engine}: {why}")


def test_plain_fully_shard_refuses_delora_lambda(ranks) -> None:
    """Why `ll.fsdp_ignored_params` exists: without it, fully_shard refuses delora's 0-dim λ. If a torch
    release lifts that, this fails, and the README's FSDP2 note (and maybe the helper) can go."""
    _registered("delora")
    results, _ = ranks
    for res in results:
        why = res["refused"].get("delora/fsdp2-plain")
        assert why is not None and "scalar" in why, why


def test_fsdp2_averages_delora_lambda_gradients(ranks) -> None:
    """`ll.fsdp_ignored_params`: FSDP2 leaves λ whole and unreduced; its hook averages λ's gradient over the
    ranks, after each of 2 accumulated backward passes, to the one-process gradient on the global batch.
    Tolerance: RTOL of the largest |grad| (summation order only; measured <= 1.2e-6 of each value). Without
    the averaging each rank keeps its half-batch gradient, off by 37-400% here (checked below)."""
    _registered("delora")
    results, _ = ranks
    want = scalar_grads()
    assert len(want) == 14 and all(torch.count_nonzero(g) for g in want.values())  # 7 layers x 2 blocks, all moved
    keys = sorted(want)
    w = torch.stack([want[k] for k in keys])
    bound = RTOL * w.abs().max().item()
    for r, res in enumerate(results):
        got = torch.stack([res[f"delora/fsdp2/grad/{k}"] for k in keys])
        assert torch.equal(got, torch.stack([results[0][f"delora/fsdp2/grad/{k}"] for k in keys])), f"rank {r}"
        assert (got - w).abs().max().item() <= bound, f"rank {r}: {(got - w).abs().max().item():.3g} > {bound:.3g}"
    half = torch.stack([g for _, g in sorted(scalar_grads(0, WORLD).items())])
    assert (half - w).abs().max().item() > 100 * bound  # rank 0's own gradient: the check can fail


def _check_engine(ranks, single, v: str, engine: str) -> None:
    results, _ = ranks
    _refused(results, v, engine)
    ref, init = single[v], _adapter(attached_model(v))
    moved = max((ref[k] - init[k]).abs().max().item() for k in init)
    assert moved > 100 * ATOL, f"{v}: training barely moved the adapter ({moved}); the test would prove nothing"
    for r, res in enumerate(results):
        for k in init:
            _close(res[f"{v}/{engine}/{k}"], ref[k], f"{k} on rank {r}")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_adapters_one_frozen_train_as_in_one_process(ranks, single, engine) -> None:
    """Named adapters under DDP / FSDP2: a fixed lora adapter runs under a dora adapter that trains on top of
    it (set_active(..., trainable="default")). The trained one matches the single-process run; the frozen one
    is bit for bit its init on every rank; both save (one file each) and load back to the sharded outputs."""
    results, out = ranks
    _check_engine(ranks, single, TWO, engine)
    init = _adapter(attached_model(TWO))
    frozen = [k for k in init if k.startswith("frozen/")]
    assert frozen and any(k.startswith("default/") for k in init)
    for res in results:
        for k in frozen:
            assert torch.equal(res[f"{TWO}/{engine}/{k}"], init[k]), k
    if engine == "fsdp2":
        assert [int(res[f"{TWO}/fsdp2/save_writes"]) for res in results] == [2, 0]
        for res in results:
            _close(res[f"{TWO}/fsdp2/loaded_logits"], results[0][f"{TWO}/fsdp2/logits"], "two adapters reloaded")


@pytest.mark.parametrize("v", VARIANTS)
def test_ddp_matches_single_process(ranks, single, v) -> None:
    _check_engine(ranks, single, _registered(v), "ddp")


@pytest.mark.parametrize("v", VARIANTS)
def test_fsdp2_matches_single_process(ranks, single, v) -> None:
    """fully_shard per decoder layer, then the root; lora_* tensors are DTensor shards of dim 0."""
    _check_engine(ranks, single, _registered(v), "fsdp2")


@pytest.mark.parametrize("v", VARIANTS)
def test_fsdp2_save_writes_once_and_reloads(ranks, single, v) -> None:
    """ll.save under FSDP2: rank 0 writes the gathered adapter, rank 1 nothing; ll.load before fully_shard
    reproduces the trained sharded model on every rank, and ll.load in one process reproduces it too."""
    v = _registered(v)
    results, out = ranks
    _refused(results, v, "fsdp2")
    assert [int(res[f"{v}/fsdp2/save_writes"]) for res in results] == [1, 0]
    mine = [p.name for p in out.iterdir() if p.name.lstrip(".").startswith(f"{v}.safetensors")]
    assert mine == [f"{v}.safetensors"]  # no temp file (.<name>.*.tmp) left
    trained = results[0][f"{v}/fsdp2/logits"]
    for res in results:
        torch.testing.assert_close(res[f"{v}/fsdp2/logits"], trained, rtol=0, atol=0)  # one model, all ranks
        _close(res[f"{v}/fsdp2/loaded_logits"], trained, "loaded then sharded")
    model = tiny_llama()
    ll.load(model, out / f"{v}.safetensors")
    with torch.no_grad():
        logits = model(eval_ids()).logits
        base = tiny_llama()(eval_ids()).logits
    _close(logits, trained, "loaded in one process vs trained under FSDP2")
    _close(logits, single[v]["logits"], "loaded in one process vs trained in one process")
    assert (base - trained).abs().max() > 100 * ATOL  # the adapter changes the outputs: the checks can fail


def test_eva_sums_calibration_statistics_over_ranks(ranks) -> None:
    """Each rank calibrates on its own shard; A is that of all the data, identical on every rank.
    And every rank passing the same (whole) data gives that A too (duplicated rows: same directions)."""
    _registered("eva")
    results, _ = ranks
    everything = _adapter(attached_model("eva", calibration_data=calibration()))
    shard0 = _adapter(attached_model("eva", calibration_data=calibration(0, WORLD)))
    a_keys = [k for k in everything if k.endswith("lora_A")]
    assert a_keys
    for k in a_keys:
        assert (everything[k] - shard0[k]).abs().max() > 100 * ATOL, k  # rank 0's shard alone gives another A
        for case in ("shard", "same"):
            key = f"eva/{case}/{k.removeprefix('default/')}"
            torch.testing.assert_close(results[1][key], results[0][key], rtol=0, atol=0)
            _close(results[0][key], everything[k], f"{case}: {k}")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_train_ddp_example_runs(tmp_path) -> None:
    """The documented command, `torchrun --nproc_per_node 2 examples/train_ddp.py`, on CPU with gloo."""
    out = tmp_path / "adapter.safetensors"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += [str(ROOT / "examples" / "train_ddp.py"), "--steps", "3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduces outputs exactly: True" in p.stdout, p.stdout
    assert out.is_file()


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group in this process (HashStore: no port), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_fsdp_ignored_params_needs_an_adapter_and_a_process_group() -> None:
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter on this model; call ll.attach"):
        ll.fsdp_ignored_params(tiny_llama())
    with pytest.raises(ll.AdapterError, match="torch.distributed is not initialized; call dist.init_process_group"):
        ll.fsdp_ignored_params(attached_model(_registered("delora")))


def test_fsdp_ignored_params_returns_the_0dim_tensors_and_hooks_them_once(one_rank_group) -> None:
    dist = one_rank_group
    assert ll.fsdp_ignored_params(attached_model(_registered("lora"))) == set()
    model = attached_model(_registered("delora"))
    lambdas = {ad(layer).lora_lambda for layer in ll.targets(model).values()}
    assert len(lambdas) == 14
    assert ll.fsdp_ignored_params(model) == lambdas
    assert ll.fsdp_ignored_params(model) == lambdas  # again: same set, no second hook
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in lambdas)
    with pytest.raises(ll.AdapterError, match=r"q_proj\.lora_lambda already averages its gradient over another"):
        ll.fsdp_ignored_params(model, group=dist.new_group([0]))
    frozen = attached_model("delora")
    for p in (ad(layer).lora_lambda for layer in ll.targets(frozen).values()):
        p.requires_grad_(False)
    got = ll.fsdp_ignored_params(frozen)  # still refused by fully_shard, so still returned; nothing to average
    assert len(got) == 14 and not any(p._post_accumulate_grad_hooks for p in got)
