"""`python -m lora_lite ...` is the `lora-lite` command."""

import sys

from .app.cli import main

sys.exit(main())
