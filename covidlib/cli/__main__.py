"""``python -m covidlib.cli``: the same command as ``covidlib``."""

import sys

from covidlib.cli import main

sys.exit(main())
