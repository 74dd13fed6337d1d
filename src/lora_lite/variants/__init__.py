"""One file per variant; importing this package registers them all."""

from . import lora  # noqa: F401
