"""`python -m qllava ...` (what torchrun launches) is the `qllava` command."""

import sys

from .cli import main

sys.exit(main())
