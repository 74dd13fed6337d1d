"""OFT and BOFT: parity with peft 0.21.2 (forward, gradients, 8 AdamW steps), the butterfly against a dense
construction, steering, merge, peft import/export both ways, quantized bases, and the refusals.

Models: the tiny Llama (GQA, no biases) and the tiny GPT-2 (Conv1D, biases) of tests/_parity.py. Tolerances
as tests/test_parity_peft.py: RTOL 1e-5 of the reference's scale for the forward and the gradients (same math,
another association order: peft rotates with an einsum, we with a bmm), TRAIN_RTOL 1e-4 after 8 AdamW steps at
lr 1e-3 (Adam's ~sign(g) first step amplifies rounding of near-zero gradient entries; one step moves an entry
by ~1e-2 of its scale, so 1e-4 still catches any step that differs by more than rounding).

peft's BOFT forces n_butterfly_factor to 1 on CPU (its block-diagonal kernel `fbd_cuda` is CUDA-only). The
factor > 1 cases run peft's own code with that kernel replaced by a dense torch.block_diag shim (`_fbd_shim`),
and `test_butterfly_matches_dense_construction` checks our gather-and-rotate product against the dense
M = P_m BD_m P_mᵀ ⋯ P_1 BD_1 P_1ᵀ built with peft's permutation functions.
"""

from __future__ import annotations

import json

import pytest
import torch
from _models import ad
from _parity import (
    TARGETS,
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

import lora_lite as ll
from lora_lite.variants import boft, oft

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as boft_layer  # noqa: E402

RTOL, TRAIN_RTOL, LR, STEPS = 1e-5, 1e-4, 1e-3, 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _FbdShim:
    """peft's fbd_cuda interface (forward / backward of a batched block diagonal), densely on CPU."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*x[n]) for n in range(x.shape[0])])]

    @staticmethod
    def backward(g, x):
        N, D, H, _ = x.shape
        return [
            torch.stack(
                [torch.stack([g[n, d * H : (d + 1) * H, d * H : (d + 1) * H] for d in range(D)]) for n in range(N)]
            )
        ]


@pytest.fixture
def fbd_shim(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _FbdShim)


def map_oft(pl):
    return {"lora_R": (pl.oft_R["default"].weight, lambda t: t)}


def map_boft(pl):
    return {"lora_R": (pl.boft_R["default"], lambda t: t), "lora_s": (pl.boft_s["default"], lambda t: t.reshape(-1))}


# name: (our variant_kwargs, peft config kwargs, mapping, needs the fbd shim)
CASES = {
    "oft_bs4": (dict(block_size=4), dict(r=0, oft_block_size=4), map_oft, False),
    "oft_r4_exact_cayley": (dict(use_cayley_neumann=False), dict(r=4, oft_block_size=0, use_cayley_neumann=False), map_oft, False),
    "oft_share_3terms": (dict(block_size=8, block_share=True, num_cayley_neumann_terms=3), dict(r=0, oft_block_size=8, block_share=True, num_cayley_neumann_terms=3), map_oft, False),
    "oft_coft": (dict(block_size=4, coft=True, eps=5e-2), dict(r=0, oft_block_size=4, coft=True, eps=5e-2), map_oft, False),
    "boft_bs4": (dict(block_size=4), dict(boft_block_size=4), map_boft, False),
    "boft_num4": (dict(block_num=4), dict(boft_block_num=4, boft_block_size=0), map_boft, False),
    "boft_bs4_f2": (dict(block_size=4, n_butterfly_factor=2), dict(boft_block_size=4, boft_n_butterfly_factor=2), map_boft, True),
    "boft_num8_f3": (dict(block_num=8, n_butterfly_factor=3), dict(boft_block_num=8, boft_block_size=0, boft_n_butterfly_factor=3), map_boft, True),
}  # fmt: skip


def _peft_cfg(case: str, kind: str):
    _, pkw, _, _ = CASES[case]
    cls = peft.OFTConfig if case.startswith("oft") else peft.BOFTConfig
    return cls(target_modules=TARGETS[kind], **pkw)


def _ours_cfg(case: str, kind: str, r: int = 4) -> ll.LoraLiteConfig:
    variant = case.split("_")[0]
    return ll.LoraLiteConfig(
        variant=variant, r=r, target_names=(ours_regex(TARGETS[kind]),), variant_kwargs=CASES[case][0]
    )


def _peft_base(kind: str):
    """peft's OFT/BOFT reject GPT-2's Conv1D: peft runs on the nn.Linear twin, ours on the Conv1D model."""
    return linear_twin(base_model(kind)) if kind == "gpt2" else base_model(kind)


def _pair(case: str, kind: str, request):
    if CASES[case][3]:
        request.getfixturevalue("fbd_shim")
    pm = peft.get_peft_model(_peft_base(kind), _peft_cfg(case, kind))
    pm.eval()
    ours = base_model(kind)
    ll.attach(ours, _ours_cfg(case, kind))
    pairs = peft_pairs(pm, ours)
    return pm, ours, pairs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_peft(case: str, kind: str, request) -> None:
    pm, ours, pairs = _pair(case, kind, request)
    mapping = CASES[case][2]
    if CASES[case][3]:  # the shim is in place: peft really runs the requested factor
        assert all(pl.boft_R["default"].shape[0] == CASES[case][0]["n_butterfly_factor"] for _, pl, _ in pairs)
    data = batches(kind, STEPS + 1, seed=1)
    with torch.no_grad():
        y_base = output(base_model(kind), kind, data[0])
    perturb_peft(pairs, mapping)
    copy_into_ours(pairs, mapping)
    y_p, y_o = output(pm, kind, data[0]), output(ours, kind, data[0])
    assert rel_err(y_p, y_base) > 1e-3  # the perturbation changed the model
    assert rel_err(y_o, y_p) <= RTOL
    loss(pm, kind, data[0]).backward()
    loss(ours, kind, data[0]).backward()
    errs = compare_tensors(pairs, mapping, grad=True)
    assert max(errs.values()) <= RTOL, max(errs.items(), key=lambda kv: kv[1])
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for m in (pm, ours)]
    for batch in data[1:]:
        for m, opt in zip((pm, ours), opts):
            opt.zero_grad()
            loss(m, kind, batch).backward()
            opt.step()
    errs = compare_tensors(pairs, mapping, grad=False)
    assert max(errs.values()) <= TRAIN_RTOL, max(errs.items(), key=lambda kv: kv[1])
    with torch.no_grad():
        assert rel_err(output(ours, kind, data[0]), output(pm, kind, data[0])) <= TRAIN_RTOL


@pytest.mark.parametrize("m, D, H", [(2, 4, 4), (3, 8, 2), (2, 2, 6), (4, 8, 4)])
def test_butterfly_matches_dense_construction(m: int, D: int, H: int) -> None:
    """x M for M = B_m ⋯ B_1, B_i = P_i blockdiag(R_i) P_iᵀ built densely with peft's permutation functions."""
    d = D * H
    g = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(m, D, H, H, generator=g, dtype=torch.float64)).Q
    M = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        perm = boft_layer.BOFTLayer.block_butterfly_perm(None, d, D // 2**i, H // 2, m - 1)
        P = boft_layer.BOFTLayer.perm2mat(None, perm).double()
        M = (P @ torch.block_diag(*R[i]) @ P.T) @ M
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    assert torch.allclose(boft.butterfly(x, R), x @ M, atol=1e-12)


def test_neumann_series_terms_as_peft() -> None:
    """peft's series: 1 term I; 2: I + 2Q; 3 and 4: I + 2Q + 2Q² + Q³; 5: … + 2Q³ + Q⁴."""
    Q = oft.skew(torch.randn(2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1)
    eye = torch.eye(4, dtype=torch.float64)
    P = [torch.linalg.matrix_power(Q, k) for k in range(6)]
    want = {1: eye, 2: eye + 2 * Q, 3: eye + 2 * Q + 2 * P[2] + P[3], 4: eye + 2 * Q + 2 * P[2] + P[3]}
    want[5] = eye + 2 * (Q + P[2] + P[3]) + P[4]
    for t, w in want.items():
        assert torch.allclose(oft.cayley(Q, True, t), w.expand_as(Q), atol=1e-14), t
    exact = oft.cayley(Q, False)
    assert torch.allclose(exact @ exact.transpose(-1, -2), eye.expand_as(Q), atol=1e-12)
    assert torch.allclose(exact, torch.linalg.solve(eye + Q, eye - Q, left=False))


@pytest.mark.parametrize("case", ["oft_bs4", "oft_r4_exact_cayley", "boft_bs4", "boft_num8_f3"])
def test_steering_merge_and_identity(case: str) -> None:
    kind = "gpt2"
    x = batches(kind, 1, seed=2)[0]
    base = base_model(kind)
    with torch.no_grad():
        y0 = output(base, kind, x)
    model = base_model(kind)
    ll.attach(model, _ours_cfg(case, kind))
    with torch.no_grad():
        assert torch.equal(output(model, kind, x), y0)  # identity at init, bit for bit
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        y1 = output(model, kind, x)
        assert rel_err(y1, y0) > 1e-3
        with ll.scaled(model, 0.0):
            assert torch.equal(output(model, kind, x), y0)
        with ll.scaled(model, 1.0):
            assert torch.equal(output(model, kind, x), y1)
        layer = ad(model.transformer.h[0].mlp.c_fc)
        if case.startswith("oft"):  # R(−c) = R(c)ᵀ exactly; the inverse exactly for the exact Cayley transform
            Rp, Rm = oft.rotation(layer, 0.5), oft.rotation(layer, -0.5)
            assert torch.allclose(Rm, Rp.transpose(-1, -2), atol=1e-6)
            if "exact" in case:
                assert torch.allclose(Rm @ Rp, torch.eye(Rp.shape[-1]).expand_as(Rp), atol=1e-6)
        else:  # every butterfly block: R(−1) R(1) = I
            Rp, Rm = boft.blocks(layer, 1.0), boft.blocks(layer, -1.0)
            assert torch.allclose(Rm @ Rp, torch.eye(Rp.shape[-1]).expand_as(Rp), atol=1e-6)
        sd = ll.merged_state_dict(model)
        ll.merge(model)
        assert rel_err(output(model, kind, x), y1) <= RTOL
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items() if k in model.state_dict())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "case", ["oft_bs4", "oft_r4_exact_cayley", "oft_share_3terms", "boft_bs4", "boft_num4", "boft_bs4_f2"]
)
def test_peft_io_both_ways(case: str, kind: str, tmp_path, request) -> None:
    """peft's save_pretrained -> ll.import_peft, and ll.export_peft -> peft's from_pretrained, same outputs."""
    pm, ours, pairs = _pair(case, kind, request)
    perturb_peft(pairs, CASES[case][2])
    x = batches(kind, 1, seed=3)[0]
    with torch.no_grad():
        want = output(pm, kind, x)
    pm.save_pretrained(tmp_path / "p")
    mine = base_model(kind)
    ll.import_peft(mine, tmp_path / "p")
    with torch.no_grad():
        assert rel_err(output(mine, kind, x), want) <= RTOL
    ll.export_peft(mine, tmp_path / "o")
    conf = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert conf["peft_type"] == case.split("_")[0].upper()
    back = peft.PeftModel.from_pretrained(_peft_base(kind), str(tmp_path / "o")).eval()
    with torch.no_grad():
        assert rel_err(output(back, kind, x), want) <= RTOL


def test_boft_dropout_matches_peft_in_training(request) -> None:
    """boft_dropout: same RNG draws as peft's MultiplicativeDropoutLayer, so the same blocks drop."""
    kind = "llama"
    pm = peft.get_peft_model(
        base_model(kind), peft.BOFTConfig(target_modules=TARGETS[kind], boft_block_size=4, boft_dropout=0.5)
    )
    ours = base_model(kind)
    ll.attach(ours, ll.LoraLiteConfig(variant="boft", target_names=(ours_regex(TARGETS[kind]),), variant_kwargs={"block_size": 4, "boft_dropout": 0.5}))  # fmt: skip
    pairs = peft_pairs(pm, ours)
    perturb_peft(pairs, map_boft)
    copy_into_ours(pairs, map_boft)
    x = batches(kind, 1, seed=4)[0]
    pm.train(), ours.train()
    torch.manual_seed(5)
    y_p = output(pm, kind, x)
    torch.manual_seed(5)
    y_o = output(ours, kind, x)
    assert rel_err(y_o, y_p) <= RTOL
    pm.eval(), ours.eval()
    assert rel_err(output(ours, kind, x), y_p) > 1e-4  # dropout did drop blocks in training


def _qmodel(kind: str):
    from test_quantized import qtoy

    return qtoy(kind).train()  # train mode: bnb's CPU 4-bit kernel never repacks


@pytest.mark.parametrize("qkind", ["nf4", "int8"])
@pytest.mark.parametrize(
    "variant, kw", [("oft", {"block_size": 8}), ("boft", {"block_size": 4, "n_butterfly_factor": 2})]
)
def test_quantized_base(variant: str, kw: dict, qkind: str) -> None:
    from test_quantized import _loss, _x

    model, x = _qmodel(qkind), _x()
    with torch.no_grad():
        y0 = model(x)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, target_roles=("reader", "writer", "inner"), variant_kwargs=kw))
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss_ = _loss(model, x)
        loss_.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss_.item())
    assert losses[-1] < losses[0]


def test_refusals() -> None:
    cfg = ll.LoraLiteConfig
    with pytest.raises(ll.ConfigError, match="module_dropout"):
        cfg(variant="oft", variant_kwargs={"module_dropout": 0.1})
    with pytest.raises(ll.ConfigError, match="dropout=0.1 is not supported"):
        cfg(variant="boft", dropout=0.1)
    with pytest.raises(ll.ConfigError, match="only one of variant_kwargs block_size and block_num"):
        cfg(variant="boft", variant_kwargs={"block_size": 4, "block_num": 4})
    with pytest.raises(ll.ConfigError, match="num_cayley_neumann_terms"):
        cfg(variant="oft", variant_kwargs={"num_cayley_neumann_terms": 0})
    model = base_model("llama")
    with pytest.raises(ll.ConfigError, match=r"mlp\.down_proj.*block_size=24 does not tile d_in=64"):
        ll.attach(model, cfg(variant="oft", target_names=("down_proj",), variant_kwargs={"block_size": 24}))
    with pytest.raises(ll.ConfigError, match=r"n_butterfly_factor=5 does not tile d_in=32"):
        ll.attach(model, cfg(variant="boft", variant_kwargs={"block_size": 4, "n_butterfly_factor": 5}))
    assert ll.adapters(model) == []


def test_import_refuses_unsupported_peft_options(tmp_path) -> None:
    pm = peft.get_peft_model(
        base_model("llama"), peft.OFTConfig(target_modules=TARGETS["llama"], r=0, oft_block_size=4)
    )
    pm.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, "bias": "all"}))
    model = base_model("llama")
    with pytest.raises(ll.LoadError, match=r"\['bias'\]"):
        ll.import_peft(model, tmp_path)
    assert ll.adapters(model) == []
