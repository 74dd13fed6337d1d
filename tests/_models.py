"""Tiny models shared by the tests: a toy MLP stack with biased layers and transformers models from configs."""

from __future__ import annotations

import torch
from torch import nn

D_MODEL = 16


class Block(nn.Module):
    def __init__(self, d: int = D_MODEL, hidden: int = 40, bias: bool = True) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=bias)  # inner
        self.up = nn.Linear(d, hidden, bias=bias)  # reader
        self.down = nn.Linear(hidden, d, bias=bias)  # writer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.q(x))
        return x + self.down(torch.relu(self.up(x)))


class Toy(nn.Module):
    """Residual MLP stack: `layers.{i}.q` (inner), `.up` (reader), `.down` (writer), plus a `lm_head`."""

    def __init__(self, n_layers: int = 2, d: int = D_MODEL, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(d, bias=bias) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, 7, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b(x)
        return self.lm_head(x)


# The tiny decoder shape every test uses (Llama, and Qwen/Gemma configs in test_architectures).
TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attn_implementation="eager",
)


def tiny_llama(seed: int = 0, **overrides):
    """LlamaForCausalLM, hidden 32, GQA (4 heads / 2 kv heads), 2 layers, vocab 128, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {**TINY_DECODER, **overrides}
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def llama_batch(seed: int = 1, batch: int = 2, seq: int = 12, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def ad(layer, name: str = "default"):
    """The adapter's module on `layer` (its lora_* tensors and record `_lora_lite`); an adapter module as is."""
    stack = getattr(layer, "lora_lite", None)
    return layer if stack is None else stack[name]


def perturb_trained(model, name: str, seed: int) -> None:
    """Move every trainable tensor of adapter `name` off its init (relative to its scale): a trained-looking adapter."""
    import lora_lite as ll

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ll.targets(model, name).values():
            for p in a._lora_lite.trainable:
                t = getattr(a, p)
                t.add_(0.3 * torch.randn(t.shape, generator=g) * (t.abs().mean() + 0.1))
