"""olora and loftq against peft 0.21.2 (`LoraConfig(init_lora_weights="olora" | "loftq")`).

Two models: a tiny Llama with grouped-query attention, and a tiny GPT-2 whose Conv1D projections are
replaced by the equal biased nn.Linear (`linear_twin`; peft's olora QR-decomposes the raw Conv1D weight,
transposed, so it cannot run on Conv1D). Widths are multiples of 64: bitsandbytes 0.50.2's CPU nf4
dequantization is wrong otherwise (peft's LoftQ on CPU would then be the wrong reference; ours is right).

peft's LoftQ init hard-codes the "cuda" device: `cpu_loftq_init` runs peft's own `loftq_init` with that one
string changed, as the oracle (monkeypatched into peft's lora layer module).

For each: init (bit-exact W_res, A, B at alpha = r), then peft's tensors perturbed and copied into ours:
forward, gradients and 8 AdamW steps within fp32 rounding; then ll.export_peft -> PeftModel.from_pretrained
on the unmodified base, and peft's save_pretrained -> ll.import_peft, both reproduce the outputs.
"""

from __future__ import annotations

import copy
import inspect
import textwrap
import warnings

import pytest
import torch
from _models import ad, tiny_llama
from _parity import (
    compare_tensors,
    copy_into_ours,
    linear_twin,
    map_lora,
    ours_regex,
    peft_pairs,
    perturb_peft,
    rel_err,
)
from torch import nn

import lora_lite as ll
from lora_lite.config import ConfigError
from lora_lite.errors import LoadError
from lora_lite.named import model_state
from lora_lite.target import dense_weight

peft = pytest.importorskip("peft")

R = 4
RTOL = 1e-5  # fp32 forward/backward: the same math in possibly another association order
TRAIN_RTOL = 1e-4  # after 8 AdamW steps (test_parity_peft.py explains the bound)
STEPS = 8
TARGETS = {
    "llama": r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "gpt2": r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_loftq_init():
    """peft 0.21.2's `loftq_init` with its hard-coded "cuda" compute device changed to "cpu" (nothing else)."""
    import peft.utils.loftq_utils as lu

    src = textwrap.dedent(inspect.getsource(lu.loftq_init))
    assert src.count('"cuda"') == 1
    ns = dict(vars(lu))
    exec(src.replace('"cuda"', '"cpu"'), ns)
    return ns["loftq_init"]


@pytest.fixture
def peft_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import peft.tuners.lora.layer as layer

    monkeypatch.setattr(layer, "loftq_init", cpu_loftq_init())


def base(kind: str) -> nn.Module:
    if kind == "llama":  # GQA: 4 heads, 2 kv heads; d_in 64 or 128
        return tiny_llama(hidden_size=64, intermediate_size=128)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager")
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return linear_twin(GPT2LMHeadModel(cfg).eval())  # biased nn.Linear projections


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(n)]


def out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def peft_cfg(kind: str, init: str, alpha: float, bits: int = 4, n_iter: int = 1):
    from peft import LoftQConfig, LoraConfig

    kw = dict(loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=n_iter)) if init == "loftq" else {}
    return LoraConfig(
        r=R, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS[kind], init_lora_weights=init, **kw
    )


def ours_cfg(kind: str, variant: str, alpha: float, bits: int = 4, n_iter: int = 1) -> ll.LoraLiteConfig:
    kw = {"loftq_bits": bits, "loftq_iter": n_iter} if variant == "loftq" else {}
    return ll.LoraLiteConfig(
        variant=variant, r=R, alpha=alpha, target_names=(ours_regex(TARGETS[kind]),), variant_kwargs=kw
    )


CASES = [  # (variant, alpha, loftq_bits, loftq_iter)
    ("olora", float(R), 4, 1),
    ("olora", 16.0, 4, 1),  # alpha != r: W_res = W - s·B A
    ("loftq", float(R), 4, 1),
    ("loftq", float(R), 8, 2),
]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant, alpha, bits, n_iter", CASES)
def test_parity_with_peft(kind, variant, alpha, bits, n_iter, peft_on_cpu, tmp_path) -> None:
    from peft import PeftModel, get_peft_model

    data = batches(STEPS + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base(kind), peft_cfg(kind, variant, alpha, bits, n_iter))
    ours = base(kind)
    ll.attach(ours, ours_cfg(kind, variant, alpha, bits, n_iter))
    pairs = peft_pairs(pm, ours)

    # 1. init: the same residual weight and factors, bit for bit; the same outputs
    for name, pl, ol in pairs:
        assert torch.equal(ol.weight, pl.base_layer.weight), f"{name}: W_res differs from peft's"
        assert torch.equal(ad(ol).lora_A, ad(pl).lora_A["default"].weight), name
        assert torch.equal(ad(ol).lora_B, ad(pl).lora_B["default"].weight), name
    with torch.no_grad():
        assert rel_err(out(ours, data[0]), out(pm, data[0])) <= RTOL

    # 2. perturbed, copied: forward and gradients
    perturb_peft(pairs, map_lora)
    copy_into_ours(pairs, map_lora)
    assert rel_err(out(ours, data[0]), out(pm, data[0])) <= RTOL
    loss(pm, data[0]).backward()
    loss(ours, data[0]).backward()
    grads = compare_tensors(pairs, map_lora, grad=True)
    assert max(grads.values()) <= RTOL, max(grads.items(), key=lambda kv: kv[1])

    # 3. 8 AdamW steps on the same batches
    mine = [p for p in ours.parameters() if p.requires_grad]
    theirs = [p for p in pm.parameters() if p.requires_grad]
    assert len(mine) == len(theirs) == 2 * len(pairs)
    opt_o, opt_p = torch.optim.AdamW(mine, lr=1e-3), torch.optim.AdamW(theirs, lr=1e-3)
    for ids in data[:STEPS]:
        for model, opt in ((ours, opt_o), (pm, opt_p)):
            opt.zero_grad()
            loss(model, ids).backward()
            opt.step()
    params = compare_tensors(pairs, map_lora, grad=False)
    assert max(params.values()) <= TRAIN_RTOL, max(params.items(), key=lambda kv: kv[1])
    with torch.no_grad():
        y_p, y_o = out(pm, data[-1]), out(ours, data[-1])
    assert rel_err(y_o, y_p) <= TRAIN_RTOL

    # 4. ours -> peft: from_pretrained on the unmodified base reproduces our outputs
    ll.export_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(base(kind), str(tmp_path / "ours"))
    with torch.no_grad():
        assert rel_err(out(loaded, data[-1]), y_o) <= RTOL

    # 5. peft -> ours: peft's unconverted save (init_lora_weights kept) imports onto the unmodified base
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = base(kind)
    ll.import_peft(fresh, tmp_path / "peft")
    assert model_state(fresh).adapters["default"].cfg.variant == variant
    with torch.no_grad():
        assert rel_err(out(fresh, data[-1]), y_p) <= RTOL
    ll.detach(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), base(kind).state_dict().values()))


def test_loftq_alpha_not_r_keeps_peft_residual_and_approximates_w(peft_on_cpu) -> None:
    """alpha != r: the same W_res as peft; our s·B A equals peft's B A (= L R), so W_res + s·B A is LoftQ's
    approximation of W for any alpha (peft's B A is scaled by s on top and overshoots)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base("llama"), peft_cfg("llama", "loftq", 16.0))
    ours = base("llama")
    W0 = {n: m.weight.detach().clone() for n, m in ours.named_modules() if isinstance(m, nn.Linear)}
    ll.attach(ours, ours_cfg("llama", "loftq", 16.0))
    for name, pl, ol in peft_pairs(pm, ours):
        assert torch.equal(ol.weight, pl.base_layer.weight), name
        s = ad(ol)._lora_lite.scale
        LR = ad(pl).lora_B["default"].weight @ ad(pl).lora_A["default"].weight
        assert rel_err(s * ad(ol).lora_B @ ad(ol).lora_A, LR) <= 1e-5, name
        err_q = (W0[name] - ol.weight).norm()  # quantization error alone
        err_ours = (W0[name] - ol.weight - s * ad(ol).lora_B @ ad(ol).lora_A).norm()
        assert err_ours < err_q, f"{name}: the rank-r correction should reduce the quantization error"


def test_nf4_and_int8_roundtrips_match_bitsandbytes() -> None:
    """Our pure-torch quantizers give bitsandbytes' values bit for bit (where its CPU backend is right)."""
    bnb = pytest.importorskip("bitsandbytes")
    from lora_lite.variants.loftq import int8_roundtrip, nf4_roundtrip

    g = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (48, 128), (7, 9), (3, 192)]:
        W = torch.randn(shape, generator=g)
        p = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        assert torch.equal(nf4_roundtrip(W), bnb.functional.dequantize_4bit(p.data, p.quant_state)), shape
        q = bnb.nn.Int8Params(W.clone(), requires_grad=False).to("cpu")
        assert torch.equal(int8_roundtrip(W), bnb.functional.int8_vectorwise_dequant(q.data, q.SCB)), shape
        assert torch.equal(nf4_roundtrip(nf4_roundtrip(W)), nf4_roundtrip(W))  # idempotent: requantizes exactly


def test_olora_identity_detach_and_reload(tmp_path) -> None:
    m = base("llama")
    ref = copy.deepcopy(m)
    ids = batches(1)[0]
    y0 = out(m, ids)
    ll.attach(m, ours_cfg("llama", "olora", 16.0))
    for name, a in ll.targets(m).items():
        B = ad(a).lora_B
        assert torch.allclose(B.t() @ B, torch.eye(R), atol=1e-5), f"{name}: B has orthonormal columns"
    assert rel_err(out(m, ids), y0) <= 1e-5
    with torch.no_grad():
        for a in ll.targets(m).values():
            ad(a).lora_B.add_(0.01)
    y1 = out(m, ids)
    ll.save(m, tmp_path / "a.safetensors")
    ll.detach(m)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    ll.load(m, tmp_path / "a.safetensors")
    assert torch.equal(out(m, ids), y1)


def test_options_are_checked() -> None:
    m = base("llama")
    for kw, what in [
        ({"loftq_bits": 3}, "loftq_bits"),
        ({"loftq_bits": 4.0}, "loftq_bits"),
        ({"loftq_iter": 0}, "loftq_iter"),
        ({"bits": 4}, "bits"),
    ]:
        with pytest.raises(ConfigError, match=what):
            ll.attach(m, ll.LoraLiteConfig(variant="loftq", r=R, variant_kwargs=kw))
    with pytest.raises(ConfigError, match="r <= min"):
        ll.attach(m, ll.LoraLiteConfig(variant="olora", r=65, target_names=(r"q_proj$",)))
    assert ll.adapters(m) == []


def test_import_refuses_olora_with_dora(tmp_path) -> None:
    import json

    m = base("llama")
    ll.attach(m, ours_cfg("llama", "olora", 8.0))
    ll.export_peft(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(init_lora_weights="olora", use_dora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="'olora' with use_dora"):
        ll.import_peft(base("llama"), tmp_path)


# ----------------------------------------------------------------------------- quantized bases (bitsandbytes, CPU)


class Toy(nn.Module):
    """Two biased linears, widths multiples of 64 (bitsandbytes' CPU nf4 is right there)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("variant", ["olora", "loftq"])
def test_quantized_bases_are_refused_with_the_fix(variant: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from test_quantized import quantize_model

    m = quantize_model(Toy(), "nf4")
    assert isinstance(m.up, bnb.nn.Linear4bit)
    with pytest.raises(ConfigError, match=rf"up: variant '{variant}' rewrites the weight.*Load the base unquantized"):
        ll.attach(m, ll.LoraLiteConfig(variant=variant, r=4, target_names=("up", "down")))
    assert not hasattr(m.up, "lora_lite")


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_residual_requantizes_exactly_and_the_adapter_runs_on_the_quantized_base(bits: int, tmp_path) -> None:
    """LoftQ's deployment (peft's LoftQ workflow): W_res quantizes back to itself, so the trained adapter, attached
    as a plain lora to the quantized residual model, gives the adapted model's outputs."""
    bnb = pytest.importorskip("bitsandbytes")
    m = Toy()
    W = {n: getattr(m, n).weight.detach().clone() for n in ("up", "down")}
    ll.attach(m, ll.LoraLiteConfig(variant="loftq", r=4, alpha=8.0, target_names=("up", "down"),
                                   variant_kwargs={"loftq_bits": bits, "loftq_iter": 2}))  # fmt: skip
    with torch.no_grad():
        for a in ll.targets(m).values():
            a.lora_B.mul_(1.5)  # a "trained" adapter
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    y = m(x)
    ll.save(m, tmp_path / "a.safetensors")

    q = Toy()  # the residual base (the model's weights now), quantized
    for n in ("up", "down"):
        lin, w_res = getattr(q, n), getattr(m, n).weight.detach().clone()
        assert not torch.equal(w_res, W[n])
        if bits == 4:
            ql = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4")
            ql.weight = bnb.nn.Params4bit(w_res, requires_grad=False, quant_type="nf4", compress_statistics=False)
        else:
            ql = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=0.0)
            ql.weight = bnb.nn.Int8Params(w_res, requires_grad=False, has_fp16_weights=False)
        ql.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(q, n, ql.to("cpu"))
        deq = dense_weight(getattr(q, n))
        if bits == 4:
            assert torch.equal(deq, w_res), f"{n}: nf4 requantization of W_res is not exact"
        else:  # int8: the same codes; the fp16 absmax round trip moves values by <= 1 ulp of fp16
            assert rel_err(deq, w_res) <= 1e-3, n
    cfg, _, tensors = ll.read_adapter(tmp_path / "a.safetensors")
    ll.attach(q, ll.LoraLiteConfig.from_dict({**cfg.to_dict(), "variant": "lora", "variant_kwargs": {}}))
    with torch.no_grad():
        for k, v in ll.adapter_state_dict(q).items():
            v.copy_(tensors[k])
    q.train()  # (bitsandbytes' CPU 4-bit kernel never repacks in train mode: test_quantized.py)
    assert rel_err(q(x), y) <= (1e-5 if bits == 4 else 2e-3)
    ll.detach(m)
    assert all(torch.equal(getattr(m, n).weight, W[n]) for n in W)


@pytest.mark.parametrize("variant", ["olora", "loftq"])
def test_scaled_and_merge(variant: str) -> None:
    """ll.scaled: c = 0 is the base model (the original weight), c = 1 the adapter; ll.merge folds W_res + s·B A into plain weights with the adapter's outputs."""
    m = base("gpt2")
    ids = batches(1)[0]
    with torch.no_grad():
        y0 = out(m, ids)
        ll.attach(m, ours_cfg("gpt2", variant, 8.0))
        for a in ll.targets(m).values():
            a.lora_B.add_(0.02)
        y1 = out(m, ids)
        assert rel_err(y1, y0) > 1e-3
        with ll.scaled(m, 0.0):
            assert rel_err(out(m, ids), y0) <= 1e-6
        with ll.scaled(m, 1.0):
            assert torch.equal(out(m, ids), y1)
        ll.merge(m)
        assert not ll.is_attached(m)
        assert rel_err(out(m, ids), y1) <= 1e-5
