"""Smoke tests of benchmarks/bench_vs_peft.py, fused_ceiling.py and profile_step.py --quick: they run end to end and write complete results.

No timing assertions (timings on a shared CI machine mean nothing); only that every field is there,
finite and consistent (same trainable-parameter count as peft, ratios = medians of the per-round quotients
of the times).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_peft.py"
FUSED = BENCH.with_name("fused_ceiling.py")
PROFILE = BENCH.with_name("profile_step.py")


def _load(path: Path = BENCH):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_writes_complete_results(tmp_path) -> None:
    bench = _load()
    argv = ["--quick", "--variants", "lora,pissa,pissa_nokeep", "--rounds", "2", "--warmup", "1", "--threads", "1"]
    bench.main([*argv, "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_vs_peft_quick.json").read_text())
    assert (tmp_path / "bench_vs_peft_quick.md").read_text().count("| lora |") == 1
    assert (tmp_path / "bench_vs_peft_quick.png").stat().st_size > 0
    for key in ("size", "rounds", "threads", "machine", "base", "variants", "pissa_fast_init", "steal"):
        assert key in res, key
    for share in res["steal"].values():  # None off Linux
        assert share is None or 0 <= share <= 1
    assert {"torch", "peft", "processor"} <= set(res["machine"])
    base = res["base"]
    assert base["step_s"] > 0 and base["trainable"] == 0 and base["peak_mb"] > 0
    assert len(base["step_s_all"]) == 2
    assert [v["variant"] for v in res["variants"]] == ["lora", "pissa", "pissa_nokeep"]
    pissa, nokeep = (v for v in res["variants"] if v["variant"].startswith("pissa"))
    # keep_original=False keeps nothing to restore the base: below the default's peak, and at peft's
    # (the allocator's byte counts are deterministic; 10 KiB of slack for Python-side allocations)
    assert nokeep["ours"]["peak_mb"] < pissa["ours"]["peak_mb"]
    assert nokeep["ours"]["peak_mb"] <= nokeep["peft"]["peak_mb"] + 0.01
    for v in res["variants"]:
        ours, peft = v["ours"], v["peft"]
        for row in (ours, peft):
            for k in ("step_s", "init_s", "trainable", "peak_mb", "step_vs_base", "extra_mb_vs_base"):
                assert math.isfinite(row[k]), (v["variant"], k)
            per_round = [a / b for a, b in zip(row["step_s_all"], base["step_s_all"], strict=True)]
            assert math.isclose(row["step_vs_base"], statistics.median(per_round))
            assert row["peak_mb"] > 0 and row["trainable"] > 0
        assert ours["trainable"] == peft["trainable"], v["variant"]  # same adapter size in both libraries
        per_round = [a / b for a, b in zip(ours["step_s_all"], peft["step_s_all"], strict=True)]
        assert math.isclose(v["ours_vs_peft_step"], statistics.median(per_round))
        assert math.isclose(v["ours_vs_peft_peak"], ours["peak_mb"] / peft["peak_mb"])
    (pz,) = res["pissa_fast_init"]  # --quick: only on the benchmark's own model
    for lib in ("ours", "peft"):
        assert 0 <= pz[f"{lib}_fast_rel_err_median"] <= pz[f"{lib}_fast_rel_err"] < 2
        assert 0 < pz[f"{lib}_fast_energy"] <= pz[f"{lib}_fast_energy_median"] <= 1.0 + 1e-4


def test_fused_ceiling_prototype_matches_lora_lite_and_reports(tmp_path) -> None:
    fc = _load(FUSED)
    res = fc.main(["--quick", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)])
    assert res["check_worst_rel_grad_diff"] < 1e-5  # same math as lora-lite, to fp32 rounding (seen: 4e-7)
    assert json.loads((tmp_path / "fused_ceiling_quick.json").read_text())["over_base"] == res["over_base"]
    assert (tmp_path / "fused_ceiling_quick.md").read_text().count("| fused |") == 1
    times = res["step_s_all"]
    assert set(times) == {"base", "ours", "peft", "fused"} and all(len(v) == 2 for v in times.values())
    for k, r in res["over_base"].items():
        assert math.isclose(r, statistics.median(a / b for a, b in zip(times[k], times["base"], strict=True)))


def test_fused_ceiling_check_catches_a_wrong_prototype(monkeypatch) -> None:
    fc = _load(FUSED)
    right = fc._FusedLoRA.backward

    def wrong(ctx, g):  # A's gradient off by a factor 2
        gx, gA, gB, *rest = right(ctx, g)
        return gx, 2 * gA, gB, *rest

    monkeypatch.setattr(fc._FusedLoRA, "backward", staticmethod(wrong))
    assert fc.check(fc.bench.QUICK) > 0.4


def test_profile_step_attributes_ops_and_times_the_hook_path(tmp_path) -> None:
    import lora_lite as ll

    ps = _load(PROFILE)
    argv = ["--quick", "--steps", "1", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)]
    res = ps.main(argv)
    assert json.loads((tmp_path / "profile_lora_quick.json").read_text())["overhead"] == res["overhead"]
    assert "| forward |" in (tmp_path / "profile_lora_quick.md").read_text()
    base, ours = res["profile"]["base"], res["profile"]["ours"]
    for p in (base, ours):  # (--steps 1: the medians are that step's numbers, so the parts add up)
        assert math.isclose(p["total_ms"], sum(p["phase_ms"].values()))
        assert math.isclose(p["total_ms"], sum(p["op_ms"].values()), rel_tol=1e-6)
        assert p["op_ms"]["aten::mm"] > 0 and list(p["op_ms"].values()) == sorted(p["op_ms"].values(), reverse=True)
    # the r-sized matmuls are the adapter's: none in the base, forward and backward ones with LoRA
    assert sum(base["lowrank_matmul_ms"].values()) == 0
    assert ours["lowrank_matmul_ms"]["forward"] > 0 and ours["lowrank_matmul_ms"]["backward"] > 0
    assert "optimizer" not in base["phase_ms"] and ours["phase_ms"]["optimizer"] > 0
    times = res["step_s_all"]
    assert set(times) == {"base", "noop_hook", "null_variant", "ours"} and all(len(v) == 2 for v in times.values())
    for k, r in res["overhead"].items():
        assert math.isclose(r, statistics.median(a / b for a, b in zip(times[k], times["base"], strict=True)))
    assert ps._NullVariant.name not in ll.REGISTRY  # registered only for its own attach


def test_profile_step_lowrank_classifier() -> None:
    ps = _load(PROFILE)
    assert ps._is_lowrank("aten::mm", [[1024, 512], [512, 8]], 8)
    assert ps._is_lowrank("aten::addmm", [[1024, 512], [1024, 8], [8, 512], [], []], 8)
    assert not ps._is_lowrank("aten::mm", [[1024, 512], [512, 512]], 8)
    assert not ps._is_lowrank("aten::mul", [[1024, 8], [1024, 8]], 8)  # not a matmul
    assert not ps._is_lowrank("aten::mm", [[8], [8]], 8)  # no matrix operand


def test_profile_step_parses_py_spy_samples() -> None:
    ps = _load(PROFILE)
    raw = "\n".join(
        [
            "<module> (train.py:1);forward (torch/nn/modules/module.py:9);at::native::mm (libtorch_cpu.so) 70",
            "<module> (train.py:1);_forward_hook (lora_lite/adapter.py:104);forward (lora_lite/variants/lora.py:40);"
            "at::native::addmm (libtorch_cpu.so) 20",
            "<module> (train.py:1);_forward_hook (lora_lite/adapter.py:104) 6",
            "<module> (train.py:1);backward (lora_lite/variant.py:218);mm (libtorch_cpu.so) 4",
            "a truncated line",
        ]
    )
    spy = ps.parse_pyspy(raw)
    assert spy["samples"] == 100
    assert math.isclose(spy["under_lora_lite"], 0.30)
    assert math.isclose(spy["lora_lite_interpreter"], 0.06)
    assert math.isclose(spy["lora_lite_torch_ops"], 0.24)
    assert spy["top_lines"][0] == ["forward (lora_lite/variants/lora.py:40)", 0.20]
    assert math.isnan(ps.parse_pyspy("")["under_lora_lite"])
    loop = ps.parse_pyspy(
        raw.replace("<module> (train.py:1);_forward_hook", "_train_loop (p.py:9);_forward_hook"), "_train_loop ("
    )
    assert loop["samples"] == 26 and math.isclose(loop["under_lora_lite"], 1.0)  # only the samples in the loop
    assert math.isclose(loop["lora_lite_interpreter"], 6 / 26)


@pytest.mark.slow
def test_profile_step_py_spy_end_to_end(tmp_path) -> None:
    import shutil

    if shutil.which("py-spy") is None:
        pytest.skip("py-spy is not installed")
    ps = _load(PROFILE)
    spy = ps.run_pyspy("lora", quick=True, threads=1, steps=60)  # tiny steps: enough of them to be sampled
    assert spy["samples"] >= 10 and 0 < spy["under_lora_lite"] < 1 and spy["rate"] == 50
    assert math.isclose(spy["under_lora_lite"], spy["lora_lite_interpreter"] + spy["lora_lite_torch_ops"])


@pytest.mark.slow  # inductor compiles C++ with gcc: minutes on 2 cores
def test_quick_benchmark_compiled(tmp_path) -> None:
    bench = _load()
    argv = ["--quick", "--compile", "--variants", "lora", "--rounds", "2", "--warmup", "1", "--threads", "1"]
    bench.main([*argv, "--no-plot", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_vs_peft_quick_compile.json").read_text())
    assert res["compile"] is True and "torch.compile" in (tmp_path / "bench_vs_peft_quick_compile.md").read_text()
    (row,) = res["variants"]
    assert math.isfinite(row["ours"]["step_vs_base"]) and math.isfinite(row["ours_vs_peft_step"])


def test_named_adapters_benchmark_quick(tmp_path) -> None:
    """bench_named.py: k active adapters train k adapters' parameters in both libraries (same counts as peft)."""
    bench = _load(BENCH.with_name("bench_named.py"))
    bench.main(["--quick", "--rounds", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "bn")])
    res = json.loads((tmp_path / "bn.json").read_text())
    rows = {r["arm"]: r for r in res["rows"]}
    one = rows["1 active"]["trainable"]
    assert one > 0
    for arm, k in (("1 active", 1), ("2 active", 2), ("4 active", 4), ("4 attached, 1 active", 1)):
        assert rows[arm]["trainable"] == rows[arm]["peft_trainable"] == k * one, arm
        assert all(math.isfinite(rows[arm][f]) for f in ("ours_ms", "peft_ms", "ours_over_peft", "ours_over_base"))
    assert (tmp_path / "bn.md").read_text().count("| 4 active |") == 1
