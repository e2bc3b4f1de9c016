"""Entry point for `python -m explorer_core`."""

import sys

from .cli import main

sys.exit(main())
