"""Multi-GPU (or multi-process CPU) training with DistributedDataParallel: no glue code.

    torchrun --nproc_per_node 2 examples/train_ddp.py                  # gloo on CPU, nccl on GPUs
    torchrun --nproc_per_node 2 examples/train_ddp.py --variant eva    # eva calibrates on every rank's shard

Every rank builds the same base (same seed), attaches the adapter BEFORE wrapping, trains on its shard of
each batch (DDP averages the gradients), and rank 0 saves; then rank 0 reloads the file onto a fresh base.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig, LlamaForCausalLM

import lora_lite as ll

p = argparse.ArgumentParser()
p.add_argument("--variant", default="lora")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--out", default="adapter_ddp.safetensors")
args = p.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)

cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same base weights on every rank and for the reload
    return LlamaForCausalLM(cfg).to(device)


g = torch.Generator().manual_seed(1)  # the same 4 global batches on every rank; each rank takes its rows
data = torch.randint(0, 128, (4, 4 * world, 32), generator=g)

model = base()
calibration = None
if args.variant == "eva":  # every rank passes its own shard: eva sums the statistics over ranks
    calibration = [batch[rank::world].to(device) for batch in data]
torch.manual_seed(1234)  # the same adapter init on every rank (DDP also broadcasts rank 0's at wrap time)
ll.attach(model, ll.LoraLiteConfig(variant=args.variant, r=8, alpha=16.0), calibration_data=calibration)
ddp = DDP(model, device_ids=[device.index] if cuda else None)

opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=3e-3)
for step in range(args.steps):
    ids = data[step % len(data)][rank::world].to(device)  # this rank's shard of the global batch
    loss = ddp(input_ids=ids, labels=ids).loss
    loss.backward()  # DDP all-reduces (averages) the lora_* gradients here
    opt.step()
    opt.zero_grad()
    if rank == 0 and step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}", flush=True)

if rank == 0:
    ll.save(model, args.out)  # the unwrapped model: keys are model.layers..., not module.model.layers...
    fresh = base()
    ll.load(fresh, args.out)
    model.eval(), fresh.eval()
    with torch.no_grad():
        ids = data[0].to(device)
        same = torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    print(f"saved {args.out}; reloaded adapter reproduces outputs exactly: {same}", flush=True)
dist.barrier()
dist.destroy_process_group()
