"""``python -m raytorch ...``: the ``raytorch`` command (what a submitted job runs on a cluster)."""

from raytorch.jobs.cli import run

run()
