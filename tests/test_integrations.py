"""lora_lite.integrations: the Trainer callback that writes the adapter into every checkpoint; transformers stays
optional (imported when the callback is first used)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _models import llama_batch, tiny_llama

import lora_lite as ll
from lora_lite.integrations import adapter_checkpoint_callback

CFGS = {"lora": dict(r=4, alpha=8.0), "pissa": dict(r=4, alpha=16.0)}  # pissa: the checkpoint's weights are W_res


def _trainer(variant: str, out: Path, max_steps: int = 4):
    from transformers import Trainer, TrainingArguments

    from lora_lite.integrations import AdapterCheckpointCallback

    model = tiny_llama()
    torch.manual_seed(3)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, **CFGS[variant]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCheckpointCallback()])
    return model, trainer


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ll.adapter_state_dict(model).items()}


@pytest.mark.parametrize("variant", sorted(CFGS))
def test_every_checkpoint_holds_the_adapter_of_its_step(variant: str, tmp_path) -> None:
    from safetensors.torch import load_file

    model, trainer = _trainer(variant, tmp_path / "out")
    trainer.train()
    ckpts = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):  # the adapter file = the lora_* tensors of Trainer's own full state dict of that step
        d = tmp_path / "out" / f"checkpoint-{step}"
        _, _, saved = ll.read_adapter(d / "adapter.safetensors")
        full = load_file(d / "model.safetensors")
        ours = {k.replace(".lora_lite.default.", "."): v for k, v in full.items() if ".lora_lite.default." in k}
        assert saved.keys() == ours.keys() and saved
        assert all(torch.equal(saved[k], ours[k]) for k in saved)

    model.eval()
    ids = llama_batch()
    with torch.no_grad():
        want = model(ids).logits
    fresh = tiny_llama()  # only the base and the adapter file: no Trainer state
    ll.load(fresh, tmp_path / "out" / "checkpoint-4" / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_resume_from_a_checkpoint_with_the_adapter_attached_first(tmp_path) -> None:
    """The docs' recipe: attach, then trainer.train(resume_from_checkpoint=...): the run ends where a straight
    run ends (Trainer restores the lora_* tensors, optimizer and RNG from the checkpoint)."""
    straight, trainer = _trainer("lora", tmp_path / "straight")
    trainer.train()
    want = _adapter(straight)
    resumed, trainer = _trainer("lora", tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    got = _adapter(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
    _, _, last = ll.read_adapter(tmp_path / "resumed" / "checkpoint-4" / "adapter.safetensors")
    assert all(torch.equal(last[k], want[k]) for k in want)


def test_only_the_main_process_writes(tmp_path) -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4))
    (tmp_path / "checkpoint-7").mkdir()
    cb = adapter_checkpoint_callback()
    args = SimpleNamespace(output_dir=str(tmp_path))
    cb.on_save(args, SimpleNamespace(global_step=7, is_world_process_zero=False), None, model=model)
    assert not (tmp_path / "checkpoint-7" / "adapter.safetensors").exists()
    cb.on_save(args, SimpleNamespace(global_step=7, is_world_process_zero=True), None, model=model)
    assert (tmp_path / "checkpoint-7" / "adapter.safetensors").is_file()
    ddp_like = torch.nn.DataParallel(model)  # a wrapped model: the adapter is saved from the module inside
    named = adapter_checkpoint_callback("named.safetensors")
    named.on_save(args, SimpleNamespace(global_step=7, is_world_process_zero=True), None, model=ddp_like)
    assert (tmp_path / "checkpoint-7" / "named.safetensors").is_file()


def test_misuse_is_refused_with_the_fix(tmp_path) -> None:
    from transformers import TrainerCallback

    cb = adapter_checkpoint_callback()
    assert isinstance(cb, TrainerCallback)
    with pytest.raises(ll.AdapterError, match="plain file name"):
        adapter_checkpoint_callback("sub/adapter.safetensors")
    state, args = SimpleNamespace(global_step=3, is_world_process_zero=True), SimpleNamespace(output_dir=str(tmp_path))
    with pytest.raises(ll.AdapterError, match="no lora-lite adapter is attached"):
        cb.on_train_begin(args, state, None, model=tiny_llama())
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4))
    with pytest.raises(ll.AdapterError, match="checkpoint-3' does not exist"):
        cb.on_save(args, state, None, model=model)


def test_importing_the_library_does_not_import_transformers() -> None:
    code = (
        "import sys, lora_lite, lora_lite.integrations, lora_lite.reference\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    src = str(Path(ll.__file__).parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src, "PATH": ""}, timeout=120)
