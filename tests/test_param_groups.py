"""ll.param_groups (LoRA+) against peft 0.21.2's `create_loraplus_optimizer` (peft/optimizers/loraplus.py).

For each variant with a peft counterpart, the same tiny Llama is adapted by peft and by lora-lite; every one
of our trainable tensors must get the same (lr, weight_decay) as the peft tensor it corresponds to (the
mapping is the parity harness's, tests/_parity.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import ad, llama_batch, lm_loss, tiny_llama
from _parity import TARGETS, map_delora, map_dora, map_hra, map_ia3, map_lora, ours_regex, peft_pairs

import lora_lite as ll
from lora_lite.config import ConfigError

peft = pytest.importorskip("peft")

LR, RATIO, WD = 1e-3, 16.0, 0.1
T = TARGETS["llama"]


def _peft_cfgs():
    from peft import DeloraConfig, HRAConfig, IA3Config, LoraConfig

    return {
        "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=T), map_lora),
        "pissa": (LoraConfig(r=4, lora_alpha=8, target_modules=T, init_lora_weights="pissa"), map_lora),
        "olora": (LoraConfig(r=4, lora_alpha=8, target_modules=T, init_lora_weights="olora"), map_lora),
        "dora": (LoraConfig(r=4, lora_alpha=8, target_modules=T, use_dora=True), map_dora),
        "delora": (DeloraConfig(r=4, delora_lambda=15, target_modules=T), map_delora),
        "hra": (HRAConfig(r=4, target_modules=T), map_hra),
        "ia3": (IA3Config(target_modules=T, feedforward_modules=[]), map_ia3),
    }


def _ours_cfg(variant: str) -> ll.LoraLiteConfig:
    kw = {"variant_kwargs": {"feedforward_roles": []}} if variant == "ia3" else {"r": 4, "alpha": 8.0}
    if variant == "delora":
        kw = {"r": 4}
    return ll.LoraLiteConfig(variant=variant, target_names=(ours_regex(T),), **kw)


def _settings(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("variant", ["lora", "pissa", "olora", "dora", "delora", "hra", "ia3"])
def test_groups_match_peft_loraplus(variant: str) -> None:
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    peft_cfg, mapping = _peft_cfgs()[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), peft_cfg)
        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD)
    theirs = _settings(opt.param_groups)
    ours_model = tiny_llama()
    ll.attach(ours_model, _ours_cfg(variant))
    groups = ll.param_groups(ours_model, LR, loraplus_lr_ratio=RATIO, weight_decay=WD)
    mine = _settings(groups)
    assert len(mine) == sum(p.numel() > 0 for p in ours_model.parameters() if p.requires_grad)
    n_b = 0
    for name, pl, ol in peft_pairs(pm, ours_model):
        for ours_name, (t, _) in mapping(pl).items():
            want = theirs[id(t)]
            assert mine[id(getattr(ad(ol), ours_name))] == pytest.approx(want), f"{name}.{ours_name}"
            n_b += want[0] == pytest.approx(RATIO * LR)
    expect_b = {"hra": 0, "ia3": 0}.get(variant, 1)
    assert (n_b > 0) == bool(expect_b), "peft puts some tensors in its B group" if expect_b else "no B tensors"
    torch.optim.AdamW(groups).step()  # the groups are valid optimizer input


def test_without_ratio_one_group_and_only_active_adapters() -> None:
    m = tiny_llama()
    ll.attach(m, ll.LoraLiteConfig(variant="lora", r=4), name="a")
    ll.attach(m, ll.LoraLiteConfig(variant="dora", r=2), name="b")
    (g,) = ll.param_groups(m, LR, weight_decay=WD)
    assert (g["lr"], g["weight_decay"], g["name"]) == (LR, WD, "adapters")
    assert {id(p) for p in g["params"]} == {id(p) for p in m.parameters() if p.requires_grad}
    ll.set_active(m, "a")
    groups = ll.param_groups(m, LR, loraplus_lr_ratio=4.0)
    assert [(x["name"], x["lr"]) for x in groups] == [("A", LR), ("B", 4 * LR)]
    a = ll.targets(m, "a")
    assert {id(p) for p in groups[1]["params"]} == {id(x.lora_B) for x in a.values()}
    assert {id(p) for p in groups[0]["params"]} == {id(x.lora_A) for x in a.values()}


def test_buffers_and_frozen_tensors_are_left_out() -> None:
    m = tiny_llama()
    ll.attach(m, ll.LoraLiteConfig(variant="antipasto", r=4, variant_kwargs={"block_size": 2}))
    groups = ll.param_groups(m, LR, loraplus_lr_ratio=RATIO)
    names = {id(getattr(a, n)): n for a in ll.targets(m).values() for n in a._lora_lite.names}
    assert {g["name"]: sorted({names[id(p)] for p in g["params"]}) for g in groups} == {
        "A": ["lora_rot_T"],
        "B": ["lora_delta_s"],  # peft's rule: 1-D tensors are B-type
    }


def test_loraplus_trains_b_faster() -> None:
    """With the ratio, one AdamW step moves B ratio times as far as without (Adam's first step is ~lr·sign(g))."""
    steps = {}
    for ratio in (None, 8.0):
        m = tiny_llama()
        ll.attach(m, ll.LoraLiteConfig(variant="olora", r=4))
        B0 = {n: a.lora_B.detach().clone() for n, a in ll.targets(m).items()}
        opt = torch.optim.AdamW(ll.param_groups(m, LR, loraplus_lr_ratio=ratio))
        lm_loss(m, llama_batch()).backward()
        opt.step()
        steps[ratio] = sum((a.lora_B - B0[n]).abs().sum().item() for n, a in ll.targets(m).items())
    assert steps[8.0] / steps[None] == pytest.approx(8.0, rel=0.02)


@pytest.mark.parametrize(
    "kw, what",
    [
        (dict(lr=-1.0), "lr must be a number >= 0"),
        (dict(lr=LR, loraplus_lr_ratio=0), "loraplus_lr_ratio must be a number > 0"),
        (dict(lr=LR, weight_decay="0.1"), "weight_decay"),
    ],
)
def test_bad_values_are_refused(kw, what) -> None:
    m = tiny_llama()
    ll.attach(m, ll.LoraLiteConfig(variant="lora", r=4))
    with pytest.raises(ConfigError, match=what):
        ll.param_groups(m, **kw)


def test_every_variant_declares_b_tensors_it_has() -> None:
    for name in ("lora", "pissa", "olora", "loftq", "eva", "dora", "delora", "antipasto"):
        v = ll.REGISTRY[name]
        assert v.b_tensors, name
        specs = set(v.param_specs(16, 16, ll.LoraLiteConfig(variant=name, r=4, **_extra(name))))
        assert set(v.b_tensors) <= specs, f"{name}: b_tensors {v.b_tensors} not among {sorted(specs)}"


def _extra(name: str) -> dict:
    return {"variant_kwargs": {"block_size": 2}} if name == "antipasto" else {}


def test_modules_to_save_join_the_groups_as_in_peft() -> None:
    """modules_to_save parameters: peft's rule on their names (not lora_B; 1-D -> B), so lm_head.weight is A-type;
    a biased Linear's bias is B-type; without LoRA+ they are in the one group."""
    from _models import Toy

    m = Toy()
    ll.attach(m, ll.LoraLiteConfig(r=2, target_names=(r"up$",), modules_to_save=(r"layers\.1\.q$",)))
    q = m.layers[1].q
    assert q.bias is not None and q.weight.requires_grad and q.bias.requires_grad
    groups = {g["name"]: g for g in ll.param_groups(m, LR, loraplus_lr_ratio=RATIO)}
    assert any(p is q.weight for p in groups["A"]["params"]) and any(p is q.bias for p in groups["B"]["params"])
    (one,) = ll.param_groups(m, LR)
    assert sum(p is q.weight or p is q.bias for p in one["params"]) == 2
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g["params"]}  # nothing left out
