"""``python -m core ...`` is the command line (see :mod:`core.cli`)."""

import sys

from core.cli import main

sys.exit(main())
