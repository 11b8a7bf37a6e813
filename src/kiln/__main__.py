"""`python -m kiln <stage> [overrides]`, the same as the `kiln` console script."""

import sys

from kiln.cli import main

sys.exit(main())
