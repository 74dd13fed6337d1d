"""One file per variant; importing this package registers them all."""

from . import antipasto, delora, dora, eva, hra, ia3, loftq, lora, olora, pissa  # noqa: F401
