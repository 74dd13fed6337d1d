"""FSDP2 and 0-dim adapter parameters (delora's λ): `fsdp_ignored_params`.

torch's `fully_shard` refuses scalar parameters ("fully_shard doesn't support scalar parameters", torch
2.13), and DeLoRA's `lora_lambda` has shape () (SPEC; peft uses (1,)). `fully_shard` can leave
parameters alone (`ignored_params`): they stay whole on every rank, and FSDP does not reduce their
gradients. So this returns those parameters, and gives each trainable one a hook that averages its
gradient over the ranks once backward has accumulated it. FSDP does the same for the parameters it
shards (mean over ranks). The result is the training of one process on the global batch
(tests/test_distributed.py). With gradient accumulation the hook runs after every backward; averaging
again what is already equal on every rank leaves it unchanged, so the sum stays right.

    ignored = ll.fsdp_ignored_params(model)            # after attach / load, before fully_shard
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)

For variants without 0-dim tensors it returns an empty set, so the recipe is the same for all of them.
"""

from __future__ import annotations

from functools import partial

import torch.distributed as dist
from torch import nn

from .errors import AdapterError
from .named import is_attached, model_state

_GROUP = "_lora_lite_grad_group"  # set on a parameter once it has the averaging hook: the group it averages over


def _average_grad(p: nn.Parameter, group: dist.ProcessGroup | None) -> None:
    if p.grad is not None:
        dist.all_reduce(p.grad, group=group)  # SUM (gloo has no AVG)
        p.grad.div_(dist.get_world_size(group))


def fsdp_ignored_params(model: nn.Module, group: dist.ProcessGroup | None = None) -> set[nn.Parameter]:
    """Every adapter's 0-dim parameters, for `fully_shard(..., ignored_params=...)`.

    Trainable ones average their gradient over `group` (default: the default process group) after each
    backward. Call after `attach`/`load` and `init_process_group`, before `fully_shard`, on every rank.
    Calling it again is harmless: it returns the same set and adds no second hook. As with DDP, every rank
    must run backward through the same adapted layers (the averaging is a collective).
    """
    if not is_attached(model):
        raise AdapterError("fsdp_ignored_params: no lora-lite adapter on this model; call ll.attach or ll.load first")
    if not (dist.is_available() and dist.is_initialized()):
        raise AdapterError(
            "fsdp_ignored_params: torch.distributed is not initialized; call dist.init_process_group first "
            "(the gradients of the returned parameters are averaged over it)"
        )
    found = {
        f"adapter {adapter!r}: {layer_name}.{name}": p
        for adapter, info in model_state(model).adapters.items()
        for layer_name, a in info.layers.items()
        for name, p in a.named_parameters(recurse=False)
        if p.dim() == 0
    }
    hook = {k: p for k, p in found.items() if p.requires_grad and not hasattr(p, _GROUP)}
    for k, p in found.items():  # check everything before changing anything
        if hasattr(p, _GROUP) and getattr(p, _GROUP) is not group:
            raise AdapterError(
                f"fsdp_ignored_params: {k} already averages its gradient over another process group; "
                "pass the same `group` as in the first call"
            )
    for p in hook.values():
        p.register_post_accumulate_grad_hook(partial(_average_grad, group=group))
        setattr(p, _GROUP, group)
    return set(found.values())
