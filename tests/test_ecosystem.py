"""lora-lite inside the usual training stack (issue 5, part 4): gradient checkpointing, transformers.Trainer,
torch.compile. All on the tiny Llama, CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import llama_batch, lm_loss, tiny_llama

import lora_lite as ll

ALL_ROLES = ("reader", "writer", "inner")
CFGS = {
    "lora": dict(r=4, alpha=8.0),
    "lora_dropout": dict(r=4, alpha=8.0, dropout=0.1),
    "dora": dict(r=4, alpha=8.0),
    "delora": dict(r=4),
    "hra": dict(r=4),  # a pre-hook variant
    "ia3": dict(variant_kwargs={"feedforward_roles": ["writer"]}),  # output gates + an input gate (pre-hook)
    "pissa": dict(r=4, alpha=8.0),
    "antipasto": dict(r=4, variant_kwargs={"block_size": 2}),
    "eva": dict(r=4, alpha=8.0, variant_kwargs={"show_progress_bar": False}),
}


def _cfg(key: str) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(variant=key.removesuffix("_dropout"), target_roles=ALL_ROLES, **CFGS[key])


def _attached(key: str, seed: int = 4):
    model = tiny_llama()
    torch.manual_seed(seed)  # the same kaiming draws for every copy
    calib = [{"input_ids": llama_batch(seed=9 + i)} for i in range(2)] if key == "eva" else None
    ll.attach(model, _cfg(key), calibration_data=calib)
    _perturb(model)
    return model


def _perturb(model) -> None:
    """Move every trainable tensor off its init (B = 0 would hide half of the adapter's math)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _grads(model, ids, seed: int = 0) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(seed)  # the adapter dropout's draws
    lm_loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("key", ["lora", "lora_dropout", "dora", "hra", "ia3"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(key: str, reentrant: bool) -> None:
    ids = llama_batch()
    ref = _grads(_attached(key), ids)
    model = _attached(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: renamed activation_checkpointing_*
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_gradient_checkpointing
    calls = []
    layer0 = model.model.layers[0].mlp.up_proj
    layer0.register_forward_hook(lambda *a: calls.append(1))
    got = _grads(model, ids)
    assert len(calls) == 2  # the block really ran twice: forward, then recomputed in backward
    assert got.keys() == ref.keys()
    for n in ref:
        # the recomputation repeats the same ops (dropout draws replayed from the saved RNG state)
        assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-7), n
        assert got[n].abs().sum() > 0, n


def _checkpointed(key: str, reentrant: bool):
    model = _attached(key).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("key", ["lora", "hra", "pissa"])
@pytest.mark.parametrize("steer", ["scaled", "disabled"])
def test_checkpointing_with_backward_outside_the_steering_block_raises(key: str, reentrant: bool, steer: str) -> None:
    """The recompute in backward would run with the state restored on exit: wrong gradients. It raises instead."""
    model, ids = _checkpointed(key, reentrant), llama_batch()

    def block():
        return ll.scaled(model, 0.5) if steer == "scaled" else ll.disabled(model)

    with block():
        loss = lm_loss(model, ids)
    if not loss.requires_grad:  # disabled pissa: nothing in the graph requires grad (pissa rewrites no input)
        return
    want = "scaled by c=0.5" if steer == "scaled" else r"disabled \(ll.disabled\)"
    with pytest.raises(ll.AdapterError, match=rf"recomputed during backward with the adapter on, .* {want}"):
        loss.backward()
    model.zero_grad(set_to_none=True)
    with block():  # the fix the message gives: backward inside the block
        lm_loss(model, ids).backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("key", ["lora", "pissa", "dora"])
def test_checkpointing_allows_a_no_grad_reference_pass_before_backward(key: str, reentrant: bool) -> None:
    """DPO as TRL orders it: policy forward, then a no-grad reference pass under ll.disabled, then backward. The
    recompute runs in the policy's state: same gradients as without checkpointing. A later step that does run
    its forward inside the block and backward outside is still caught (the states seen are per step)."""
    ids = llama_batch()

    def dpo_step(model):
        pol = lm_loss(model, ids)
        with torch.no_grad(), ll.disabled(model):
            ref = lm_loss(model, ids)
        (pol - ref).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = dpo_step(_attached(key).train())
    model = _checkpointed(key, reentrant)
    got = dpo_step(model)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7), n
    with ll.scaled(model, 0.5):
        loss = lm_loss(model, ids)
    with pytest.raises(ll.AdapterError, match=r"with the adapter on, but the forwards since the last backward ran "):
        loss.backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_with_backward_inside_the_scaled_block_matches_no_checkpointing(reentrant: bool) -> None:
    ids = llama_batch()
    ref = _attached("lora").train()
    with ll.scaled(ref, 0.5):
        lm_loss(ref, ids).backward()
    model = _checkpointed("lora", reentrant)
    with ll.scaled(model, 0.5):
        lm_loss(model, ids).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7), n


# ---------------------------------------------------------------- transformers.Trainer


def test_trainer_trains_an_attached_model_then_save_and_load(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4, alpha=8.0))
    base0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert all(torch.equal(p, base0[n]) for n, p in model.named_parameters() if n in base0)  # base untouched
    assert all(not torch.equal(p, adapter0[n]) for n, p in model.named_parameters() if n in adapter0)
    assert ll.is_attached(model)

    model.eval()
    ids = llama_batch()
    with torch.no_grad():
        y = model(ids).logits
    path = ll.save(model, tmp_path / "adapter.safetensors")
    fresh = tiny_llama()
    ll.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, y)


# ---------------------------------------------------------------- torch.compile


def _compile_matches_eager(key: str, backend: str) -> None:
    torch._dynamo.reset()
    ids = llama_batch()
    model = _attached(key)
    model.eval()
    with torch.no_grad():
        y_eager = model(ids).logits
    ref = _grads(model, ids)
    model.zero_grad()
    compiled = torch.compile(model, backend=backend)
    compiled.eval()
    with torch.no_grad():
        y = compiled(ids).logits
    # aot_eager runs the same ATen ops: equal to eager up to op reordering; inductor fuses and may reorder
    # reductions: fp32 rounding of a few ulps of the logits' scale
    assert (y - y_eager).abs().max() <= 1e-5 * y_eager.abs().max()
    got = {k.removeprefix("_orig_mod."): v for k, v in _grads(compiled, ids).items()}
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("key", ["lora", "dora", "hra", "ia3", "antipasto"])
def test_hooks_compile_into_one_graph(key: str) -> None:
    """No graph break in the hook path (each would split the compiled model at every adapted layer)."""
    torch._dynamo.reset()
    model, ids = _attached(key), llama_batch()
    ex = torch._dynamo.explain(lambda i: model(input_ids=i).logits)(ids)
    assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons[:3]]
    assert ex.graph_count == 1


@pytest.mark.parametrize("key", ["lora", "dora"])
def test_compile_aot_eager_equals_eager(key: str) -> None:
    _compile_matches_eager(key, "aot_eager")


@pytest.mark.slow  # CPU inductor compiles C++ with gcc: ~1 min per model on 2 cores
@pytest.mark.parametrize("key", ["lora", "dora"])
def test_compile_inductor_equals_eager(key: str) -> None:
    _compile_matches_eager(key, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("key", ["delora", "hra", "ia3", "pissa", "antipasto", "eva"])
def test_compile_aot_eager_other_variants(key: str) -> None:
    _compile_matches_eager(key, "aot_eager")


def test_compiled_dora_follows_a_base_weight_load() -> None:
    """Under compile DoRA's ‖W‖² is recomputed each call: a load_state_dict of the base weights after the first
    compiled call is seen (a cached value stayed the attach-time one: 1e-1 off, right only after an eager call)."""
    torch._dynamo.reset()
    model, ids = _attached("dora").eval(), llama_batch()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(ids)
        other = tiny_llama(seed=1).state_dict()
        model.load_state_dict({k: v for k, v in other.items() if "lora_" not in k}, strict=False)
        y = compiled(ids).logits
        want = model(ids).logits  # eager, whose cache is keyed on the weight's version
    assert (y - want).abs().max() <= 1e-5 * want.abs().max()


def test_compiled_pissa_first_use_of_scaled_and_disabled() -> None:
    """ll.scaled builds pissa's original weight on entry, eagerly: the first scaled call of a compiled model
    no longer traces its hash (dynamo refused it under fullgraph; without, a storage error)."""
    torch._dynamo.reset()
    ids = llama_batch()
    ref = _attached("pissa").eval()
    with torch.no_grad(), ll.scaled(ref, 0.5):
        want = ref(ids).logits
    model = _attached("pissa").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        with ll.scaled(compiled, 0.5):
            y = compiled(ids).logits
        assert (y - want).abs().max() <= 1e-5 * want.abs().max()
        with ll.disabled(ref):
            base = ref(ids).logits
        with ll.disabled(compiled):
            assert torch.equal(compiled(ids).logits, base)


def test_attach_through_the_compiled_wrapper_uses_the_models_own_names(tmp_path) -> None:
    """ll.attach(torch.compile(model), cfg): targets, saved keys and the summary use the model's names, not
    `_orig_mod.`-prefixed ones, so the file loads onto a plain base; every entry point accepts the wrapper."""
    torch._dynamo.reset()
    ids = llama_batch()
    model = tiny_llama()
    compiled = torch.compile(model, backend="aot_eager")
    ll.attach(compiled, _cfg("lora"))
    assert ll.is_attached(compiled) and ll.is_attached(model)
    assert all(not n.startswith("_orig_mod") for n in ll.targets(compiled))
    _perturb(model)
    with torch.no_grad():
        want = model(ids).logits
        assert (compiled(ids).logits - want).abs().max() <= 1e-5 * want.abs().max()
    ll.save(compiled, tmp_path / "a.safetensors")
    assert "_orig_mod" not in ll.summary(compiled)
    assert all(not k.startswith("_orig_mod") for k in ll.merged_state_dict(compiled))
    fresh = tiny_llama()
    ll.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    ll.detach(compiled)
    assert not ll.is_attached(model) and not any(p.requires_grad is False for p in model.parameters())


# ---------------------------------------------------------------- generation with a KV cache


@pytest.mark.parametrize("key", [k for k in CFGS if k != "lora_dropout"])
def test_generate_with_kv_cache_equals_greedy_without_cache(key: str) -> None:
    """model.generate reuses cached keys/values and feeds one token at a time: the adapted k/v projections'
    outputs land in the cache. Greedy decoding must pick the same tokens as re-running the whole prefix
    without a cache (the adapter applied to every position every time)."""
    model = _attached(key).eval()
    model.generation_config.eos_token_id = None  # decode all 8 tokens (no early stop on a sampled EOS)
    ids = llama_batch(batch=2, seq=6)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        with ll.disabled(model):
            base = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, base), "the adapter changed no token: the test would not see a lost update"
