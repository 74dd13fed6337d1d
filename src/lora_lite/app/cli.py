"""`lora-lite` command line: fine-tune a causal LM (`train`), compare base vs adapted (`eval`), fold an
adapter into the weights (`merge`), `demo`.

    lora-lite train --model DIR_OR_HUB_ID --data FILE --variant dora --r 8 --alpha 16 --steps 200 --out run/
    lora-lite train ... --out run/ --resume --steps 400      # continue run/ up to step 400
    lora-lite eval  --model DIR_OR_HUB_ID --adapter run/ --data FILE
    lora-lite merge --model DIR_OR_HUB_ID --adapter run/ --out merged/
    lora-lite demo                                           # offline, real weights, every variant

transformers, tqdm and matplotlib are imported lazily here (they are not dependencies of the
library: `pip install "lora-lite[demo]"`). Bad arguments print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import lora_lite as ll

from ..config import ROLES
from .usage import UsageError

ADAPTER_FILE = "adapter.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


# ---------------------------------------------------------------- arguments


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter (ignored with --resume: the config is read from the saved adapter)")
    g.add_argument("--variant", default="lora", help="registered variant name (default: lora)")
    g.add_argument("--r", type=int, default=8, help="rank (default: 8)")
    g.add_argument("--alpha", type=float, default=16.0, help="scale numerator, s = alpha/r (default: 16)")
    g.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout (default: 0)")
    g.add_argument("--dtype", default="float32", help="adapter dtype: float32, bfloat16, float16, float64")
    g.add_argument("--target-roles", nargs="+", default=None, metavar="ROLE", help=f"any of {', '.join(ROLES)}")
    g.add_argument(
        "--target-names", nargs="+", default=(), metavar="REGEX", help="module-name regexes (override roles)"
    )
    g.add_argument("--exclude-names", nargs="+", default=None, metavar="REGEX", help="default: lm_head embed_tokens")
    g.add_argument("--layers", nargs="+", type=int, default=None, metavar="I", help="transformer block indices")
    g.add_argument("--variant-kwargs", default="{}", metavar="JSON", help="e.g. '{\"use_rslora\": true}'")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="a text file, or a .jsonl file with one JSON object per line")
    g.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training block (default: 128)")
    g.add_argument("--batch-size", type=int, default=8, help="blocks per step (default: 8)")


_ADAPTER_FLAGS = (  # the `args` keys of _add_adapter_args
    "variant", "r", "alpha", "dropout", "dtype", "target_roles", "target_names", "exclude_names", "layers",
    "variant_kwargs",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lora-lite",
        description="Fine-tune and evaluate LoRA-family adapters on causal language models; run the offline demo.",
    )
    ap.add_argument("--version", action="version", version=f"lora-lite {ll.__version__}")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = ap.add_subparsers(dest="command", metavar="{train,eval,merge,demo}")
    sub.required = True
    # --debug is accepted after the subcommand too (the error hint says "rerun with --debug")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    t = sub.add_parser(
        "train", parents=[debug], help="fine-tune an adapter on a text/JSONL file (AdamW), save it to --out"
    )
    t.add_argument("--model", required=True, help="local model directory or Hugging Face hub id")
    _add_data_args(t)
    _add_adapter_args(t)
    o = t.add_argument_group("training")
    o.add_argument("--out", required=True, help="output directory (adapter.safetensors, train_state.json, ...)")
    o.add_argument("--resume", action="store_true", help="continue the run saved in --out up to --steps")
    o.add_argument("--steps", type=int, default=100, help="total optimizer steps (default: 100)")
    o.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 3e-4; resume: the run's)")
    o.add_argument(
        "--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0; resume: the run's)"
    )
    o.add_argument(
        "--loraplus-lr-ratio",
        type=float,
        default=None,
        help="LoRA+: train the B-type tensors at this multiple of --lr (e.g. 16; default: off; resume: the run's)",
    )
    o.add_argument(
        "--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (default: 1; resume: the run's)"
    )
    o.add_argument("--holdout", type=float, default=0.05, help="fraction of blocks held out (default: 0.05)")
    o.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps, 0 = end only")
    o.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: end only)")
    o.add_argument("--calib-batches", type=int, default=4, help="training batches given to data-initialised variants")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    e = sub.add_parser("eval", parents=[debug], help="loss and perplexity of the base model and of base + adapter")
    e.add_argument("--model", required=True, help="local model directory or Hugging Face hub id")
    e.add_argument("--adapter", required=True, help="adapter .safetensors file, or a `train --out` directory")
    _add_data_args(e)
    e.add_argument("--max-batches", type=int, default=0, help="evaluate at most N batches (default: all)")
    e.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    mg = sub.add_parser(
        "merge", parents=[debug], help="fold an adapter into the base weights, save the plain model to --out"
    )
    mg.add_argument("--model", required=True, help="local model directory or Hugging Face hub id")
    mg.add_argument("--adapter", required=True, help="adapter .safetensors file, or a `train --out` directory")
    mg.add_argument("--out", required=True, help="new directory for the merged model and its tokenizer")
    mg.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    d = sub.add_parser(
        "demo", parents=[debug], help="offline demo: adapt all-MiniLM-L6-v2 for passage retrieval, every variant"
    )
    from .demo import add_demo_args

    add_demo_args(d)
    return ap


# ---------------------------------------------------------------- helpers


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def config_from_args(args: argparse.Namespace) -> ll.LoraLiteConfig:
    try:
        vkw = json.loads(args.variant_kwargs)
    except json.JSONDecodeError as err:
        raise UsageError(f"--variant-kwargs is not valid JSON ({err}): {args.variant_kwargs!r}") from None
    _need(isinstance(vkw, dict), f"--variant-kwargs must be a JSON object, got {args.variant_kwargs!r}")
    if args.variant == "adalora" and "steps" in vars(args):  # its rank schedule spans the run (ll.on_step)
        vkw.setdefault("total_step", args.steps)
    kw: dict[str, Any] = dict(
        variant=args.variant,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        dtype=args.dtype,
        target_names=tuple(args.target_names),
        layers=tuple(args.layers) if args.layers is not None else None,
        variant_kwargs=vkw,
    )
    if args.target_roles is not None:
        kw["target_roles"] = tuple(args.target_roles)
    if args.exclude_names is not None:
        kw["exclude_names"] = tuple(args.exclude_names)
    return ll.LoraLiteConfig(**kw)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    _need(
        dev.type != "cuda" or torch.cuda.is_available(),
        f"--device {name!r}: this torch has no usable CUDA device; use --device cpu (or leave --device out)",
    )
    return dev


def _check_model_ref(ref: str) -> None:
    """Local paths must exist; anything shaped like `org/name` is left to the hub."""
    p = Path(ref).expanduser()
    if p.exists():
        _need(p.is_dir(), f"--model {ref!r} is a file; give the model directory (with config.json) or a hub id")
        _need((p / "config.json").is_file(), f"--model {ref!r} has no config.json; is it a saved model directory?")
        return
    looks_local = ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref
    _need(not looks_local, f"--model {ref!r}: no such directory")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_causal_lm(ref: str, device: torch.device):
    """(model, tokenizer) via transformers' Auto classes; local directories, or hub ids when a hub is reachable."""
    _check_model_ref(ref)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = Path(ref).expanduser()
    if p.is_dir():
        _need(
            any((p / f).is_file() for f in _TOKENIZER_FILES),
            f"--model {ref!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...); "
            f"save the tokenizer there too: tokenizer.save_pretrained({ref!r})",
        )
    tok = AutoTokenizer.from_pretrained(ref)
    model = AutoModelForCausalLM.from_pretrained(ref).to(device)
    _check_causal(model, ref, device)
    return model, tok


def _check_causal(model: torch.nn.Module, ref: str, device: torch.device) -> None:
    """Refuse a model whose output at a position depends on later tokens (an encoder loaded through an LM head,
    e.g. BERT without is_decoder=True): next-token training on it would learn to copy the answer."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[0, 1, 2, vocab - 1], [0, 1, 2, vocab - 2]], device=device) % vocab
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    model.train(was)
    _need(
        torch.allclose(logits[0, :3], logits[1, :3], rtol=1e-4, atol=1e-5),
        f"--model {ref!r} is not a causal language model: its output at a position changes with later tokens "
        f"({type(model).__name__}; an encoder such as BERT without is_decoder=True). train/eval need a decoder "
        "(Llama, Qwen, GPT-2, ...)",
    )


def read_texts(path: str, text_field: str) -> list[str]:
    """Documents of a data file: one per record of a `.jsonl`/`.ndjson` file, else the whole file as text."""
    p = Path(path)
    _need(p.is_file(), f"--data {path!r}: no such file")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"--data {path!r} line {i} is not valid JSON: {err}") from None
                _need(
                    isinstance(rec, dict) and isinstance(rec.get(text_field), str),
                    f"--data {path!r} line {i} has no string field {text_field!r} (set --text-field)",
                )
                texts.append(rec[text_field])
    else:
        texts = [p.read_text(encoding="utf-8")]
    _need(any(t.strip() for t in texts), f"--data {path!r} contains no text")
    return texts


def make_blocks(texts: list[str], tok, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into (n_blocks, seq_len) token blocks (the tail is dropped)."""
    _need(seq_len >= 2, f"--seq-len must be >= 2, got {seq_len}")
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    ids: list[int] = []
    limit, tok.model_max_length = tok.model_max_length, 10**30  # whole documents, cut into blocks below: no
    try:  # "sequence length is longer than the specified maximum" warning for a length we never feed the model
        for t in texts:
            ids.extend(tok(t, add_special_tokens=False)["input_ids"])
            if sep is not None:
                ids.append(sep)
    finally:
        tok.model_max_length = limit
    n = len(ids) // seq_len
    _need(n >= 1, f"the data has {len(ids)} tokens, fewer than one block of --seq-len {seq_len}; lower --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of blocks into (train, held-out); held-out has at least one block if holdout > 0."""
    _need(0.0 <= holdout < 1.0, f"--holdout must be in [0, 1), got {holdout}")
    n = len(blocks)
    n_ho = 0 if holdout == 0 else max(1, round(holdout * n))
    _need(n - n_ho >= 1, f"only {n} block(s) of data: nothing left to train on; add data or lower --seq-len")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[perm[n_ho:]], blocks[perm[:n_ho]]


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Block indices of `step`: epochs of seeded permutations, a pure function of step (exact resume)."""
    idx = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in idx.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = idx.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[idx[sel] % n]
    return out


@torch.no_grad()
def lm_eval(model, blocks: torch.Tensor, batch_size: int, device: torch.device, max_batches: int = 0) -> float:
    """Mean next-token loss (nats per predicted token) over the blocks."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches and i >= max_batches:
            break
        ids = blocks[start : start + batch_size].to(device)
        n_tok = ids.shape[0] * (ids.shape[1] - 1)
        total += float(model(input_ids=ids, labels=ids).loss) * n_tok
        count += n_tok
    model.train(was)
    return total / count


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _file_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_optimizer(opt: torch.optim.Optimizer, names: list[str], path: Path) -> None:
    """AdamW state as safetensors (tensors keyed by parameter name) + param_groups as JSON metadata."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{names[i]}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "n_params": len(g["params"])} for g in sd["param_groups"]
    ]
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"param_groups": json.dumps(groups)})
    os.replace(tmp, path)


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    index = {n: i for i, n in enumerate(names)}
    for key, v in tensors.items():
        pname, k = key.split("::")
        if pname not in index:
            raise ll.LoadError(f"{path}: optimizer state for {pname!r}, which is not a trainable adapter tensor")
        state.setdefault(index[pname], {})[k] = v
    if len(groups) != len(opt.param_groups) or any(
        g.get("n_params", len(names)) != len(o["params"]) for g, o in zip(groups, opt.param_groups)
    ):
        raise ll.LoadError(
            f"{path}: the saved optimizer has {len(groups)} parameter group(s) of other sizes than this run's "
            f"{len(opt.param_groups)} (was --loraplus-lr-ratio given to only one of the runs?)"
        )
    first = [0]
    for o in opt.param_groups:
        first.append(first[-1] + len(o["params"]))
    sd = {
        "state": state,
        "param_groups": [
            {**{k: v for k, v in g.items() if k != "n_params"}, "params": list(range(first[i], first[i + 1]))}
            for i, g in enumerate(groups)
        ],
    }
    opt.load_state_dict(sd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    _need(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    _need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    _need(not out.exists() or out.is_dir(), f"--out {args.out!r} is a file; pass a directory")
    state_path, adapter_path, optim_path = out / STATE_FILE, out / ADAPTER_FILE, out / OPTIM_FILE
    prev: dict[str, Any] = {}
    if args.resume:
        _need(adapter_path.is_file() and state_path.is_file(), f"--resume: {str(out)!r} holds no run to resume")
        try:
            prev = json.loads(state_path.read_text())
            int(prev["step"])
        except (ValueError, KeyError, TypeError) as e:
            _need(False, f"--resume: {str(state_path)!r} is damaged ({type(e).__name__}: {e}); cannot resume from it")
        for fname, digest in prev.get("files", {}).items():  # (older runs have no "files": not checked)
            f = out / fname
            _need(
                not f.is_file() or _file_hash(f) == digest,
                f"--resume: {str(f)!r} is not the file of step {prev['step']} recorded in {STATE_FILE} (the last "
                "checkpoint was interrupted between its writes); the run cannot be resumed exactly. Start it again, "
                "or train on from the adapter alone with a new --out and ll.load",
            )
        cfg = ll.read_adapter(adapter_path)[0]
        changed = [
            k
            for k in ("model", "data", "text_field", "seq_len", "batch_size", "holdout", "seed")
            if k in prev.get("args", {}) and prev["args"][k] != getattr(args, k)
        ]
        if changed:  # the held-out split and the batch order are derived from these
            print(
                f"lora-lite: warning: --resume with different {', '.join(changed)} than the saved run: "
                "the held-out split and batch order change",
                file=sys.stderr,
            )
        _need(
            args.steps > prev["step"],
            f"--resume: {str(out)!r} is already at step {prev['step']}; pass --steps > {prev['step']}",
        )
    else:
        _need(
            not adapter_path.exists(), f"{str(adapter_path)!r} exists; pass --resume to continue it, or another --out"
        )
        cfg = config_from_args(args)  # validate before the (slow) model load
    saved = prev.get("args", {})  # a resume keeps the run's optimizer settings unless the command line gives them
    for k, default in (("lr", 3e-4), ("weight_decay", 0.0), ("grad_clip", 1.0), ("loraplus_lr_ratio", None)):
        if getattr(args, k) is None:
            setattr(args, k, saved.get(k, default))
    _need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    _need(
        args.loraplus_lr_ratio is None or args.loraplus_lr_ratio > 0,
        f"--loraplus-lr-ratio must be > 0, got {args.loraplus_lr_ratio}",
    )
    _need(
        cfg.dtype != torch.float16,
        "--dtype float16: AdamW's eps (1e-8) rounds to 0 in float16, so the first update divides by zero and "
        "the adapter turns NaN; train adapters in bfloat16 or float32 (the base model may stay float16)",
    )
    if args.resume and not optim_path.is_file():
        print(
            f"lora-lite: warning: --resume: no {OPTIM_FILE} in {str(out)!r}: AdamW restarts from zero moments, so "
            "the run will differ from an uninterrupted one",
            file=sys.stderr,
        )
    texts = read_texts(args.data, args.text_field)
    device = _device(args.device)
    torch.manual_seed(args.seed)
    model, tok = load_causal_lm(args.model, device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    _need(max_pos is None or args.seq_len <= max_pos, f"--seq-len {args.seq_len} > the model's {max_pos} positions")
    train, held = split_blocks(make_blocks(texts, tok, args.seq_len), args.holdout, args.seed)
    print(f"data: {len(train)} training blocks, {len(held)} held-out blocks of {args.seq_len} tokens")

    # keep_original=False: this process never detaches or disables the adapter, so pissa/antipasto keep nothing
    # to restore the base weight they rewrote (the memory of ~1/10 of those weights; the saved adapter is the same)
    if args.resume:
        ll.load(model, adapter_path, keep_original=False)
        start = int(prev["step"])
        history = prev.get("history", [])
    else:
        calib = [
            {"input_ids": train[batch_indices(s, args.batch_size, len(train), args.seed)].to(device)}
            for s in range(args.calib_batches)
        ]
        for b in calib:
            b["attention_mask"] = torch.ones_like(b["input_ids"])
        ll.attach(model, cfg, calibration_data=calib, keep_original=False)
        start, history = 0, []
    groups = ll.param_groups(model, args.lr, args.loraplus_lr_ratio, args.weight_decay)
    name_of = {id(p): n for n, p in _trainable(model)}
    grouped = {id(p) for g in groups for p in g["params"]}
    other = [p for n, p in _trainable(model) if id(p) not in grouped]  # (anything trained besides adapter tensors)
    if other:
        groups.append({"params": other, "lr": args.lr, "weight_decay": args.weight_decay, "name": "other"})
    named = [(name_of[id(p)], p) for g in groups for p in g["params"]]  # the optimizer's parameter order
    names = [n for n, _ in named]
    n_params = sum(p.numel() for _, p in named)
    print(f"adapter: {cfg.variant} r={cfg.r} alpha={cfg.alpha} on {len(ll.targets(model))} layers, {n_params:,} params")
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.resume and optim_path.is_file():
        load_optimizer(opt, names, optim_path)
        for g, new in zip(opt.param_groups, groups):  # the command line wins over the saved hyper-parameters
            g["lr"], g["weight_decay"] = new["lr"], new["weight_decay"]

    try:
        out.mkdir(parents=True, exist_ok=True)  # now, not after training: an unwritable --out fails before the work
    except OSError as e:
        _need(False, f"--out {args.out!r}: cannot create the directory ({e})")

    def checkpoint(step: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        ll.save(model, adapter_path)
        save_optimizer(opt, names, optim_path)
        run = {k: v for k, v in vars(args).items() if k not in ("resume", "func", "debug")}
        if args.resume:  # the adapter flags were ignored (the config came from the file): keep the saved run's
            run.update({k: prev["args"][k] for k in _ADAPTER_FLAGS if k in prev.get("args", {})})
        # written last, with the hashes of the two files it goes with: an interrupt between the three writes
        # leaves a state whose hashes do not match, which --resume refuses instead of mixing two steps
        files = {f.name: _file_hash(f) for f in (adapter_path, optim_path)}
        _write_json(
            state_path, {"step": step, "args": run, "config": cfg.to_dict(), "history": history, "files": files}
        )

    def held_out() -> float | None:
        return lm_eval(model, held, args.batch_size, device) if len(held) else None

    if start == 0 and len(held):
        ho = held_out()
        history.append([0, None, ho])
        print(f"step 0: held-out loss {ho:.4f} (ppl {_ppl(ho):.2f})")
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True)
    t0, tokens, loss_val = time.perf_counter(), 0, float("nan")
    for step in range(start, args.steps):
        torch.manual_seed(args.seed * 1_000_003 + step)  # adapter/base dropout: same masks on resume
        ids = train[batch_indices(step, args.batch_size, len(train), args.seed)].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], args.grad_clip)
        opt.step()
        ll.on_step(model, step)  # training-time schedules (adalora's rank allocation); a no-op otherwise
        opt.zero_grad(set_to_none=True)
        loss_val = float(loss.detach())
        _need(math.isfinite(loss_val), f"loss became {loss_val} at step {step + 1}; lower --lr")
        tokens += ids.numel()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        done = step + 1
        rec: list[Any] = [done, loss_val, None]
        if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
            ho = held_out()
            rec[2] = ho
            if ho is not None:
                bar.write(f"step {done}: train loss {loss_val:.4f}, held-out loss {ho:.4f} (ppl {_ppl(ho):.2f})")
        history.append(rec)
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            checkpoint(done)
    bar.close()
    checkpoint(args.steps)
    print(f"saved {adapter_path} (step {args.steps}); resume with --resume --out {out} --steps N")
    return 0


# ---------------------------------------------------------------- eval


def _adapter_file(arg: str) -> tuple[Path, ll.LoraLiteConfig]:
    """--adapter: a file, or a `train --out` directory holding one; validated before any model load."""
    adapter = Path(arg)
    if adapter.is_dir():
        adapter = adapter / ADAPTER_FILE
    _need(adapter.is_file(), f"--adapter {arg!r}: no adapter file there")
    return adapter, ll.read_adapter(adapter)[0]


def cmd_eval(args: argparse.Namespace) -> int:
    _need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    _need(args.max_batches >= 0, f"--max-batches must be >= 0 (0 = all), got {args.max_batches}")
    adapter, _ = _adapter_file(args.adapter)
    texts = read_texts(args.data, args.text_field)
    device = _device(args.device)
    model, tok = load_causal_lm(args.model, device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    _need(max_pos is None or args.seq_len <= max_pos, f"--seq-len {args.seq_len} > the model's {max_pos} positions")
    blocks = make_blocks(texts, tok, args.seq_len)
    ll.load(model, adapter)
    with ll.disabled(model):
        base = lm_eval(model, blocks, args.batch_size, device, args.max_batches)
    adapted = lm_eval(model, blocks, args.batch_size, device, args.max_batches)
    n = min(len(blocks), args.max_batches * args.batch_size) if args.max_batches else len(blocks)
    print(f"{n} blocks of {args.seq_len} tokens from {args.data}")
    print(f"{'':8} {'loss':>8} {'ppl':>10}")
    print(f"{'base':8} {base:8.4f} {_ppl(base):10.2f}")
    print(f"{'adapted':8} {adapted:8.4f} {_ppl(adapted):10.2f}")
    return 0


# ---------------------------------------------------------------- merge


def cmd_merge(args: argparse.Namespace) -> int:
    adapter, cfg = _adapter_file(args.adapter)
    out = Path(args.out)
    _need(not out.exists() or not any(out.iterdir()), f"--out {args.out!r} is not empty; give a new directory")
    model, tok = load_causal_lm(args.model, _device(args.device))
    ll.load(model, adapter)
    names = ll.merge(model)  # plain dense weights, no hooks: loads anywhere without lora-lite
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"merged the {cfg.variant} adapter into {len(names)} layers; saved the plain model to {out}")
    return 0


# ---------------------------------------------------------------- main

_USER_ERRORS = (ll.ConfigError, ll.TargetError, ll.AdapterError, OSError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-lite` and `python -m lora_lite`; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge}
    if args.command == "demo":
        from .demo import cmd_demo

        commands["demo"] = cmd_demo
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("lora-lite: interrupted", file=sys.stderr)
        return 130
    except ImportError as err:
        if args.debug:
            raise
        print(f"lora-lite: error: {err} (the CLI needs: pip install 'lora-lite[demo]')", file=sys.stderr)
        return 1
    except _USER_ERRORS as err:
        if args.debug:
            raise
        lines = str(err).strip().splitlines() or [type(err).__name__]
        more = f" [{len(lines) - 1} more lines: rerun with --debug]" if len(lines) > 1 else ""
        print(f"lora-lite: error: {lines[0]}{more}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
