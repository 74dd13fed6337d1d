"""One file per variant; importing this package registers them all."""

from . import (  # noqa: F401
    adalora,
    antipasto,
    delora,
    dora,
    eva,
    hra,
    ia3,
    loftq,
    lora,
    lora_conv,
    lora_embedding,
    olora,
    pissa,
    road,
)
