"""RoAd and AdaLoRA (issue 25): identity, merge, steering, peft 0.21.2 parity (forward, gradients, 8 AdamW steps with
AdaLoRA's rank allocation through ll.on_step and its regulariser through ll.regularizer), save/load of the allocated
ranks, ll.import_peft / ll.export_peft both ways, and the errors.

Parity models: the tiny Llama (GQA, no biases) and the tiny GPT-2 (biases; Conv1D: peft's RoAd takes nn.Linear only,
so for RoAd peft runs on the nn.Linear twin of the same model and ours on the Conv1D original). Tolerances as
tests/test_parity_peft.py: 1e-5 of the scale for forward and gradients, 1e-4 after training.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _models import ad, llama_batch, tiny_llama
from _parity import (
    TARGETS,
    apply_peft,
    base_model,
    batches,
    compare_tensors,
    copy_into_ours,
    linear_twin,
    loss,
    ours_regex,
    output,
    peft_pairs,
    perturb_peft,
    rel_err,
)
from test_cli import _train_args, model_dir, text_file  # noqa: F401  (fixtures)

import lora_lite as ll
from lora_lite.variants import road

peft = pytest.importorskip("peft")
RTOL, TRAIN_RTOL, LR, STEPS = 1e-5, 1e-4, 1e-3, 8
MEASURED: dict = {}  # (variant, sub, kind) -> errors, for docs/peft-parity.md
GS = 16  # divides every out_features of both tiny models (Llama: 16, 32, 64; GPT-2: 32, 96, 128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def map_road(pl):
    return {
        "lora_theta": (pl.road_theta["default"], lambda t: t),
        "lora_alpha": (pl.road_alpha["default"], lambda t: t),
    }


def map_adalora(pl):
    return {p: (getattr(pl, p)["default"], lambda t: t) for p in ("lora_A", "lora_E", "lora_B")}


ADA = dict(target_r=2, tinit=1, tfinal=2, deltaT=2, beta1=0.85, beta2=0.9, orth_reg_weight=0.3, total_step=STEPS)


class _Case:
    def __init__(self, variant, kw, peft_cfg, mapping):
        self.variant, self.kw, self.peft_cfg, self.mapping = variant, kw, peft_cfg, mapping

    def peft_config(self, kind):
        return self.peft_cfg(kind)

    eva = False


def _road_case(kind_: str) -> _Case:
    return _Case(
        "road",
        {"variant": kind_, "group_size": GS},
        lambda k: peft.RoadConfig(variant=kind_, group_size=GS, target_modules=TARGETS[k]),
        map_road,
    )


def _ada_case() -> _Case:
    return _Case(
        "adalora",
        ADA,
        lambda k: peft.AdaLoraConfig(
            init_r=4,
            lora_alpha=8,
            target_modules=TARGETS[k],
            fan_in_fan_out=k == "gpt2",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",  # peft adds its regulariser in AdaLoraModel.forward: task wrappers call it
            **ADA,
        ),
        map_adalora,
    )


def _pair(case: _Case, kind: str):
    theirs, ours = base_model(kind), base_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = apply_peft(theirs, case, kind, None)
        if isinstance(pm, str):  # peft's RoAd rejects GPT-2's Conv1D: peft on the nn.Linear twin
            pm = apply_peft(linear_twin(base_model(kind)), case, kind, None)
    cfg = ll.LoraLiteConfig(
        variant=case.variant, r=4, alpha=8.0, target_names=(ours_regex(TARGETS[kind]),), variant_kwargs=case.kw
    )
    ll.attach(ours, cfg)
    return pm, ours, peft_pairs(pm, ours)


PARITY = [("road", v, k) for v in ("road_1", "road_2", "road_4") for k in ("llama", "gpt2")] + [
    ("adalora", None, k) for k in ("llama", "gpt2")
]


@pytest.mark.parametrize("variant, sub, kind", PARITY)
def test_parity_with_peft(variant: str, sub: str | None, kind: str) -> None:
    """Init outputs, forward, gradients, then 8 AdamW steps (adalora: with ll.regularizer in the loss and ll.on_step
    after each step, against peft's loss-with-labels and update_and_allocate), tensors, masks, losses, outputs."""
    case = _road_case(sub) if variant == "road" else _ada_case()
    data = batches(kind, STEPS, seed=1)
    torch.manual_seed(0)
    pm, ours, pairs = _pair(case, kind)
    with torch.no_grad():
        assert rel_err(output(ours, kind, data[0]), output(pm, kind, data[0])) <= RTOL  # identity on both sides
    perturb_peft(pairs, case.mapping)
    copy_into_ours(pairs, case.mapping)
    y_p, y_o = output(pm, kind, data[0]), output(ours, kind, data[0])
    assert rel_err(y_o, y_p) <= RTOL
    reg = (lambda m: ll.regularizer(m)) if variant == "adalora" else (lambda m: 0.0)
    (loss(ours, kind, data[0]) + reg(ours)).backward()
    loss(pm, kind, data[0]).backward()  # peft adds its regulariser to the loss itself
    grads = compare_tensors(pairs, case.mapping, grad=True)
    assert max(grads.values()) <= RTOL, max(grads.items(), key=lambda kv: kv[1])

    mine = [getattr(ol, n) for _, pl, ol in pairs for n in sorted(case.mapping(pl))]
    theirs = [case.mapping(pl)[n][0] for _, pl, _ in pairs for n in sorted(case.mapping(pl))]
    opt_o, opt_p = torch.optim.AdamW(mine, lr=LR), torch.optim.AdamW(theirs, lr=LR)
    losses_o, losses_p = [], []
    for step, batch in enumerate(data):
        opt_o.zero_grad(), opt_p.zero_grad()
        lo = loss(ours, kind, batch) + reg(ours)
        lp = loss(pm, kind, batch)
        lo.backward(), lp.backward()
        opt_o.step(), opt_p.step()
        ll.on_step(ours, step)
        if variant == "adalora":
            pm.base_model.update_and_allocate(step)
        losses_o.append(lo.item()), losses_p.append(lp.item())
    errs = compare_tensors(pairs, case.mapping, grad=False)
    assert max(errs.values()) <= TRAIN_RTOL, max(errs.items(), key=lambda kv: kv[1])
    assert max(abs(a - b) / abs(b) for a, b in zip(losses_o, losses_p)) <= TRAIN_RTOL, (losses_o, losses_p)
    with torch.no_grad():
        assert rel_err(output(ours, kind, data[1]), output(pm, kind, data[1])) <= TRAIN_RTOL
        final_o, final_p = loss(ours, kind, data[0]) + reg(ours), loss(pm, kind, data[0])
    assert abs(final_o.item() - final_p.item()) <= TRAIN_RTOL * abs(final_p.item())
    assert final_p.item() < losses_p[0], "training should lower the loss (else the comparison is vacuous)"
    MEASURED[(variant, sub, kind)] = dict(
        fwd=rel_err(y_o, y_p), grad=max(grads.values()), train=max(errs.values()), n_layers=len(pairs)
    )
    if variant == "adalora":  # the allocation happened, and chose the same ranks as peft's
        pattern = pm.peft_config["default"].rank_pattern
        assert pattern, "no allocation happened: the test would be vacuous"
        for name, _, ol in pairs:
            assert ad(ol).lora_mask.bool().tolist() == pattern[f"{name}.lora_E.default"], name
        kept = sum(int(ad(ol).lora_mask.sum()) for _, _, ol in pairs)
        assert kept <= ADA["target_r"] * len(pairs) < 4 * len(pairs)


# ----------------------------------------------------------------------------- RoAd specifics


def _road_model(sub: str = "road_1", seed: int = 0):
    m = tiny_llama()
    ll.attach(m, ll.LoraLiteConfig(variant="road", variant_kwargs={"variant": sub, "group_size": GS}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ll.targets(m).values():
            ad(a).lora_theta.add_(torch.randn(ad(a).lora_theta.shape, generator=g))
            ad(a).lora_alpha.add_(0.2 * torch.randn(ad(a).lora_alpha.shape, generator=g))
    return m


@pytest.mark.parametrize("sub", ["road_1", "road_2", "road_4"])
def test_road_identity_merge_and_steering(sub: str) -> None:
    x = llama_batch()
    with torch.no_grad():
        y0 = tiny_llama()(x).logits
        m = _road_model(sub)
        y1 = m(x).logits
        with ll.scaled(m, 0.0):
            assert torch.equal(m(x).logits, y0)  # θ → 0, α → 1: exactly the base
        sd = ll.merged_state_dict(m)
        ll.merge(m)
        assert rel_err(m(x).logits, y1) <= RTOL
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_road_merge_rotates_the_bias_too() -> None:
    from _models import Toy

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    m = Toy(bias=True)
    ll.attach(m, ll.LoraLiteConfig(variant="road", target_roles=("reader", "writer", "inner"),
                                   variant_kwargs={"variant": "road_2", "group_size": 8}))  # fmt: skip
    with torch.no_grad():
        for a in ll.targets(m).values():
            ad(a).lora_theta.normal_()
            ad(a).lora_alpha.normal_(1.0, 0.3)
        y = m(x)
        ll.merge(m)
        assert rel_err(m(x), y) <= RTOL


def test_road_fractional_rotation_inverts_exactly() -> None:
    """road_1 with α = 1 is a rotation: c = −1 is its inverse, c = 0.5 twice is c = 1."""
    m = _road_model("road_1")
    a = ad(next(iter(ll.targets(m).values())))
    with torch.no_grad():
        a.lora_alpha.fill_(1.0)
        y = torch.randn(3, a.out_features)
        assert rel_err(road._apply(a, road._apply(a, y), -1.0), y) <= 1e-6
        assert rel_err(road._apply(a, road._apply(a, y, 0.5), 0.5), road._apply(a, y)) <= 1e-6


def test_road_group_size_must_divide_out_features() -> None:
    m = tiny_llama()
    with pytest.raises(ll.ConfigError, match=r"k_proj \(32->16\): road: group_size 64 does not divide out_features 16"):
        ll.attach(m, ll.LoraLiteConfig(variant="road"))  # peft's default group_size 64
    assert not ll.is_attached(m)
    for kw, msg in [({"variant": "road_3"}, "must be one of"), ({"group_size": 5}, "positive even")]:
        with pytest.raises(ll.ConfigError, match=msg):
            ll.LoraLiteConfig(variant="road", variant_kwargs=kw)


# ----------------------------------------------------------------------------- AdaLoRA specifics


def _ada_trained(steps: int = STEPS, kw: dict = ADA, model=None):
    """Ours trained with allocation (all of tinit .. tfinal when steps = total_step)."""
    m = tiny_llama() if model is None else model
    torch.manual_seed(0)
    ll.attach(m, ll.LoraLiteConfig(variant="adalora", r=4, alpha=8.0, variant_kwargs=kw))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(batches("llama", steps, seed=2)):
        (loss(m, "llama", batch) + ll.regularizer(m)).backward()
        opt.step()
        ll.on_step(m, step)
        opt.zero_grad()
    return m


def test_adalora_identity_and_merge() -> None:
    x = llama_batch()
    with torch.no_grad():
        y0 = tiny_llama()(x).logits
    m = _ada_trained()
    with torch.no_grad():
        y1 = m(x).logits
        assert rel_err(y1, y0) > 1e-3
        with ll.scaled(m, 0.0):
            assert torch.equal(m(x).logits, y0)
        ll.merge(m)
        assert rel_err(m(x).logits, y1) <= RTOL


def test_adalora_final_phase_keeps_masked_ranks_at_zero_and_save_load_restores_them(tmp_path) -> None:
    m = _ada_trained()
    masks = {n: ad(a).lora_mask.clone() for n, a in ll.targets(m).items()}
    assert any(not mk.all() for mk in masks.values())
    for n, a in ll.targets(m).items():  # after the final allocation every masked E_i stays exactly 0
        assert torch.all(ad(a).lora_E[masks[n] == 0] == 0), n
    path = ll.save(m, tmp_path / "a.safetensors")
    fresh = tiny_llama()
    ll.load(fresh, path)
    x = llama_batch()
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, m(x).logits)
    for n, a in ll.targets(fresh).items():
        assert torch.equal(ad(a).lora_mask, masks[n]), n
    # continuing to train after load: the final phase re-applies the restored ranks
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    loss(fresh, "llama", batches("llama", 1, seed=5)[0]).backward()
    opt.step()
    ll.on_step(fresh, STEPS + 1)
    for n, a in ll.targets(fresh).items():
        assert torch.all(ad(a).lora_E[masks[n] == 0] == 0), n


def test_regularizer_matches_peft_formula_and_is_zero_elsewhere() -> None:
    m = _ada_trained(steps=1)
    terms = []
    for a in ll.targets(m).values():
        A, B = ad(a).lora_A, ad(a).lora_B
        terms += [torch.norm(A @ A.T - torch.eye(4), p="fro"), torch.norm(B.T @ B - torch.eye(4), p="fro")]
    want = ADA["orth_reg_weight"] * sum(terms) / len(terms)
    assert torch.allclose(ll.regularizer(m), want, rtol=1e-6)
    lora = tiny_llama()
    ll.attach(lora, ll.LoraLiteConfig(variant="lora", r=4))
    assert ll.regularizer(lora).item() == 0.0
    before = {k: v.clone() for k, v in ll.adapter_state_dict(lora).items()}
    ll.on_step(lora, 3)  # a no-op for variants without a schedule
    assert all(torch.equal(v, before[k]) for k, v in ll.adapter_state_dict(lora).items())


def test_adalora_errors() -> None:
    with pytest.raises(ll.ConfigError, match=r"target_r=6 exceeds r=4"):
        ll.LoraLiteConfig(variant="adalora", r=4, variant_kwargs={"target_r": 6, "total_step": 10})
    with pytest.raises(ll.ConfigError, match=r"tinit=8 >= total_step - tfinal = 8"):
        ll.LoraLiteConfig(variant="adalora", r=4, variant_kwargs={"tinit": 8, "tfinal": 2, "total_step": 10})
    with pytest.raises(ll.ConfigError, match=r"'beta1'\] must be in \(0, 1\)"):
        ll.LoraLiteConfig(variant="adalora", r=4, variant_kwargs={"beta1": 1.0, "total_step": 10})
    m = tiny_llama()
    ll.attach(m, ll.LoraLiteConfig(variant="adalora", r=4))  # no total_step: runs, but cannot schedule
    with pytest.raises(ll.ConfigError, match=r"on_step needs variant_kwargs\['total_step'\]"):
        ll.on_step(m, 0)
    with pytest.raises(TypeError, match="step must be an integer"):
        ll.on_step(m, 1.5)
    m = tiny_llama()
    ll.attach(m, ll.LoraLiteConfig(variant="adalora", r=4, variant_kwargs={"total_step": 10}))
    with pytest.raises(RuntimeError, match=r"has no gradient; call it after loss.backward\(\)"):
        ll.on_step(m, 0)


# ----------------------------------------------------------------------------- peft files, both ways


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _biased_llama_twin():
    """The biased model for export/import: GPT-2 with its Conv1D replaced by the equal nn.Linear (peft's RoAd)."""
    return linear_twin(base_model("gpt2"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("sub", ["road_1", "road_4"])
def test_road_export_loads_in_peft_and_import_round_trips(sub: str, kind: str, tmp_path) -> None:
    make = tiny_llama if kind == "llama" else _biased_llama_twin
    x = llama_batch()
    m = make()
    ll.attach(m, ll.LoraLiteConfig(variant="road", target_roles=("reader", "writer", "inner"),
                                   variant_kwargs={"variant": sub, "group_size": GS}))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in ll.targets(m).values():
            ad(a).lora_theta.add_(torch.randn(ad(a).lora_theta.shape, generator=g))
    want = _logits(m, x)
    ll.export_peft(m, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ROAD"
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    assert rel_err(_logits(pm, x), want) <= RTOL
    fresh = make()
    ll.import_peft(fresh, tmp_path)
    assert torch.equal(_logits(fresh, x), want)


def test_road_export_refuses_conv1d(tmp_path) -> None:
    m = base_model("gpt2")
    ll.attach(m, ll.LoraLiteConfig(variant="road", target_names=(r"c_attn$",), variant_kwargs={"group_size": GS}))
    with pytest.raises(ValueError, match=r"peft's RoAd adapts nn.Linear only.*c_attn.*Conv1D"):
        ll.export_peft(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_road_imports(kind: str, tmp_path) -> None:
    make = tiny_llama if kind == "llama" else _biased_llama_twin
    x = llama_batch()
    pm = peft.get_peft_model(make(), peft.RoadConfig(variant="road_2", group_size=GS, target_modules=TARGETS[kind]))
    perturb_peft([(n, pl, None) for n, pl, _ in _peft_layers(pm)], map_road)
    pm.save_pretrained(str(tmp_path))
    m = make()
    ll.import_peft(m, tmp_path)
    assert rel_err(_logits(m, x), _logits(pm, x)) <= RTOL


def _peft_layers(pm):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m, None) for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adalora_export_after_allocation_loads_in_peft_and_round_trips(kind: str, tmp_path) -> None:
    """peft saves only the kept ranks plus rank_pattern and resizes its layers on load: so do we."""
    make = tiny_llama if kind == "llama" else lambda: base_model("gpt2")
    x = llama_batch()
    m = _ada_trained(model=make(), kw={**ADA}) if kind == "llama" else make()
    if kind == "gpt2":  # Conv1D: perturb, then mask some ranks by hand
        ll.attach(m, ll.LoraLiteConfig(variant="adalora", r=4, variant_kwargs=ADA))
        with torch.no_grad():
            for i, a in enumerate(ll.targets(m).values()):
                ad(a).lora_E.normal_()
                ad(a).lora_mask[i % 4] = 0
                ad(a).lora_E[i % 4] = 0
    want = _logits(m, x)
    ll.export_peft(m, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "ADALORA" and conf["rank_pattern"], conf
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    assert rel_err(_logits(pm, x), want) <= RTOL
    fresh = make()
    ll.import_peft(fresh, tmp_path)
    assert rel_err(_logits(fresh, x), want) <= RTOL
    for n, a in ll.targets(fresh).items():
        assert torch.equal(ad(a).lora_mask, ad(ll.targets(m)[n]).lora_mask), n


def test_peft_adalora_trained_with_allocation_imports(tmp_path) -> None:
    case = _ada_case()
    torch.manual_seed(0)
    pm = apply_peft(tiny_llama(), case, "llama", None)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(batches("llama", STEPS, seed=2)):
        loss(pm, "llama", batch).backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    x = llama_batch()
    m = tiny_llama()
    ll.import_peft(m, tmp_path)
    assert rel_err(_logits(m, x), _logits(pm, x)) <= RTOL
    cfg = ll.targets(m)
    assert all(ad(a)._lora_lite.cfg.variant_kwargs["total_step"] == STEPS for a in cfg.values())


@pytest.mark.parametrize("kind", ["ROAD", "ADALORA"])
def test_import_refuses_unsupported_peft_options(kind: str, tmp_path) -> None:
    cfg = (
        peft.RoadConfig(group_size=GS, target_modules=["q_proj"])
        if kind == "ROAD"
        else peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    )
    pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.save_pretrained(str(tmp_path))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["modules_to_save"] = ["lm_head"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    m = tiny_llama()
    with pytest.raises(ll.LoadError, match=r"(AdaLoRA|RoAd) option.*modules_to_save"):
        ll.import_peft(m, tmp_path)
    assert not ll.is_attached(m)


# ----------------------------------------------------------------------------- the command line


def test_cli_train_runs_adalora_schedule(model_dir, text_file, tmp_path) -> None:  # noqa: F811
    """`lora-lite train --variant adalora`: total_step defaults to --steps and the loop calls ll.on_step."""
    from lora_lite.app.cli import main

    kw = json.dumps({"target_r": 2, "tinit": 1, "deltaT": 1})
    assert main([*_train_args(model_dir, text_file, tmp_path, 6, "--variant", "adalora", "--variant-kwargs", kw)]) == 0
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert state["config"]["variant_kwargs"]["total_step"] == 6
    masks = [t for k, t in ll.read_adapter(next(tmp_path.glob("*.safetensors")))[2].items() if k.endswith("lora_mask")]
    assert masks and sum(int(m.sum()) for m in masks) <= 2 * len(masks) < 4 * len(masks)  # the final allocation
