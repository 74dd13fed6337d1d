"""ll.export_peft / ll.import_peft (issue 7), with peft 0.21.2 as the oracle, on the tiny Llama and GPT-2.

Tolerance 1e-5 of max|logits|: peft and lora-lite compute the same adapter math in a different operation
order (peft scales the d_out-dim output, we the r-dim intermediate; exported pissa is W + s·(BA − B₀A₀)
where we run W_res + s·BA), so they agree to fp32 rounding (measured <= 1.5e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from _models import ad, llama_batch, tiny_llama
from test_merge import _gpt2, perturb, rel
from test_variants_common import ALL_ROLES, _eva_calib

import lora_lite as ll

peft = pytest.importorskip("peft")
RTOL = 1e-5

EXPORTS = {
    "lora": dict(variant="lora", r=4, alpha=12.0),
    "rslora": dict(variant="lora", r=4, alpha=12.0, variant_kwargs={"use_rslora": True}),
    "dora": dict(variant="dora", r=4, alpha=12.0),
    "pissa": dict(variant="pissa", r=4, alpha=12.0),  # alpha != r
    "pissa_rslora": dict(variant="pissa", r=4, alpha=12.0, variant_kwargs={"use_rslora": True}),
    "eva": dict(variant="eva", r=4, alpha=12.0),
    "ia3": dict(variant="ia3", variant_kwargs={"feedforward_roles": ["writer"]}),
    "ia3_ff": dict(variant="ia3_ff"),
}


def _ours(kw: dict, model=None):
    model = tiny_llama() if model is None else model
    calib = _eva_calib("llama") if kw["variant"] == "eva" else None
    ll.attach(model, ll.LoraLiteConfig(target_roles=ALL_ROLES, **kw), calibration_data=calib)
    perturb(model)
    return model


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_peft_and_reproduces_outputs(case: str, tmp_path) -> None:
    x = llama_batch()
    base = _logits(tiny_llama(), x)
    ours = _ours(EXPORTS[case])
    want = _logits(ours, x)
    assert rel(want, base) > 1e-2
    ll.export_peft(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # the unmodified base
    assert rel(_logits(pm, x), want) <= RTOL
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == sorted(ll.targets(ours))
    if case.startswith("pissa"):  # rank 2r, same scaling (peft's PiSSA conversion)
        assert conf["r"] == 8 and conf["lora_alpha"] == pytest.approx(12.0 * (2**0.5 if "rslora" in case else 2))


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "pissa"])
def test_export_gpt2_conv1d(case: str, tmp_path) -> None:
    """GPT-2's Conv1D (fan_in_fan_out): same lora tensors, peft transposes only in its own merge / DoRA norm."""
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = _ours(EXPORTS[case], _gpt2())
    want = _logits(ours, x)
    ll.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path))
    assert rel(_logits(pm, x), want) <= RTOL


@pytest.mark.parametrize("variant", ["hra", "delora", "antipasto"])
def test_export_unsupported_variant_raises(variant: str, tmp_path) -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant=variant, r=4))
    with pytest.raises(ll.AdapterError, match=rf"variant '{variant}' has no peft LoRA/IA3 equivalent.*ll\.merge"):
        ll.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "pissa", "ia3"])
def test_export_then_import_round_trip(case: str, tmp_path) -> None:
    x = llama_batch()
    ours = _ours(EXPORTS[case])
    ll.export_peft(ours, tmp_path)
    fresh = tiny_llama()
    names = ll.import_peft(fresh, tmp_path)
    assert sorted(names) == sorted(ll.targets(ours))
    assert rel(_logits(fresh, x), _logits(ours, x)) <= RTOL


PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "up_proj"]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=["q_proj", "gate_proj"]),
    "dropout": lambda: peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["o_proj"]),
    "regex": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.1\.mlp\.(up|down)_proj"),
    "pissa": lambda: peft.LoraConfig(
        r=4, lora_alpha=6, init_lora_weights="pissa", target_modules=["q_proj", "up_proj"]
    ),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_import_reproduces_peft(case: str, tmp_path) -> None:
    x = llama_batch()
    pm = peft.get_peft_model(tiny_llama(), PEFT_CONFIGS[case]())
    perturb(pm)  # peft's trainable tensors: lora_A/B, magnitude, ia3_l
    pm.save_pretrained(str(tmp_path))
    want = _logits(pm.eval(), x)
    assert rel(want, _logits(tiny_llama(), x)) > 1e-2
    model = tiny_llama()
    names = ll.import_peft(model, tmp_path)
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "base_layer"))
    assert sorted(names) == peft_names
    assert rel(_logits(model, x), want) <= RTOL
    if case == "ia3":
        kinds = {n: ad(layer)._lora_lite.variant.name for n, layer in ll.targets(model).items()}
        assert {k for n, k in kinds.items() if n.endswith("down_proj")} == {"ia3_ff"}
        assert {k for n, k in kinds.items() if not n.endswith("down_proj")} == {"ia3"}


def test_import_of_a_peft_pissa_adapter_can_keep_no_original(tmp_path) -> None:
    x = llama_batch()
    pm = peft.get_peft_model(tiny_llama(), PEFT_CONFIGS["pissa"]())
    perturb(pm)
    pm.save_pretrained(str(tmp_path))
    want = _logits(pm.eval(), x)
    model = tiny_llama()
    ll.import_peft(model, tmp_path, keep_original=False)
    assert rel(_logits(model, x), want) <= RTOL
    assert all(ad(layer)._lora_lite.original_dropped for layer in ll.targets(model).values())
    with pytest.raises(ll.AdapterError, match="keep_original=False"):
        ll.detach(model)
    with pytest.raises(ll.AdapterError, match="keep_original must be True or False"):
        ll.import_peft(tiny_llama(), tmp_path, keep_original=None)


@pytest.mark.parametrize("use_dora", [False, True])
def test_import_reproduces_peft_gpt2_conv1d(use_dora: bool, tmp_path) -> None:
    """peft with fan_in_fan_out=True on Conv1D: same (r, d_in) / (d_out, r) tensors, our layout from the module."""
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    conf = peft.LoraConfig(r=4, lora_alpha=6, use_dora=use_dora, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    pm = peft.get_peft_model(_gpt2(), conf)
    perturb(pm)
    pm.save_pretrained(str(tmp_path))
    want = _logits(pm.eval(), x)
    model = _gpt2()
    assert len(ll.import_peft(model, tmp_path)) == 4
    assert rel(_logits(model, x), want) <= RTOL


def _edit_config(path, **changes) -> None:
    conf = json.loads((path / "adapter_config.json").read_text())
    conf.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(conf))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(bias="all"), r"\['bias'\].*no lora-lite equivalent"),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save \['lm_head'\] selects lm_head.*no tensors for it"),
        (dict(rank_pattern={"q_proj": 8}), r"q_proj: rank 4 differs from the config's r=8 for this layer"),
        (dict(layer_replication=[[0, 1]]), r"\['layer_replication'\]"),
        (dict(peft_type="FOURIERFT"), r"peft_type 'FOURIERFT' is not supported"),
        (dict(peft_type="LOHA"), r"lora_A.weight' is not a peft LoHa tensor"),  # LoRA tensors
        (dict(r=8), r"rank 4 differs from the config's r=8"),
        (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights='pissa_niter_4'.*path_initial_model"),
        (dict(init_lora_weights="corda"), r"init_lora_weights='corda'.*path_initial_model"),
        (dict(init_lora_weights="olora", use_dora=True), r"init_lora_weights='olora' with use_dora"),
    ],
)
def test_import_refuses_unsupported_options(changes: dict, match: str, tmp_path) -> None:
    ll.export_peft(_ours(EXPORTS["lora"]), tmp_path)
    _edit_config(tmp_path, **changes)
    model = tiny_llama()
    with pytest.raises(ll.LoadError, match=match):
        ll.import_peft(model, tmp_path)
    assert not ll.is_attached(model) and not [n for n in model.state_dict() if "lora_" in n]


def test_import_refuses_wrong_model_and_missing_files(tmp_path) -> None:
    ll.export_peft(_ours(EXPORTS["lora"]), tmp_path)
    with pytest.raises(ll.LoadError, match=r"module 'model.layers.0.\S+' \(\d+ in all\) is not in this model"):
        ll.import_peft(tiny_llama().model, tmp_path)  # the inner LlamaModel: names lack the 'model.' prefix
    with pytest.raises(ll.LoadError, match="does not fit this model"):  # same names, other shapes
        ll.import_peft(tiny_llama(intermediate_size=48), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ll.LoadError, match="no adapter_model.safetensors"):
        ll.import_peft(tiny_llama(), tmp_path)
    with pytest.raises(ll.LoadError, match="not a peft adapter directory"):
        ll.import_peft(tiny_llama(), tmp_path / "nowhere")


def _damage(path, how: str) -> None:
    conf, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if how == "config not JSON":
        conf.write_text("{r: 4")
    elif how == "config a list":
        conf.write_text("[1, 2]")
    elif how == "no r":
        _edit_config(path)
        c = json.loads(conf.read_text())
        del c["r"]
        conf.write_text(json.dumps(c))
    elif how == "alpha null":
        _edit_config(path, lora_alpha=None)
    elif how == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "NaN in lora_A":
        from safetensors.torch import load_file, save_file

        ts = load_file(str(weights))
        k = next(k for k in ts if "lora_A" in k)
        ts[k][0, 0] = float("nan")
        save_file(ts, str(weights))


@pytest.mark.parametrize(
    "how, match",
    [
        ("config not JSON", r"adapter_config.json is not readable JSON"),
        ("config a list", r"must hold a JSON object, got list"),
        ("no r", r"missing or invalid field: KeyError\('r'\)"),
        ("alpha null", r"missing or invalid field: TypeError"),
        ("weights truncated", r"adapter_model.safetensors is not a readable safetensors file"),
        ("NaN in lora_A", r"lora_A contains NaN or inf values; pass allow_nonfinite=True"),
    ],
)
def test_import_damaged_directory_raises_load_error_and_leaves_the_model(how: str, match: str, tmp_path) -> None:
    ll.export_peft(_ours(EXPORTS["lora"]), tmp_path)
    _damage(tmp_path, how)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.LoadError, match=match):
        ll.import_peft(model, tmp_path)
    assert not ll.is_attached(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if how == "NaN in lora_A":  # the documented opt-in
        ll.import_peft(model, tmp_path, allow_nonfinite=True)
        assert ll.is_attached(model)


def test_export_onto_an_existing_file_is_refused(tmp_path) -> None:
    f = tmp_path / "adapter"
    f.write_text("not a directory")
    with pytest.raises(ll.AdapterError, match=r"is a file; peft adapters are directories"):
        ll.export_peft(_ours(EXPORTS["lora"]), f)
    assert f.read_text() == "not a directory"
