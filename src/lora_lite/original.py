"""The weight a rewriting variant replaced (pissa, antipasto), kept so that `detach` restores it bit for bit.

A dense copy doubles the memory of every targeted weight (for a 7B model with every linear layer
targeted, about 13 GB in bf16). We keep what is needed to recompute it exactly instead:

    W = W_res + L R + c · ulp(W)       L R: the rank-r part the variant moved out of W, given by the variant
                                       as two thin factors (pissa: s·B₀ and A₀; antipasto: U diag(S) and Vh)
                                       c:   a small integer per entry, 0 for most

`_blocks` computes W̃ = round(W_res + Σ_k L[:, k] R[k, :]) in float64 on the CPU, one rank-1 update at a
time in a fixed order, each a separate elementwise multiply and add (or one multiply-add where the product
is exact, see `_blocks`), so it gives the same bits at attach
and at detach whatever the device, thread count or memory alignment (a BLAS product may not: its kernels
pick FMA or not, and their blocking, by size, alignment and threads).

c = bits(W) − bits(W̃), the difference of the integer views (units in the last place), is 0 for 72–76% of
the entries of the fp32 weights we measured (all-MiniLM-L6-v2, the benchmark's Llama, r = 8) and |c| ≤ 7
for 98.5–99%. A bitmap marks the entries with c ≠ 0 (1 bit per entry); only those get a 4-bit code (c + 7,
two per byte), and code 15 sends the rare |c| > 7 (entries of W much smaller than the residual's, whose ulp
is finer) to an exception list of their c, in index order. On the benchmark's Llama that is 4.7 MiB instead
of a 48 MiB dense copy (10 MiB with a 4-bit code for every entry): bitmap and codes 3 MiB (1/16 of the fp32
weights; it would be 1/8 of bf16 ones), the factors 1.2 MiB (float32 where that is exact, else float64),
the list 0.5 MiB. All of it lives in CPU memory, whatever device the model is on (a model on a GPU keeps no
extra device memory). Where it would not be smaller, or the variant gives no factors, the dense copy is
kept (on the weight's device).

Speed: on the benchmark's Llama (12.6M weights, 2 threads) compacting takes 0.13 s and restoring 0.16 s.
The recompute uses one fused multiply-add per rank-1 term when the factors are fp32 (exact products, so
the same bits as a separate multiply and add); the bitmap and the compaction of the codes use numpy
(`flatnonzero`, `packbits`), which does this 3x faster than torch's boolean indexing on the CPU.

`ll.disabled` / `ll.scaled` need the dense original while they run: `original_weight` below rebuilds it
on first use and keeps it in the adapter's cache (so only models that use them pay for the dense copy).
The runtime helpers at the end of this file (keep, rebuild, check, swap, drop) are everything else
attach, detach, ll.disabled and ll.set_active do for a rewriting variant.

Restoring from a residual in another dtype (`model.double()` after attach): a widening cast is undone
exactly, so the restore is exact too; after a narrowing one (`model.half()`) W_res has lost bits and the
result is W̃ from the rounded residual, the original to that cast's rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import AdapterError
from .guards import require_original
from .state import for_cache
from .target import all_finite, fingerprint, is_conv1d, tensor_hash

_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_WIDENS = {  # dtype -> the dtypes that hold every one of its values exactly
    torch.float16: (torch.float16, torch.float32, torch.float64),
    torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64),
    torch.float32: (torch.float32, torch.float64),
    torch.float64: (torch.float64,),
}
_MAX = 7  # |c| <= 7 fits a 4-bit code c + 7 in 0..14; code 15 marks an entry of the exception list
_BLOCK = 2**17  # float64 entries per block of rows in `_blocks` (1 MiB: the reused buffers stay in L2)


@dataclass
class Original:
    dtype: torch.dtype
    finite: bool  # the original had no NaN/inf (attach checks that the rewritten weight has none either)
    dense: torch.Tensor | None = None  # fallback: the original itself
    L: torch.Tensor | None = None  # (d_out, k) float64 (float32 if exact), CPU; the weight's storage layout
    R: torch.Tensor | None = None  # (k, d_in) float64 (float32 if exact), CPU                (Conv1D: transposed)
    nonzero: torch.Tensor | None = None  # uint8 bitmap, 1 bit per entry (LSB first): c != 0
    codes: torch.Tensor | None = None  # uint8, two 4-bit codes per byte (c + 7, or 15), for the entries with c != 0
    diff: torch.Tensor | None = None  # int32 (int64 if needed), c of the entries with code 15 (|c| > 7), in order

    @classmethod
    def dense_copy(cls, W0: torch.Tensor) -> Original:
        return cls(W0.dtype, all_finite(W0), dense=W0.detach().clone())

    @classmethod
    def compact(
        cls, W0: torch.Tensor, W_res: torch.Tensor, L: torch.Tensor, R: torch.Tensor, finite: bool | None = None
    ) -> Original:
        """The smaller of the compact form (W_res, L R, c) and W0 itself (kept, not copied). L, R in W0's layout."""
        finite = all_finite(W0) if finite is None else finite
        dense = cls(W0.dtype, finite, dense=W0)  # the fallback: the runtime passes its own private copy of W
        if W0.dtype not in _INT or W0.shape != W_res.shape or W_res.dtype != W0.dtype:
            return dense
        o = cls(W0.dtype, finite, L=_thin(L), R=_thin(R))
        a = _ints(W0.detach().cpu()).numpy()
        nonzero = np.empty(a.size, dtype=bool)
        code, diff = [], []
        for lo, hi, w in o._blocks(W_res):  # block by block: every temporary stays in the CPU's cache
            b = _ints(w).numpy()
            nz = np.not_equal(a[lo:hi], b, out=nonzero[lo:hi])
            at = np.flatnonzero(nz)  # (numpy: 3x faster than torch's boolean indexing on the CPU)
            c = a[lo:hi][at].astype(np.int64) - b[at]  # exact, even where the sign bit differs
            cc = (np.clip(c, -_MAX - 1, _MAX + 1) + _MAX) & 15  # c + 7 for |c| <= 7; -8 -> -1 -> 15, 8 -> 15
            code.append(cc.astype(np.uint8))
            far = cc == 15
            if far.any():
                diff.append(c[far])
        # (cloned into torch's allocator, which the benchmark's memory count and torch's own tools can see)
        o.nonzero = torch.from_numpy(np.packbits(nonzero, bitorder="little")).clone()  # LSB first, zero-padded
        code = np.concatenate(code)
        if code.size % 2:
            code = np.append(code, np.uint8(0))
        o.codes = torch.from_numpy(code[0::2] | (code[1::2] << 4)).clone()
        diff = np.concatenate(diff) if diff else np.zeros(0, np.int64)
        if diff.size == 0 or np.abs(diff).max() < 2**31:
            diff = diff.astype(np.int32)  # int64 only when some |c| needs it (a sign flip of an fp32 entry)
        o.diff = torch.from_numpy(diff).clone()
        return o if o.nbytes() < W0.numel() * W0.element_size() else dense

    def _blocks(self, W_res: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, round(W_res + L R) of flat entries lo:hi in the original dtype), a few rows at a time.

        Deterministic: in float64, W_res plus one rank-1 term at a time in a fixed order, each a separate
        multiply and add (two IEEE roundings, never an FMA, which a BLAS ger or a fused addcmul may use in one
        loop and not in another) or, with fp32 factors, one addcmul_ whose product is exact (one rounding,
        fused or not), so the same bits at attach and at detach whatever the device or threads.
        Rows in blocks of ~1 MiB of float64, through reused buffers: 7x faster than whole-matrix passes
        on a 4096 x 4096 weight (0.17 vs 1.17 s, 2 threads), where every fresh 134 MB temporary page-faults.
        """
        src = W_res.detach().to("cpu")
        n_rows, n_cols = self.L.shape[0], self.R.shape[1]
        src = src.reshape(n_rows, n_cols)
        # Factors held in fp32 (`_thin`): every product L[i, k]·R[k, j] of two fp32 values is exact in fp64
        # (24 + 24 significant bits <= 53), so a fused multiply-add rounds once, like the add alone: addcmul_
        # gives the same bits as mul then add, with or without FMA, in half the passes.
        exact_products = self.L.dtype == self.R.dtype == torch.float32
        L, R = self.L.double(), self.R.double()
        step = max(1, _BLOCK // n_cols)
        acc = torch.empty(min(step, n_rows), n_cols, dtype=torch.float64)
        tmp = None if exact_products else torch.empty_like(acc)
        for i in range(0, n_rows, step):
            j = min(i + step, n_rows)
            a = acc[: j - i]
            a.copy_(src[i:j])
            for k in range(L.shape[1]):
                if tmp is None:
                    a.addcmul_(L[i:j, k, None], R[k])
                else:
                    a.add_(torch.mul(L[i:j, k, None], R[k], out=tmp[: j - i]))
            yield i * n_cols, j * n_cols, a.to(self.dtype).flatten()

    def weight(self, current: torch.Tensor) -> torch.Tensor:
        """The original weight in `current`'s dtype, device and shape; `current` is the (rewritten) weight now."""
        if self.dense is not None:
            return self.dense.to(device=current.device, dtype=current.dtype)
        if current.is_meta:  # model.to("meta"): no values anywhere, only the shape and dtype to follow
            return torch.empty_like(current)
        exact = current.dtype in _WIDENS[self.dtype]  # W_res unchanged by any cast since attach: apply corrections
        out = torch.empty(current.numel(), dtype=self.dtype)
        if exact:
            nonzero = np.unpackbits(self.nonzero.numpy(), count=current.numel(), bitorder="little").view(bool)
            codes = self.codes.numpy()
            code = np.stack([codes & 15, codes >> 4], 1).reshape(-1)
            diff = self.diff.numpy()
            used = far = 0  # codes and exception-list entries used by the blocks so far
        for lo, hi, w in self._blocks(current.to(self.dtype)):
            if exact:
                at = np.flatnonzero(nonzero[lo:hi])
                c = code[used : used + at.size].astype(np.int64) - _MAX
                used += at.size
                escape = c == _MAX + 1  # code 15: c is the next entry of the exception list
                n_far = int(escape.sum())
                c[escape] = diff[far : far + n_far]
                far += n_far
                b = _ints(w).numpy()  # w is this block's own fresh tensor: corrected in place
                b[at] = b[at] + c  # int64 sum (exact past a sign flip); the result fits the dtype's integer
            out[lo:hi] = w
        return out.view(current.shape).to(device=current.device, dtype=current.dtype)

    def nbytes(self) -> int:
        ts = (self.dense, self.L, self.R, self.nonzero, self.codes, self.diff)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _thin(F: torch.Tensor) -> torch.Tensor:
    """A factor on the CPU in float64, or in float32 where that holds it exactly (pissa's A₀, and s·B₀ for a
    power-of-two s; antipasto's Vh): half the bytes, the same values."""
    F64 = F.detach().to("cpu", torch.float64, copy=True)  # a copy: never a view of a larger tensor or a live parameter
    F32 = F64.float()
    return F32 if torch.equal(F32.double(), F64) else F64


def _ints(t: torch.Tensor) -> torch.Tensor:
    """The flat integer view of a float tensor's bits (no copy when contiguous)."""
    return t.contiguous().view(_INT[t.dtype]).reshape(-1)


# ---------------------------------------------------------------- the runtime's side (one adapter `a` on a layer)


def keep(a: torch.nn.Module) -> None:
    """Before the variant's init: a private dense copy of the weight, and its fingerprint (for load)."""
    st = a._lora_lite
    st.original = Original.dense_copy(a.weight.data)  # until init succeeded
    st.fingerprint = fingerprint(a)
    st.original_weight = functools.partial(original_weight, a)


def compact(a: torch.nn.Module) -> None:
    """After the variant's init: the compact form from its `residual_factors` (W − W_res = L R), if it has them."""
    st = a._lora_lite
    if st.variant.residual_factors is not None:
        L, R = st.variant.residual_factors(a)
        if is_conv1d(a):  # the weight is stored (d_in, d_out): factors of the transpose
            L, R = R.T, L.T
        st.original = Original.compact(st.original.dense, a.weight.data, L, R, finite=st.original.finite)
    if st.original.dense is None:  # rebuilt from W_res: note which W_res (check_residual)
        st.residual_hash = tensor_hash(a.weight)


def drop(a: torch.nn.Module) -> None:
    """keep_original=False: free what restores the rewritten weight; detach and ll.disabled can no longer."""
    st = a._lora_lite
    if st.original is not None:
        st.original, st.residual_hash, st.original_dropped = None, None, True
        st.cache.pop("original", None)


def original_weight(a: torch.nn.Module, cache: bool = True, what: str = "original_weight") -> torch.Tensor:
    """The weight the variant replaced, in the current weight's dtype and device.

    Rebuilt bit for bit from the compact form on first use, then kept in the adapter's cache, so that repeated
    `ll.disabled` / `ll.scaled` blocks (a DPO reference model every step) cost nothing after the first: the
    memory of a dense copy, paid only by models that use them. detach frees it. cache=False (one-off readers
    such as export_peft): rebuilt if not cached, and not kept.
    """
    st = a._lora_lite
    require_original(st, what)
    w_res = residual(a)
    W0 = cached(st, w_res)
    if W0 is None:  # first use, or model.to() since
        check_residual(a)
        if not cache:
            return st.original.weight(w_res)
        with for_cache():
            W0 = st.cache["original"] = st.original.weight(w_res)
    return W0


def residual(a: torch.nn.Module) -> torch.Tensor:
    """W_res: the layer's weight, or the one set aside while the original is swapped in (`use_original`)."""
    return a._lora_lite.cache.get("w_res", a.weight.data)


def cached(st, w_res: torch.Tensor) -> torch.Tensor | None:
    W0 = st.cache.get("original")
    return W0 if W0 is not None and W0.dtype == w_res.dtype and W0.device == w_res.device else None


def check_residual(a: torch.nn.Module) -> None:
    """Raise if W_res is not the one attach wrote (the compact original is rebuilt from it).

    Not checkable after a narrowing cast of the model (`model.half()`), which rounds W_res: then the
    original is rebuilt to that cast's rounding (see the top of this file).
    """
    st = a._lora_lite
    if st.residual_hash is None:
        return
    w = residual(a)
    if w.is_meta or w.dtype not in _WIDENS[st.original.dtype]:
        return
    if tensor_hash(w.to(st.original.dtype)) != st.residual_hash:
        raise AdapterError(
            f"{st.name}: layer.weight is no longer the residual W_res that {st.variant.name!r} wrote at attach "
            "(it was written since, e.g. by load_state_dict of a full checkpoint), so the original base weight "
            "cannot be rebuilt from it; nothing was changed. To get the base model back, reload it; to keep the "
            "adapted model as plain weights, use ll.merge(model)."
        )


def check_restorable(a: torch.nn.Module, what: str) -> None:
    """Every check `restore` would otherwise fail half way through, before anything changes."""
    st = a._lora_lite
    require_original(st, what)
    if st.original is not None and "w_res" not in st.cache and cached(st, a.weight.data) is None:
        check_residual(a)


def restore(a: torch.nn.Module) -> None:
    """detach: put the original weight back (in today's dtype/device: model.to since attach)."""
    st = a._lora_lite
    if st.original is not None and "w_res" not in st.cache:  # (swapped in, it already is the original)
        a._base.weight.data = original_weight(a)


def use_original(a: torch.nn.Module) -> bool:
    """ll.disabled / an inactive adapter: swap the original weight in; False if it already is."""
    st = a._lora_lite
    if st.original is None or "w_res" in st.cache:
        return False
    W0 = original_weight(a)
    st.cache["w_res"] = a.weight.data
    a._base.weight.data = W0
    return True


def use_residual(a: torch.nn.Module) -> None:
    """Undo `use_original`."""
    w_res = a._lora_lite.cache.pop("w_res", None)
    if w_res is not None:
        a._base.weight.data = w_res
