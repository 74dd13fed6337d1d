"""`reference_model(model)`: the base model with no second copy, on every path TRL 1.16's DPOTrainer takes.

TRL replaces the reference's `forward` on the instance by a fused LM head that calls `ref.base_model(...)` and
reads `ref.get_output_embeddings().weight` itself, so the tests check the plain forward, that fused path, and a
few DPO steps against a run with a separate frozen copy of the base."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import TINY_DECODER, llama_batch, tiny_llama

import lora_lite as ll
from lora_lite.reference import ReferenceModel, reference_model

ALL_ROLES = ("reader", "writer", "inner")
CFGS = {  # every registered variant (test_every_variant_has_a_case)
    "lora": dict(r=4, alpha=8.0),
    "pissa": dict(r=4, alpha=16.0),
    "antipasto": dict(r=4, variant_kwargs={"block_size": 2}),
    "dora": dict(r=4, alpha=8.0),
    "delora": dict(r=4),
    "hra": dict(r=4),
    "ia3": dict(variant_kwargs={"feedforward_roles": ["writer"]}),  # output gates + input gates (pre-hook)
    "ia3_ff": dict(),
    "eva": dict(r=4, alpha=8.0, variant_kwargs={"show_progress_bar": False}),
    "road": dict(variant_kwargs={"variant": "road_2", "group_size": 16}),
    "adalora": dict(r=4, alpha=8.0, variant_kwargs={"target_r": 2, "total_step": 10}),
    "olora": dict(r=4, alpha=8.0),
    "loftq": dict(r=4, alpha=4.0, variant_kwargs={"loftq_bits": 8}),
    "oft": dict(variant_kwargs={"block_size": 4}),  # input rotation (pre-hook)
    "boft": dict(variant_kwargs={"block_size": 4, "n_butterfly_factor": 2}),  # pre-hook and forward hook
    "loha": dict(r=4, alpha=8.0),
    "lokr": dict(r=2, alpha=4.0),
    "vera": dict(r=4),
}


def _attached(variant: str, model=None, **overrides):
    model = tiny_llama() if model is None else model
    kw = {"target_roles": ALL_ROLES, **CFGS[variant], **overrides}
    calib = [{"input_ids": llama_batch(seed=9 + i)} for i in range(2)] if variant == "eva" else None
    torch.manual_seed(4)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, **kw), calibration_data=calib)
    g = torch.Generator().manual_seed(11)  # move every trainable tensor off its init: a non-zero adapter
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _fused_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """TRL's fused LM head, as DPOTrainer adds it to the policy and the reference."""
    from trl.trainer.utils import add_fused_lm_head

    if "forward" not in model.__dict__:
        add_fused_lm_head(model)
    with torch.no_grad():
        return model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs


def test_every_variant_has_a_case() -> None:
    assert set(CFGS) == set(ll.REGISTRY)


@pytest.mark.parametrize("variant", sorted(CFGS))
def test_reference_is_the_base_model_on_every_path(variant: str) -> None:
    ids = llama_batch()
    base = tiny_llama()
    h = torch.randn(2, 12, TINY_DECODER["hidden_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = base(ids).logits
        want_hidden = base.model(ids).last_hidden_state
        want_mlp = base.model.layers[1].mlp(h)
    model = _attached(variant)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        policy = model(ids).logits
    assert (policy - want).abs().max() > 1e-3  # the adapter is not the identity any more

    ref = reference_model(model)
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, want)
        assert torch.equal(ref(input_ids=ids).logits, want)
        assert torch.equal(ref.base_model(ids).last_hidden_state, want_hidden)  # the fused head's backbone call
        assert torch.equal(ref.model.layers[1].mlp(h), want_mlp)  # any submodule reached through the view
        assert torch.equal(model(ids).logits, policy)  # the adapter is back on after each call
    assert torch.equal(ref.get_output_embeddings().weight, base.lm_head.weight)
    assert torch.equal(_fused_log_probs(ref, ids), _fused_log_probs(base, ids))
    assert not torch.equal(_fused_log_probs(model, ids), _fused_log_probs(base, ids))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize("variant", ["pissa", "antipasto"])
def test_a_rewritten_lm_head_reads_as_the_original_weight(variant: str) -> None:
    """pissa/antipasto replace lm_head.weight by a residual; TRL's fused head reads that weight directly."""
    ids = llama_batch()
    base = tiny_llama()
    model = _attached(variant, exclude_names=(), target_names=(r"lm_head$", r"q_proj$"))
    assert "lm_head" in ll.targets(model)
    ref = reference_model(model)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert torch.equal(ref.lm_head.weight, base.lm_head.weight)
    assert torch.equal(ref.get_output_embeddings().weight, base.lm_head.weight)
    assert torch.equal(_fused_log_probs(ref, ids), _fused_log_probs(base, ids))
    sd, want = ref.state_dict(), base.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)


def test_the_reference_owns_nothing_and_changes_nothing_on_the_model() -> None:
    model = _attached("lora")
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = reference_model(model)
    assert list(ref.parameters()) == [] and list(ref.buffers()) == [] and list(ref.children()) == []
    assert not ref.training  # eval when made, like a model from from_pretrained
    ref.requires_grad_(True)
    ref.to(torch.float64)
    ref.eval()
    ref.train(False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(m.training for m in model.modules())  # the policy keeps training
    assert next(model.parameters()).dtype == torch.float32
    assert ref.config is model.config and ref.device == model.device and ref.dtype == model.dtype
    assert bool(ref) and (ref or model) is ref  # TRL: `self.ref_model or self.model`
    assert ref.get_output_embeddings() is ref.lm_head  # one view per submodule
    assert isinstance(ref.model, ReferenceModel) and isinstance(ref.model.layers[0], ReferenceModel)
    assert len(ref.model.layers) == 2 and all(isinstance(b, ReferenceModel) for b in ref.model.layers)
    sd, own = ref.state_dict(), model.state_dict()
    assert not any("lora_" in k for k in sd) and all(sd[k].data_ptr() == own[k].data_ptr() for k in sd)  # no copies
    with pytest.raises(ll.AdapterError, match="no weights of its own"):
        ref.load_state_dict(sd)


def test_the_reference_runs_in_its_own_mode() -> None:
    """A training policy's dropout never reaches the reference (eval unless ref.train()); modes are restored."""
    ids = llama_batch()
    base = tiny_llama(attention_dropout=0.5)
    model = _attached("lora", model=tiny_llama(attention_dropout=0.5)).train()
    ref = reference_model(model)
    with torch.no_grad():
        want = base(ids).logits  # eval
        assert torch.equal(ref(ids).logits, want)
        assert all(m.training for m in model.modules())
        ref.train()
        torch.manual_seed(0)
        dropped = ref(ids).logits
        base.train()
        torch.manual_seed(0)
        assert torch.equal(dropped, base(ids).logits) and not torch.equal(dropped, want)
        model.eval()
        ref(ids)
        assert not any(m.training for m in model.modules())


def test_generate_through_the_reference_is_the_base_model() -> None:
    ids = llama_batch(batch=1, seq=4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = tiny_llama().generate(ids, **kw)
    model = _attached("pissa")
    assert torch.equal(reference_model(model).generate(ids, **kw), want)


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ll.AdapterError, match=r"Call ll.attach\(model, cfg\) or ll.load first"):
        reference_model(tiny_llama())
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4), keep_original=False)
    with pytest.raises(ll.AdapterError, match="keep_original=True"):
        reference_model(model)
    model = _attached("lora")
    ref = reference_model(model)
    with pytest.raises(ll.AdapterError, match="already a reference model"):
        reference_model(ref)
    ll.merge(model)
    with pytest.raises(ll.AdapterError, match="ll.detach or ll.merge since the reference was made"):
        ref(llama_batch())


# ---------------------------------------------------------------- TRL DPOTrainer

WORDS = "the cat sat on a mat and dog ran far away while bird sang in tree".split()
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]")


def _preferences():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": ["the cat", "a dog", "the bird", "a mat"],
            "chosen": [" sat on a mat", " ran far away", " sang in tree", " and the cat"],
            "rejected": [" ran far", " sat on the tree", " on a dog", " sang"],
        }
    )


def _dpo(variant: str, ref_kind: str, tmp_path):
    """3 DPO steps with TRL; the reference: ll's view, a frozen copy of the base, or a wrapper TRL bypasses."""
    from trl import DPOConfig, DPOTrainer

    model = _attached(variant, model=tiny_llama(vocab_size=len(VOCAB)))
    with torch.no_grad():  # back to the identity (B = 0 etc. after the perturbation): DPO starts at the base
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "lora_delta_s", "lora_rot_T")):
                p.zero_()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    if ref_kind == "view":
        ref = reference_model(model)
    elif ref_kind == "copy":
        ref = tiny_llama(vocab_size=len(VOCAB)).requires_grad_(False)
    else:  # what the fused head bypasses: only forward enters ll.disabled
        ref = _ForwardOnly(model)
    args = DPOConfig(
        output_dir=str(tmp_path / ref_kind),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=_preferences(), processing_class=_tokenizer()
    )
    assert "forward" in trainer.ref_model.__dict__  # TRL replaced it by the fused LM head
    trainer.train()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    adapter = {k: v.detach().clone() for k, v in ll.adapter_state_dict(model).items()}
    return trainer, adapter


class _ForwardOnly(ReferenceModel):
    """A reference that wraps only its own forward: TRL's fused head reaches the policy's backbone around it."""

    def _ll_wrap(self, value):
        return value


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_dpo_with_the_reference_equals_dpo_with_a_frozen_copy(variant: str, tmp_path) -> None:
    """Bit for bit: the reference pass is the same float ops either way (the view's hooks return None under
    ll.disabled, pissa's original weight is rebuilt bit for bit), so the log-probs, the loss and each AdamW step
    are identical; no tolerance is needed."""
    view, got = _dpo(variant, "view", tmp_path)
    copied, want = _dpo(variant, "copy", tmp_path)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    lora_b = [k for k in want if k.endswith("lora_B")]
    assert all(want[k].abs().max() > 0 for k in lora_b)  # DPO moved the adapter off its init

    # memory: the view adds no tensor storage to the policy's, except for pissa the original weight of each
    # rewritten layer, which ll.disabled rebuilds once and keeps; the frozen copy adds a whole model
    policy = _storages(list(view.model.parameters()) + list(view.model.buffers()))
    assert list(view.ref_model.parameters()) == []
    extra = {p: n for p, n in _storages(view.ref_model.state_dict().values()).items() if p not in policy}
    rewritten = sum(layer.weight.untyped_storage().nbytes() for layer in ll.targets(view.model).values())
    model_bytes = sum(p.nbytes for p in view.model.parameters() if not p.requires_grad)
    assert sum(extra.values()) == (rewritten if variant == "pissa" else 0) < model_bytes
    copy_policy = _storages(list(copied.model.parameters()) + list(copied.model.buffers()))
    copy_extra = _storages(copied.ref_model.state_dict().values())
    assert not copy_extra.keys() & copy_policy.keys() and sum(copy_extra.values()) >= model_bytes


def test_dpo_detects_a_reference_the_fused_head_bypasses(tmp_path) -> None:
    """The comparison above is sensitive: a wrapper whose forward alone enters ll.disabled trains another adapter
    (TRL's fused head calls ref.base_model, i.e. the policy's backbone with the adapter on)."""
    _, bypassed = _dpo("lora", "bypassed", tmp_path)
    _, want = _dpo("lora", "copy", tmp_path)
    assert any(not torch.equal(bypassed[k], want[k]) for k in want)


def test_trl_hashes_the_reference_as_the_base_model() -> None:
    """precompute_ref_log_probs=True names its cache by a hash of the reference's state_dict: it must be the
    base model's (a view hashing as nothing would reuse another model's reference log-probs)."""
    from trl.trainer.utils import hash_module

    for variant in ("lora", "pissa"):
        assert hash_module(reference_model(_attached(variant))) == hash_module(tiny_llama())
    assert hash_module(reference_model(_attached("lora", model=tiny_llama(seed=1)))) != hash_module(tiny_llama())


def test_deepcopy_of_a_reference_is_a_reference_of_the_copy() -> None:
    model = _attached("lora")
    ref = copy.deepcopy(reference_model(model))
    ids = llama_batch()
    with torch.no_grad():
        assert ref._ll_model is not model and torch.equal(ref(ids).logits, tiny_llama()(ids).logits)
