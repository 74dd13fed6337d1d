"""nn.Embedding and nn.Conv1d/2d/3d targets for lora and dora, with peft 0.21.2 as the oracle.

Parity (forward, gradients, 8 AdamW steps) by copying peft's tensors into ours, on: the tiny Llama (embed_tokens and
every projection), a tiny GPT-2 (wte tied to lm_head, wpe, biased Conv1D c_fc), and a small model of convolutions
(1-D, 2-D with stride/padding, a 1×1 2-D, 3-D with padding="same"). Then export_peft -> PeftModel.from_pretrained,
peft's save_pretrained -> import_peft, merge == unmerged, detach bit-exact, save/load, and the refusals.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import ad, llama_batch, tiny_llama
from _parity import base_model, rel_err
from torch import nn

import lora_lite as ll

RTOL = 1e-5  # fp32: the same math on both sides, possibly in another association order
TRAIN_RTOL = 1e-4  # after 8 AdamW steps (rounding passed through lr·g/(|g| + eps)), as tests/test_parity_peft.py
LLAMA = r"model\.embed_tokens|model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
GPT2 = r"transformer\.(wte|wpe|h\.\d+\.mlp\.c_fc)"


class Convs(nn.Module):
    """Three inputs through 1-D, 2-D (strided, padded, no bias; then a 1×1) and 3-D ("same") convolutions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=(1, 0), bias=False)
        self.p2 = nn.Conv2d(8, 5, 1)
        self.c3 = nn.Conv3d(2, 4, 3, padding="same")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        outs = (self.c1(x1), self.p2(torch.relu(self.c2(x2))), self.c3(x3))
        return torch.cat([o.flatten(1) for o in outs], 1)


CONVS = r"c1|c2|p2|c3"


def conv_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x1": torch.randn(2, 3, 10, generator=g),
        "x2": torch.randn(2, 3, 7, 6, generator=g),
        "x3": torch.randn(2, 2, 4, 5, 3, generator=g),
    }


MODELS = {  # kind -> (base builder, peft/our target regex, inputs(seed), output(model, inputs), loss)
    "llama": (lambda: tiny_llama(), LLAMA),
    "gpt2": (lambda: base_model("gpt2"), GPT2),
    "convs": (lambda: Convs(), CONVS),
}


def inputs(kind: str, seed: int) -> dict[str, torch.Tensor]:
    if kind == "convs":
        return conv_inputs(seed)
    return {"input_ids": llama_batch(seed=seed, seq=10)}


def output(model: nn.Module, kind: str, batch: dict) -> torch.Tensor:
    return model(**batch) if kind == "convs" else model(**batch).logits


def loss(model: nn.Module, kind: str, batch: dict) -> torch.Tensor:
    if kind == "convs":
        return (output(model, kind, batch) - 0.5).pow(2).mean()
    return model(**batch, labels=batch["input_ids"]).loss


def mapping(pl: nn.Module) -> dict[str, tuple[torch.Tensor, object]]:
    """Our tensor name -> (peft tensor, peft layout -> ours) for one peft tuner layer of any kind."""
    from peft.tuners import lora

    m = {}
    if isinstance(pl, lora.Embedding):
        m = {
            "lora_A": (pl.lora_embedding_A["default"], lambda t: t),
            "lora_B": (pl.lora_embedding_B["default"], lambda t: t),
        }
    else:
        flat = (lambda t: t.flatten(1)) if isinstance(pl, lora.layer._ConvNd) else (lambda t: t)
        m = {"lora_A": (pl.lora_A["default"].weight, flat), "lora_B": (pl.lora_B["default"].weight, flat)}
    if pl.lora_magnitude_vector:
        m["lora_m"] = (pl.lora_magnitude_vector["default"].weight, lambda t: t.reshape(-1))
    return m


def peft_config(kind: str, variant: str):
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, target_modules=MODELS[kind][1], use_dora=variant == "dora", fan_in_fan_out=kind == "gpt2"
    )


def our_config(kind: str, variant: str, **kw) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(variant=variant, r=4, alpha=8, target_names=(f"^(?:{MODELS[kind][1]})$",), **kw)


def twins(kind: str, variant: str):
    """(peft model, ours): the same base; peft's tensors moved off their init, then copied into ours."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = MODELS[kind][0]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft warns about the tied wte)
        pm = get_peft_model(copy.deepcopy(base), peft_config(kind, variant))
    ours = copy.deepcopy(base)
    ll.attach(ours, our_config(kind, variant))
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}
    assert sorted(theirs) == sorted(ll.targets(ours))
    pairs = [(n, theirs[n], ad(ours.get_submodule(n))) for n in sorted(theirs)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, pl, ol in pairs:
            for p, (t, to_ours) in mapping(pl).items():
                rms = t.pow(2).mean().sqrt().item() or 1.0
                t.add_(0.3 * rms * torch.randn(t.shape, generator=g))
                getattr(ol, p).copy_(to_ours(t))
    return pm, ours, pairs


def worst(pairs: list, grad: bool) -> float:
    errs = [0.0]
    for _, pl, ol in pairs:
        for p, (t, to_ours) in mapping(pl).items():
            a, b = (getattr(ol, p).grad, t.grad) if grad else (getattr(ol, p), t)
            errs.append(rel_err(a, to_ours(b)))
    return max(errs)


CASES = [(k, v) for k in MODELS for v in ("lora", "dora")]


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_parity_with_peft(kind: str, variant: str) -> None:
    """Forward, gradients, and 8 AdamW steps on the same batches agree with peft."""
    pm, ours, pairs = twins(kind, variant)
    kinds = {type(ol._base).__name__ for _, _, ol in pairs}
    assert kinds >= ({"Embedding"} if kind != "convs" else {"Conv1d", "Conv2d", "Conv3d"})
    b = inputs(kind, 0)
    assert rel_err(output(ours, kind, b), output(pm, kind, b)) <= RTOL
    loss(ours, kind, b).backward()
    loss(pm, kind, b).backward()
    assert worst(pairs, grad=True) <= RTOL
    mine = [p for p in ours.parameters() if p.requires_grad]
    theirs = [p for p in pm.parameters() if p.requires_grad]
    assert len(mine) == len(theirs)
    opt_o, opt_p = torch.optim.AdamW(mine, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(8):
        for model, opt in ((ours, opt_o), (pm, opt_p)):
            opt.zero_grad()
            loss(model, kind, inputs(kind, 10 + step)).backward()
            opt.step()
    assert worst(pairs, grad=False) <= TRAIN_RTOL
    b = inputs(kind, 99)
    assert rel_err(output(ours, kind, b), output(pm, kind, b)) <= TRAIN_RTOL


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_export_import_both_ways(kind: str, variant: str, tmp_path) -> None:
    """export_peft -> PeftModel.from_pretrained on the plain base, and peft's save_pretrained -> import_peft."""
    import peft

    pm, ours, _ = twins(kind, variant)
    b = inputs(kind, 5)
    want = output(ours, kind, b)
    ll.export_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(MODELS[kind][0](), str(tmp_path / "ours"))
    assert rel_err(output(loaded, kind, b), want) <= RTOL
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = MODELS[kind][0]()
    names = ll.import_peft(fresh, tmp_path / "peft")
    assert sorted(names) == sorted(ll.targets(ours))
    assert rel_err(output(fresh, kind, b), output(pm, kind, b)) <= RTOL


@pytest.mark.parametrize(("kind", "variant"), [c for c in CASES if c[0] != "gpt2"])  # (gpt2's wte is tied: below)
def test_merge_detach_save_load(kind: str, variant: str, tmp_path) -> None:
    _, ours, _ = twins(kind, variant)
    b = inputs(kind, 7)
    base = MODELS[kind][0]()
    y0, want = output(base, kind, b), output(ours, kind, b)
    assert rel_err(want, y0) > 1e-3  # the adapter changes the output
    ll.save(ours, tmp_path / "a.safetensors")
    fresh = MODELS[kind][0]()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(output(fresh, kind, b), want)
    with ll.scaled(ours, 0.0):
        assert torch.equal(output(ours, kind, b), y0)
    with ll.disabled(ours):
        assert torch.equal(output(ours, kind, b), y0)
    with ll.scaled(ours, 0.5):
        half = output(ours, kind, b)
    assert rel_err(half, y0) > 1e-4 and rel_err(half, want) > 1e-4
    merged = copy.deepcopy(ours)
    ll.merge(merged)
    assert rel_err(output(merged, kind, b), want) <= RTOL
    ll.detach(ours)
    assert torch.equal(output(ours, kind, b), y0)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_identity_at_init_and_embedding_ids_are_not_cast(variant: str) -> None:
    """B = 0 (conv) / A = 0 (embedding): attach changes no output bit; a bf16 adapter never casts the int ids."""
    m, ids = tiny_llama(), llama_batch()
    y0 = m(ids).logits
    ll.attach(m, ll.LoraLiteConfig(variant=variant, r=4, target_names=("embed_tokens",), dtype=torch.bfloat16))
    assert ll.targets(m) == {"model.embed_tokens": ad(m.model.embed_tokens)}
    assert torch.equal(m(ids).logits, y0)
    net, b = Convs(), conv_inputs(0)
    y0 = net(**b)
    ll.attach(net, ll.LoraLiteConfig(variant=variant, r=4, target_names=(CONVS,)))
    assert torch.equal(net(**b), y0)


def test_padding_idx_row_stays_zero() -> None:
    """As peft: the padding token's column of A gets no gradient, so its update stays zero."""
    m = tiny_llama(pad_token_id=0)
    assert m.model.embed_tokens.padding_idx == 0
    ll.attach(m, ll.LoraLiteConfig(variant="lora", r=4, target_names=("embed_tokens",)))
    ids = llama_batch()
    ids[:, 0] = 0
    m(input_ids=ids, labels=ids).loss.backward()
    g = ad(m.model.embed_tokens).lora_A.grad
    assert torch.equal(g[:, 0], torch.zeros(4)) and g[:, ids[0, 1]].abs().sum() > 0


def test_default_exclude_gives_way_to_a_pattern_that_names_it() -> None:
    m = tiny_llama()
    names = lambda cfg: [n for n, _, _ in ll.find_targets(m, cfg)]  # noqa: E731
    assert names(ll.LoraLiteConfig(target_names=("embed_tokens",))) == ["model.embed_tokens"]
    assert names(ll.LoraLiteConfig(target_names=(r"model\.embed_tokens$", "layers.0.mlp.up_proj")))[0] == (
        "model.embed_tokens"
    )
    # a pattern that does not spell the name out keeps the default exclusion, and your own excludes always apply
    assert "model.embed_tokens" not in names(ll.LoraLiteConfig(target_names=(r"model\.embed.*", "up_proj")))
    with pytest.raises(ll.TargetError, match="no module matched"):
        names(ll.LoraLiteConfig(target_names=("embed_tokens",), exclude_names=("embed",)))
    # roles never select an embedding or a convolution
    assert not any(r in ("embedding", "conv") for _, _, r in ll.find_targets(m, ll.LoraLiteConfig(exclude_names=())))


def test_tied_embedding_is_adapted_on_input_only_and_merge_refuses() -> None:
    """As peft's default: the adapter sits on the embedding; the tied lm_head reads the unchanged weight."""
    m = base_model("gpt2")
    assert m.lm_head.weight is m.transformer.wte.weight
    ll.attach(m, ll.LoraLiteConfig(variant="lora", r=4, target_names=(r"transformer\.wte$",)))
    assert list(ll.targets(m)) == ["transformer.wte"]
    with pytest.raises(ll.AdapterError, match=r"transformer.wte: its weight is shared with \['lm_head'\]"):
        ll.merge(m)
    assert ll.is_attached(m)


@pytest.mark.parametrize(
    ("variant", "target", "match"),
    [
        (
            "hra",
            "embed_tokens",
            r"model.embed_tokens: variant 'hra' cannot adapt this Embedding .* adapt embedding layers: dora, lora",
        ),
        ("ia3", "embed_tokens", r"variant 'ia3' cannot adapt"),
        ("pissa", "embed_tokens", r"variant 'pissa' cannot adapt .* dora, lora"),
    ],
)
def test_a_variant_refuses_a_kind_it_cannot_adapt(variant: str, target: str, match: str) -> None:
    m = tiny_llama()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ll.TargetError, match=match):
        ll.attach(m, ll.LoraLiteConfig(variant=variant, r=4, target_names=(target, "q_proj")))
    assert not ll.is_attached(m) and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (nn.Conv2d(4, 8, 3, groups=2), r"c: Conv2d with groups=2: lora-lite adapts convolutions with groups=1"),
        (nn.Conv1d(4, 8, 3, padding=1, padding_mode="reflect"), r"c: Conv1d with padding_mode='reflect'"),
    ],
)
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_refused_convolutions_leave_the_model_intact(conv: nn.Module, match: str, variant: str) -> None:
    net = nn.Sequential()
    net.add_module("c", conv)
    with pytest.raises(ll.ConfigError, match=match):
        ll.attach(net, ll.LoraLiteConfig(variant=variant, r=4, target_names=("c",)))
    assert not ll.is_attached(net) and not hasattr(conv, "lora_lite")


def test_dilated_convolution_trains_and_merges_but_is_not_exported(tmp_path) -> None:
    """peft 0.21.2 builds lora_A without the layer's dilation (its forward fails); ours uses it: merge agrees."""
    net = nn.Sequential()
    net.add_module("c", nn.Conv2d(3, 4, 3, dilation=2, padding=2))
    ll.attach(net, ll.LoraLiteConfig(variant="dora", r=2, target_names=("c",)))
    with torch.no_grad():
        ad(net.c).lora_B.normal_()
    x = torch.randn(1, 3, 8, 8)
    want = net(x)
    merged = copy.deepcopy(net)
    ll.merge(merged)
    assert rel_err(merged(x), want) <= RTOL
    with pytest.raises(ll.ConfigError, match=r"c: dilation=\(2, 2\): peft 0.21.2 builds its lora_A without"):
        ll.export_peft(net, tmp_path)


def test_import_refuses_other_embeddings_tied_adapters_and_dilation(tmp_path) -> None:
    import json

    pm, _, _ = twins("llama", "lora")
    pm.save_pretrained(str(tmp_path / "p"))  # (peft also saves the embedding's own weight: save_embedding_layers)
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight[3] += 1.0
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ll.LoadError, match=r"base weight for 'model.embed_tokens' .* differs from this model's"):
        ll.import_peft(other, tmp_path / "p")
    assert not ll.is_attached(other) and all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "ensure_weight_tying": True}))
    with pytest.raises(ll.LoadError, match=r"\['ensure_weight_tying'\]"):
        ll.import_peft(tiny_llama(), tmp_path / "p")

    from peft import LoraConfig, get_peft_model

    def dilated() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential()
        net.add_module("c", nn.Conv2d(3, 4, 3, dilation=2))
        return net

    get_peft_model(dilated(), LoraConfig(r=2, target_modules=["c"])).save_pretrained(str(tmp_path / "d"))
    with pytest.raises(ll.LoadError, match=r"c: dilation=\(2, 2\): peft 0.21.2's lora_A ignores"):
        ll.import_peft(dilated(), tmp_path / "d")


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: the output times a scalar `embed_scale` buffer."""

    def __init__(self, *a, scale: float, **kw) -> None:
        super().__init__(*a, **kw)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_scaled_embedding_as_peft(variant: str) -> None:
    """peft scales the update by the layer's `embed_scale` (Gemma); so do we, and merge agrees."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("emb", ScaledEmbedding(50, 12, scale=3.0, padding_idx=1))
    base.add_module("out", nn.Linear(12, 5))
    pm = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["emb"], use_dora=variant == "dora")
    )
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.LoraLiteConfig(variant=variant, r=4, alpha=8, target_names=("emb",)))
    pl, ol = pm.base_model.model.emb, ad(ours.emb)
    with torch.no_grad():
        for p, (t, to_ours) in mapping(pl).items():
            t.add_(0.3 * torch.randn(t.shape))
            getattr(ol, p).copy_(to_ours(t))
    ids = torch.randint(0, 50, (3, 7))
    want = pm(ids)
    assert rel_err(ours(ids), want) <= RTOL and rel_err(want, base(ids)) > 1e-2
    ll.merge(ours)
    assert rel_err(ours(ids), want) <= RTOL
