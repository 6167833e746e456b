"""`python -m cluster <stage> ...`: the whole `selfsup` CLI, for job entry points without the console script."""

import sys

from cluster.cli import main

sys.exit(main())
