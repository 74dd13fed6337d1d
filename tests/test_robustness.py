"""Property tests (hypothesis) over random layer shapes, ranks, alphas, dtypes, variants and targeting (issue 9).

The property: `attach` either succeeds, with identity at init (bit-exact, or within the variant's bound
below), live and finite gradients, a bit-exact save -> fresh load round trip and a `detach` that
restores the model bit for bit; or it raises one of lora-lite's documented errors (ConfigError,
TargetError, AdapterError/LoadError) and leaves the model exactly as it was: no hooks, no lora_*
tensors, no _lora_lite attributes, state_dict and requires_grad unchanged. Never an exception from
deep inside torch, never a half-attached model.

Models are "parallel" nets: layer i reads x[..., :d_in_i], so every layer sees real inputs, shapes are
independent (d_in != d_out, dims below r, with and without bias) and rounding does not compound
across layers.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _models import ad
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_lite as ll

DOCUMENTED = (ll.ConfigError, ll.TargetError, ll.AdapterError)  # LoadError is an AdapterError
VARIANTS = sorted(n for n in ll.REGISTRY if not n.startswith("_"))
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
SETTINGS = settings(
    max_examples=int(os.environ.get("LL_HYPOTHESIS_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Identity at init. Bit-exact where the update is exactly zero (B = 0, g = 1). The rest are exact in
# real arithmetic and hold to the rounding of the adapter dtype: pissa/antipasto split W by an SVD
# (W_res + U S Vh), hra applies pairs of reflections that cancel (H H = I), dora rescales by
# m / ||W||_row = 1 computed in floating point. Bound: max|y' - y| <= BOUND * eps(dtype) * scale, with
# scale = max|y| + max|x| * max|W| * sqrt(d_in) (the size of the terms that cancel), dtype the
# narrower of the adapter dtype and the fp32 base.
EXACT = {"lora", "delora", "eva", "ia3", "ia3_ff", "road", "adalora", "loha", "lokr", "vera"}
BOUND = 64


class Net(nn.Module):
    """Parallel linear-like layers `layers.{i}`; layer i reads the first d_in_i features of x.

    bias=None makes a transformers GPT-2 `Conv1D` (weight stored (d_in, d_out), always biased).
    """

    def __init__(self, shapes: list[tuple[int, int, bool | None]], seed: int) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Conv1D(o, i) if b is None else nn.Linear(i, o, bias=b) for i, o, b in shapes)
        self.d = max(i for i, _, _ in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x[..., : ll.target.dims(lin)[0]]) for lin in self.layers], dim=-1)


def _kwargs(variant: str) -> st.SearchStrategy[dict]:
    opt = {
        "lora": {"use_rslora": st.booleans()},
        "eva": {"use_rslora": st.booleans(), "whiten": st.booleans()},
        "pissa": {"use_rslora": st.booleans(), "svd_niter": st.integers(0, 3)},
        "antipasto": {
            "block_size": st.sampled_from([1, 2, 2, 3, 4, 5]),
            "max_angle": st.sampled_from([None, 0.5, 3.0]),
        },
        "delora": {"delora_lambda": st.sampled_from([0.5, 15.0, -2.0])},
        # hra's apply_GS is documented as not identity at init (Gram-Schmidt of the paired vectors), so not here
        "ia3": {"feedforward_roles": st.sampled_from([["writer"], ["reader", "inner"]])},
        # a group_size that divides no out_features is a documented ConfigError at attach (not identity)
        "road": {"variant": st.sampled_from(["road_1", "road_2", "road_4"]), "group_size": st.sampled_from([2, 4])},
        "adalora": {"total_step": st.sampled_from([5, 100])},
    }.get(variant, {})
    return st.fixed_dictionaries({}, optional=opt)


@st.composite
def setups(draw) -> dict:
    n = draw(st.integers(1, 4))
    bias = st.sampled_from([True, False, True, False, None])  # None: GPT-2 Conv1D
    shapes = [(draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(bias)) for _ in range(n)]
    variant = draw(st.sampled_from(VARIANTS))
    ranks = st.one_of(st.sampled_from([1, 2, 4]), st.integers(1, 10))
    idx = draw(st.lists(st.integers(0, n), unique=True, max_size=n))  # index n matches nothing
    how = draw(st.sampled_from(["all", "all", "roles", "names", "layers"]))
    cfg = dict(
        variant=variant,
        r=draw(st.sampled_from([2, 4]) if variant in ("hra", "antipasto") and draw(st.booleans()) else ranks),
        alpha=draw(st.one_of(st.sampled_from([1.0, 8.0, 16.0]), st.floats(-32, 32, allow_nan=False))),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
        dtype=draw(st.sampled_from(DTYPES)),
        target_roles=tuple(draw(st.lists(st.sampled_from(["reader", "writer", "inner"]), unique=True, max_size=3))),
        variant_kwargs=draw(_kwargs(variant)),
    )
    if how == "all":
        cfg["target_roles"] = ("reader", "writer", "inner")
    elif how == "names":
        cfg["target_names"] = tuple(rf"^layers\.{i}$" for i in idx)
    elif how == "layers":
        cfg["layers"] = tuple(idx)
    if draw(st.booleans()):
        cfg["exclude_names"] = (rf"^layers\.{draw(st.integers(0, n - 1))}$",)
    frozen = draw(st.lists(st.booleans(), min_size=2 * n, max_size=2 * n))  # base requires_grad before attach
    return dict(shapes=shapes, cfg=cfg, frozen=frozen, seed=draw(st.integers(0, 2**16)))


def _build(s: dict) -> tuple[Net, torch.Tensor]:
    m = Net(s["shapes"], s["seed"])
    for p, f in zip(m.parameters(), s["frozen"]):
        p.requires_grad_(not f)
    x = torch.randn(5, m.d, generator=torch.Generator().manual_seed(s["seed"] + 1))
    return m, x


def _calibration(variant: str, x: torch.Tensor) -> list[torch.Tensor] | None:
    if ll.REGISTRY[variant].group_init is None:
        return None
    g = torch.Generator().manual_seed(7)
    return [torch.randn(16, x.shape[1], generator=g) for _ in range(2)]


def snapshot(m: nn.Module) -> dict:
    return {
        "sd": {k: v.clone() for k, v in m.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in m.named_parameters()},
        "dtypes": {n: p.dtype for n, p in m.named_parameters()},
    }


def assert_pristine(m: nn.Module, snap: dict) -> None:
    """`m` carries nothing of lora-lite and equals its snapshot bit for bit."""
    assert not ll.is_attached(m)
    assert not hasattr(m, "_lora_lite_state")
    for name, mod in m.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, f"{name}: hook left behind"
        assert not hasattr(mod, "_lora_lite"), f"{name}: _lora_lite left behind"
        left = [k for k in [*mod._parameters, *mod._buffers, *vars(mod)] if k.startswith("lora_")]
        assert not left, f"{name}: {left} left behind"
    sd = m.state_dict()
    assert sd.keys() == snap["sd"].keys()
    for k, v in snap["sd"].items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), f"{k} changed"
    assert {n: p.requires_grad for n, p in m.named_parameters()} == snap["grad"]


def _identity_ok(variant: str, dtype: torch.dtype, m: Net, x: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor):
    narrow = torch.finfo(dtype).eps > torch.finfo(torch.float32).eps
    # a pre-hook (ia3_ff, hra) feeds the base layer its input rounded through a narrower adapter dtype
    rounds_input = narrow and any(
        ad(lay)._lora_lite.variant.forward_input is not None for lay in ll.targets(m).values()
    )
    if variant in EXACT and not rounds_input:
        return torch.equal(y1, y0), "not bit-exact"
    eps = torch.finfo(dtype if narrow else torch.float32).eps
    w = max(lin.weight.abs().max().item() for lin in m.layers)
    scale = y0.abs().max().item() + x.abs().max().item() * w * math.sqrt(m.d)
    err = (y1 - y0).abs().max().item()
    return err <= BOUND * eps * scale, f"max err {err:.3g} > {BOUND} * {eps:.3g} * {scale:.3g}"


@SETTINGS
@given(s=setups())
def test_attach_identity_or_documented_error_and_nothing_half_done(s, tmp_path_factory) -> None:
    m, x = _build(s)
    snap = snapshot(m)
    with torch.no_grad():
        y0 = m(x)
    variant = s["cfg"]["variant"]
    try:
        cfg = ll.LoraLiteConfig(**s["cfg"])
        names = ll.attach(m, cfg, calibration_data=_calibration(variant, x))
    except DOCUMENTED as e:
        event(f"{variant}: {type(e).__name__}")
        assert len(str(e)) > 20, f"uninformative error: {e!r}"
        assert_pristine(m, snap)
        return

    event(f"{variant}: attached")
    # attached: identity at init, only lora_* trainable, base frozen
    m.eval()
    with torch.no_grad():
        y1 = m(x)
    assert y1.dtype == y0.dtype and torch.isfinite(y1).all()
    ok, why = _identity_ok(variant, cfg.dtype, m, x, y0, y1)
    assert ok, f"identity at init: {why}"
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[1].startswith("lora_") for n in trainable), trainable
    assert set(ll.targets(m)) == set(names)

    # one training step: finite gradients, then the adapter is no longer trivially at init
    m.train()
    m(x).square().mean().backward()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n}: gradient {p.grad}"
                p.add_(torch.randn_like(p) * 0.05)
    m.eval()
    with torch.no_grad():
        y2 = m(x)
    assert torch.isfinite(y2).all()

    # save -> fresh base -> load reproduces the outputs bit for bit, no calibration data
    path = ll.save(m, tmp_path_factory.mktemp("rob") / "a.safetensors")
    fresh, _ = _build(s)
    fresh_snap = snapshot(fresh)
    assert ll.load(fresh, path) == names
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y2)
    ll.detach(fresh)
    assert_pristine(fresh, fresh_snap)

    # detach restores the model bit for bit (weight-rewriting variants included)
    ll.detach(m)
    for p in m.parameters():
        p.grad = None
    assert_pristine(m, snap)
    with torch.no_grad():
        assert torch.equal(m(x), y0)


# ---------------------------------------------------------------- configs

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["(", "[a-", "reader", "float32", "lora", "*", torch.float16, torch.int8, object()]),
    st.lists(st.one_of(st.integers(-1, 3), st.text(max_size=4), st.sampled_from(["(", "writer"])), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
FIELDS = ("variant", "r", "alpha", "dropout", "dtype", "target_roles", "target_names", "exclude_names", "layers")


@settings(max_examples=150, deadline=None)
@given(kw=st.dictionaries(st.sampled_from(FIELDS), JUNK, max_size=4))
def test_config_junk_gives_config_error_or_a_valid_config(kw) -> None:
    """Any value in any field: a ConfigError naming the problem, or a config that round-trips through JSON."""
    try:
        cfg = ll.LoraLiteConfig(**kw)
    except ll.ConfigError as e:
        assert str(e)
        return
    assert ll.LoraLiteConfig.from_json(cfg.to_json()) == cfg
    json.loads(cfg.to_json())


def test_config_mutated_after_construction_is_revalidated_at_attach() -> None:
    m = Net([(4, 6, True)], 0)
    snap = snapshot(m)
    cfg = ll.LoraLiteConfig(r=2)
    cfg.r = 0
    with pytest.raises(ll.ConfigError, match="r must be an integer >= 1"):
        ll.attach(m, cfg)
    cfg.r, cfg.target_names = 2, ("(",)
    with pytest.raises(ll.ConfigError, match="not a valid regular expression"):
        ll.attach(m, cfg)
    assert_pristine(m, snap)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"target_names": ("(",)}, r"target_names: '\(' is not a valid regular expression"),
        ({"exclude_names": ("[a-",)}, r"exclude_names: '\[a-' is not a valid regular expression"),
        ({"target_names": (3,)}, "target_names must hold regex strings"),
        ({"target_roles": 5}, "target_roles must be a tuple of strings"),
        ({"layers": ("0",)}, "layers must be a tuple of block indices"),
        ({"layers": 1.5}, "layers must be a tuple of block indices"),
        ({"variant": ["lora"]}, "variant must be a registered variant name"),
    ],
)
def test_config_rejects_malformed_targeting(kw, msg) -> None:
    with pytest.raises(ll.ConfigError, match=msg):
        ll.LoraLiteConfig(**kw)


@SETTINGS
@given(
    s=setups(), other=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.booleans()), min_size=1, max_size=4)
)
def test_load_onto_another_random_model_loads_exactly_or_refuses_cleanly(s, other, tmp_path_factory) -> None:
    """An adapter saved from one random model, loaded onto another: LoadError and an untouched model, or a load
    whose tensors equal the file's (shapes happened to fit)."""
    m, x = _build(s)
    try:
        ll.attach(m, ll.LoraLiteConfig(**s["cfg"]), calibration_data=_calibration(s["cfg"]["variant"], x))
    except DOCUMENTED:
        return
    path = ll.save(m, tmp_path_factory.mktemp("other") / "a.safetensors")
    target = Net(other, s["seed"] + 1)
    snap = snapshot(target)
    try:
        ll.load(target, path)
    except ll.LoadError as e:
        why = ("shape", "fingerprint", "does not fit", "missing", "unexpected", "dtype")
        event("refused: " + next((k for k in why if k in str(e)), "other"))
        assert_pristine(target, snap)
        return
    event("loaded")
    _, _, tensors = ll.read_adapter(path)
    got = ll.adapter_state_dict(target)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    ll.detach(target)
    assert_pristine(target, snap)
