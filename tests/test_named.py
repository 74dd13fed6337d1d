"""Several named adapters on one model: stacking, activation, detach in any order, save/load by name, errors.

The composition rule (runtime.py): each adapter acts on the layer as the adapters attached before it left it,
so a stack's output equals merging its adapters one by one (merge.py folds `merged_weight(layer, W, b)` in
attach order). Tolerances: fp32, a few matmuls deep: rtol 1e-5, atol 1e-5 of the output's largest entry.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from _models import D_MODEL, Toy, ad

import lora_lite as ll

X = torch.randn(3, 5, D_MODEL, generator=torch.Generator().manual_seed(0))
CALIB = [torch.randn(4, 6, D_MODEL, generator=torch.Generator().manual_seed(1 + i)) for i in range(2)]
NON_REWRITING = ["lora", "dora", "delora", "ia3", "ia3_ff", "hra", "eva"]
ROLES = ("reader", "writer", "inner")


def _cfg(variant: str, **kw) -> ll.LoraLiteConfig:
    kw.setdefault("r", 4)
    return ll.LoraLiteConfig(variant=variant, alpha=8.0, target_roles=ROLES, **kw)


def _attach(model: torch.nn.Module, variant: str, name: str, seed: int = 0, **kw) -> None:
    torch.manual_seed(seed)
    ll.attach(model, _cfg(variant, **kw), calibration_data=CALIB if variant == "eva" else None, name=name)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved off its init
        for a in ll.targets(model, name).values():
            for p in a._lora_lite.trainable:
                t = getattr(a, p)
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _pristine(model: torch.nn.Module, snap: dict, grads: dict[str, bool]) -> None:
    sd = model.state_dict()
    assert sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not ll.is_attached(model) and ll.adapters(model) == []


def test_state_dict_keys_carry_the_adapter_and_tensor_names() -> None:
    m = Toy()
    _attach(m, "lora", "a")
    _attach(m, "dora", "b", seed=1)
    keys = [k for k in m.state_dict() if "lora_" in k]
    assert "layers.0.q.lora_lite.a.lora_A" in keys and "layers.0.q.lora_lite.b.lora_m" in keys
    assert ll.adapters(m) == ll.active(m) == ["a", "b"]
    sd = ll.adapter_state_dict(m, "b")
    assert "layers.0.q.lora_m" in sd and sd["layers.0.q.lora_m"] is ad(m.layers[0].q, "b").lora_m  # live tensors


@pytest.mark.parametrize("variant", NON_REWRITING)
def test_second_adapter_is_the_identity_at_init_on_top_of_a_trained_first(variant: str) -> None:
    m = Toy()
    _attach(m, "lora", "first")
    with torch.no_grad():
        before = m(X)
    torch.manual_seed(3)
    ll.attach(m, _cfg(variant), calibration_data=CALIB if variant == "eva" else None, name="second")
    with torch.no_grad():
        after = m(X)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)  # hra: pairs of reflections, to rounding


@pytest.mark.parametrize("first,second", list(itertools.product(NON_REWRITING, repeat=2)))
def test_stack_equals_merging_the_adapters_one_by_one(first: str, second: str) -> None:
    m = Toy()
    _attach(m, first, "a", seed=0)
    _attach(m, second, "b", seed=1)
    with torch.no_grad():
        stacked = m(X)
        merged = copy.deepcopy(m)
        ll.merge(merged)
        assert not ll.is_attached(merged)
        # fp32 rounding of a different operation order, relative to the output's scale (delora's λ = 15 is large)
        torch.testing.assert_close(merged(X), stacked, rtol=1e-5, atol=1e-5 * stacked.abs().max().item())


@pytest.mark.parametrize("variant", ["lora", "dora", "ia3_ff", "hra"])
def test_gradients_reach_only_active_adapters_and_outputs_follow_set_active(variant: str) -> None:
    m = Toy()
    _attach(m, "lora", "a")
    _attach(m, variant, "b", seed=1)
    alone = Toy()  # only b, with b's tensors
    _attach(alone, variant, "b", seed=1)
    with torch.no_grad():
        for k, v in ll.adapter_state_dict(alone, "b").items():
            v.copy_(ll.adapter_state_dict(m, "b")[k])
    ll.set_active(m, "b")
    assert ll.active(m) == ["b"]
    out = m(X)
    torch.testing.assert_close(out, alone(X), rtol=0, atol=0)  # inactive: skipped, bit for bit
    out.square().sum().backward()
    for a in ll.targets(m, "a").values():
        assert not a.lora_A.requires_grad and a.lora_A.grad is None
    grads = [getattr(a, p).grad for a in ll.targets(m, "b").values() for p in a._lora_lite.trainable]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    ll.set_active(m, ["a", "b"])
    assert all(a.lora_A.requires_grad for a in ll.targets(m, "a").values())


def test_set_active_trainable_trains_a_new_adapter_on_top_of_a_frozen_one() -> None:
    """set_active(names, trainable=...): every adapter in names runs, only `trainable` gets gradients; a later
    attach leaves the frozen one frozen; set_active without trainable makes every active adapter train again."""
    m = Toy()
    _attach(m, "lora", "a")
    both = Toy()
    _attach(both, "lora", "a")
    _attach(m, "dora", "b", seed=1)
    _attach(both, "dora", "b", seed=1)
    ll.set_active(m, ["a", "b"], trainable="b")
    assert ll.active(m) == ["a", "b"]
    out = m(X)
    torch.testing.assert_close(out, both(X), rtol=0, atol=0)  # "a" still runs
    out.square().sum().backward()
    assert all(not a.lora_A.requires_grad and a.lora_A.grad is None for a in ll.targets(m, "a").values())
    assert all(a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0 for a in ll.targets(m, "b").values())
    _attach(m, "ia3", "c", seed=2)  # a new adapter trains; "a" stays frozen
    assert not any(a.lora_B.requires_grad for a in ll.targets(m, "a").values())
    assert all(a.lora_g.requires_grad for a in ll.targets(m, "c").values())
    ll.set_active(m, ["a", "b"])
    assert all(a.lora_A.requires_grad for a in ll.targets(m, "a").values())


def test_detach_in_any_order_restores_the_base_bit_for_bit() -> None:
    for order in itertools.permutations(["a", "b", "c"]):
        m = Toy()
        snap, grads = _snapshot(m), {n: p.requires_grad for n, p in m.named_parameters()}
        _attach(m, "lora", "a")
        _attach(m, "ia3_ff", "b", seed=1)
        _attach(m, "pissa", "c", seed=2, target_names=("lm_head",), exclude_names=())  # a layer of its own
        with torch.no_grad():
            full = m(X)
        for i, name in enumerate(order):
            ll.detach(m, name)
            assert ll.adapters(m) == [n for n in ["a", "b", "c"] if n not in order[: i + 1]]
            if i == 0 and name != "c":  # the others still compute as before without this one
                with torch.no_grad():
                    assert not torch.equal(m(X), full)
        _pristine(m, snap, grads)


def test_disabled_and_per_adapter_coefficients() -> None:
    m = Toy()
    base = copy.deepcopy(m)
    _attach(m, "lora", "a")
    _attach(m, "dora", "b", seed=1)
    only_b = copy.deepcopy(m)
    ll.detach(only_b, "a")
    with torch.no_grad():
        with ll.disabled(m):
            assert torch.equal(m(X), base(X))
        with ll.scaled(m, {"a": 0.0}):  # a off, b as trained
            torch.testing.assert_close(m(X), only_b(X), rtol=1e-6, atol=1e-6)
        with ll.scaled(m, 0.0):  # every active adapter at c = 0: the base model
            torch.testing.assert_close(m(X), base(X), rtol=1e-6, atol=1e-6)
    with pytest.raises(ll.AdapterError, match="ll.scaled: no adapter named 'nope'"):
        with ll.scaled(m, {"nope": 1.0}):
            pass


def test_merge_named_folds_those_and_removes_the_others() -> None:
    m = Toy()
    _attach(m, "lora", "a")
    _attach(m, "hra", "b", seed=1)
    only_a = copy.deepcopy(m)
    ll.detach(only_a, "b")
    with torch.no_grad():
        want = only_a(X)
        sd = ll.merged_state_dict(m, names=["a"])
        ll.merge(m, names=["a"])
        torch.testing.assert_close(m(X), want, rtol=1e-5, atol=1e-6)
        assert not ll.is_attached(m) and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_save_and_load_each_adapter_by_name(tmp_path) -> None:
    m = Toy()
    _attach(m, "lora", "a")
    _attach(m, "delora", "b", seed=1)
    with pytest.raises(ll.AdapterError, match=r"ll.save: several adapters are attached \(\['a', 'b'\]\); pass name="):
        ll.save(m, tmp_path / "x.safetensors")
    pa, pb = ll.save(m, tmp_path / "a.safetensors", "a"), ll.save(m, tmp_path / "b.safetensors", name="b")
    fresh = Toy()
    ll.load(fresh, pa)  # the name stored in the file
    ll.load(fresh, pb, name="other")
    assert ll.adapters(fresh) == ["a", "other"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), m(X), rtol=0, atol=0)
    with pytest.raises(ll.AdapterError, match="an adapter named 'a' is already attached"):
        ll.load(fresh, pa)


def test_a_version_1_file_loads_as_default(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    m = Toy()
    _attach(m, "lora", "default")
    p = ll.save(m, tmp_path / "v2.safetensors")
    with safe_open(str(p), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format_version"] == "2" and meta["name"] == "default"
    del meta["name"]
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={**meta, "format_version": "1"})
    fresh = Toy()
    ll.load(fresh, tmp_path / "v1.safetensors")
    assert ll.adapters(fresh) == ["default"]
    with torch.no_grad():
        assert torch.equal(fresh(X), m(X))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: ll.attach(m, _cfg("lora"), name="a"), "an adapter named 'a' is already attached"),
        (lambda m: ll.attach(m, _cfg("lora"), name="bad name"), r"must match \[A-Za-z0-9_\]\+"),
        (lambda m: ll.attach(m, _cfg("lora"), name="x.y"), r"must match \[A-Za-z0-9_\]\+"),
        (lambda m: ll.set_active(m, ["a", "nope"]), "ll.set_active: no adapter named 'nope'.*attached adapters: "),
        (lambda m: ll.set_active(m, "a", trainable="b"), r"trainable='b' is not among the adapters being activated"),
        (lambda m: ll.detach(m, "nope"), "ll.detach: no adapter named 'nope'"),
        (lambda m: ll.save(m, "unused.safetensors", name="nope"), "ll.save: no adapter named 'nope'"),
        (lambda m: ll.merge(m, names=["nope"]), "ll.merge: no adapter named 'nope'"),
        (lambda m: ll.targets(m), r"several adapters are attached"),
        (lambda m: ll.attach(m, _cfg("pissa"), name="p"), r"layers\.0\.q: adapter 'p' cannot share this layer"),
    ],
)
def test_bad_names_change_nothing(call, match: str) -> None:
    m = Toy()
    _attach(m, "lora", "a")
    _attach(m, "ia3", "b", seed=1)
    snap, grads = _snapshot(m), {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ll.AdapterError, match=match):
        call(m)
    assert ll.adapters(m) == ["a", "b"] and ll.active(m) == ["a", "b"]
    sd = m.state_dict()
    assert sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grads


def test_rewriting_adapters_do_not_stack() -> None:
    m = Toy()
    _attach(m, "antipasto", "rot", r=4)
    with pytest.raises(ll.AdapterError, match=r"layers\.0\.q: adapter 'l' cannot share this layer with \['rot'\]"):
        ll.attach(m, _cfg("lora"), name="l")
    assert ll.adapters(m) == ["rot"]


def test_inactive_pissa_is_the_base_layer_and_comes_back() -> None:
    m = Toy()
    base = copy.deepcopy(m)
    _attach(m, "pissa", "p")
    with torch.no_grad():
        on = m(X)
        ll.set_active(m, [])
        assert torch.equal(m(X), base(X))  # the original weight is swapped back in while it is off
        ll.set_active(m, "p")
        assert torch.equal(m(X), on)


def test_summary_shows_every_adapter() -> None:
    m = Toy()
    _attach(m, "lora", "a")
    _attach(m, "ia3", "b", seed=1)
    ll.set_active(m, "b")
    text = ll.summary(m)
    assert "'a' inactive: variant=lora" in text and "'b' active: variant=ia3" in text
    assert json.dumps(ll.adapters(m)) == '["a", "b"]'


def test_fp16_adapter_warns() -> None:
    with pytest.warns(UserWarning, match=r"dtype=torch.float16 .*AdamW.*bfloat16 or torch.float32"):
        ll.attach(Toy(), ll.LoraLiteConfig(dtype=torch.float16, target_roles=ROLES))


def test_eva_takes_one_batch_tensor_as_calibration_data() -> None:
    a, b = Toy(), Toy()
    ll.attach(a, _cfg("eva"), calibration_data=CALIB[0])
    ll.attach(b, _cfg("eva"), calibration_data=[CALIB[0]])
    assert all(torch.equal(v, ll.adapter_state_dict(b)[k]) for k, v in ll.adapter_state_dict(a).items())


def test_target_error_groups_blocks() -> None:
    from _models import tiny_llama

    with pytest.raises(ll.TargetError, match=r"model\.layers\.\{0\.\.1\}\.self_attn\.q_proj  inner"):
        ll.attach(tiny_llama(), ll.LoraLiteConfig(target_names=("nothing_matches",)))


def test_a_layer_whose_hook_never_runs_is_reported() -> None:
    m = Toy()
    _attach(m, "lora", "a")

    def fused(x):  # reads layers.1.q's weight directly, as a fused kernel does: its hook never runs
        x = m.layers[0](x)
        return torch.nn.functional.linear(x, m.layers[1].q.weight) + m.layers[1].down(torch.relu(m.layers[1].up(x)))

    with pytest.warns(UserWarning, match=r"never ran.*\['layers\.1\.q'\].*fused kernel"):
        fused(X).square().sum().backward()
    assert "hooks not run since attach: layers.1.q (a)" in ll.summary(m)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(X).square().sum().backward()  # once only
        m2 = Toy()
        _attach(m2, "lora", "a")
        m2(X).square().sum().backward()  # every hook ran: no warning
