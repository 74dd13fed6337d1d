"""lora-lite: LoRA-family adapters as forward hooks, one short file per variant."""

from . import variants  # noqa: F401  (registers the built-in variants)
from .combine import combine
from .config import REGISTRY, ConfigError, LoraLiteConfig
from .distributed import fsdp_ignored_params
from .errors import AdapterError, LoadError
from .interop.peft import export_peft, import_peft
from .io import load, read_adapter, save
from .merge import merge, merged_state_dict
from .mixed import per_sample
from .named import active, adapter_state_dict, adapters, is_attached, set_active, targets
from .optim import param_groups
from .reference import reference_model
from .runtime import attach, detach
from .schedule import on_step, regularizer
from .steer import disabled, scaled
from .summary import summary
from .target import TargetError, find_targets
from .variant import ParamSpec, Variant, register

__version__ = "0.2.0"

__all__ = [
    "REGISTRY",
    "AdapterError",
    "ConfigError",
    "LoadError",
    "LoraLiteConfig",
    "ParamSpec",
    "TargetError",
    "Variant",
    "active",
    "adapter_state_dict",
    "adapters",
    "attach",
    "combine",
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
    "per_sample",
    "on_step",
    "param_groups",
    "read_adapter",
    "reference_model",
    "register",
    "regularizer",
    "save",
    "scaled",
    "set_active",
    "summary",
    "targets",
]
