"""One file per variant; importing this package registers them all."""

from . import adalora, antipasto, delora, dora, eva, hra, ia3, lora, lora_conv, lora_embedding, pissa, road  # noqa: F401
