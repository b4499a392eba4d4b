"""`python -m molrmog ...` is the `molrmog` command."""

import sys

from molrmog.cli import main

sys.exit(main())
