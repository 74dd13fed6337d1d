"""One file per variant; importing this package registers them all."""

from . import antipasto, delora, dora, eva, hra, ia3, loha, lokr, lora, pissa, vera  # noqa: F401
