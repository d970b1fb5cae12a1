"""``python -m slimserve``: the same command as ``slimserve``."""

import sys

from slimserve.cli import main

sys.exit(main())
