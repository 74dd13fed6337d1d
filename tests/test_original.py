"""original.py: a rewritten weight is restored bit for bit from W_res, thin factors and 4-bit ulp corrections.

The runtime's detach / disabled tests (test_variants_svd, test_steer, test_misuse) run on layers so small
that the dense fallback is smaller; these run the compact form itself, on sizes where it is chosen.
"""

from __future__ import annotations

import pytest
import torch
from _models import ad
from torch import nn

import lora_lite as ll
from lora_lite.original import Original
from lora_lite.target import all_finite

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _split(d_out: int, d_in: int, r: int, dtype: torch.dtype, seed: int = 0):
    """W0, a rank-r part L R of it (peft's PiSSA split: top-r SVD), and W_res = W0 − L R rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    W0 = (torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5).to(dtype)
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    L, R = U[:, :r] * S[:r], Vh[:r]
    W_res = (W0.double() - L @ R).to(dtype)
    return W0, W_res, L, R


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 64), (97, 65)])  # odd numel: the last 4-bit code pads a byte
def test_compact_restores_bit_for_bit(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    W0, W_res, L, R = _split(*shape, r=4, dtype=dtype)
    W0[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -3e-8, 5e-6]).to(dtype)  # tiny entries: corrections beyond ±7 ulp
    o = Original.compact(W0, W_res, L, R)
    assert o.dense is None
    out = o.weight(W_res)
    assert out.dtype == dtype and out.shape == W0.shape
    assert torch.equal(out.view(torch.uint8), W0.contiguous().view(torch.uint8))  # bits, incl. the sign of -0.0


def test_compact_is_chosen_and_small_with_exceptions_listed() -> None:
    W0, W_res, L, R = _split(512, 384, r=8, dtype=torch.float32)
    W0[3, :40] = 1e-12  # far below the residual's ulp: these need the exception list
    W_res = (W0.double() - L @ R).float()
    o = Original.compact(W0, W_res, L, R)
    # every kept tensor is in torch's own allocator, not a numpy buffer wrapped by from_numpy (whose storage is
    # not resizable), so torch's memory accounting (the benchmark's peak, the profiler) sees these bytes; and
    # it owns no more than its own elements (a factor that views a whole SVD output would keep all of it)
    for t in (o.L, o.R, o.nonzero, o.codes, o.diff):
        assert t.untyped_storage().resizable() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert o.dense is None and o.diff.numel() >= 40
    assert o.nbytes() < W0.numel() * W0.element_size() / 4  # 4-bit codes + thin fp64 factors + a short list
    assert torch.equal(o.weight(W_res), W0)


@pytest.mark.parametrize("shape", [(300, 1000), (12, 2**17 + 5)])  # 131-row blocks and a 38-row tail; 1 row each
def test_blocked_recompose_equals_whole_matrix_and_restores_across_blocks(shape: tuple[int, int]) -> None:
    """`_blocks` works a few rows at a time (original.py): the same bits as one whole-matrix pass, and the
    corrections and exception list land in the right block, including the last, partial one."""
    W0, W_res, L, R = _split(*shape, r=4, dtype=torch.float32)
    W0[:, -3:] = 1e-12  # exceptions in every block (every row), up to the last entry
    W_res = (W0.double() - L @ R).float()
    o = Original.compact(W0, W_res, L, R)
    assert o.dense is None and o.diff.numel() >= 3 * shape[0]
    acc = W_res.double()
    for k in range(L.shape[1]):
        acc += L[:, k, None] * R[k]
    assert torch.equal(torch.cat([w for _, _, w in o._blocks(W_res)]), acc.float().flatten())
    assert torch.equal(o.weight(W_res), W0)


def test_dense_fallback_when_compact_would_not_be_smaller() -> None:
    W0, W_res, L, R = _split(8, 8, r=4, dtype=torch.float32)  # fp64 factors alone outweigh the weight
    o = Original.compact(W0, W_res, L, R)
    assert o.dense is not None and torch.equal(o.weight(W_res), W0)


def test_widening_cast_restores_exactly_narrowing_to_rounding() -> None:
    W0, W_res, L, R = _split(256, 192, r=8, dtype=torch.float32)
    o = Original.compact(W0, W_res, L, R)
    assert o.dense is None
    assert torch.equal(o.weight(W_res.double()), W0.double())  # model.double() after attach: exact
    half = o.weight(W_res.half())  # model.half(): W_res lost bits; the restore is the original to fp16 rounding:
    # W_res's fp16 rounding (<= eps/2 |W_res|) plus the result's and the reference's (<= eps/2 |W| each)
    bound = torch.finfo(torch.float16).eps * (W_res.abs() + W0.abs()) + 2**-24
    err = (half.float() - W0.half().float()).abs()
    assert half.dtype == torch.float16 and (err <= bound).all() and (err > 0).any()


def _big_model(conv1d: bool) -> nn.Module:
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(192, 256), nn.Tanh(), Conv1D(256, 192))
    return nn.Sequential(nn.Linear(256, 192), nn.Tanh(), nn.Linear(192, 256))


@pytest.mark.parametrize(("conv1d", "dtype"), [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
@pytest.mark.parametrize("variant", ["pissa", "antipasto"])
def test_attach_keeps_compact_form_and_detach_after_training_is_exact(
    variant: str, conv1d: bool, dtype: torch.dtype
) -> None:
    model = _big_model(conv1d).to(dtype)
    raw = {n: p.detach().clone() for n, p in model.state_dict().items()}
    x = torch.randn(4, 7, 256, dtype=dtype)
    with torch.no_grad():
        base = model(x)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, r=8, target_names=(r"^[02]$",)))
    for layer in ll.targets(model).values():
        o = ad(layer)._lora_lite.original
        assert o.dense is None, "the compact form should be chosen at this size"
        # 4-bit codes are 1/8 of an fp32 weight (1/4 of bf16); on layers this small the fp64 factors add as much again
        limit = 0.4 if dtype == torch.float32 else 0.75
        assert o.nbytes() < limit * layer.weight.numel() * layer.weight.element_size()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        with ll.disabled(model):
            assert torch.equal(model(x), base)  # the original weights rebuilt for the block
        with ll.scaled(model, 0.0):  # y₀ from the rebuilt original, computed in the fp32 adapter dtype: bf16 rounding
            assert torch.allclose(model(x), base, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    ll.detach(model)
    for n, p in model.state_dict().items():
        assert torch.equal(p, raw[n]), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compact_original_of_a_cuda_model_lives_on_the_cpu_and_restores_exactly() -> None:
    model = _big_model(conv1d=False).cuda()
    raw = {n: p.detach().clone() for n, p in model.state_dict().items()}
    before = torch.cuda.memory_allocated()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=8, target_names=(r"^[02]$",)))
    adapter = sum(t.numel() * t.element_size() for t in ll.adapter_state_dict(model).values())
    assert torch.cuda.memory_allocated() - before <= adapter  # no copy of the weights kept on the device
    for layer in ll.targets(model).values():
        o = ad(layer)._lora_lite.original
        assert o.dense is None and o.L.device.type == "cpu" and o.codes.device.type == "cpu"
    ll.detach(model)
    for n, p in model.state_dict().items():
        assert p.is_cuda and torch.equal(p, raw[n]), n


def test_disabled_rebuilds_the_original_once_and_reuses_it() -> None:
    """Only the compact form is kept until a block needs the original; then the rebuilt one is reused."""
    model = _big_model(conv1d=False)
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        base = model(x)
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=8, target_names=(r"^[02]$",)))
    layers = list(ll.targets(model).values())
    assert all("original" not in ad(layer)._lora_lite.cache for layer in layers)  # compact only, until needed
    with torch.no_grad():
        with ll.disabled(model):
            assert torch.equal(model(x), base)
        kept = [ad(layer)._lora_lite.cache["original"] for layer in layers]
        with ll.disabled(model):  # a DPO-style second reference pass: no rebuild
            assert torch.equal(model(x), base)
            assert all(layer.weight.data_ptr() == w.data_ptr() for layer, w in zip(layers, kept))
        model.double()  # a cast since: rebuilt in the new dtype, still exact
        with ll.disabled(model):
            assert torch.equal(model(x.double()), _big_model(conv1d=False).double()(x.double()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_even_when_the_sum_overflows(dtype: torch.dtype) -> None:
    """all_finite's fast path is a sum; an overflowing sum of finite values must still count as finite."""
    big = torch.finfo(dtype).max
    t = torch.full((64,), big, dtype=dtype)  # every entry finite, the sum overflows
    assert all_finite(t)
    assert all_finite(torch.randn(1000).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[17] = bad
        assert not all_finite(u)
        v = torch.zeros(1000, dtype=dtype)
        v[999] = bad
        assert not all_finite(v)
    assert all_finite(torch.tensor([1, 2, 3]))  # integer tensors hold no NaN/inf
