"""`python -m graphprune` runs the command line."""

import sys

from graphprune.cli import main

sys.exit(main())
