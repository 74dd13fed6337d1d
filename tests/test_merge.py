"""ll.merge / ll.merged_state_dict (issue 7): every variant folds into dense weights with unchanged outputs.

Tolerance: merge computes W_eff in fp32 once and the model then runs one matmul per layer instead of the
base matmul plus the adapter's; the outputs differ by fp32 rounding through a 2-block model
(measured <= 1e-6 of max|y|), checked at 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from _models import ad, tiny_llama
from test_variants_common import ALL_ROLES, CASES, _attach, _inputs, _model, _out
from torch import nn

import lora_lite as ll

RTOL = 1e-5
KINDS = ("llama", "toy")  # the toy model has a bias on every layer (ia3 scales it, the others must not)


def perturb(model: nn.Module, seed: int = 5, std: float = 0.1) -> None:
    """Stand-in for training: move every trainable adapter tensor away from its (identity) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g).to(p.dtype))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def _adapted(name: str, kind: str):
    model, x = _model(kind), _inputs(kind)
    with torch.no_grad():
        base = _out(model, kind, x)
    _attach(model, name, kind)
    perturb(model)
    with torch.no_grad():
        want = _out(model, kind, x)
    assert rel(want, base) > 1e-2, "the perturbed adapter must change the output, or the test proves nothing"
    return model, x, base, want


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_hooked_output(name: str, kind: str) -> None:
    model, x, _, want = _adapted(name, kind)
    names = ll.merge(model)
    assert names and not ll.is_attached(model)
    for _, m in model.named_modules():
        assert not hasattr(m, "_lora_lite") and not m._forward_hooks and not m._forward_pre_hooks
    assert not [k for k in model.state_dict() if "lora_" in k]
    with torch.no_grad():
        got = _out(model, kind, x)
    assert rel(got, want) <= RTOL


@pytest.mark.parametrize("name", list(CASES))
def test_merged_state_dict_does_not_mutate_and_loads_into_base(name: str) -> None:
    kind = "toy"
    model, x, _, want = _adapted(name, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = ll.merged_state_dict(model)
    assert ll.is_attached(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(_out(model, kind, x), want)
    fresh = _model(kind)
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert rel(_out(fresh, kind, x), want) <= RTOL
    ll.merge(model)  # and it is exactly what merge writes
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_merge_gpt2_conv1d(name: str) -> None:
    """Conv1D stores W transposed (d_in, d_out): merge must write W_eff in that layout."""
    model = _gpt2()
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    cfg = ll.LoraLiteConfig(
        variant=name, target_roles=ALL_ROLES, exclude_names=("lm_head", "wte", "wpe"), **CASES[name]["cfg"]
    )
    calib = CASES[name]["calib"](model, "llama") if "calib" in CASES[name] else None
    ll.attach(model, cfg, calibration_data=calib)
    perturb(model)
    with torch.no_grad():
        want = model(x).logits
    ll.merge(model)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    with torch.no_grad():
        assert rel(model(x).logits, want) <= RTOL


def test_merge_keeps_requires_grad_and_drops_original_weight() -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4, alpha=16.0))
    layer = next(iter(ll.targets(model).values()))
    w_res = layer.weight.detach().clone()
    ll.merge(model)
    assert all(p.requires_grad for p in model.parameters())  # as before attach
    assert not torch.equal(layer.weight, w_res)  # W_res + s·B A, not W_res ...
    # ... and not the original either: detach-style restoring would be wrong after a merge; nothing to restore now
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter is attached"):
        ll.merge(model)


def test_merge_refuses_quantized_base_before_changing_anything() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), bnb.nn.Linear4bit(16, 32, bias=True)).to("cpu")  # .to quantizes
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_roles=ALL_ROLES))
    perturb(model)
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ll.AdapterError, match=r"1: cannot merge into a quantized weight \(Linear4bit"):
        ll.merge(model)
    with pytest.raises(ll.AdapterError, match="quantized"):
        ll.merged_state_dict(model)
    assert ll.is_attached(model) and torch.equal(model[0].weight, w0) and hasattr(ad(model[0]), "lora_A")


def test_merge_refuses_tied_weights() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_names=("lm_head",), exclude_names=()))
    with pytest.raises(ll.AdapterError, match=r"lm_head: its weight is shared with \['model.embed_tokens'\]"):
        ll.merge(model)
    assert ll.is_attached(model)


def test_merge_refuses_inside_disabled_or_scaled() -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4))
    with ll.disabled(model), pytest.raises(ll.AdapterError, match="inside ll.disabled or ll.scaled"):
        ll.merge(model)
    with ll.scaled(model, 0.5), pytest.raises(ll.AdapterError, match="inside ll.disabled or ll.scaled"):
        ll.merged_state_dict(model)
    assert ll.is_attached(model)


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_cli_merge(variant: str, tmp_path) -> None:
    """`lora-lite merge --model DIR --adapter FILE --out DIR`: a plain saved model with the adapter's outputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lora_lite.app.cli import main

    base_dir, out = tmp_path / "base", tmp_path / "merged"
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(base_dir)
    tiny_llama().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ll.attach(model, ll.LoraLiteConfig(variant=variant, r=4, alpha=8.0))
    perturb(model)
    ll.save(model, tmp_path / "adapter.safetensors")
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
    argv = ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter.safetensors"), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not [k for k in merged.state_dict() if "lora_" in k]
    with torch.no_grad():
        assert rel(merged(x).logits, want) <= RTOL
    assert (out / "tokenizer.json").is_file()
    assert main([*argv, "--device", "cpu"]) == 2  # --out is not empty: refused, nothing overwritten


@pytest.mark.parametrize("name", list(CASES))
def test_merge_of_an_fp64_model_is_fp64_exact(name: str) -> None:
    """An fp64 model and adapter merge in fp64 (merge_dtype): merged and hooked outputs agree to fp64 rounding,
    not just fp32's (computing W_eff in fp32 left them 2e-7 apart)."""
    torch.manual_seed(0)
    model, x = _model("toy").double(), _inputs("toy").double()
    cfg = ll.LoraLiteConfig(variant=name, target_roles=ALL_ROLES, dtype=torch.float64, **CASES[name]["cfg"])
    calib = [t.double() for t in CASES[name]["calib"](model, "toy")] if "calib" in CASES[name] else None
    ll.attach(model, cfg, calibration_data=calib)
    perturb(model)
    with torch.no_grad():
        want = model(x)
    ll.merge(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert rel(model(x), want) <= 1e-12
