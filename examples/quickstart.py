"""Quickstart: attach LoRA to a tiny Llama, train a few steps, save, load onto a fresh copy."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_lite as ll

cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
ids = torch.randint(0, 128, (4, 32))

names = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=8, alpha=16.0))
print(f"attached to {len(names)} layers, e.g. {names[0]}")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
for step in range(20):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}")
ll.save(model, "adapter.safetensors")

torch.manual_seed(0)
fresh = LlamaForCausalLM(cfg)  # same base weights
ll.load(fresh, "adapter.safetensors")
model.eval(), fresh.eval()
same = torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
print(f"reloaded adapter reproduces outputs exactly: {same}")
