"""ll.per_sample: a mixed batch equals running each row alone with its adapters, for every variant, stacks,
the batched low-rank path, gradients, ll.scaled inside, and the refusals."""

from __future__ import annotations

import pytest
import torch
from _models import Toy, llama_batch, perturb_trained, tiny_llama

import lora_lite as ll
from lora_lite.state import STACK

TARGETS = (r"layers\.\d+\.(q|up|down)$",)
from test_variants_common import CASES as _CASES  # noqa: E402

VARIANTS = sorted(_CASES)  # every registered variant


def _alone(model, x, names):
    """Row i run by itself with exactly its adapters active."""
    before = ll.active(model)
    outs = []
    for i, n in enumerate(names):
        s = () if n is None else (n,) if isinstance(n, str) else tuple(n)
        if s:
            ll.set_active(model, list(s))
            outs.append(model(x[i : i + 1]))
        else:
            with ll.disabled(model):
                outs.append(model(x[i : i + 1]))
    ll.set_active(model, before)
    return torch.cat(outs)


def _close(a, b, rtol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rtol * b.abs().max(), (a - b).abs().max()


def _cfg(variant, **kw):
    from test_variants_common import CASES

    return ll.LoraLiteConfig(variant=variant, target_names=TARGETS, **{**CASES[variant]["cfg"], **kw})


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_mixed_batch_equals_rows_alone(variant):
    model = Toy()
    rewrites = ll.REGISTRY[variant].rewrites_weight  # alone on their layers: a on block 0, b on block 1
    calib = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, n in enumerate("ab"):
        cfg = _cfg(variant, layers=(i,) if rewrites else None)
        ll.attach(model, cfg, calibration_data=calib if variant == "eva" else None, name=n)
        perturb_trained(model, n, i)
    names = ["a", None, "b", "a", ("a", "b"), None, "b"]
    x = torch.randn(len(names), 16, generator=torch.Generator().manual_seed(5))
    with ll.per_sample(model, names):
        y = model(x)
    _close(y, _alone(model, x, names))
    assert all(st.rows is None for st in (m._modules.get(STACK) for m in model.modules()) if st is not None)


def test_stack_of_output_and_input_side_adapters():
    """hra (input side) between two loras on the same layers: each row's stack in attach order."""
    model = Toy()
    for n, v in (("a", "lora"), ("h", "hra"), ("b", "dora"), ("g", "ia3_ff")):
        ll.attach(model, _cfg(v), name=n)
        perturb_trained(model, n, len(n) + ord(n))
    names = [("a", "h"), ("h", "b"), "g", None, ("a", "h", "b", "g"), ("b", "a")]
    x = torch.randn(len(names), 3, 16, generator=torch.Generator().manual_seed(1))
    with ll.per_sample(model, names):
        y = model(x)
    _close(y, _alone(model, x, names))


def test_lora_takes_one_batched_matmul_on_llama():
    """Several loras of different rank and alpha, one per row (or none): the gathered bmm path, 3-D inputs."""
    model = tiny_llama()
    for i, (r, alpha) in enumerate(((4, 8.0), (8, 4.0), (2, 2.0))):
        n = f"l{i}"
        cfg = ll.LoraLiteConfig(r=r, alpha=alpha, target_roles=("reader", "writer", "inner"))
        ll.attach(model, cfg, name=n)
        perturb_trained(model, n, i)
    names = ["l0", "l1", None, "l2", "l1", "l0"]
    ids = llama_batch(batch=len(names))
    with ll.per_sample(model, names):
        plan = model.model.layers[0].mlp.up_proj.lora_lite.rows
        assert plan.slots is not None and plan.slot_of_row.tolist() == [0, 1, 3, 2, 1, 0]
        y = model(input_ids=ids).logits
    outs = []
    for i, n in enumerate(names):
        if n is None:
            with ll.disabled(model):
                outs.append(model(input_ids=ids[i : i + 1]).logits)
        else:
            ll.set_active(model, n)
            outs.append(model(input_ids=ids[i : i + 1]).logits)
    _close(y, torch.cat(outs))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_gradients_equal_the_sum_over_rows(variant):
    """Training on a mixed batch: each adapter's gradient is the sum of its rows' gradients (bmm and group paths)."""
    model = Toy()
    for i, n in enumerate("ab"):
        ll.attach(model, _cfg(variant), name=n)
        perturb_trained(model, n, i)
    names = ["a", "b", None, "a"]
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]
    with ll.per_sample(model, names):
        g_mixed = torch.autograd.grad(model(x).square().sum(), params)
    total = [torch.zeros_like(p) for p in params]
    for i, n in enumerate(names):
        if n is None:
            continue
        ll.set_active(model, n)
        loss = model(x[i : i + 1]).square().sum()
        ps = [p for p in params if p.requires_grad]
        for p, g in zip(ps, torch.autograd.grad(loss, ps)):
            total[next(k for k, q in enumerate(params) if q is p)] += g
    ll.set_active(model, ["a", "b"])
    for g, t in zip(g_mixed, total):
        _close(g, t, 1e-5)


def test_scaled_inside_per_sample():
    model = Toy()
    for i, n in enumerate("ab"):
        ll.attach(model, _cfg("lora"), name=n)
        perturb_trained(model, n, i)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    with ll.per_sample(model, ["a", "b", "a"]), ll.scaled(model, {"a": 0.5, "b": -1.0}):
        y = model(x)
    rows = {}
    for n, c in (("a", 0.5), ("b", -1.0)):
        ll.set_active(model, n)
        with ll.scaled(model, c):
            rows[n] = model(x)
    _close(y, torch.stack([rows["a"][0], rows["b"][1], rows["a"][2]]))


# ---------------------------------------------------------------- refusals


def _model():
    model = Toy()
    ll.attach(model, _cfg("lora"), name="a")
    ll.attach(model, _cfg("lora"), name="b")
    return model


@pytest.mark.parametrize(
    "names,match",
    [
        (["a", "zz"], "no adapter named 'zz'"),
        ([], "non-empty list"),
        ("a", "non-empty list, one entry per row"),
        (["a", 3], r"names\[1\] must be an adapter name"),
    ],
)
def test_bad_names_refused(names, match):
    model = _model()
    with pytest.raises(ll.AdapterError, match=match):
        with ll.per_sample(model, names):
            pass
    assert ll.active(model) == ["a", "b"]


def test_length_not_batch_size_and_inactive_and_nesting():
    model = _model()
    x = torch.randn(3, 16)
    y = model(x)
    with pytest.raises(
        ll.AdapterError, match=r"layers\.0\.q: ll\.per_sample got 2 names, but this layer's input has shape \(3, 16\)"
    ):
        with ll.per_sample(model, ["a", "b"]):
            model(x)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # nothing left behind
    ll.set_active(model, "a")
    with pytest.raises(ll.AdapterError, match=r"adapter 'b' is not active"):
        with ll.per_sample(model, ["a", "b", None]):
            pass
    with ll.per_sample(model, ["a", None, "a"]):
        with pytest.raises(ll.AdapterError, match="do not nest"):
            with ll.per_sample(model, ["a", None, "a"]):
                pass
        model(x)


def test_gpt2_conv1d_with_pissa_and_dora():
    """GPT-2's Conv1D layout (biases): pissa on block 0 (rows without it need the original weight), dora on
    block 1; a mixed batch of sequences equals each row alone."""
    from _parity import base_model

    model = base_model("gpt2")
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4, alpha=8.0, layers=(0,)), name="p")
    ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4, alpha=8.0, layers=(1,)), name="d")
    perturb_trained(model, "p", 0)
    perturb_trained(model, "d", 1)
    names = ["p", None, "d", ("p", "d"), "p"]
    ids = llama_batch(batch=len(names))
    with torch.no_grad():
        with ll.per_sample(model, names):
            y = model(input_ids=ids).logits
        outs = []
        for i, n in enumerate(names):
            s = [] if n is None else [n] if isinstance(n, str) else list(n)
            if s:
                ll.set_active(model, s)
                outs.append(model(input_ids=ids[i : i + 1]).logits)
            else:
                with ll.disabled(model):
                    outs.append(model(input_ids=ids[i : i + 1]).logits)
    _close(y, torch.cat(outs))


def test_expert_weights_and_modules_to_save_are_refused() -> None:
    """target_parameters and modules_to_save act outside the layer hooks (on the whole batch): refused, naming
    the adapter, until it is deactivated."""
    from test_targets_params_patterns import qwen_moe

    m = qwen_moe()
    ll.attach(m, ll.LoraLiteConfig(r=2, target_roles=(), target_parameters=(r"experts\.gate_up_proj",)), name="e")
    ll.attach(m, ll.LoraLiteConfig(r=2, target_names=(r"q_proj$",)), name="q")
    with pytest.raises(ll.AdapterError, match="adapter 'e' uses target_parameters"):
        with ll.per_sample(m, ["q", None]):
            pass
    ll.set_active(m, "q")
    ids = llama_batch(seed=3, batch=2, seq=5)
    with torch.no_grad(), ll.per_sample(m, ["q", None]):
        out = m(ids).logits
    with torch.no_grad():
        alone = m(ids[:1]).logits
        with ll.disabled(m):
            base = m(ids[1:]).logits
    torch.testing.assert_close(out, torch.cat([alone, base]), rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    t = Toy()
    ll.attach(t, ll.LoraLiteConfig(r=2, target_names=(r"up$",), modules_to_save=(r"layers\.1\.q$",)), name="s")
    with pytest.raises(ll.AdapterError, match="adapter 's' uses modules_to_save"):
        with ll.per_sample(t, ["s"]):
            pass
