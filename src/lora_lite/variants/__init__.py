"""One file per variant; importing this package registers them all."""

from . import antipasto, boft, delora, dora, eva, hra, ia3, lora, oft, pissa  # noqa: F401
