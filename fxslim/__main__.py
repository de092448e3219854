"""`python -m fxslim ...`: the same command line as the `fxslim` console script (see fxslim/cli.py)."""

import sys

from fxslim.cli import main

sys.exit(main())
