"""Run by tests/jobs/test_object_storage.py in a process of its own (its local Ray must see the
AWS variables of the S3 server): the same 2-worker fit twice with the run directory on S3, once
uninterrupted and once with rank 1 killed mid-run. Prints one JSON line: both histories, whether
the trained weights are equal, and the restarts."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    import torch

    from raytorch.cluster.session import ensure_ray
    from tests._digits import digits_rows, small_trainer
    from tests._flaky import flaky_model, ship_by_value

    ensure_ray(num_cpus=2)
    ship_by_value()
    train, valid = digits_rows(n_train=320)
    tmp = Path(tempfile.mkdtemp(prefix="raytorch-s3-fit-"))
    over = {
        "storage_path": "s3://bkt/fits",
        "max_failures": 1,
        # 0.5 CPU each: Ray Train's controller and the progress actor fit beside the group.
        "compute_kwargs": {"num_workers": 2, "num_cpus": 0.5},
        "loader_kwargs": {"batch_size": 16},  # 160 rows per worker: 10 steps an epoch
    }
    whole = flaky_model()
    first = small_trainer(tmp, "s3fit", run_name="whole", **over).fit(whole, train, valid)
    cut = flaky_model(str(tmp / "killed"), fail_at=25, how="kill", rank=1, kill_after_s=2.0)
    second = small_trainer(tmp, "s3fit", run_name="cut", **over).fit(cut, train, valid)
    a, b = whole.object.state_dict(), cut.object.state_dict()
    print(
        json.dumps(
            {
                "killed": (tmp / "killed").exists(),
                "whole": first.history,
                "cut": second.history,
                "restarts": second.restarts,
                "same_weights": all(torch.equal(a[k], b[k]) for k in a),
                "run_dir": str(second.run_dir),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
