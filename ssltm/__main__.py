"""``python -m ssltm``: the command line (see :mod:`ssltm.cli`)."""

import sys

from .cli import main

sys.exit(main())
