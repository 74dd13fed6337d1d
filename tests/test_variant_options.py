"""Variant options at their edges (audit of session 9): settings that would silently train nothing or the wrong
thing are refused with a message naming the option and the fix; eva leaves the model's modes as it found them."""

from __future__ import annotations

import pytest
import torch
from _models import Toy, llama_batch, tiny_llama

import lora_lite as ll


@pytest.mark.parametrize("variant", ["lora", "dora", "eva"])
def test_alpha_zero_is_refused_where_it_zeroes_the_update(variant: str) -> None:
    with pytest.raises(ll.ConfigError, match=rf"^{variant}: alpha=0 makes the scale alpha/r zero"):
        ll.LoraLiteConfig(variant=variant, alpha=0)
    ll.LoraLiteConfig(variant=variant, alpha=-4.0)  # a sign flip of B: allowed


def test_alpha_is_ignored_where_the_variant_has_no_scale() -> None:
    for variant in ("ia3", "hra"):
        ll.LoraLiteConfig(variant=variant, alpha=0)


def test_delora_lambda_must_fit_the_adapter_dtype() -> None:
    with pytest.raises(ll.ConfigError, match=r"delora_lambda'\]=1e\+39 does not fit the adapter dtype"):
        ll.LoraLiteConfig(variant="delora", variant_kwargs={"delora_lambda": 1e39})
    with pytest.raises(ll.ConfigError, match="does not fit the adapter dtype torch.float16"):
        ll.LoraLiteConfig(variant="delora", dtype=torch.float16, variant_kwargs={"delora_lambda": 1e5})
    ll.LoraLiteConfig(variant="delora", dtype=torch.float64, variant_kwargs={"delora_lambda": 1e39})


def test_antipasto_max_angle_below_float32_range_is_refused_and_block_size_message_fits_r() -> None:
    with pytest.raises(ll.ConfigError, match=r"max_angle must be in \[1\.18e-38, pi\)"):
        ll.LoraLiteConfig(variant="antipasto", r=4, variant_kwargs={"max_angle": 1e-45})
    model = Toy()
    ll.attach(model, ll.LoraLiteConfig(variant="antipasto", r=4, variant_kwargs={"max_angle": 1e-30}))
    assert all(torch.isfinite(model(torch.randn(2, 16))).all() for _ in range(1))
    with pytest.raises(ll.ConfigError, match=r"block_size must be an integer >= 2 .*got 1 with r=4$"):
        ll.LoraLiteConfig(variant="antipasto", r=4, variant_kwargs={"block_size": 1})


def test_eva_whiten_refuses_inputs_that_span_fewer_than_r_directions() -> None:
    """Inputs in a 2-dim affine subspace, r = 4: the two missing directions are fp32 rounding noise (~1e-8 of
    the top variance), which the old guard (1e-12) never caught: rows of A came out 7000x larger."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 16, generator=g)
    xs = [torch.randn(50, 2, generator=g) @ basis + 1.0 for _ in range(3)]
    cfg = ll.LoraLiteConfig(
        variant="eva",
        r=4,
        target_names=(r"layers\.0\.q$",),
        variant_kwargs={"whiten": True, "show_progress_bar": False},
    )
    model = Toy()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match=r"^layers\.0\.q: whiten=True but .* fewer than r=4 directions"):
        ll.attach(model, cfg, calibration_data=xs)
    assert not ll.is_attached(model) and all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feedforward_names": [r"down_porj"]}, r"feedforward_names pattern 'down_porj' matches none of the"),
        ({"feedforward_names": [r"o_proj"]}, r"feedforward_names pattern 'o_proj' matches none of the"),
    ],
)
def test_ia3_feedforward_patterns_must_match_a_target(kwargs: dict, message: str) -> None:
    """A typo used to gate every layer's output silently (peft raises when feedforward_modules is not a subset
    of target_modules)."""
    model = tiny_llama()
    cfg = ll.LoraLiteConfig(variant="ia3", target_names=(r"(k|v|down)_proj$",), variant_kwargs=kwargs)
    with pytest.raises(ll.ConfigError, match=message):
        ll.attach(model, cfg)
    assert not ll.is_attached(model)


def test_eva_restores_every_submodule_mode() -> None:
    model = tiny_llama().train()
    model.model.layers[1].eval()  # the user's choice for one block: kept
    modes = {n: m.training for n, m in model.named_modules()}
    ids = llama_batch()
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    cfg = ll.LoraLiteConfig(variant="eva", r=2, variant_kwargs={"show_progress_bar": False})
    ll.attach(model, cfg, calibration_data=calib)
    assert {n: m.training for n, m in model.named_modules() if ".lora_lite" not in n} == modes


def test_eva_per_sequence_labels_with_a_mask_get_a_clear_error() -> None:
    ids = llama_batch()
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(ids.shape[0])}]
    cfg = ll.LoraLiteConfig(variant="eva", r=2, variant_kwargs={"show_progress_bar": False})
    model = tiny_llama()
    with pytest.raises(ll.ConfigError, match=r"label masking needs per-token labels.*use_label_mask': False"):
        ll.attach(model, cfg, calibration_data=calib)
    assert not ll.is_attached(model)
