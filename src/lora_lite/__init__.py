"""lora-lite: LoRA-family adapters as forward hooks, one short file per variant."""

from . import variants  # noqa: F401  (registers the built-in variants)
from .adapter import (
    AdapterError,
    LoadError,
    adapter_state_dict,
    attach,
    detach,
    is_attached,
    load,
    read_adapter,
    save,
    targets,
)
from .config import ConfigError, LoraLiteConfig
from .distributed import fsdp_ignored_params
from .merge import merge, merged_state_dict
from .peft_io import export_peft, import_peft
from .steer import disabled, scaled
from .summary import summary
from .target import TargetError, find_targets
from .variant import REGISTRY, ParamSpec, Variant, register

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "AdapterError",
    "ConfigError",
    "LoadError",
    "LoraLiteConfig",
    "ParamSpec",
    "TargetError",
    "Variant",
    "adapter_state_dict",
    "attach",
    "detach",
    "disabled",
    "export_peft",
    "find_targets",
    "fsdp_ignored_params",
    "import_peft",
    "is_attached",
    "load",
    "merge",
    "merged_state_dict",
    "read_adapter",
    "register",
    "save",
    "scaled",
    "summary",
    "targets",
]
