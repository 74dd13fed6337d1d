"""Session-wide test setup.

Warm-up of torch's CPU vector math. torch computes tanh, exp, log, sin, ... on the CPU with MKL's vector
math library (VML, `ATen/cpu/vml.h`), in parallel chunks. In about 4% of test processes on the 2-core CI
machine, the FIRST float32 tanh of the process came out less accurate in one thread's chunk: errors up to
5e-5 (about 2^-14 relative; every later call was within 3e-8 of the float64 value). A test that computes
a base model's output once and later requires the adapted model to reproduce it bit for bit (identity at
init, `ll.disabled`, `detach`) then failed although the adapter was exact: caught in
test_original.py (`nn.Tanh` between two pissa layers), where the rebuilt weights were bit-identical and
only the reference `base = model(x)` was off. Not reproduced in 100 fresh processes outside pytest, nor
in 44 runs of a probe test placed after the same tests; a torch/MKL behaviour, not lora-lite's. Calling
each VML function once per thread before any test runs takes that first call out of every comparison: test_original.py failed in 3 of 74 runs without this
warm-up and in 0 of 150 with it (two runs at a time on the 2 cores, as when it was first seen).
"""

from __future__ import annotations

import pytest
import torch

# the ops torch routes to MKL's VML (IMPLEMENT_VML_MKL in ATen/cpu/vml.h, torch 2.13)
_VML = (
    torch.tanh,
    torch.exp,
    torch.log,
    torch.log2,
    torch.log10,
    torch.sin,
    torch.cos,
    torch.tan,
    torch.sqrt,
    torch.erf,
    torch.erfc,
    torch.erfinv,
    torch.acos,
    torch.asin,
    torch.atan,
    torch.trunc,
)


@pytest.fixture(scope="session", autouse=True)
def _warm_vector_math() -> None:
    n = 1 << 16  # vml.h: parallel_for(0, size, 2048, ...), so every thread gets a chunk
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(0.01, 0.99, n, dtype=dtype)
        for f in _VML:
            f(x)
