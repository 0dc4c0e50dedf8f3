"""`python -m archipelago`: the same command line as `archipelago`."""

import sys

from archipelago.cli import main

sys.exit(main())
