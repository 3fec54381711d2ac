"""``python -m fedcl ...``: the same as the ``fedcl`` console script (``fedcl report RUN_DIR`` and the rest)."""

import sys

from fedcl.pilot.cli import main

sys.exit(main())
