"""More kinds of target: 3-D MoE expert weights (`target_parameters`), `rank_pattern` / `alpha_pattern`, and
`modules_to_save`, each against peft 0.21.2 (forward, gradients, 8 AdamW steps; by copying tensors and through
ll.import_peft / ll.export_peft), plus the refusals.

Models: a tiny transformers Qwen3-MoE (4 experts, top-2; experts as 3-D `gate_up_proj` / `down_proj`), a
tiny Mixtral (same expert layout), the tiny Llama (GQA) and the biased toy MLP of _models.py. Tolerances:
1e-5 of the reference's max |value| (fp32 rounding of the same math in another order).
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from _models import TINY_DECODER, Toy, ad, llama_batch, tiny_llama
from torch import nn

import lora_lite as ll
from lora_lite.experts import from_peft, to_peft

peft = pytest.importorskip("peft")
RTOL = 1e-5
TRAIN_RTOL = 1e-4  # after 8 AdamW steps (Adam divides by sqrt(v): small gradients' rounding is amplified)
PREFIX = "base_model.model."


def qwen_moe(seed: int = 0) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(**TINY_DECODER, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(cfg).eval()


def mixtral(seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**TINY_DECODER, num_local_experts=4, num_experts_per_tok=2)).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def _lm(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=x, labels=x)
    return out.logits, out.loss


def _toy_run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = model(x)
    return y, (y - 0.3).pow(2).mean()


def _get_peft(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kw))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _pairs(pm: nn.Module, ours: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, object]]:
    """(name, our tensor, peft tensor, peft layout -> ours) for every trainable tensor of both models."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.utils.other import ModulesToSaveWrapper

    mine, out = ll.targets(ours), []
    for n, m in pm.named_modules():
        n = n.removeprefix(PREFIX)
        if isinstance(m, ParamWrapper):
            key = f"{n.split('.base_layer')[0]}.{m.parameter_name}"
            a, E = mine[key], m.num_experts
            out.append(
                (f"{key}.lora_A", a.lora_A, m.lora_A["default"].weight, lambda t, E=E: t.reshape(E, -1, t.shape[-1]))
            )
            out.append(
                (
                    f"{key}.lora_B",
                    a.lora_B,
                    m.lora_B["default"].weight,
                    lambda t, E=E: t.reshape(t.shape[0], -1, E).permute(2, 0, 1),
                )
            )
        elif isinstance(m, LoraLayer):
            a = ad(ours.get_submodule(n))
            out.append((f"{n}.lora_A", a.lora_A, m.lora_A["default"].weight, _same))
            out.append((f"{n}.lora_B", a.lora_B, m.lora_B["default"].weight, _same))
        elif isinstance(m, ModulesToSaveWrapper):
            mod = ours.get_submodule(n)
            for k, t in m.modules_to_save["default"].named_parameters():
                out.append((f"{n}.{k}", mod.get_parameter(k), t, _same))
    trainable = {id(p) for p in ours.parameters() if p.requires_grad}
    assert {id(o) for _, o, _, _ in out} == trainable, "both sides must train the same tensors"
    assert {id(t) for _, _, t, _ in out} == {id(p) for p in pm.parameters() if p.requires_grad}
    return out


def _parity(pm: nn.Module, ours: nn.Module, base_out: torch.Tensor, run, x) -> dict[str, float]:
    """Perturb peft's tensors, copy them into ours; forward, gradients and 8 AdamW steps agree."""
    pairs = _pairs(pm, ours)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, o, t, to_ours in pairs:
            t.add_(0.2 * torch.randn(t.shape, generator=g))
            o.copy_(to_ours(t))
    (yp, lp), (yo, lo) = run(pm, x), run(ours, x)
    assert rel(yp, base_out) > 1e-2, "the perturbed adapter must change the output"
    err = {"forward": rel(yo, yp)}
    lp.backward()
    lo.backward()
    err["grad"] = max(rel(o.grad, to_ours(t.grad)) for _, o, t, to_ours in pairs)
    opt_p = torch.optim.AdamW([t for _, _, t, _ in pairs], lr=1e-2)
    opt_o = torch.optim.AdamW([o for _, o, _, _ in pairs], lr=1e-2)
    for _ in range(8):
        for opt, model in ((opt_p, pm), (opt_o, ours)):
            opt.zero_grad()
            run(model, x)[1].backward()
            opt.step()
    err["train"] = max(rel(run(ours, x)[0], run(pm, x)[0]), *(rel(o, to_ours(t)) for _, o, t, to_ours in pairs))
    assert err["forward"] <= RTOL and err["grad"] <= RTOL and err["train"] <= TRAIN_RTOL, err
    return err


# ---------------------------------------------------------------- MoE experts (target_parameters)

MOE_PEFT = dict(
    r=2,
    lora_alpha=6,
    target_modules=["q_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    rank_pattern={"down_proj": 3},
    modules_to_save=["lm_head"],
)
MOE_OURS = dict(
    r=2,
    alpha=6,
    target_names=(r"q_proj$",),
    target_parameters=(r"mlp\.experts\.(gate_up|down)_proj$",),
    rank_pattern={"down_proj": 3},
    modules_to_save=("lm_head",),
    exclude_names=(),
)


@pytest.mark.parametrize("make", [qwen_moe, mixtral], ids=["qwen3_moe", "mixtral"])
def test_experts_parity_with_peft(make) -> None:
    x = llama_batch()
    with torch.no_grad():
        base = make()(x).logits
    pm = _get_peft(make(), **MOE_PEFT)
    ours = make()
    ll.attach(ours, ll.LoraLiteConfig(**MOE_OURS))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, base)  # identity at init, bit for bit
    _parity(pm, ours, base, _lm, x)


def test_experts_detach_disabled_scaled_merge_save_load(tmp_path) -> None:
    x = llama_batch()
    model = qwen_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x).logits
    ll.attach(model, ll.LoraLiteConfig(r=2, target_roles=(), target_parameters=("experts",)))
    assert not any(k for k in model.state_dict() if "experts.gate_up_proj" in k and "lora" not in k and k not in before)
    with torch.no_grad():
        for a in ll.targets(model).values():
            a.lora_B.normal_(0, 0.3)
        want = model(x).logits
        assert rel(want, base) > 1e-2
        with ll.disabled(model):
            assert torch.equal(model(x).logits, base)
        with ll.scaled(model, 0.0):
            assert rel(model(x).logits, base) <= RTOL
        with ll.scaled(model, 0.5):
            half = model(x).logits
            assert rel(half, base) > 1e-3 and rel(half, want) > 1e-3
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, nn.Parameter)  # put back after the call
    with torch.no_grad():
        assert torch.equal(ll.reference_model(model)(x).logits, base)  # the DPO reference: the base model
    ll.save(model, tmp_path / "a.safetensors")
    merged_sd = ll.merged_state_dict(model)
    ll.detach(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    fresh = qwen_moe()
    ll.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, want)
        ll.merge(fresh)
        assert rel(fresh(x).logits, want) <= RTOL
        assert not ll.is_attached(fresh) and "lora_lite_params" not in str(fresh)
        plain = qwen_moe()
        plain.load_state_dict(merged_sd, strict=True)
        assert rel(plain(x).logits, want) <= RTOL


def test_experts_gradient_checkpointing_and_two_adapters() -> None:
    x = llama_batch()
    model = qwen_moe()
    ll.attach(model, ll.LoraLiteConfig(r=2, target_roles=(), target_parameters=("gate_up_proj",)), name="a")
    ll.attach(model, ll.LoraLiteConfig(r=3, target_roles=(), target_parameters=("gate_up_proj",)), name="b")
    with torch.no_grad():
        for n in ("a", "b"):
            for t in ll.targets(model, n).values():
                t.lora_B.normal_(0, 0.3)
        both = model(x).logits
        ll.set_active(model, "a")
        only_a = model(x).logits
    ll.set_active(model, ["a", "b"])
    ref = qwen_moe()
    for n in ("a", "b"):  # the sum of the two updates, merged by hand
        for name, t in ll.targets(model, n).items():
            with torch.no_grad():
                ref.get_parameter(name).add_(t._lora_lite.scale * torch.bmm(t.lora_B, t.lora_A))
    with torch.no_grad():
        assert rel(both, ref(x).logits) <= RTOL and rel(only_a, both) > 1e-3
    model.gradient_checkpointing_enable()
    model.train()
    _lm(model, x)[1].backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_disable()
    _lm(model, x)[1].backward()
    assert all(rel(p.grad, g1[n]) <= RTOL for n, p in model.named_parameters() if p.requires_grad)


class _TransposedExperts(nn.Module):
    """Experts stored (E, d_in, d_out) with `is_transposed = True`, applied as x @ W[e] (every expert, summed)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(x @ self.w[e] for e in range(3))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = _TransposedExperts()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x))


def test_transposed_expert_layout_matches_peft() -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = _Net()(x)
    pm = _get_peft(_Net(), r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.w"])
    ours = _Net()
    ll.attach(ours, ll.LoraLiteConfig(r=2, alpha=4, target_roles=(), target_parameters=("experts.w",)))
    assert ll.targets(ours)["experts.w"].lora_A.shape == (3, 2, 8)
    _parity(pm, ours, base, _toy_run, x)


def test_experts_import_export_with_peft(tmp_path) -> None:
    x = llama_batch()
    extra = {"alpha_pattern": {"layers.1.self_attn.q_proj": 7}, "rank_pattern": {"down_proj": 3, "nothing": 5}}
    pm = _get_peft(qwen_moe(), **{**MOE_PEFT, **extra})  # (peft ignores "nothing", with a warning: so do we)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        want = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = qwen_moe()
    names = ll.import_peft(ours, tmp_path / "peft")
    assert sum("experts" in n for n in names) == 4 and ll.targets(ours)[
        "model.layers.0.mlp.experts.down_proj"
    ].lora_A.shape == (4, 3, 24)
    with torch.no_grad():
        assert rel(ours(x).logits, want) <= RTOL
    ll.export_peft(ours, tmp_path / "ours")
    conf = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["lm_head"] and len(conf["target_parameters"]) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(qwen_moe(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert rel(back(x).logits, want) <= RTOL
    # and the file keys are peft's own (nested ParamWrappers: the first parameter under base_layer)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )


def test_to_peft_inverts_from_peft() -> None:
    A, B = torch.randn(12, 5), torch.randn(7, 12)
    a3, b3 = from_peft(A, B, 4)
    fake = type("P", (), {"lora_A": a3, "lora_B": b3})()
    t = to_peft(fake)
    assert torch.equal(t["lora_A.weight"], A) and torch.equal(t["lora_B.weight"], B)


def test_untargeted_experts_are_logged(caplog) -> None:
    model = qwen_moe()
    with caplog.at_level(logging.INFO, logger="lora_lite"):
        ll.attach(model, ll.LoraLiteConfig(r=2))
    assert any("3-D expert weights" in r.message and "target_parameters" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_lite"):
        ll.attach(tiny_llama(), ll.LoraLiteConfig(r=2))
    assert not any("expert" in r.message for r in caplog.records)


def test_experts_refusals() -> None:
    model = qwen_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ll.TargetError,
        match=r"(?s)'nope' matches no 3-D parameter.*model\.layers\.0\.mlp\.experts\.gate_up_proj  \(4, 48, 32\)",
    ):
        ll.attach(model, ll.LoraLiteConfig(target_roles=(), target_parameters=("experts", "nope")))
    for kw, match in [
        (dict(variant="dora"), "variant 'lora' and dropout=0 only"),
        (dict(dropout=0.1), "variant 'lora' and dropout=0 only"),
    ]:
        with pytest.raises(ll.ConfigError, match=match):
            ll.LoraLiteConfig(target_parameters=("experts",), **kw)
    with pytest.raises(ll.TargetError, match="matches no 3-D parameter"):
        ll.attach(tiny_llama(), ll.LoraLiteConfig(target_parameters=("experts",)))
    ll.attach(model, ll.LoraLiteConfig(target_roles=(), target_parameters=("experts",), layers=(1,)))
    assert list(ll.targets(model)) == [
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    ll.detach(model)
    assert not ll.is_attached(model) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------- rank_pattern / alpha_pattern

LLAMA_T = r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.(up|down)_proj)"
PATTERNS = dict(rank_pattern={"up_proj": 3, r"layers\.1\.self_attn\.q_proj": 5}, alpha_pattern={"v_proj": 2.5})


def test_patterns_parity_with_peft_llama() -> None:
    x = llama_batch()
    with torch.no_grad():
        base = tiny_llama()(x).logits
    pm = _get_peft(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_T, **PATTERNS)
    ours = tiny_llama()
    ll.attach(ours, ll.LoraLiteConfig(r=4, alpha=8, target_names=(f"^{LLAMA_T}$",), **PATTERNS))
    t = ll.targets(ours)
    assert t["model.layers.0.mlp.up_proj"].lora_A.shape == (3, 32) and t[
        "model.layers.0.self_attn.q_proj"
    ].lora_A.shape == (4, 32)
    assert t["model.layers.1.self_attn.q_proj"].lora_A.shape == (5, 32)
    assert t["model.layers.0.self_attn.v_proj"]._lora_lite.scale == 2.5 / 4
    assert t["model.layers.0.mlp.up_proj"]._lora_lite.scale == 8 / 3
    _parity(pm, ours, base, _lm, x)


def test_patterns_and_modules_to_save_parity_with_peft_biased_toy() -> None:
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = Toy()(x)
    kw = dict(rank_pattern={"up": 2}, alpha_pattern={r"layers\.0\.down": 3.0})
    pm = _get_peft(Toy(), r=4, lora_alpha=8, target_modules=["up", "down"], modules_to_save=["layers.1.q"], **kw)
    ours = Toy()
    ll.attach(
        ours,
        ll.LoraLiteConfig(r=4, alpha=8, target_names=(r"\.(up|down)$",), modules_to_save=(r"layers\.1\.q$",), **kw),
    )
    _parity(pm, ours, base, _toy_run, x)


def test_patterns_import_export_with_peft(tmp_path) -> None:
    x = llama_batch()
    pm = _get_peft(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_T, use_rslora=True, **PATTERNS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        want = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    ll.import_peft(ours, tmp_path / "peft")
    cfg = ll.LoraLiteConfig.from_json(ll.read_adapter(ll.save(ours, tmp_path / "a.safetensors"))[0].to_json())
    assert cfg.rank_pattern == PATTERNS["rank_pattern"] and cfg.alpha_pattern == PATTERNS["alpha_pattern"]
    with torch.no_grad():
        assert rel(ours(x).logits, want) <= RTOL
    ll.export_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert rel(back(x).logits, want) <= RTOL


def test_patterns_for_other_variants_and_refusals() -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4, target_roles=("reader",), rank_pattern={"up_proj": 2}))
    assert ad(model.model.layers[0].mlp.up_proj).lora_A.shape == (2, 32)
    assert ad(model.model.layers[0].mlp.gate_proj).lora_A.shape == (4, 32)
    model = tiny_llama()
    for cfg, match in [
        (ll.LoraLiteConfig(r=4, rank_pattern={"up_prj": 2}), r"rank_pattern: key 'up_prj' matches no targeted layer"),
        (ll.LoraLiteConfig(r=4, alpha_pattern={"q_proj": 2}), r"alpha_pattern: key 'q_proj' matches no targeted layer"),
        (
            ll.LoraLiteConfig(variant="hra", r=4, rank_pattern={"up_proj": 3}),
            r"model\.layers\.0\.mlp\.up_proj: hra: r must be even",
        ),
        (ll.LoraLiteConfig(variant="eva", r=4, rank_pattern={"up_proj": 3}), "not supported with variant 'eva'"),
    ]:
        with pytest.raises(ll.ConfigError, match=match):
            ll.attach(model, cfg)
        assert not ll.is_attached(model)
    for kw, match in [
        (dict(rank_pattern={"x": 0}), r"rank_pattern\['x'\] must be an integer >= 1"),
        (dict(rank_pattern={"(": 2}), "not a valid regular expression"),
        (dict(alpha_pattern={"x": float("nan")}), "must be a finite number"),
        (dict(rank_pattern=[("x", 2)]), "must be a dict"),
        (dict(modules_to_save="lm_head"), "tuple of strings"),
    ]:
        with pytest.raises(ll.ConfigError, match=match):
            ll.LoraLiteConfig(**kw)


def test_new_fields_round_trip_and_old_configs_load() -> None:
    cfg = ll.LoraLiteConfig(target_parameters=("experts",), modules_to_save=("lm_head",), **PATTERNS)
    assert ll.LoraLiteConfig.from_json(cfg.to_json()) == cfg
    old = {k: v for k, v in json.loads(ll.LoraLiteConfig().to_json()).items() if k not in cfg.to_dict() or k in (
        "variant", "r", "alpha", "dropout", "dtype", "target_roles", "target_names", "exclude_names", "layers", "variant_kwargs")}  # fmt: skip
    assert ll.LoraLiteConfig.from_dict(old) == ll.LoraLiteConfig()


# ---------------------------------------------------------------- modules_to_save


def test_modules_to_save_parity_with_peft_llama() -> None:
    x = llama_batch()
    with torch.no_grad():
        base = tiny_llama()(x).logits
    pm = _get_peft(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_T, modules_to_save=["lm_head"])
    ours = tiny_llama()
    ll.attach(ours, ll.LoraLiteConfig(r=4, alpha=8, target_names=(f"^{LLAMA_T}$",), modules_to_save=("lm_head",)))
    _parity(pm, ours, base, _lm, x)


def test_modules_to_save_detach_load_disabled_and_named(tmp_path) -> None:
    x = llama_batch()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x).logits
    ll.attach(model, ll.LoraLiteConfig(r=4, modules_to_save=("lm_head",)))
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert "lm_head.weight" in ll.adapter_state_dict(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
        want = model(x).logits
        with ll.disabled(model):
            assert torch.equal(model(x).logits, base)
        assert torch.equal(model(x).logits, want)
    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.lm_head.weight.requires_grad  # the flags before attach are back (a fresh model's: True)
    fresh = tiny_llama()
    ll.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, want)
    # a second adapter: it may not save lm_head too; while "default" is inactive lm_head is the original
    with pytest.raises(ll.AdapterError, match="lm_head is already saved by adapter 'default'"):
        ll.attach(fresh, ll.LoraLiteConfig(r=2, modules_to_save=("lm_head",)), name="b")
    ll.attach(fresh, ll.LoraLiteConfig(r=2), name="b")
    ll.set_active(fresh, "b")
    assert not fresh.lm_head.weight.requires_grad
    assert torch.equal(fresh.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(ll.adapter_state_dict(fresh, "default")["lm_head.weight"], before["lm_head.weight"] + 0.5)
    ll.set_active(fresh, ["default", "b"])
    assert fresh.lm_head.weight.requires_grad and torch.equal(fresh.lm_head.weight, before["lm_head.weight"] + 0.5)
    ll.detach(fresh, "b")
    ll.attach(fresh, ll.LoraLiteConfig(r=2), name="b")
    with torch.no_grad(), ll.disabled(fresh):
        assert torch.equal(fresh(x).logits, base)
    ll.merge(fresh, "default")  # merged: lm_head keeps its trained values
    assert torch.equal(fresh.lm_head.weight, before["lm_head.weight"] + 0.5)


def test_modules_to_save_refusals() -> None:
    model = tiny_llama()
    for cfg, err, match in [
        (
            ll.LoraLiteConfig(modules_to_save=("lm_haed",)),
            ll.TargetError,
            "modules_to_save: 'lm_haed' matches no module",
        ),
        (
            ll.LoraLiteConfig(modules_to_save=("up_proj",)),
            ll.ConfigError,
            r"model\.layers\.0\.mlp\.up_proj is also adapted",
        ),
        (ll.LoraLiteConfig(modules_to_save=("rotary_emb",)), ll.ConfigError, "has no parameters or buffers"),
    ]:
        with pytest.raises(err, match=match):
            ll.attach(model, cfg)
        assert not ll.is_attached(model)


def test_modules_to_save_import_export_with_peft(tmp_path) -> None:
    x = llama_batch()
    pm = _get_peft(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_T, modules_to_save=["lm_head"])
    with torch.no_grad():
        for _n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
        want = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    ll.import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        assert rel(ours(x).logits, want) <= RTOL
    ll.export_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert rel(back(x).logits, want) <= RTOL


def test_experts_only_export_loads_in_peft(tmp_path) -> None:
    """No linear target (peft's target_modules None) and a rank_pattern on expert weights."""
    x = llama_batch()
    ours = qwen_moe()
    ll.attach(
        ours, ll.LoraLiteConfig(r=2, target_roles=(), target_parameters=("experts",), rank_pattern={"gate_up_proj": 3})
    )
    with torch.no_grad():
        for a in ll.targets(ours).values():
            a.lora_B.normal_(0, 0.3)
        want = ours(x).logits
    ll.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(qwen_moe(), str(tmp_path))
    with torch.no_grad():
        assert rel(pm(x).logits, want) <= RTOL
