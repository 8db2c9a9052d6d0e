"""`python -m graphprune` runs the command line."""

import sys

from graphprune.tools.cli import main

sys.exit(main())
