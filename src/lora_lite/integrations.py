"""Glue for training stacks that lora-lite does not depend on. transformers is imported on first use only.

    from lora_lite.integrations import AdapterCheckpointCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCheckpointCallback()])
    ...
    ll.load(fresh_base, "out/checkpoint-500/adapter.safetensors")   # no full model state needed

`AdapterCheckpointCallback` is a `transformers.TrainerCallback`; the class is built when first accessed
(`adapter_checkpoint_callback()` returns an instance), so `import lora_lite.integrations` does not import
transformers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import AdapterError
from .io import save
from .named import adapter_state_dict

if TYPE_CHECKING:
    from transformers import TrainerCallback

ADAPTER_FILE = "adapter.safetensors"


def adapter_checkpoint_callback(filename: str = ADAPTER_FILE) -> TrainerCallback:
    """A `transformers.TrainerCallback` that writes `ll.save`'s adapter file into every Trainer checkpoint."""
    return _callback_class()(filename)


def __getattr__(name: str) -> Any:  # `from lora_lite.integrations import AdapterCheckpointCallback`
    if name == "AdapterCheckpointCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CLASS: type | None = None


def _callback_class() -> type:
    global _CLASS
    if _CLASS is None:
        try:
            from transformers import TrainerCallback
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        except ImportError as e:
            raise ImportError(
                "AdapterCheckpointCallback is a transformers TrainerCallback, and transformers is not installed: "
                "pip install transformers"
            ) from e
        _CLASS = _define(TrainerCallback, PREFIX_CHECKPOINT_DIR)
    return _CLASS


def _define(base: type, prefix: str) -> type:
    class AdapterCheckpointCallback(base):
        """On each Trainer checkpoint, write the attached adapter to `<checkpoint>/adapter.safetensors`.

        The checkpoint directory is `args.output_dir/checkpoint-<global_step>`, as Trainer names it; load it
        onto a fresh base with `ll.load(base, ".../checkpoint-N/adapter.safetensors")`. Written by the main
        process only (`state.is_world_process_zero`), except under FSDP2, where `ll.save` gathers the sharded
        adapter on every rank and rank 0 writes. The model is the Trainer's (passed to every callback), or the
        one given here. Trainer's final `save_model` is not a checkpoint: call `ll.save` after training.
        To resume, attach (or `ll.load`) the adapter before `trainer.train(resume_from_checkpoint=...)`: Trainer
        restores the `lora_*` tensors from the checkpoint's full state dict.
        """

        def __init__(self, filename: str = ADAPTER_FILE, model: nn.Module | None = None) -> None:
            if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
                raise AdapterError(
                    f"AdapterCheckpointCallback: filename must be a plain file name such as {ADAPTER_FILE!r} "
                    f"(it is written inside each checkpoint directory), got {filename!r}"
                )
            self.filename = filename
            self.model = model

        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any):
            adapter_state_dict(_unwrapped(self.model if self.model is not None else model))  # attached? (else raise)

        def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
            model = _unwrapped(self.model if self.model is not None else model)
            sharded = any(hasattr(t, "full_tensor") for t in adapter_state_dict(model).values())  # FSDP2
            if not (sharded or state.is_world_process_zero):
                return
            checkpoint = os.path.join(args.output_dir, f"{prefix}-{state.global_step}")
            if not os.path.isdir(checkpoint):
                raise AdapterError(
                    f"AdapterCheckpointCallback: Trainer's checkpoint directory {checkpoint!r} does not exist "
                    "(a hyperparameter search puts checkpoints under a run directory); save the adapter with "
                    "ll.save(model, path) from your own callback there."
                )
            save(model, os.path.join(checkpoint, self.filename))

    AdapterCheckpointCallback.__module__ = __name__
    AdapterCheckpointCallback.__qualname__ = "AdapterCheckpointCallback"
    return AdapterCheckpointCallback


def _unwrapped(model: nn.Module | None) -> nn.Module:
    """The model inside DDP / DataParallel (`.module`); what ll.save needs."""
    if model is None:
        raise AdapterError(
            "AdapterCheckpointCallback: no model was passed to on_save; give it the model: "
            "AdapterCheckpointCallback(model=model)"
        )
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
