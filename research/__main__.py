"""``python -m research``: the research subcommands (research/README.md)."""

import sys

from research.cli import main

sys.exit(main())
