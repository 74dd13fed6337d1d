"""The errors a user can cause at run time. (ConfigError lives with the config, TargetError with targeting.)"""


class AdapterError(RuntimeError):
    """Misuse of attach/detach/save/... (a name taken or unknown, nothing attached, a refused combination)."""


class LoadError(AdapterError):
    """An adapter file cannot be loaded onto this model; nothing was changed."""
