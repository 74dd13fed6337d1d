"""Quantized bases (issue 5, part 2): bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt, on the CPU backend.

Layers are built from fp32 nn.Linear weights (`quantize_linear`); moving a bnb layer to a device is what
quantizes it. lora, delora, ia3, ia3_ff, hra, eva and dora must attach with identity at init, train with
non-zero gradients and save/load; pissa and antipasto refuse with a message that says what to do.

bitsandbytes' CPU trap (measured with bitsandbytes 0.50.2 on an AVX512-BF16 CPU): a Linear4bit repacks its
weight in place, for good, at its first forward in eval mode whose input does not require grad
(`_convert_weight_packed_for_cpu`: nibbles retiled, absmax rounded to bf16, bf16 kernel). From then on
(1) its output differs from the unpacked layer's by ~1e-2 relative (so an identity reference must come from
an already-run layer, in the same mode), (2) `dequantize_4bit` reads the packed weight as garbage (we
dequantize it ourselves: `target._dequantize_4bit_cpu_packed`), and (3) no gradient flows through it to its
input (`gemv_4bit` has no autograd: silently None without bias, an error with one). Identity checks below
therefore run in train mode (never packs); the packed case has its own tests.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _models import ad, llama_batch, lm_loss, tiny_llama
from test_dtypes import VARIANTS as DTYPE_VARIANTS
from torch import nn

import lora_lite as ll
from lora_lite.target import dense_weight, is_quantized

bnb = pytest.importorskip("bitsandbytes")

KINDS = ("nf4", "fp4", "int8")
D = 64


def quantize_linear(lin: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes layer holding `lin`'s weight (and bias) quantized: Linear4bit nf4/fp4 or Linear8bitLt."""
    bias = lin.bias is not None
    w = lin.weight.detach().clone()
    if kind in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, quant_type=kind, compute_dtype=w.dtype)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind)
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to(w.device)  # .to() quantizes


def quantize_model(model: nn.Module, kind: str, under: str = "") -> nn.Module:
    """Replace every nn.Linear whose name starts with `under` by its quantized twin (in place)."""
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if type(child) is nn.Linear and full.startswith(under):
                setattr(mod, cname, quantize_linear(child, kind))
    return model


class QToy(nn.Module):
    """Two residual blocks (q: 64->64 inner, up: 64->128 reader, down: 128->64 writer, with biases) + fp32 head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(D, D), "up": nn.Linear(D, 2 * D), "down": nn.Linear(2 * D, D)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(D, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = x + torch.tanh(b["q"](x))
            x = x + b["down"](torch.relu(b["up"](x)))
        return self.lm_head(x)


def qtoy(kind: str) -> QToy:
    torch.manual_seed(0)
    return quantize_model(QToy(), kind, under="layers")


def _x() -> torch.Tensor:
    return torch.randn(6, D, generator=torch.Generator().manual_seed(3))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ((model(x) - torch.sin(torch.arange(8.0))) ** 2).mean()


# every variant that does not rewrite the weight (pissa and antipasto refuse quantized bases: tested below)
VARIANTS = {k: v for k, v in DTYPE_VARIANTS.items() if not ll.REGISTRY[k].rewrites_weight}
ALL_ROLES = ("reader", "writer", "inner")


def _attach(model: nn.Module, variant: str) -> list[str]:
    cfg = ll.LoraLiteConfig(variant=variant, target_roles=ALL_ROLES, **VARIANTS[variant])
    calib = [torch.randn(8, D, generator=torch.Generator().manual_seed(9 + i)) for i in range(2)]
    return ll.attach(model, cfg, calibration_data=calib if variant == "eva" else None)


def _raw_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as stored (packed bytes for bnb), without bnb's state_dict side effects."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_variant_on_quantized_base(kind: str, variant: str, tmp_path) -> None:
    model = qtoy(kind)
    assert all(is_quantized(b[k]) for b in model.layers for k in ("q", "up", "down"))
    x = _x()
    raw0 = _raw_state(model)
    model.train()  # train mode: bnb's 4-bit CPU kernel never repacks (see the module docstring)
    with torch.no_grad():
        y0 = model(x)
    names = _attach(model, variant)
    assert len(names) == 6
    with torch.no_grad():
        y1 = model(x)
    if variant == "hra":  # paired reflections cancel to fp32 rounding (~r·eps), not bit for bit
        assert (y1 - y0).abs().max() <= 1e-5 * y0.abs().max()
    else:
        assert torch.equal(y1, y0)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1].startswith("lora_") for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    grads, losses = [], []
    for _ in range(4):
        opt.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in trainable.items()})
        opt.step()
        losses.append(loss.item())
    for n in trainable:
        assert all(torch.isfinite(g[n]).all() for g in grads), n
        assert any(g[n].abs().sum() > 0 for g in grads[:2]), f"{n}: zero gradient in the first 2 steps"
    assert losses[-1] < losses[0]

    with torch.no_grad():
        y = model(x)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = qtoy(kind).train()  # quantizing the same fp32 weights again gives the same bytes
    ll.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    ll.detach(model)
    raw1 = _raw_state(model)
    assert raw1.keys() == raw0.keys()
    assert all(torch.equal(raw1[k], raw0[k]) for k in raw0)


@pytest.mark.parametrize("variant", ["pissa", "antipasto"])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_rewriting_variants_refuse_quantized_bases(kind: str, variant: str) -> None:
    model = qtoy(kind)
    raw0 = _raw_state(model)
    kw = {"variant_kwargs": {"block_size": 2}} if variant == "antipasto" else {}
    with pytest.raises(ll.ConfigError, match=r"layers\.0\.q.*dense floating-point weight.*unquantized"):
        ll.attach(model, ll.LoraLiteConfig(variant=variant, r=4, target_roles=ALL_ROLES, **kw))
    assert not ll.is_attached(model) and not any(hasattr(m, "_lora_lite") for m in model.modules())
    raw1 = _raw_state(model)
    assert all(torch.equal(raw1[k], raw0[k]) for k in raw0)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_weight_matches_peft_dequantization(kind: str) -> None:
    from peft.utils.integrations import dequantize_bnb_weight

    torch.manual_seed(0)
    lin = nn.Linear(D, 2 * D)
    q = quantize_linear(lin, kind)
    if kind == "int8":
        q.train()
        q(_x())  # moves SCB from the weight to q.state, as the first forward does: both places must work
    W = dense_weight(q)
    ref = dequantize_bnb_weight(q.weight, getattr(q, "state", None))
    assert W.shape == (2 * D, D) and W.dtype == torch.float32
    assert torch.equal(W, ref.float())
    # and it is the fp32 weight up to the quantization error: 4-bit, 16 levels per 64-block, so up to ~1/6 of
    # the block's absmax (measured 0.15 nf4, 0.17 fp4); int8: half a step, 1/254 of the row's absmax
    bound = 0.25 if kind != "int8" else 0.005
    assert (W - lin.weight).abs().max() <= bound * lin.weight.abs().max()


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_dora_magnitude_is_the_dequantized_row_norm(kind: str) -> None:
    from peft.utils.integrations import dequantize_bnb_weight

    model = qtoy(kind)
    _attach(model, "dora")
    for b in model.layers:
        for k in ("q", "up", "down"):
            layer = b[k]
            W = dequantize_bnb_weight(layer.weight, None).float()
            assert torch.allclose(ad(layer).lora_m, W.norm(dim=1), rtol=1e-6)


def _packs(layer: nn.Module) -> bool:
    return bool(getattr(layer, "support_avx512bf16_for_cpu", False))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_cpu_packed_4bit_layout_is_dequantized_correctly(kind: str) -> None:
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(D, 2 * D), kind)
    if not _packs(q):
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights")
    W0 = dense_weight(q)
    q.eval()
    with torch.no_grad():
        y = q(_x())
    assert q.weight.quant_state.packing_format_for_cpu  # bnb repacked it in place
    W1 = dense_weight(q)
    # equal up to the bf16 rounding of absmax the packing applied (relative 2^-8)
    assert (W1 - W0).abs().max() <= 2**-8 * W0.abs().max()
    # and it is the weight the packed kernel uses (bf16 compute: ~1e-2 relative)
    assert (y - nn.functional.linear(_x(), W1, q.bias)).abs().max() <= 2e-2 * y.abs().max()


@pytest.mark.parametrize("variant", ["lora", "dora", "hra"])
def test_identity_on_an_already_packed_4bit_base_in_eval_mode(variant: str) -> None:
    """Eval mode on CPU: take the reference from an already-run (packed) base; identity then holds as usual."""
    model = qtoy("nf4").eval()
    x = _x()
    packs = _packs(model.layers[0]["q"])
    with torch.no_grad():
        model(x)  # first eval forward: bnb repacks every 4-bit layer (if the CPU supports it)
        y0 = model(x)
        with pytest.warns(UserWarning, match="already repacked") if packs else contextlib.nullcontext():
            _attach(model, variant)  # (fine for inference, which this is: the warning is about training)
        y1 = model(x)
    if variant == "hra":  # Q x = x to ~1e-7, but the packed kernel rounds its input to bf16: a perturbation that
        # crosses a bf16 rounding boundary moves that input by one bf16 ulp (2^-8 relative); a non-identity Q moves y by O(1)
        assert (y1 - y0).abs().max() <= 2**-8 * y0.abs().max()
    else:
        assert torch.equal(y1, y0)


def test_eva_calibration_does_not_repack_4bit_layers() -> None:
    model = qtoy("nf4")
    if not _packs(model.layers[0]["q"]):
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights")
    _attach(model, "eva")  # group_init runs the model in eval mode under no_grad
    layers = [b[k] for b in model.layers for k in ("q", "up", "down")]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    _loss(model, _x()).backward()  # gradients reach the first block's adapters through the 4-bit layers
    assert ad(model.layers[0]["q"]).lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["lora", "hra", "ia3_ff"])
def test_repacking_is_off_while_attached_so_training_survives_an_evaluation(variant: str) -> None:
    """Train, evaluate (eval mode, no grad), train again: bnb would repack every 4-bit layer at the evaluation and
    no gradient would pass through them afterwards (hra/ia3_ff, on the layer's input, all silently zero). lora-lite
    turns the repacking off while attached; detach gives bnb's flag back."""
    model = qtoy("nf4")
    layers = [b[k] for b in model.layers for k in ("q", "up", "down")]
    if not _packs(layers[0]):
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights")
    if variant == "ia3_ff":
        cfg = ll.LoraLiteConfig(variant="ia3", target_roles=ALL_ROLES, variant_kwargs={"feedforward_names": [r"\."]})
        ll.attach(model, cfg)
    else:
        _attach(model, variant)
    assert not any(_packs(m) for m in layers)
    model.eval()
    with torch.no_grad():
        model(_x())  # an evaluation
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    _loss(model, _x()).backward()
    for name, layer in ll.targets(model).items():  # every layer's adapter still learns (B = 0: not yet A)
        grads = [p.grad for n, p in layer.named_parameters() if n.startswith("lora_") and p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    ll.detach(model)
    assert all(_packs(m) for m in layers)  # bnb's own flag restored


def test_attaching_to_an_already_repacked_base_warns() -> None:
    model = qtoy("nf4").eval()
    if not _packs(model.layers[0]["q"]):
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights")
    with torch.no_grad():
        model(_x())  # repacks every 4-bit layer
    with pytest.warns(UserWarning, match=r"already repacked 6 4-bit layer\(s\) .*e\.g\. layers\.0\.q.*will not learn"):
        _attach(model, "lora")


def test_a_4bit_layer_not_yet_quantized_is_refused_clearly() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(D, D)
    q = bnb.nn.Linear4bit(D, D, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4")  # no .to()
    model = nn.Sequential(q)
    for variant in ("lora", "dora"):
        with pytest.raises(ll.AdapterError, match=r"^0: this bitsandbytes Linear4bit is not quantized yet.*model\.to"):
            ll.attach(model, ll.LoraLiteConfig(variant=variant, r=2, target_names=("0",)))
        assert not ll.is_attached(model) and not hasattr(q, "lora_A")


def test_quantized_tiny_llama_trains() -> None:
    """Every nn.Linear in the decoder layers replaced by a 4-bit nf4 one; dora trains, the loss falls."""
    model = quantize_model(tiny_llama(), "nf4", under="model.layers").train()
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 2 * 7
    ids = llama_batch()
    with torch.no_grad():
        y0 = model(ids).logits
    ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4, alpha=8.0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, y0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] * 0.97, losses


def test_turning_off_cpu_repacking_keeps_gradients_flowing() -> None:
    """The README's workaround: with support_avx512bf16_for_cpu = False an eval no-grad pass leaves the 4-bit
    layers trainable-through, so the first block's adapters still get gradients afterwards."""
    model = qtoy("nf4")
    if not _packs(model.layers[0]["q"]):
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights")
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    _attach(model, "lora")
    model.eval()
    with torch.no_grad():
        model(_x())  # would repack every 4-bit layer without the workaround
    layers = [b[k] for b in model.layers for k in ("q", "up", "down")]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    _loss(model, _x()).backward()
    assert ad(model.layers[0]["q"]).lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_summary_counts_4bit_weights_of_any_storage_dtype(storage: torch.dtype) -> None:
    """quant_storage=bf16 packs four 4-bit values per element (fp32: eight); the count was 1/4 (1/8) too low."""
    torch.manual_seed(0)
    w = nn.Linear(D, 2 * D).weight.detach().clone()
    q = bnb.nn.Linear4bit(D, 2 * D, bias=False, quant_type="nf4", compute_dtype=torch.float32, quant_storage=storage)
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=storage)
    model = nn.Sequential(q.to("cpu"))
    assert model[0].weight.dtype == storage
    ll.attach(model, ll.LoraLiteConfig(r=2, target_names=("0",)))
    trainable = 2 * (D + 2 * D)
    assert f"trainable params: {trainable:,} of {D * 2 * D + trainable:,}" in ll.summary(model)


def test_summary_counts_4bit_weights_unpacked() -> None:
    model = qtoy("nf4")
    _attach(model, "lora")
    fp32 = QToy()  # same shapes, unquantized
    total = sum(p.numel() for p in fp32.parameters()) + sum(
        p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[1].startswith("lora_")
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = ll.summary(model)
    assert f"trainable params: {trainable:,} of {total:,}" in text
    assert text.count("Linear4bit uint8") == 6
