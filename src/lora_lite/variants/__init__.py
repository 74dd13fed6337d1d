"""One file per variant; importing this package registers them all."""

from . import (  # noqa: F401
    adalora,
    antipasto,
    boft,
    delora,
    dora,
    eva,
    hra,
    ia3,
    loftq,
    loha,
    lokr,
    lora,
    lora_conv,
    lora_embedding,
    lycoris_conv,
    oft,
    olora,
    pissa,
    road,
    vera,
)
