"""``python -m igpt`` is the ``igpt`` command."""

import sys

from igpt.cli import main

sys.exit(main())
