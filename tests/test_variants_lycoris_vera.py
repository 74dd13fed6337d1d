"""loha, lokr, vera against peft 0.21.2: parity (forward, gradients, 10 AdamW steps), options, import/export, errors.

Parity runs through test_parity_peft's harness on the tiny Llama (GQA) and the tiny GPT-2 (biased Conv1D
projections; peft's LoHa/LoKr reject Conv1D, so peft runs on the nn.Linear twin there, ours on the Conv1D).
"""

from __future__ import annotations

import json
import warnings

import pytest
import test_parity_peft as tpp
import torch
from _models import ad, llama_batch, tiny_llama
from _parity import TARGETS, Case, base_model, batches, output, peft_pairs, rel_err

import lora_lite as ll
from lora_lite.variants.lokr import factorization

peft = pytest.importorskip("peft")

_one_thread = tpp._one_thread  # (autouse fixture: tiny matrices, one intra-op thread)
ALL = ("reader", "writer", "inner")


def _same(t):
    return t


def map_loha(pl) -> dict:
    return {f"lora_{n}": (getattr(pl, f"hada_{n}")["default"], _same) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}


def map_lokr(pl) -> dict:
    names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
    return {
        f"lora_{n}": (getattr(pl, f"lokr_{n}")["default"], _same)
        for n in names
        if "default" in getattr(pl, f"lokr_{n}")
    }


def map_vera(pl) -> dict:
    return {
        "lora_lambda_b": (pl.vera_lambda_b["default"], _same),
        "lora_lambda_d": (pl.vera_lambda_d["default"], _same),
    }


def _loha(kind, r=4, alpha=8.0, **kw):
    return peft.LoHaConfig(r=r, alpha=alpha, target_modules=TARGETS[kind], **kw)


def _lokr(kind, r=2, alpha=4.0, **kw):
    return peft.LoKrConfig(r=r, alpha=alpha, target_modules=TARGETS[kind], **kw)


def _vera(kind, r=4, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.VeraConfig(r=r, target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2", **kw)


CASES = [
    # r = 4 on 32 x 32: r²(d_in + d_out) = d_in·d_out, so q/o and k/v build ΔW, gate/up/down use the r² form
    Case("loha", "loha", 4, 8.0, _loha, map_loha),
    Case("loha r=2 (rank-r² form everywhere)", "loha", 2, 3.0, lambda k: _loha(k, r=2, alpha=3.0), map_loha),
    # r = 2: W2 low rank where max(k, n) >= 6 (32 = 4·8), full on 16 = 4·4; W1 full
    Case("lokr", "lokr", 2, 4.0, _lokr, map_lokr),
    Case("lokr r=8 (W1, W2 full)", "lokr", 8, 8.0, lambda k: _lokr(k, r=8, alpha=8.0), map_lokr),
    Case(
        "lokr decompose_both, factor 8",
        "lokr",
        2,
        4.0,
        lambda k: _lokr(k, decompose_both=True, decompose_factor=8),
        map_lokr,
        {"decompose_both": True, "decompose_factor": 8},
    ),
    Case("vera", "vera", 4, 1.0, _vera, map_vera),
    Case(
        "vera key 7, d_initial 0.5",
        "vera",
        4,
        1.0,
        lambda k: _vera(k, projection_prng_key=7, d_initial=0.5),
        map_vera,
        {"projection_prng_key": 7, "d_initial": 0.5},
    ),
]


SECONDARY = {"loha r=2 (rank-r² form everywhere)", "lokr r=8 (W1, W2 full)", "vera key 7, d_initial 0.5"}
PARITY = [  # the secondary option cases run on GPT-2 only with -m slow (the file stays fast)
    pytest.param(
        c, k, id=f"{c.label}-{k}".replace(" ", "_"), marks=[pytest.mark.slow] * (c.label in SECONDARY and k == "gpt2")
    )
    for c in CASES
    for k in ("llama", "gpt2")
]


@pytest.mark.parametrize("case, kind", PARITY)
def test_parity_with_peft(case: Case, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tpp.test_parity_with_peft(case, kind, monkeypatch)


# ----------------------------------------------------------------------------- init and shapes as peft's


def _both(case: Case, kind: str = "llama"):
    theirs, ours = base_model(kind), base_model(kind)
    torch.manual_seed(0)
    pm = tpp.apply_peft(theirs, case, kind, None)
    torch.manual_seed(0)
    ll.attach(ours, case.ours_config(kind))
    return pm, ours, peft_pairs(pm, ours)


@pytest.mark.parametrize("case", [c for c in CASES if c.variant == "vera"], ids=lambda c: c.label)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_vera_projections_are_peft_s_bit_for_bit(case: Case, kind: str) -> None:
    pm, ours, pairs = _both(case, kind)
    for name, pl, ol in pairs:
        A, B = pl.vera_A["default"], pl.vera_B["default"]
        assert torch.equal(ad(ol).lora_vera_A, A[:, : ad(ol).lora_vera_A.shape[1]]), name
        assert torch.equal(ad(ol).lora_vera_B, B[: ad(ol).lora_vera_B.shape[0]]), name
        assert torch.equal(ad(ol).lora_lambda_d, pl.vera_lambda_d["default"]), name
        assert not ad(ol).lora_lambda_b.any()
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "vera_" in n)
    assert "lora_vera_A" not in {n.rsplit(".", 1)[1] for n, p in ours.named_parameters()}  # buffers


@pytest.mark.parametrize("case", [c for c in CASES if c.variant == "lokr"], ids=lambda c: c.label)
def test_lokr_chooses_peft_s_full_and_low_rank_factors(case: Case) -> None:
    _, _, pairs = _both(case)
    for name, pl, ol in pairs:
        theirs = {f"lora_{n}": tuple(t.shape) for n, (t, _) in ((k[5:], v) for k, v in map_lokr(pl).items())}
        mine = {n: tuple(getattr(ad(ol), n).shape) for n in ad(ol)._lora_lite.names}
        assert mine == theirs, name
        if "lora_w1" in mine:  # peft's init: W1 = 0 (or W1a = 0), the rest kaiming
            assert not ad(ol).lora_w1.any()
        else:
            assert not ad(ol).lora_w1_a.any() and ad(ol).lora_w1_b.any()


def test_factorization_is_peft_s() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for d in list(range(1, 130)) + [768, 1000, 4096, 11008]:
        for f in (-1, 1, 2, 3, 4, 8, 16, 100):
            assert factorization(d, f) == peft_factorization(d, f), (d, f)


def test_loha_init_is_peft_s() -> None:
    _, _, pairs = _both(CASES[0])
    for _, pl, ol in pairs:
        assert not ad(ol).lora_w2_b.any() and not pl.hada_w2_b["default"].any()
        for n in ("w1_a", "w1_b", "w2_a"):  # kaiming-uniform(a=√5) on the same shape: the same bound
            mine, theirs = getattr(ad(ol), f"lora_{n}"), getattr(pl, f"hada_{n}")["default"]
            assert mine.shape == theirs.shape and mine.any()
            assert mine.abs().max() <= 1 / mine.shape[1] ** 0.5 and theirs.abs().max() <= 1 / mine.shape[1] ** 0.5


# ----------------------------------------------------------------------------- rank / module dropout


def _train_mode_outputs(case: Case, seeds=(0, 1, 2)):
    pm, ours, pairs = _both(case)
    tpp.perturb_peft(pairs, case.mapping)
    tpp.copy_into_ours(pairs, case.mapping)
    pm.train()
    ours.train()
    batch = batches("llama", 1, seed=1)[0]
    outs = []
    for s in seeds:
        torch.manual_seed(s)
        y_p = output(pm, "llama", batch)
        torch.manual_seed(s)
        y_o = output(ours, "llama", batch)
        outs.append((y_o, y_p))
    pm.eval()
    ours.eval()
    with torch.no_grad():
        outs.append((output(ours, "llama", batch), output(pm, "llama", batch)))
    return outs


DROP_CASES = [
    Case("loha dropout", "loha", 2, 4.0, lambda k: _loha(k, r=2, alpha=4.0, rank_dropout=0.3, module_dropout=0.3),
         map_loha, {"rank_dropout": 0.3, "module_dropout": 0.3}),
    Case("lokr dropout", "lokr", 2, 4.0, lambda k: _lokr(k, rank_dropout=0.3, module_dropout=0.3),
         map_lokr, {"rank_dropout": 0.3, "module_dropout": 0.3}),
    Case("lokr dropout scaled", "lokr", 2, 4.0, lambda k: _lokr(k, rank_dropout=0.5, rank_dropout_scale=True),
         map_lokr, {"rank_dropout": 0.5, "rank_dropout_scale": True}),
]  # fmt: skip


@pytest.mark.parametrize("case", DROP_CASES, ids=lambda c: c.label)
def test_rank_and_module_dropout_draw_what_peft_draws(case: Case) -> None:
    """Training mode, same seed: the same modules skipped and rows dropped as peft (same draws, same order)."""
    outs = _train_mode_outputs(case)
    for y_o, y_p in outs:
        assert rel_err(y_o, y_p) <= 1e-5
    assert not torch.allclose(outs[0][1], outs[1][1]), "dropout should change the output between seeds"
    assert not torch.allclose(outs[0][1], outs[-1][1]), "training-mode output should differ from eval mode"


def test_module_dropout_skips_the_whole_update_and_eval_ignores_it() -> None:
    m = tiny_llama()
    ids = llama_batch()
    with torch.no_grad():
        y0 = m(ids).logits
    cfg = ll.LoraLiteConfig(variant="loha", r=2, alpha=4.0, target_roles=ALL, variant_kwargs={"module_dropout": 0.999})
    ll.attach(m, cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.3)
        y1 = m(ids).logits
        m.train()
        torch.manual_seed(0)
        y_train = m(ids).logits
    assert not torch.allclose(y1, y0)
    assert torch.equal(y_train, y0)  # every module dropped (p = 0.999): the base model exactly


def test_rank_dropout_zeroes_output_rows_of_the_update() -> None:
    m = torch.nn.Linear(16, 12)
    seq = torch.nn.Sequential(m).eval()
    kw = {"rank_dropout": 0.5}
    ll.attach(seq, ll.LoraLiteConfig(variant="loha", r=2, alpha=2.0, target_names=("^0$",), variant_kwargs=kw))
    a = ad(m)
    with torch.no_grad():
        a.lora_w2_b.normal_()
    x = torch.randn(5, 16)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, m.weight, m.bias)
        full = seq(x) - base
        seq.train()
        torch.manual_seed(3)
        dropped = seq(x) - base
    torch.manual_seed(3)
    torch.rand(1)
    keep = (torch.rand(12) > 0.5).float()
    torch.testing.assert_close(dropped, full * keep / keep.mean(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- import / export


def _trained_peft(case: Case, kind: str = "llama"):
    pm = tpp.apply_peft(base_model(kind), case, kind, None)
    from peft.tuners.tuners_utils import BaseTunerLayer

    pairs = [(n, m, None) for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)]
    tpp.perturb_peft(pairs, case.mapping)
    return pm


IO_CASES = [CASES[0], CASES[2], CASES[4], CASES[6]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", IO_CASES, ids=lambda c: c.label)
def test_import_peft_reproduces_peft_and_export_loads_in_peft(case: Case, kind: str, tmp_path) -> None:
    if kind == "gpt2" and case.variant != "vera":
        pytest.skip("peft's LoHa/LoKr do not adapt GPT-2's Conv1D")
    pm = _trained_peft(case, kind)
    batch = batches(kind, 1, seed=2)[0]
    with torch.no_grad():
        y_p = output(pm, kind, batch)
    pm.save_pretrained(tmp_path / "peft")
    ours = base_model(kind)
    ll.import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(output(ours, kind, batch), y_p) <= 1e-5
    # and back: ours exported, loaded by peft on a fresh base
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        y_o = output(ours, kind, batch)
    ll.export_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(base_model(kind), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(output(back, kind, batch), y_o) <= 1e-5


def test_vera_without_saved_projections_both_ways(tmp_path) -> None:
    case = Case("vera", "vera", 4, 1.0, lambda k: _vera(k, save_projection=False, projection_prng_key=3), map_vera)
    pm = _trained_peft(case)
    batch = batches("llama", 1, seed=2)[0]
    with torch.no_grad():
        y_p = output(pm, "llama", batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    assert not any("vera_A" in k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = base_model("llama")
    ll.import_peft(ours, tmp_path / "peft")  # projections re-derived from the key
    with torch.no_grad():
        assert rel_err(output(ours, "llama", batch), y_p) <= 1e-5
    ll.export_peft(ours, tmp_path / "ours")
    assert not any("vera_A" in k for k in load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["save_projection"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(output(back, "llama", batch), y_p) <= 1e-5


def test_vera_import_refuses_projections_that_are_not_the_key_s(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    pm = _trained_peft(CASES[5])
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    sd["base_model.vera_A"] = sd["base_model.vera_A"] * 1.01
    save_file(sd, f)
    m = base_model("llama")
    with pytest.raises(ll.LoadError, match="projection_prng_key=0"):
        ll.import_peft(m, tmp_path)
    assert not ll.is_attached(m)


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda k: _vera(k, modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_import_refuses_unsupported_peft_options_by_name(make, option, tmp_path) -> None:
    case = Case("x", "x", 4, 1.0, make, map_loha)
    pm = tpp.apply_peft(base_model("llama"), case, "llama", None)
    pm.save_pretrained(tmp_path)
    m = base_model("llama")
    with pytest.raises(ll.LoadError, match=option):
        ll.import_peft(m, tmp_path)
    assert not ll.is_attached(m)


@pytest.mark.parametrize(
    "make",
    [
        lambda k: _loha(k, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0}),
        lambda k: _lokr(k, alpha_pattern={"q_proj": 8.0}),
    ],
    ids=["loha", "lokr"],
)
def test_rank_and_alpha_patterns_import_and_export_with_peft(make, tmp_path) -> None:
    """peft LoHa / LoKr adapters with per-layer rank_pattern / alpha_pattern import with those ranks and scales
    and reproduce peft's outputs; exported back, peft loads them and reproduces ours (fp32: 1e-5 relative)."""
    from peft import PeftModel

    case = Case("x", "x", 4, 1.0, make, map_loha)
    pm = tpp.apply_peft(base_model("llama"), case, "llama", None)
    with torch.no_grad():  # a trained-looking adapter (peft's W2b / W1 start at zero)
        g = torch.Generator().manual_seed(3)
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "peft")
    m = base_model("llama")
    ll.import_peft(m, tmp_path / "peft")
    b = batches("llama", 1)[0]
    with torch.no_grad():
        want, got = output(pm, "llama", b), output(m, "llama", b)
    assert rel_err(got, want) < 1e-5
    assert {a._lora_lite.cfg.r for a in ll.targets(m).values()} != {1} and len(ll.targets(m))
    ll.export_peft(m, tmp_path / "ours")
    back = PeftModel.from_pretrained(base_model("llama"), tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(output(back, "llama", b), got) < 1e-5


def test_import_refuses_a_lokr_file_whose_factors_do_not_fit(tmp_path) -> None:
    """A file made with decompose_both but a config that says otherwise: W1 factors where the plan wants W1."""
    pm = tpp.apply_peft(base_model("llama"), CASES[4], "llama", None)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["decompose_both"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    m = base_model("llama")
    with pytest.raises(ll.LoadError, match="lora_w1"):
        ll.import_peft(m, tmp_path)
    assert not ll.is_attached(m)


# ----------------------------------------------------------------------------- config errors, LoRA+ groups


@pytest.mark.parametrize(
    "variant, kw, match",
    [
        ("loha", dict(dropout=0.1), "rank_dropout / module_dropout"),
        ("lokr", dict(dropout=0.1), "rank_dropout / module_dropout"),
        ("loha", dict(variant_kwargs={"rank_dropout": 1.0}), "rank_dropout"),
        ("lokr", dict(variant_kwargs={"module_dropout": -0.1}), "module_dropout"),
        ("lokr", dict(variant_kwargs={"decompose_factor": 0}), "decompose_factor"),
        ("lokr", dict(variant_kwargs={"decompose_both": 1}), "decompose_both"),
        ("loha", dict(variant_kwargs={"init_weights": False}), "init_weights"),
        ("loha", dict(alpha=0.0), "alpha=0"),
        ("vera", dict(variant_kwargs={"projection_prng_key": -1}), "projection_prng_key"),
        ("vera", dict(variant_kwargs={"d_initial": 0.0}), "d_initial"),
        ("vera", dict(variant_kwargs={"save_projection": "yes"}), "save_projection"),
    ],
)
def test_config_errors_name_the_option(variant, kw, match) -> None:
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoraLiteConfig(variant=variant, **kw)


def test_use_effective_conv2d_is_accepted_and_changes_nothing_on_linear_layers() -> None:
    ids = llama_batch()
    outs = []
    for flag in (False, True):
        m = tiny_llama()
        torch.manual_seed(0)
        ll.attach(m, ll.LoraLiteConfig(variant="loha", r=2, variant_kwargs={"use_effective_conv2d": flag}))
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1)
            outs.append(m(ids).logits)
    assert torch.equal(*outs)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=lambda c: c.label)
def test_b_tensors_are_peft_loraplus_b_group(case: Case) -> None:
    from peft.optimizers import create_loraplus_optimizer

    pm, ours, pairs = _both(case)
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    b_ids = {id(p) for g in opt.param_groups if g["lr"] == 16e-3 for p in g["params"]}
    theirs = {n for _, pl, _ in pairs for n, (t, _) in case.mapping(pl).items() if id(t) in b_ids}
    assert theirs == set(ll.REGISTRY[case.variant].b_tensors)
