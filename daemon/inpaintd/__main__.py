"""`python -m inpaintd` is the same as the `inpaintd` command."""

import sys

from .cli import main

sys.exit(main())
