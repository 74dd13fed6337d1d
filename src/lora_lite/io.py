"""save -> read_adapter -> load: one adapter per .safetensors file.

    tensors   "<layer path>.<tensor>" for every lora_* parameter and persistent buffer (`ll.adapter_state_dict`)
    metadata  format "lora-lite", format_version "2", name (the adapter's), config (JSON),
              fingerprints (JSON: layer -> sha256 of the base weight, for variants that depend on it)

Version-1 files (no name) still load, as adapter "default". `load` and `import_peft` share one tail,
`attach_with_tensors`: attach without calibration data, copy the tensors in, and undo the attach if
the copy fails. No pickle anywhere; `save` writes a temporary file and renames it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import guards, hotswap, original
from .config import LoraLiteConfig
from .errors import AdapterError, LoadError
from .named import adapter_state_dict, adapters, model_state, resolve, targets
from .plan import expected, plan
from .runtime import attach, detach
from .target import all_finite, fingerprint, unwrap

FORMAT = "lora-lite"
FORMAT_VERSION = "2"
READS = ("1", "2")  # format versions this lora-lite reads


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter `name` (may be left out when one is attached) to one .safetensors file, atomically.

    FSDP2 (adapter tensors are DTensor shards): EVERY rank must call save; the shards are all-gathered
    (`full_tensor()`), rank 0 writes, and save returns on each rank once the file is complete.
    Plain tensors (single process, DDP): whoever calls save writes; under DDP call it on rank 0 only.
    """
    from safetensors.torch import save_file

    name = resolve(model, name, "ll.save")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"ll.save: {str(path)!r} is a directory; pass a file path, e.g. {str(path / 'adapter.safetensors')!r}"
        )
    sd = adapter_state_dict(model, name)
    sharded = any(hasattr(v, "full_tensor") for v in sd.values())  # FSDP2 DTensor
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}  # collective
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    layers = targets(model, name)
    fps = {n: a._lora_lite.fingerprint for n, a in layers.items() if a._lora_lite.fingerprint}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": _saved_config(model, name).to_json(),
        "fingerprints": json.dumps(fps, sort_keys=True),
    }
    try:
        if not sharded or torch.distributed.get_rank() == 0:
            write_atomic(tensors, meta, path, save_file)
    finally:
        if sharded:
            torch.distributed.barrier()  # the other ranks return only once rank 0's file is complete
    return path


def _saved_config(model: nn.Module, name: str) -> LoraLiteConfig:
    """The config `save` writes: cfg.dtype replaced by the adapter tensors' actual dtype.

    They differ after `model.half()` / `model.to(dtype)`; the file then holds the tensors as they
    are (no rounding) and a config that says so, so `load` recreates exactly what was saved.
    """
    cfg = model_state(model).adapters[name].cfg
    dtypes = {guards.adapter_dtype(a, a.weight) for a in targets(model, name).values()}
    if len(dtypes) > 1:
        raise AdapterError(
            f"the adapter tensors have mixed dtypes {sorted(map(str, dtypes))} across layers; "
            "cast the whole model to one dtype (model.to(dtype)) before ll.save"
        )
    dtype = dtypes.pop() if dtypes else cfg.dtype
    return cfg if dtype == cfg.dtype else dataclasses.replace(cfg, dtype=dtype)


def write_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path, save_file) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp/safetensors make 0600; give the adapter ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_adapter(path: str | os.PathLike) -> tuple[LoraLiteConfig, dict[str, str], dict[str, torch.Tensor]]:
    """Parse and validate a lora-lite file: (config, fingerprints, tensors). Raises LoadError."""
    return _read(path)[:3]


def _read(path: str | os.PathLike) -> tuple[LoraLiteConfig, dict[str, str], dict[str, torch.Tensor], str]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{str(path)!r} is a directory; pass the adapter's .safetensors file itself")
    if not path.is_file():
        raise LoadError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise LoadError(
                    f"{str(path)!r} is a safetensors file but not a lora-lite adapter (no format={FORMAT!r} "
                    "in its metadata): a file from another library (a peft adapter_model.safetensors, a plain "
                    "state dict)? ll.load reads only files written by ll.save; ll.import_peft converts a peft adapter."
                )
            if meta.get("format_version") not in READS:
                raise LoadError(
                    f"{str(path)!r} has lora-lite format version {meta.get('format_version')!r}; "
                    f"this lora-lite reads versions {', '.join(READS)} (a newer file needs a newer lora-lite)."
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        cfg = LoraLiteConfig.from_json(meta["config"])
        fps = json.loads(meta.get("fingerprints", "{}"))
        if not isinstance(fps, dict) or not all(isinstance(v, str) for v in fps.values()):
            raise TypeError(f"fingerprints must map layer names to strings, got {meta.get('fingerprints')!r}")
        name = meta.get("name", "default")
        if not guards.NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r} is not [A-Za-z0-9_]+")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise LoadError(f"{str(path)!r}: the adapter config in its metadata is invalid: {e!r}") from None
    return cfg, fps, tensors, name


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    allow_nonfinite: bool = False,
    keep_original: bool = True,
    replace: bool = False,
) -> list[str]:
    """Attach the adapter saved in `path` as adapter `name` (default: the name in the file) and load its
    tensors strictly. Every check runs before the model is touched: on any error the model is unchanged.
    No calibration data is needed (data-initialised variants load their tensors from the file).
    keep_original: as in `attach`. replace=True: hotswap into the attached adapter `name` instead, in place
    (hotswap.py: no new hooks, a compiled model keeps its graph).
    """
    guards.check_flag(keep_original, "keep_original")
    guards.check_flag(replace, "replace")
    cfg, fps, tensors, stored = _read(path)
    model, name = unwrap(model), stored if name is None else name
    if replace:
        return hotswap.swap_in(model, path, cfg, fps, tensors, name, allow_nonfinite)
    guards.check_name(name, adapters(model))
    try:
        targets_ = plan(model, cfg, name)
    except (ValueError, AdapterError) as e:
        raise LoadError(f"adapter {str(path)!r} does not fit this model: {e}") from None
    for t in targets_:
        if t.variant.rewrites_weight and t.name not in fps:
            raise LoadError(
                f"adapter {str(path)!r} has no base-weight fingerprint for {t.name}, which variant "
                f"{t.variant.name!r} needs to re-derive its residual weight; the file is damaged or was not "
                "written by ll.save. Save the adapter again from the trained model."
            )
        if t.name in fps and fingerprint(t.layer) != fps[t.name]:
            raise LoadError(
                f"{t.name}: base weight fingerprint {fingerprint(t.layer)} differs from the one the adapter was "
                f"made on ({fps[t.name]}). Variant {t.variant.name!r} depends on the exact base weight: "
                "load it onto the same base model it was trained on."
            )
    want = expected(targets_, cfg, model, name)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise LoadError(f"adapter {str(path)!r} is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in want]
    if unexpected:
        raise LoadError(
            f"adapter {str(path)!r} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all): "
            "it was made for a different model or targeting"
        )
    for k, (shape, dtype) in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise LoadError(f"{k}: shape {tuple(t.shape)} in the file, this model needs {shape}")
        if t.dtype != dtype:
            raise LoadError(f"{k}: dtype {t.dtype} in the file, the adapter config says {dtype}")
        if not allow_nonfinite and not all_finite(t):
            raise LoadError(f"{k}: contains NaN or inf values; pass allow_nonfinite=True to load it anyway")
    return attach_with_tensors(model, cfg, name, tensors, keep_original)


def attach_with_tensors(
    model: nn.Module, cfg: LoraLiteConfig, name: str, tensors: dict[str, torch.Tensor], keep_original: bool
) -> list[str]:
    """Attach `cfg` as `name` without group init, then copy in `tensors` ("<layer>.<tensor>", already checked
    against the plan). The shared tail of `load` and `import_peft`; a failure detaches again. Tensors left
    out (an import_peft of buffers the variant re-derives, e.g. vera's projections) keep what attach gave
    them, group init included."""
    complete = set(expected(plan(model, cfg, name), cfg)) <= set(tensors)
    names = attach(model, cfg, name=name, _skip_group_init=complete)
    try:
        with torch.no_grad():
            for k, v in adapter_state_dict(model, name).items():
                if k in tensors:
                    v.copy_(tensors[k])
    except BaseException:
        detach(model, name)
        raise
    if not keep_original:
        for a in targets(model, name).values():
            original.drop(a)
    return names
