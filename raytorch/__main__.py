"""``python -m raytorch ...``: the ``raytorch`` command (what a submitted job runs on a cluster)."""

import sys

from raytorch.jobs.cli import main

sys.exit(main())
