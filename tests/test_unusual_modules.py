"""Target layers in unusual surroundings: recomputed weights, aliased modules, meta/offloaded tensors, other
libraries' hooks and wrappers, unusual call forms. Each case either works exactly or raises a clear error that
names the layer, before changing anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import ad
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, parametrize

import lora_lite as ll

ALL = ["lora", "pissa", "dora", "delora", "ia3", "hra", "eva", "antipasto"]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8))


def _cfg(variant: str, names: tuple[str, ...] = (r"^0$",), **kw) -> ll.LoraLiteConfig:
    vk = {"r": 4, "variant_kwargs": {"delora_lambda": 2.0}} if variant == "delora" else {"r": 4}
    return ll.LoraLiteConfig(variant=variant, target_names=names, **{**vk, **kw})


def _attach(model: nn.Module, variant: str, **kw) -> None:
    calib = [torch.randn(16, 8) for _ in range(2)] if variant == "eva" else None
    ll.attach(model, _cfg(variant, **kw), calibration_data=calib)


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _raw(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dora_reference(layer: nn.Module, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """DoRA's docstring equation with the dense norm: b + m/‖W + sBA‖_row ⊙ x (W + sBA)ᵀ."""
    V = W + ad(layer)._lora_lite.scale * ad(layer).lora_B @ ad(layer).lora_A
    return layer.bias + (ad(layer).lora_m / V.norm(dim=1)) * (x @ V.T)


# ---------------------------------------------------------------- weights recomputed on access


def test_dora_norm_follows_a_new_weight_tensor_every_call() -> None:
    """functional_call with a fresh weight per step: a new tensor can land at the freed address of the last one
    with version 0, which an address-keyed cache of ‖W‖² took for the same weight (0.4-1.9 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96))  # (at this size the allocator hands a freed block straight back)
    _attach(model, "dora")
    _perturb(model)
    layer, x = model[0], torch.randn(4, 64)
    with torch.no_grad():
        for step in range(6):
            W = layer.weight * (1 + 0.5 * step)  # a fresh tensor each step
            y = functional_call(model[0], {"weight": W}, (x,))
            torch.testing.assert_close(y, _dora_reference(layer, W, x), rtol=1e-5, atol=1e-5)
            del W


def test_dora_on_a_parametrized_weight_follows_load_state_dict() -> None:
    class Double(nn.Module):
        def forward(self, W: torch.Tensor) -> torch.Tensor:
            return 2 * W

    def make(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 96))
        parametrize.register_parametrization(m[0], "weight", Double())
        return m

    model = make(0)
    _attach(model, "dora")
    _perturb(model)
    x = torch.randn(4, 64)
    with torch.no_grad():
        for _ in range(3):
            model(x)  # caches ‖W‖² of this weight
        other = make(5)
        sd = {k: v for k, v in other.state_dict().items() if "lora_" not in k}
        model.load_state_dict(sd, strict=False)
        torch.testing.assert_close(model[0](x), _dora_reference(model[0], model[0].weight, x), rtol=1e-5, atol=1e-5)


def _old_weight_norm(layer: nn.Module) -> None:
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(layer)


@pytest.mark.parametrize("variant", ["pissa", "antipasto"])
@pytest.mark.parametrize("how", ["parametrizations.weight_norm", "orthogonal", "nn.utils.weight_norm"])
def test_rewriting_variants_refuse_a_recomputed_weight(variant: str, how: str) -> None:
    """pissa/antipasto write W_res into layer.weight: through a parametrization that write would land in a
    temporary, and the model would be off by the whole principal part (1.07 seen) with no error."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    {
        "parametrizations.weight_norm": lambda m: parametrizations.weight_norm(m),
        "orthogonal": lambda m: parametrizations.orthogonal(m),
        "nn.utils.weight_norm": _old_weight_norm,
    }[how](model[0])
    raw = _raw(model)
    with pytest.raises(ll.ConfigError, match=r"^0: variant .* replaces the weight .*remove_parametrizations"):
        _attach(model, variant)
    assert not ll.is_attached(model) and _same(_raw(model), raw)


@pytest.mark.parametrize("variant", ["lora", "dora", "ia3", "hra"])
def test_merge_refuses_a_parametrized_weight_and_changes_nothing(variant: str) -> None:
    """merge wrote W_eff into a temporary: the merged model was exactly the base, the adapter silently gone."""
    model = _mlp()
    parametrizations.weight_norm(model[0])
    _attach(model, variant)
    _perturb(model)
    raw, x = _raw(model), torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    for call in (ll.merge, ll.merged_state_dict):
        with pytest.raises(ll.AdapterError, match=r"^0: cannot merge: this weight is parametrized"):
            call(model)
    assert ll.is_attached(model) and _same(_raw(model), raw)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    parametrize.remove_parametrizations(model[0], "weight")  # the fix the message gives
    ll.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- one module under two names


class _Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.b = self.lin  # the same module, registered twice
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("variant", ALL)
def test_merged_state_dict_of_an_aliased_layer_loads_strictly_and_is_merged(variant: str) -> None:
    model = _Aliased()
    _attach(model, variant, names=(r"^lin$",))
    _perturb(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    sd = ll.merged_state_dict(model)
    assert not [k for k in sd if "lora_" in k] and torch.equal(sd["lin.weight"], sd["b.weight"])
    fresh = _Aliased()
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-6)


def test_filters_see_every_name_of_an_aliased_layer() -> None:
    model = _Aliased()
    with pytest.raises(ll.TargetError, match="no module matched"):  # excluded under its other name
        ll.attach(model, ll.LoraLiteConfig(r=2, target_names=(r"^lin$",), exclude_names=(r"^b$",)))
    assert ll.attach(model, ll.LoraLiteConfig(r=2, target_names=(r"^b$",))) == ["lin"]  # matched by its alias


# ---------------------------------------------------------------- meta and offloaded tensors


@pytest.mark.parametrize("variant", ALL)
def test_attach_and_load_on_a_meta_model_raise_clearly(variant: str, tmp_path) -> None:
    trained = _mlp()
    _attach(trained, variant)
    ll.save(trained, tmp_path / "a.safetensors")
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ll.AdapterError, match=r"^0: the weight is on the meta device .* materialize"):
        _attach(model, variant)
    with pytest.raises(ll.LoadError, match=r"0: the weight is on the meta device"):
        ll.load(model, tmp_path / "a.safetensors")
    assert not ll.is_attached(model) and not any(hasattr(m, "_lora_lite") for m in model.modules())


@pytest.mark.parametrize("variant", ["lora", "pissa", "hra", "ia3", "dora"])
def test_offloading_a_target_after_attach_raises_at_forward(variant: str) -> None:
    """accelerate's offload hooks put the layer's tensors (ours too) back on meta after its forward, before our
    hook runs: F.linear(cpu x, meta A) then returned uninitialised memory, a different output every call."""
    accelerate = pytest.importorskip("accelerate")
    model = _mlp()
    _attach(model, variant)
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(ll.AdapterError, match=r"^0: the adapter tensors are on the meta device .* offloaded"):
        with torch.no_grad():
            model(torch.randn(2, 8))


def test_a_forward_wrapper_keeps_the_base_output_it_holds() -> None:
    """A wrapper that replaces layer.forward (accelerate's add_hook_to_module) may hold the base output: the
    in-place update must not rewrite it."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook

    class Keep(ModelHook):
        def post_forward(self, module, output):
            self.out = output
            return output

    model = _mlp()
    _attach(model, "lora")
    _perturb(model)
    keep = Keep()
    accelerate.hooks.add_hook_to_module(model[0], keep)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = model[0](x)
        assert torch.equal(keep.out, F.linear(x, model[0].weight, model[0].bias))
        assert not torch.equal(y, keep.out)


# ---------------------------------------------------------------- other hooks and call forms


@pytest.mark.parametrize("variant", ["lora", "pissa", "delora", "eva", "antipasto"])
def test_an_in_place_user_hook_after_ours_works_on_the_out_of_place_path(variant: str) -> None:
    """A read-only hook registered before attach sends our update out of place; our autograd Function returned a
    view of its own result, so a later hook's in-place edit of y failed in backward."""
    model, ref = _mlp(), _mlp()
    for m in (model, ref):
        m[0].register_forward_hook(lambda mod, a, o: None)  # e.g. an activation logger, registered first
        torch.manual_seed(1)  # the same adapter init in both
        _attach(m, variant)
        _perturb(m)
    steer = torch.randn(12)
    model[0].register_forward_hook(lambda mod, a, o: o.add_(steer))
    ref[0].register_forward_hook(lambda mod, a, o: o + steer)
    x = torch.randn(2, 8)
    for m in (model, ref):
        m(x).pow(2).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("variant", ["lora", "pissa", "dora", "delora", "ia3", "ia3_ff", "hra", "eva", "antipasto"])
def test_keyword_input_is_the_same_as_positional(variant: str) -> None:
    """nn.Linear's forward(input): `layer(input=x)` is a legal call; our hooks read args[0] (IndexError)."""
    model = _mlp()
    if variant == "ia3_ff":
        ll.attach(
            model,
            ll.LoraLiteConfig(variant="ia3", target_names=(r"^0$",), variant_kwargs={"feedforward_names": [r"^0$"]}),
        )
    else:
        _attach(model, variant)
    _perturb(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model[0](input=x), model[0](x))


def test_calls_the_hooks_cannot_read_raise_clearly() -> None:
    class TwoKw(nn.Linear):
        def forward(self, input=None, extra=None):
            return super().forward(input)

    class Pair(nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            return y, y.norm()

    layer = TwoKw(8, 8)
    ll.attach(layer, ll.LoraLiteConfig(variant="hra", r=2, target_names=("",)))  # a pre-hook variant
    with pytest.raises(ll.AdapterError, match=r"^: TwoKw was called without a positional input .*layer\(x\)"):
        layer(input=torch.randn(2, 8), extra=1)
    pair = Pair(8, 8)
    ll.attach(pair, ll.LoraLiteConfig(r=2, target_names=("",)))
    with pytest.raises(ll.AdapterError, match=r"^: Pair returned a tuple, not a tensor.*exclude_names"):
        pair(torch.randn(2, 8))


def test_multihead_attention_out_proj_is_refused() -> None:
    """torch applies out_proj's weight inside F.multi_head_attention_forward without calling the module: a hook on
    it never runs (lora silently did nothing; pissa's W_res was used alone, 0.6 off)."""
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    raw = _raw(model)
    with pytest.raises(ll.TargetError, match=r"^self_attn\.out_proj: this is nn\.MultiheadAttention's out_proj"):
        ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=2, target_names=("out_proj", "linear1")))
    assert not ll.is_attached(model) and _same(_raw(model), raw)
    assert ll.attach(model, ll.LoraLiteConfig(r=2, target_names=("linear",))) == ["linear1", "linear2"]
