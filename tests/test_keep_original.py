"""attach / load with keep_original=False: pissa and antipasto keep nothing to restore the weight they rewrote.

The adapter itself is unchanged (same W_res, same tensors, same training); what needs the original weight
(detach, ll.disabled, pissa's ll.scaled and export_peft) raises before changing anything, naming the layer.
"""

from __future__ import annotations

import pytest
import torch
from _models import ad
from torch import nn

import lora_lite as ll

REWRITING = ["pissa", "antipasto"]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 192), nn.Tanh(), nn.Linear(192, 256))  # compact originals at this size


def _cfg(variant: str) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(variant=variant, r=8, target_names=(r"^[02]$",))


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _raw(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _kept_and_dropped(variant: str) -> tuple[nn.Module, nn.Module]:
    """The same model attached twice: with the default, and with keep_original=False."""
    kept, dropped = _model(), _model()
    ll.attach(kept, _cfg(variant))
    ll.attach(dropped, _cfg(variant), keep_original=False)
    return kept, dropped


@pytest.mark.parametrize("variant", REWRITING)
def test_same_adapter_and_training_as_the_default_but_nothing_kept(variant: str) -> None:
    x = torch.randn(4, 5, 256)
    kept, dropped = _kept_and_dropped(variant)
    assert _same(_raw(kept), _raw(dropped))  # W_res and every lora_* tensor, bit for bit
    for layer in ll.targets(dropped).values():
        st = ad(layer)._lora_lite
        assert st.original is None and st.residual_hash is None and st.original_dropped
        assert st.fingerprint is not None  # still saved, so load can check the base
    for layer in ll.targets(kept).values():
        assert ad(layer)._lora_lite.original is not None and not ad(layer)._lora_lite.original_dropped
    _train(kept, x)
    _train(dropped, x)
    assert _same(_raw(kept), _raw(dropped))
    assert "keep_original=False" in ll.summary(dropped) and "keep_original" not in ll.summary(kept)


@pytest.mark.parametrize("variant", REWRITING)
def test_what_needs_the_original_raises_and_changes_nothing(variant: str, tmp_path) -> None:
    model = _model()
    x = torch.randn(2, 3, 256)
    ll.attach(model, _cfg(variant), keep_original=False)
    _train(model, x, steps=1)
    raw = _raw(model)
    with torch.no_grad():
        out = model(x)
    attempts = [("ll.detach", lambda: ll.detach(model)), ("ll.disabled", lambda: ll.disabled(model).__enter__())]
    if variant == "pissa":  # antipasto's scaled path and export do not read the original
        attempts += [
            ("ll.scaled", lambda: ll.scaled(model, 0.5).__enter__()),
            ("export_peft", lambda: ll.export_peft(model, tmp_path / "peft")),
        ]
    for what, call in attempts:
        with pytest.raises(
            ll.AdapterError, match=r"^0: " + what.replace(".", r"\.") + r".*keep_original=False.*ll\.merge"
        ):
            call()
        assert ll.is_attached(model) and _same(_raw(model), raw), what
        for layer in ll.targets(model).values():
            assert ad(layer)._lora_lite.enabled and ad(layer)._lora_lite.coef == 1.0, what
        with torch.no_grad():
            assert torch.equal(model(x), out), what
    assert not (tmp_path / "peft").exists()
    with torch.no_grad(), ll.scaled(model, 1.0):  # c = 1 is the adapter itself: needs nothing
        assert torch.equal(model(x), out)
    if variant == "antipasto":
        with torch.no_grad(), ll.scaled(model, 0.0):
            assert torch.allclose(model(x), _model()(x), atol=1e-5)


@pytest.mark.parametrize("variant", REWRITING)
def test_merge_works_and_gives_the_same_weights_as_the_default(variant: str) -> None:
    x = torch.randn(2, 3, 256)
    kept, dropped = _kept_and_dropped(variant)
    _train(kept, x)
    _train(dropped, x)
    ll.merge(kept)
    ll.merge(dropped)
    assert not ll.is_attached(dropped)
    assert _same(_raw(kept), _raw(dropped))


@pytest.mark.parametrize("variant", REWRITING)
def test_save_and_load_with_and_without_keeping_the_original(variant: str, tmp_path) -> None:
    x = torch.randn(2, 3, 256)
    trained = _model()
    ll.attach(trained, _cfg(variant), keep_original=False)
    _train(trained, x)
    path = tmp_path / "a.safetensors"
    ll.save(trained, path)
    with torch.no_grad():
        want = trained(x)
    fresh = _model()
    base = _raw(fresh)
    ll.load(fresh, path)  # the default keeps it: detach restores the base exactly
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    ll.detach(fresh)
    assert _same(_raw(fresh), base)
    ll.load(fresh, path, keep_original=False)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    assert all(ad(layer)._lora_lite.original_dropped for layer in ll.targets(fresh).values())
    with pytest.raises(ll.AdapterError, match="keep_original=False"):
        ll.detach(fresh)


def test_a_failed_attach_still_restores_every_rewritten_weight() -> None:
    """keep_original=False drops the originals only once attach succeeded: a layer that fails after others
    were rewritten still leaves the model as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192), nn.Tanh(), nn.Linear(192, 4))  # r = 8 > 4: the last layer fails
    raw = _raw(model)
    with pytest.raises(ll.ConfigError, match=r"^2: pissa needs r <= min"):
        ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=8, target_names=(r"^[02]$",)), keep_original=False)
    assert not ll.is_attached(model) and _same(_raw(model), raw)


def test_no_effect_on_variants_that_do_not_rewrite_the_weight() -> None:
    model = _model()
    raw = _raw(model)
    ll.attach(model, _cfg("lora"), keep_original=False)
    ll.detach(model)
    assert _same(_raw(model), raw)


@pytest.mark.parametrize("bad", [0, "no", None])
def test_keep_original_must_be_a_bool(bad: object, tmp_path) -> None:
    model = _model()
    with pytest.raises(ll.AdapterError, match="keep_original must be True or False"):
        ll.attach(model, _cfg("pissa"), keep_original=bad)
    assert not ll.is_attached(model)
    ll.attach(model, _cfg("pissa"))
    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    with pytest.raises(ll.AdapterError, match="keep_original must be True or False"):
        ll.load(model, tmp_path / "a.safetensors", keep_original=bad)
    assert not ll.is_attached(model)


def test_export_peft_refuses_an_overwritten_residual_and_calls_inside_blocks(tmp_path) -> None:
    """pissa's export rebuilt B₀A₀ from whatever weight the layer held: after a full load_state_dict of another
    model it wrote a wrong adapter (0.3-0.57 off in peft) with no error, where detach and ll.disabled refuse."""
    model = _model()
    ll.attach(model, _cfg("pissa"))
    other = _model(seed=3)
    with torch.no_grad():
        model[0].weight.copy_(other[0].weight)  # W_res overwritten (as a full checkpoint load does)
    with pytest.raises(ll.AdapterError, match=r"^0: layer.weight is no longer the residual W_res"):
        ll.export_peft(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    fresh = _model()
    ll.attach(fresh, _cfg("lora"))
    for block in (ll.disabled(fresh), ll.scaled(fresh, 0.5)):
        with block, pytest.raises(ll.AdapterError, match=r"^0: export_peft called inside ll.disabled or ll.scaled"):
            ll.export_peft(fresh, tmp_path / "in_block")
    assert not (tmp_path / "in_block").exists()
