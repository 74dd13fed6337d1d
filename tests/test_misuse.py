"""Misuse after attach (issue 9): inputs and bases in other dtypes, `model.to(dtype/device)`, `model.half()`,
`eval()` and dropout, save after a cast, determinism, deepcopy, and calls in the wrong order.

The dtype rule (README "Guarantees"): the hook runs the adapter math in the dtype of the layer's adapter
tensors (cfg.dtype at attach; after `model.half()` / `model.to(dtype)` whatever they were cast to), and
returns the base output's dtype. `save` writes the tensors as they are and records their dtype in the
saved config, so `load` recreates exactly what was saved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import Toy, ad
from test_robustness import assert_pristine, snapshot

import lora_lite as ll

VARIANTS = sorted(n for n in ll.REGISTRY if not n.startswith("_"))
BASE_CFG = dict(r=4, alpha=8.0, target_roles=("reader", "writer", "inner"))
VARIANT_CFG = {
    "road": dict(variant_kwargs={"group_size": 8})
}  # Toy's out_features 16, 40: peft's default 64 fits neither


def _x(seed: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _calib(variant: str, dtype: torch.dtype = torch.float32):
    if ll.REGISTRY[variant].group_init is None:
        return None
    g = torch.Generator().manual_seed(11)
    return [torch.randn(32, 16, generator=g).to(dtype) for _ in range(2)]


def _attached(variant: str, dtype=torch.float32, base_dtype=torch.float32, seed: int = 0, **kw) -> Toy:
    """Toy with the adapter attached and moved off its init (so the adapter path matters)."""
    m = Toy(seed=seed).to(base_dtype)
    ll.attach(
        m,
        ll.LoraLiteConfig(variant=variant, dtype=dtype, **{**BASE_CFG, **VARIANT_CFG.get(variant, {}), **kw}),
        calibration_data=_calib(variant, base_dtype),
    )
    _perturb(m, seed)
    return m


def _perturb(m, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for layer in ll.targets(m).values():
            for n in ad(layer)._lora_lite.names:
                p = getattr(layer, n)
                if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                    p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _eps(*dtypes: torch.dtype) -> float:
    return max(torch.finfo(d).eps for d in dtypes)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "base_dtype, dtype",
    [
        (torch.bfloat16, torch.float32),  # adapter wider than the input
        (torch.float64, torch.float32),  # fp64 input into an fp32 adapter
        (torch.float32, torch.bfloat16),  # adapter narrower than the input
        (torch.float32, torch.float64),
    ],
    ids=["bf16-base/fp32-adapter", "fp64-base/fp32-adapter", "fp32-base/bf16-adapter", "fp32-base/fp64-adapter"],
)
def test_input_dtype_differs_from_adapter_dtype(variant, base_dtype, dtype) -> None:
    """Output in the base dtype, finite, and equal to the same adapter evaluated in fp64 up to the narrower dtype."""
    m = _attached(variant, dtype=dtype, base_dtype=base_dtype)
    m.eval()
    x = _x(dtype=base_dtype)
    with torch.no_grad():
        y = m(x)
        ref = copy.deepcopy(m).double()(x.double())  # same tensor values, every op in fp64
    assert y.dtype == base_dtype and torch.isfinite(y).all()
    err = _rel_err(y, ref)
    assert err <= 32 * _eps(base_dtype, dtype), f"rel err {err:.3g}"


DOUBLE_BROKEN: dict[str, str] = {}  # dora's cached norm now follows dtype casts

HALF_BROKEN: dict[str, str] = {}  # delora computes in >= fp32 after model.half()


def _marked(broken: dict[str, str]) -> list:
    return [
        pytest.param(v, marks=pytest.mark.xfail(reason=broken[v], strict=True)) if v in broken else v for v in VARIANTS
    ]


@pytest.mark.parametrize("variant", _marked(DOUBLE_BROKEN))
def test_model_double_after_attach(variant, tmp_path) -> None:
    """model.double() casts the adapter too; the hook then computes in fp64; save records float64; load agrees."""
    m = _attached(variant)
    m.eval()
    x = _x()
    with torch.no_grad():
        y32 = m(x)
        m.double()
        assert all(t.dtype == torch.float64 for t in ll.adapter_state_dict(m).values())
        y64 = m(x.double())
    assert y64.dtype == torch.float64 and _rel_err(y64, y32) <= 32 * _eps(torch.float32)
    p = ll.save(m, tmp_path / "a.safetensors")
    cfg, _, tensors = ll.read_adapter(p)
    assert cfg.dtype == torch.float64 and all(t.dtype == torch.float64 for t in tensors.values())
    if ll.REGISTRY[variant].rewrites_weight:  # fingerprinted against the fp32 base it was attached to
        fresh = Toy()
    else:
        fresh = Toy().double()
    ll.load(fresh, p)
    fresh.double().eval()
    with torch.no_grad():
        assert torch.equal(fresh(x.double()), y64)
    ll.detach(m)  # weight-rewriting variants restore the original weight in the model's new dtype
    ref = Toy().double()
    sd, sd_ref = m.state_dict(), ref.state_dict()
    assert all(sd[k].dtype == torch.float64 and torch.equal(sd[k], sd_ref[k]) for k in sd_ref)


@pytest.mark.parametrize("variant", _marked(HALF_BROKEN))
def test_model_half_after_attach(variant, tmp_path) -> None:
    """model.half(): adapter tensors become fp16 and the math follows them (no fp32/fp16 mix, no error).

    Save writes fp16 tensors with dtype=float16 in the config; load onto a fresh base then .half()
    reproduces the halved model bit for bit. Weight-rewriting variants re-derive W_res at load from
    float16 init factors (the saved model derived it from fp32 ones, then rounded): to fp16 rounding.
    """
    m = _attached(variant)
    m.eval()
    x = _x()
    with torch.no_grad():
        y32 = m(x)
        m.half()
        y16 = m(x.half())
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    assert _rel_err(y16, y32) <= 2e-2, _rel_err(y16, y32)  # 2 blocks of fp16 rounding (eps 9.8e-4)
    p = ll.save(m, tmp_path / "a.safetensors")
    cfg, _, tensors = ll.read_adapter(p)
    assert cfg.dtype == torch.float16 and all(t.dtype == torch.float16 for t in tensors.values())
    fresh = Toy()
    ll.load(fresh, p)
    fresh.half().eval()
    with torch.no_grad():
        y_loaded = fresh(x.half())
    if ll.REGISTRY[variant].rewrites_weight:
        assert _rel_err(y_loaded, y16) <= 8 * _eps(torch.float16)
    else:
        assert torch.equal(y_loaded, y16)


def test_save_refuses_mixed_adapter_dtypes(tmp_path) -> None:
    m = _attached("lora")
    m.layers[0].half()  # one block cast, the other not: the file could not say which dtype it holds
    with pytest.raises(ll.AdapterError, match="mixed dtypes.*cast the whole model"):
        ll.save(m, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_to_meta_device_moves_the_adapter(variant) -> None:
    """A device move (`meta` stands in for an accelerator on CPU-only CI): every adapter tensor follows."""
    m = _attached(variant)
    m.to("meta")
    assert all(t.device.type == "meta" for t in ll.adapter_state_dict(m).values())
    y = m(torch.empty(6, 16, device="meta"))
    assert y.device.type == "meta" and y.shape == (6, 7)
    ll.detach(m)  # weight-rewriting variants: the kept original follows to the model's device
    assert all(t.device.type == "meta" for t in m.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_to_cuda_and_back(variant) -> None:
    m = _attached(variant)
    m.eval()
    x = _x()
    with torch.no_grad():
        y = m(x)
        m.cuda()
        assert all(t.is_cuda for t in ll.adapter_state_dict(m).values())
        y_cuda = m(x.cuda())
    assert _rel_err(y_cuda.cpu(), y) <= 1e-4  # different kernels: not bit-exact across devices (TF32 off)
    m.cpu()
    ll.detach(m)
    sd, ref = m.state_dict(), Toy().state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- eval / dropout


def _accepts_dropout(variant: str) -> bool:
    try:
        ll.LoraLiteConfig(variant=variant, dropout=0.5, **BASE_CFG)
    except ll.ConfigError:
        return False
    return True


@pytest.mark.parametrize("variant", [v for v in VARIANTS if _accepts_dropout(v)])
def test_eval_disables_dropout(variant) -> None:
    m = _attached(variant, dropout=0.5)
    no_drop = _attached(variant, dropout=0.0)  # same seed: same base and adapter values
    x = _x()
    m.eval()
    no_drop.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        assert torch.equal(m(x), no_drop(x))
        m.train()
        torch.manual_seed(0)
        a = m(x)
        torch.manual_seed(1)
        b = m(x)
    assert not torch.equal(a, b), "dropout inactive in training mode"


def test_variants_without_dropout_refuse_it() -> None:
    for v in VARIANTS:
        if not _accepts_dropout(v):
            with pytest.raises(ll.ConfigError, match="dropout"):
                ll.LoraLiteConfig(variant=v, dropout=0.5, **BASE_CFG)


# ---------------------------------------------------------------- determinism


def _run(variant: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """attach from a seed, two AdamW steps with dropout, then eval outputs."""
    torch.manual_seed(seed)
    m = Toy(seed=seed)
    kw = {"dropout": 0.1} if _accepts_dropout(variant) else {}
    cfg = ll.LoraLiteConfig(variant=variant, **{**BASE_CFG, **VARIANT_CFG.get(variant, {}), **kw})
    ll.attach(m, cfg, calibration_data=_calib(variant))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = _x()
    for _ in range(2):
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    with torch.no_grad():
        y = m(x)
    return {k: v.detach().clone() for k, v in ll.adapter_state_dict(m).items()}, y


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_gives_bit_identical_adapters_and_outputs(variant) -> None:
    sd1, y1 = _run(variant, seed=5)
    torch.manual_seed(999)  # the global RNG state in between must not matter
    sd2, y2 = _run(variant, seed=5)
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(y1, y2)
    sd3, _ = _run(variant, seed=6)  # and the seed matters (different base, different init)
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)


# ---------------------------------------------------------------- wrong order, wrong objects


def test_deepcopy_of_an_attached_model_is_independent() -> None:
    """A deepcopy (e.g. a frozen DPO reference) carries its own adapter: same outputs, separate tensors and hooks."""
    m = _attached("lora")
    snap_x = _x()
    with torch.no_grad():
        y = m(snap_x)
        c = copy.deepcopy(m)
        assert torch.equal(c(snap_x), y)
        ll.targets(c)["layers.0.up"].lora_B.zero_()
        assert torch.equal(m(snap_x), y)  # the original is untouched
    ll.detach(c)
    with torch.no_grad():
        assert torch.equal(m(snap_x), y)  # detaching the copy left the original's hooks alone
        assert torch.equal(c(snap_x), Toy()(snap_x))


@pytest.mark.parametrize("variant", ["lora", "pissa"])
@pytest.mark.parametrize("block", ["disabled", "scaled"])
def test_copying_inside_a_steering_block_raises_and_outside_it_works(variant: str, block: str, tmp_path) -> None:
    """A copy taken inside ll.disabled / ll.scaled would keep that state for good (nothing resets it, and for
    pissa its weight would be the swapped-in original): deepcopy and pickling refuse; after the block they work."""
    import pickle

    m, x = _attached(variant), _x()
    with torch.no_grad():
        y = m(x)
    with ll.disabled(m) if block == "disabled" else ll.scaled(m, 0.5):
        with pytest.raises(
            ll.AdapterError, match=r"copied or pickled inside ll.disabled / ll.scaled.*ll.detach\(copy\)"
        ):
            copy.deepcopy(m)
        with pytest.raises(ll.AdapterError, match="copied or pickled inside"):
            pickle.dumps(m)
    c = copy.deepcopy(m)
    with torch.no_grad():
        assert torch.equal(c(x), y) and torch.equal(pickle.loads(pickle.dumps(m))(x), y)
        with ll.disabled(c):
            base = c(x)
        ll.detach(c)
        assert torch.equal(c(x), base)


def test_wrong_objects_give_documented_errors() -> None:
    with pytest.raises(ll.AdapterError, match="must be a torch.nn.Module"):
        ll.attach("model", ll.LoraLiteConfig())
    m = Toy()
    snap = snapshot(m)
    with pytest.raises(ll.ConfigError, match="cfg must be a ll.LoraLiteConfig"):
        ll.attach(m, {"variant": "lora", "r": 4})
    assert_pristine(m, snap)


def test_detach_twice_and_save_after_detach_raise(tmp_path) -> None:
    m = _attached("lora")
    ll.detach(m)
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter is attached"):
        ll.detach(m)
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter is attached"):
        ll.save(m, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_attach_to_a_submodule_then_the_parent_raises() -> None:
    m = Toy()
    ll.attach(m.layers[0], ll.LoraLiteConfig(r=2, target_roles=("inner",)))
    with pytest.raises(ll.AdapterError, match="submodule of this model already carries"):
        ll.attach(m, ll.LoraLiteConfig(r=2))
    ll.detach(m.layers[0])
    ll.attach(m, ll.LoraLiteConfig(r=2))


def test_attach_on_a_peft_model_refuses_the_name_clash(tmp_path) -> None:
    """peft's LoraLayer is linear-like and already has lora_A/lora_B: refuse instead of clobbering them."""
    from _models import tiny_llama
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    snap = snapshot(pm)
    with pytest.raises(ll.AdapterError, match=r"q_proj: .* already has an attribute 'lora_A'.*peft"):
        ll.attach(pm, ll.LoraLiteConfig(r=2, target_names=("q_proj$",)))
    assert_pristine_except_peft(pm, snap)
    m = Toy()
    ll.attach(m, ll.LoraLiteConfig(r=2, target_names=("layers.0.q$",)))
    p = ll.save(m, tmp_path / "a.safetensors")
    clash = Toy()
    ad(clash.layers[0].q).lora_A = torch.nn.Parameter(torch.zeros(1))  # someone else's tensor of that name
    with pytest.raises(ll.LoadError, match="already has an attribute 'lora_A'"):
        ll.load(clash, p)
    assert ad(clash.layers[0].q).lora_A.shape == (1,) and not ll.is_attached(clash)


def assert_pristine_except_peft(m, snap) -> None:
    """As assert_pristine, but peft's own lora_* tensors (in snap) may stay."""
    assert not ll.is_attached(m)
    assert not any(hasattr(mod, "_lora_lite") for mod in m.modules())
    sd = m.state_dict()
    assert sd.keys() == snap["sd"].keys() and all(torch.equal(sd[k], snap["sd"][k]) for k in sd)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == snap["grad"]
