"""ia3 / ia3_ff (one adapter gating outputs and feed-forward inputs) and eva (data-driven A), issue 3."""

from __future__ import annotations

import sys

import pytest
import torch
from _models import Toy, ad, llama_batch, lm_loss, tiny_llama

import lora_lite as ll
from lora_lite.variants.ia3 import IA3, IA3FF

# ------------------------------------------------------------------ ia3

MIXED = dict(variant="ia3", target_names=("k_proj", "v_proj", "down_proj"))


def _randomize(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in ll.adapter_state_dict(model).values():
            t.copy_(1 + 0.5 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("kw", [{"feedforward_names": ["down_proj"]}, {"feedforward_roles": ["writer"]}])
def test_ia3_one_adapter_gates_kv_outputs_and_down_proj_input(kw) -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(**MIXED, variant_kwargs=kw))
    layers = ll.targets(model)
    assert len(layers) == 6
    for name, layer in layers.items():
        if name.endswith("down_proj"):
            assert ad(layer)._lora_lite.variant is IA3FF and ad(layer).lora_g.shape == (64,)  # d_in of down_proj
            assert layer.base_layer._forward_pre_hooks and not layer.base_layer._forward_hooks
        else:
            assert ad(layer)._lora_lite.variant is IA3 and ad(layer).lora_g.shape == (
                16,
            )  # d_out of k/v (2 kv heads x 8)
            assert layer.base_layer._forward_hooks and not layer.base_layer._forward_pre_hooks
    _randomize(model)
    # each hooked layer against its formula, written out by hand
    x64 = torch.randn(3, 5, 64)
    x32 = torch.randn(3, 5, 32)
    with torch.no_grad():
        for name, layer in layers.items():
            g = ad(layer).lora_g
            if name.endswith("down_proj"):
                torch.testing.assert_close(layer(x64), (x64 * g) @ layer.weight.T, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(layer(x32), (x32 @ layer.weight.T) * g, rtol=1e-5, atol=1e-6)
    # whole model: equals the base with the gates folded into the weights by hand
    ref = tiny_llama()
    with torch.no_grad():
        for name, layer in layers.items():
            w = ref.get_submodule(name).weight
            w.mul_(ad(layer).lora_g[None, :] if name.endswith("down_proj") else ad(layer).lora_g[:, None])
        ids = llama_batch()
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_ia3_scales_the_bias_and_ia3_ff_does_not() -> None:
    x = torch.randn(4, 16)
    for variant, names in (("ia3", ("up",)), ("ia3_ff", ("down",))):
        model = Toy(bias=True)
        ll.attach(model, ll.LoraLiteConfig(variant=variant, target_names=names))
        _randomize(model)
        layer = model.layers[0].up if variant == "ia3" else model.layers[0].down
        xin = x if variant == "ia3" else torch.randn(4, 40)
        W, b, g = layer.weight, layer.bias, ad(layer).lora_g
        want = (xin @ W.T + b) * g if variant == "ia3" else (xin * g) @ W.T + b
        with torch.no_grad():
            torch.testing.assert_close(layer(xin), want, rtol=1e-5, atol=1e-6)


def test_ia3_mixed_save_load_rederives_route(tmp_path) -> None:
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(**MIXED, variant_kwargs={"feedforward_names": [r"mlp\.down_proj$"]}))
    _randomize(model)
    ids = llama_batch()
    with torch.no_grad():
        y = model(ids).logits
    path = ll.save(model, tmp_path / "ia3.safetensors")
    fresh = tiny_llama()
    ll.load(fresh, path)
    for name, layer in ll.targets(fresh).items():
        assert ad(layer)._lora_lite.variant is ll.targets(model)[name]._lora_lite.variant
        assert torch.equal(ad(layer).lora_g, ll.targets(model)[name].lora_g)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, y)


def test_ia3_matches_peft_mixed() -> None:
    """peft's IA3 with feedforward_modules, its ia3_l copied into ours: fp32 logits agree to 1e-5."""
    from peft import IA3Config, get_peft_model

    pm = get_peft_model(
        tiny_llama(),
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model = tiny_llama()
    ll.attach(model, ll.LoraLiteConfig(**MIXED, variant_kwargs={"feedforward_names": ["down_proj"]}))
    _randomize(model)
    with torch.no_grad():
        for name, layer in ll.targets(model).items():
            peft_l = pm.base_model.model.get_submodule(name).ia3_l["default"]
            assert peft_l.numel() == ad(layer).lora_g.numel()
            peft_l.copy_(ad(layer).lora_g.reshape(peft_l.shape))
        ids = llama_batch()
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant, kw, msg",
    [
        ("ia3", {"feedforward_names": "down_proj"}, r"must be a list of strings, not the string 'down_proj'"),
        ("ia3", {"feedforward_names": [3]}, "must be a list of strings"),
        ("ia3", {"feedforward_names": ["down_(proj"]}, "not a valid regex"),
        ("ia3", {"feedforward_roles": ["ffn"]}, r"unknown feedforward_roles \['ffn'\]"),
        ("ia3", {"feedforward": ["down_proj"]}, "unknown variant_kwargs"),
        ("ia3_ff", {"feedforward_names": ["down_proj"]}, "use variant='ia3'"),
    ],
)
def test_ia3_config_errors(variant, kw, msg) -> None:
    with pytest.raises(ll.ConfigError, match=msg):
        ll.LoraLiteConfig(variant=variant, variant_kwargs=kw)


def test_ia3_refuses_dropout() -> None:
    for variant in ("ia3", "ia3_ff"):
        with pytest.raises(ll.ConfigError, match="no adapter-input dropout"):
            ll.LoraLiteConfig(variant=variant, dropout=0.1)


# ------------------------------------------------------------------ eva

EVA_TARGETS = ("q_proj", "down_proj")


def _calib(seed: int = 7, n: int = 3, pad_from: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, pad_from:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _inputs_by_hand(model, targets, batches) -> dict[str, torch.Tensor]:
    """Every target's input rows at non-padding positions, collected independently of lora_lite."""
    rows: dict[str, list] = {}
    hs = []
    for name, m in model.named_modules():
        if any(name.endswith(t) for t in targets):
            hs.append(m.register_forward_hook(lambda mod, a, o, name=name: rows.setdefault(name, []).append(a[0])))
    with torch.no_grad():
        for b in batches:
            n0 = {k: len(v) for k, v in rows.items()}
            model(**b)
            for k in rows:
                for i in range(n0.get(k, 0), len(rows[k])):
                    rows[k][i] = rows[k][i][b["attention_mask"].bool()]
    for h in hs:
        h.remove()
    return {k: torch.cat(v).double() for k, v in rows.items()}


def _pca(X: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    Xc = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return Vh[:r], S[:r]


def _eva(r: int = 4, **kw) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(variant="eva", r=r, alpha=8.0, target_names=EVA_TARGETS, variant_kwargs=kw)


def _assert_rows_match(A: torch.Tensor, V: torch.Tensor, tol: float) -> None:
    """Row i of A equals row i of V up to sign (|cos| ~ 1), and the projections agree."""
    A, V = A.double(), V.double()
    cos = (A * V).sum(1) / (A.norm(dim=1) * V.norm(dim=1))
    assert (cos.abs() > 1 - tol).all(), cos
    torch.testing.assert_close(A.T @ A, V.T @ V, rtol=0, atol=tol)


def test_eva_A_is_top_r_principal_directions_of_the_inputs() -> None:
    from peft.utils.incremental_pca import IncrementalPCA

    r = 4
    batches = _calib()
    X = _inputs_by_hand(tiny_llama(), EVA_TARGETS, batches)
    model = tiny_llama()
    ll.attach(model, _eva(r, show_progress_bar=False), calibration_data=batches)
    layers = ll.targets(model)
    assert sorted(layers) == sorted(X) and len(layers) == 4
    for name, layer in layers.items():
        assert X[name].shape[0] == 3 * (12 + 9)  # 3 batches, row 1 padded from position 9: 63 real tokens
        V, _ = _pca(X[name], r)
        # fp32 layer inputs, fp64 statistics: the top-4 directions agree to ~1e-6 (eigen-gaps of these inputs
        # are > 1e-2 relative); 1e-5 leaves room for the fp32 forward.
        _assert_rows_match(ad(layer).lora_A.detach(), V, tol=1e-5)
        # peft's IncrementalPCA fed all rows at once is an exact (full-SVD) PCA: same vectors, same signs
        ipca = IncrementalPCA(n_components=r).partial_fit(X[name].float())
        torch.testing.assert_close(ad(layer).lora_A.detach(), ipca.components_.float(), rtol=0, atol=1e-4)
        assert torch.equal(ad(layer).lora_B, torch.zeros_like(ad(layer).lora_B))


def test_eva_matches_peft_get_eva_state_dict_when_the_spectrum_has_a_gap() -> None:
    """peft's own pipeline (rho=1, truncated randomized IncrementalPCA until tau=0.99) on inputs with a clear gap
    after the 4th principal direction: same subspace (principal-angle cosines > 0.999), same order and signs.

    Without a gap peft's IncrementalPCA, which keeps only r components between batches, is itself inexact:
    on the random tiny Llama (flat spectrum) its 4th principal cosine with the exact PCA is ~0.4, so compare
    against peft only on data whose top-r subspace is well defined.
    """
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    scales = torch.tensor([8.0, 6, 4, 3] + [0.5] * 12)
    xs = [(torch.randn(64, 16, generator=g) * scales) @ Q.T + 0.3 for _ in range(6)]
    names = ["layers.0.q", "layers.0.up", "layers.1.up"]  # q and up of block 0 share their input (peft dedups)
    pc = LoraConfig(r=4, target_modules=names, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    peft_sd = get_eva_state_dict(
        Toy(),
        xs,
        pc,
        forward_fn=lambda m, x: m(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    model = Toy()
    ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4, target_names=tuple(names)), calibration_data=xs)
    for name, layer in ll.targets(model).items():
        A, P = ad(layer).lora_A.detach().double(), peft_sd[name].double()
        assert (torch.linalg.svdvals(A @ P.T) > 0.999).all()  # both have orthonormal rows
        assert ((A * P).sum(1) > 0.99).all()  # same order, same sign convention (svd_flip on V)


def test_eva_whiten_divides_by_sqrt_singular_values_as_peft() -> None:
    r = 4
    batches = _calib()
    X = _inputs_by_hand(tiny_llama(), EVA_TARGETS, batches)
    model = tiny_llama()
    ll.attach(model, _eva(r, whiten=True, show_progress_bar=False), calibration_data=batches)
    for name, layer in ll.targets(model).items():
        V, S = _pca(X[name], r)
        want = V / S.sqrt()[:, None]
        A = ad(layer).lora_A.detach().double()
        sign = torch.sign((A * want).sum(1, keepdim=True))
        torch.testing.assert_close(A, sign * want, rtol=1e-5, atol=1e-6)


def test_eva_padding_is_excluded() -> None:
    """Garbage tokens appended with attention_mask 0 (right padding, causal model) do not change A."""
    clean = _calib(pad_from=9)
    g = torch.Generator().manual_seed(99)
    padded = []
    for b in clean:
        junk = torch.randint(0, 128, (2, 5), generator=g)
        padded.append(
            {
                "input_ids": torch.cat([b["input_ids"], junk], 1),
                "attention_mask": torch.cat([b["attention_mask"], torch.zeros_like(junk)], 1),
            }
        )
    As = []
    for batches in (clean, padded):
        model = tiny_llama()
        ll.attach(model, _eva(show_progress_bar=False), calibration_data=batches)
        As.append({n: ad(layer).lora_A.detach().clone() for n, layer in ll.targets(model).items()})
    for n in As[0]:
        torch.testing.assert_close(As[1][n], As[0][n], rtol=0, atol=1e-5)
    # and masking matters: the same batches without their masks give a different A
    model = tiny_llama()
    unmasked = [{"input_ids": b["input_ids"]} for b in padded]
    ll.attach(model, _eva(show_progress_bar=False), calibration_data=unmasked)
    assert any((ll.targets(model)[n].lora_A - As[0][n]).abs().max() > 1e-3 for n in As[0])


def test_eva_label_mask_as_peft() -> None:
    """labels == -100 positions are excluded like attention_mask == 0 (peft's use_label_mask, default True)."""
    masked = _calib()
    labelled = []
    for b in masked:
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        labelled.append({"input_ids": b["input_ids"], "labels": labels})
    As = []
    for batches in (masked, labelled):
        model = tiny_llama()
        ll.attach(model, _eva(show_progress_bar=False), calibration_data=batches)
        As.append({n: ad(layer).lora_A.detach().clone() for n, layer in ll.targets(model).items()})
    for n in As[0]:  # causal model: masking the tail by labels or by attention gives the same rows
        torch.testing.assert_close(As[1][n], As[0][n], rtol=0, atol=1e-5)


def test_eva_accepts_a_dataloader_and_plain_tensors() -> None:
    from torch.utils.data import DataLoader

    batches = _calib()
    samples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)]
    As = []
    for data in (batches, DataLoader(samples, batch_size=2)):
        model = tiny_llama()
        ll.attach(model, _eva(show_progress_bar=False), calibration_data=data)
        As.append({n: ad(layer).lora_A.detach().clone() for n, layer in ll.targets(model).items()})
    for n in As[0]:
        assert torch.equal(As[1][n], As[0][n])
    toy = Toy()
    xs = [torch.randn(8, 16) for _ in range(3)]
    ll.attach(toy, ll.LoraLiteConfig(variant="eva", r=3, target_names=("layers.0.q",)), calibration_data=xs)
    inputs = []
    ref = Toy()
    h = ref.layers[0].q.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for x in xs:
            ref(x)
    h.remove()
    V, _ = _pca(torch.cat(inputs).double(), 3)
    _assert_rows_match(ad(toy.layers[0].q).lora_A.detach(), V, tol=1e-5)


def test_eva_A_is_a_trainable_parameter_with_gradient_by_step_2() -> None:
    model = tiny_llama()
    ll.attach(model, _eva(show_progress_bar=False), calibration_data=_calib())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = llama_batch()
    grads = []
    for _ in range(2):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
    for name in ll.targets(model):
        key = f"{name}.lora_lite.default.lora_A"
        assert key in params and key not in buffers and params[key].requires_grad
        assert grads[0][key].abs().sum() == 0  # B = 0 at step 1
        assert grads[1][key].abs().sum() > 0


def test_eva_load_needs_no_data(tmp_path) -> None:
    model = tiny_llama()
    ll.attach(model, _eva(show_progress_bar=False), calibration_data=_calib())
    path = ll.save(model, tmp_path / "eva.safetensors")
    fresh = tiny_llama()
    ll.load(fresh, path)
    for name, layer in ll.targets(fresh).items():
        assert torch.equal(ad(layer).lora_A, ll.targets(model)[name].lora_A)
        assert ad(layer).lora_A.requires_grad


def _clean(model) -> bool:
    return not ll.is_attached(model) and not any(
        hasattr(m, "_lora_lite") or m._forward_hooks or m._forward_pre_hooks for m in model.modules()
    )


def test_eva_errors_name_the_fix_and_leave_the_model_clean() -> None:
    model = tiny_llama().train()
    with pytest.raises(ll.ConfigError, match=r"eva needs calibration_data=\.\.\. at attach.*ll.load needs none"):
        ll.attach(model, _eva())
    assert _clean(model) and model.training
    with pytest.raises(ll.ConfigError, match="yielded no batches"):
        ll.attach(model, _eva(), calibration_data=[])
    with pytest.raises(ll.ConfigError, match=r"tensors or dicts.*got str in batch 2"):
        ll.attach(model, _eva(show_progress_bar=False), calibration_data=[_calib()[0], "oops"])
    assert _clean(model) and model.training  # temporary hooks removed and training flag restored on error
    toy = Toy()
    with pytest.raises(ll.ConfigError, match=r"layers\.0\.q: eva saw only 4 non-padding input rows.*r \+ 1 = 5"):
        ll.attach(
            toy, ll.LoraLiteConfig(variant="eva", r=4, target_names=("q",)), calibration_data=[torch.randn(4, 16)]
        )
    assert _clean(toy)
    with pytest.raises(ll.ConfigError, match=r"unknown variant_kwargs \['rho'\]; eva accepts"):
        _eva(rho=2.0)
    with pytest.raises(ll.ConfigError, match=r"variant_kwargs\['whiten'\] must be a bool"):
        _eva(whiten=1)


def test_eva_calibrates_in_eval_mode_without_grad_and_restores_training() -> None:
    model = tiny_llama().train()
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    ll.attach(model, _eva(show_progress_bar=False), calibration_data=_calib())
    assert seen and all(s == (False, False) for s in seen)
    assert model.training


def test_eva_progress_bar_is_optional(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    model = tiny_llama()
    ll.attach(model, _eva(), calibration_data=_calib())  # show_progress_bar defaults to True
    assert all(ad(layer).lora_A.abs().sum() > 0 for layer in ll.targets(model).values())
