"""One file per variant; importing this package registers them all."""

from . import lora  # noqa: F401
from . import ia3  # noqa: F401
from . import eva  # noqa: F401
from . import dora  # noqa: F401
from . import delora  # noqa: F401
from . import hra  # noqa: F401
from . import pissa  # noqa: F401
from . import antipasto  # noqa: F401
