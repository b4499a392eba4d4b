"""`python -m molrmog ...` is the `molrmog` command."""

import sys

from .cli import main

sys.exit(main())
