"""loha and lokr on nn.Conv1d/2d/3d targets, with peft 0.21.2 as the oracle.

Parity (forward, gradients, 8 AdamW steps) by copying peft's tensors into ours, on a small model of convolutions
(1-D padded; 2-D strided, padded and dilated without bias; 2-D grouped; 1×1 2-D), for loha (plain and
use_effective_conv2d) and lokr (full W2, incl. peft's Conv1d kron; low-rank W2; Tucker W2 with lokr_t2). Then
export_peft -> PeftModel.from_pretrained, peft's save_pretrained -> import_peft, rank / module dropout drawn as
peft's, merge == unmerged, detach bit-exact, save/load, Conv3d (ours only), and the refusals.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import ad
from _parity import rel_err
from torch import nn

import lora_lite as ll

RTOL = 1e-5  # fp32: the same math on both sides, possibly in another association order
TRAIN_RTOL = 1e-4  # after 8 AdamW steps, as tests/test_parity_peft.py


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
        self.g = nn.Conv2d(32, 16, 3, padding=1, groups=2)
        self.p = nn.Conv2d(16, 8, 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.c1(x1).flatten(1), self.p(torch.relu(self.g(self.c2(x2)))).flatten(1)], 1)


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x1": torch.randn(2, 16, 10, generator=g), "x2": torch.randn(2, 16, 9, 8, generator=g)}


def loss(model: nn.Module, b: dict) -> torch.Tensor:
    return (model(**b) - 0.5).pow(2).mean()


CASES = {  # id -> (variant, variant_kwargs, the peft tensor names expected on c1)
    "loha": ("loha", {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "loha-effective": ("loha", {"use_effective_conv2d": True}, {"hada_t1", "hada_t2", "hada_w1_a", "hada_w2_b"}),
    "lokr-full": ("lokr", {}, {"lokr_w1", "lokr_w2"}),
    "lokr-lowrank": ("lokr", {"decompose_factor": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr-effective": ("lokr", {"decompose_factor": 2, "use_effective_conv2d": True}, {"lokr_t2", "lokr_w2_a"}),
}
PREFIX = {"loha": "hada_", "lokr": "lokr_"}


def peft_config(variant: str, **kw):
    from peft import LoHaConfig, LoKrConfig

    return (LoHaConfig if variant == "loha" else LoKrConfig)(r=2, alpha=4, target_modules=["c1", "c2", "g", "p"], **kw)


def our_config(variant: str, **kw) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(variant=variant, r=2, alpha=4, target_names=(r"^(c1|c2|g|p)$",), variant_kwargs=kw)


def mapping(pl: nn.Module, ol: nn.Module, variant: str) -> dict[str, torch.Tensor]:
    """Our tensor name -> peft's tensor (same shape) on one layer."""
    return {n: getattr(pl, PREFIX[variant] + n.removeprefix("lora_"))["default"] for n in ol._lora_lite.names}


def twins(case: str, base: nn.Module | None = None, **extra):
    """(peft model, ours, pairs): the same base; peft's tensors moved off their init, then copied into ours."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    variant, kw, _ = CASES[case]
    base = base or Convs()
    pm = get_peft_model(copy.deepcopy(base), peft_config(variant, **kw, **extra))
    ours = copy.deepcopy(base)
    ll.attach(ours, our_config(variant, **kw, **extra))
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}
    assert sorted(theirs) == sorted(ll.targets(ours))
    pairs = [(theirs[n], ad(ours.get_submodule(n))) for n in sorted(theirs)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pl, ol in pairs:
            for p, t in mapping(pl, ol, variant).items():
                t.add_(0.3 * torch.randn(t.shape, generator=g))
                getattr(ol, p).copy_(t)
    return pm, ours, pairs


def worst(pairs: list, variant: str, grad: bool) -> float:
    errs = [0.0]
    for pl, ol in pairs:
        for p, t in mapping(pl, ol, variant).items():
            errs.append(rel_err(getattr(ol, p).grad, t.grad) if grad else rel_err(getattr(ol, p), t))
    return max(errs)


SLOW = ("lokr-full", "lokr-effective")  # (the 8 steps take seconds each; export/import, merge cover their forms)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_parity_with_peft(case: str) -> None:
    """Forward, gradients, and 8 AdamW steps on the same batches agree with peft; the tensors are peft's shapes."""
    variant = CASES[case][0]
    pm, ours, pairs = twins(case)
    assert CASES[case][2] <= {PREFIX[variant] + n.removeprefix("lora_") for n in pairs[0][1]._lora_lite.names}
    b = batch(0)
    assert rel_err(ours(**b), pm(**b)) <= RTOL
    loss(ours, b).backward()
    loss(pm, b).backward()
    if case == "loha-effective":  # peft's HadaWeightCP.backward is wrong for W1a, W2a: the test below
        pairs = [(pl, ol) for pl, ol in pairs if "lora_t1" in ol._lora_lite.names]
        for pl, ol in pairs:
            for p, t in mapping(pl, ol, variant).items():
                assert (rel_err(getattr(ol, p).grad, t.grad) <= RTOL) == (p not in ("lora_w1_a", "lora_w2_a")), p
        return
    assert worst(pairs, variant, grad=True) <= RTOL
    mine = [p for p in ours.parameters() if p.requires_grad]
    theirs = [p for p in pm.parameters() if p.requires_grad]
    assert len(mine) == len(theirs)
    opt_o, opt_p = torch.optim.AdamW(mine, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(8):
        for model, opt in ((ours, opt_o), (pm, opt_p)):
            opt.zero_grad()
            loss(model, batch(10 + step)).backward()
            opt.step()
    assert worst(pairs, variant, grad=False) <= TRAIN_RTOL
    b = batch(99)
    assert rel_err(ours(**b), pm(**b)) <= TRAIN_RTOL


@pytest.mark.parametrize("case", CASES)
def test_export_import_both_ways(case: str, tmp_path) -> None:
    """export_peft -> PeftModel.from_pretrained on the plain base, and peft's save_pretrained -> import_peft."""
    import peft

    pm, ours, _ = twins(case)
    b = batch(5)
    want = ours(**b)
    ll.export_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(Convs(), str(tmp_path / "ours"))
    assert rel_err(loaded(**b), want) <= RTOL
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = Convs()
    assert sorted(ll.import_peft(fresh, tmp_path / "peft")) == sorted(ll.targets(ours))
    assert rel_err(fresh(**b), pm(**b)) <= RTOL


@pytest.mark.parametrize(
    ("case", "extra"),
    [("loha", {}), ("lokr-lowrank", {"rank_dropout_scale": True}), ("lokr-effective", {})],
)
def test_rank_and_module_dropout_draw_what_peft_draws(case: str, extra: dict) -> None:
    pm, ours, _ = twins(case, rank_dropout=0.4, module_dropout=0.3, **extra)
    pm.train()
    ours.train()
    b, outs = batch(1), []
    for seed in range(4):
        torch.manual_seed(seed)
        mine = ours(**b)
        torch.manual_seed(seed)
        assert rel_err(mine, pm(**b)) <= RTOL
        outs.append(mine)
    assert len({round(float(o.detach().sum()), 3) for o in outs}) > 1  # the draws differ between seeds


@pytest.mark.parametrize("case", CASES)
def test_merge_detach_save_load_scaled(case: str, tmp_path) -> None:
    _, ours, _ = twins(case)
    b = batch(7)
    base = Convs()
    y0, want = base(**b), ours(**b)
    assert rel_err(want, y0) > 1e-3  # the adapter changes the output
    ll.save(ours, tmp_path / "a.safetensors")
    fresh = Convs()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(**b), want)
    with ll.scaled(ours, 0.0):
        assert torch.equal(ours(**b), y0)
    with ll.scaled(ours, 0.5):
        half = ours(**b)
    assert rel_err(half, y0) > 1e-4 and rel_err(half, want) > 1e-4
    merged = copy.deepcopy(ours)
    ll.merge(merged)
    assert rel_err(merged(**b), want) <= RTOL
    ll.detach(ours)
    assert torch.equal(ours(**b), y0)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())


class Conv3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv3d(8, 8, 3, padding=(1, 0, 1), stride=(1, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


@pytest.mark.parametrize("kw", [{"variant": "loha", "variant_kwargs": {"use_effective_conv2d": True}},
                                {"variant": "lokr", "variant_kwargs": {"decompose_factor": 2}}])  # fmt: skip
def test_conv3d_trains_merges_saves_but_is_not_exported(kw: dict, tmp_path) -> None:
    """peft 0.21.2 has no Conv3d LoHa / LoKr: ours adapts it; export_peft says why it cannot."""
    net, x = Conv3(), torch.randn(2, 8, 4, 5, 3)
    y0 = net(x)
    ll.attach(net, ll.LoraLiteConfig(r=2, alpha=4, target_names=("c",), **kw))
    assert torch.equal(net(x), y0)  # identity at init
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (net(x) - 1).pow(2).mean().backward()
        opt.step()
    want = net(x)
    assert rel_err(want, y0) > 1e-3
    ll.save(net, tmp_path / "a.safetensors")
    fresh = Conv3()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x), want)
    ll.merge(fresh)
    assert rel_err(fresh(x), want) <= RTOL
    with pytest.raises(ll.ConfigError, match=rf"c: peft 0.21.2 has no {kw['variant']} for nn.Conv3d"):
        ll.export_peft(net, tmp_path / "p")


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_identity_at_init_and_peft_s_1x1_rule(variant: str) -> None:
    """ΔW = 0 at init; a 1×1 kernel keeps the plain form even with use_effective_conv2d, as peft."""
    net, b = Convs(), batch(2)
    y0 = net(**b)
    ll.attach(
        net, our_config(variant, use_effective_conv2d=True, **({"decompose_factor": 2} if variant == "lokr" else {}))
    )
    assert torch.equal(net(**b), y0)
    t = "lora_t1" if variant == "loha" else "lora_t2"
    assert t in ad(net.c1)._lora_lite.names and t not in ad(net.p)._lora_lite.names


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_reflect_padding_is_refused_and_the_model_left_intact(variant: str) -> None:
    net = nn.Sequential()
    net.add_module("c", nn.Conv1d(4, 8, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ll.ConfigError, match=r"c \(12->8\): Conv1d with padding_mode='reflect': peft's"):
        ll.attach(net, ll.LoraLiteConfig(variant=variant, r=2, target_names=("c",)))
    assert not ll.is_attached(net) and not hasattr(net.c, "lora_lite")


def test_import_refuses_a_file_whose_conv_tensors_do_not_fit(tmp_path) -> None:
    """A LoHa file saved with use_effective_conv2d, its flag removed: the shapes no longer fit, named."""
    import json

    pm, _, _ = twins("loha-effective")
    pm.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    pc = json.loads(cfg_path.read_text())
    pc["use_effective_conv2d"] = False
    cfg_path.write_text(json.dumps(pc))
    with pytest.raises((ll.LoadError, ValueError), match=r"c1"):
        ll.import_peft(Convs(), tmp_path)


def test_effective_loha_gradients_are_the_true_ones_where_peft_s_are_not() -> None:
    """peft 0.21.2's HadaWeightCP.backward (copied from LyCORIS) pairs W1a's gradient with T2 W2b and W2a's with
    T1 W1b; autograd on the same forward gives the true gradient, checked here against finite differences."""
    conv = nn.Sequential()
    conv.add_module("c", nn.Conv1d(3, 4, 3, padding=1).double())
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    ours = copy.deepcopy(conv)
    ll.attach(ours, ll.LoraLiteConfig(variant="loha", r=2, alpha=4, target_names=("c",), dtype=torch.float64,
                                      variant_kwargs={"use_effective_conv2d": True}))  # fmt: skip
    a = ad(ours.c)
    with torch.no_grad():
        a.lora_w2_b.normal_()

    def f(w1a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a.lora_w1_a.copy_(w1a)
        return ours(x).pow(2).sum()

    w1a = a.lora_w1_a.detach().clone()
    ours(x).pow(2).sum().backward()
    eps, fd = 1e-6, torch.zeros_like(w1a)
    for idx in range(w1a.numel()):
        d = torch.zeros(w1a.numel(), dtype=w1a.dtype)
        d[idx] = eps
        fd.view(-1)[idx] = (f(w1a + d.view_as(w1a)) - f(w1a - d.view_as(w1a))) / (2 * eps)
    assert rel_err(a.lora_w1_a.grad, fd) <= 1e-6
    from peft import LoHaConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(conv), LoHaConfig(r=2, alpha=4, target_modules=["c"], use_effective_conv2d=True))
    pl = pm.base_model.model.c
    with torch.no_grad():
        for n in a._lora_lite.names:
            getattr(pl, "hada_" + n.removeprefix("lora_"))["default"].copy_(getattr(a, n))
    pm(x).pow(2).sum().backward()
    assert rel_err(pl.hada_w1_a["default"].grad, fd) > 1e-2
