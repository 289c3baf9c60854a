"""Run by tests/cluster/test_three_nodes.py in a process of its own: a Ray cluster of three nodes
on this machine (a CPU-less head and two 1-CPU worker nodes, each its own raylet), owned and torn
down here (never `ray stop`). Prints one JSON line per check."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    from ray.cluster_utils import Cluster

    from raytorch.cluster.session import ensure_ray
    from raytorch.core.errors import ResourceError
    from tests._digits import digits_rows, mlp, small_trainer

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
        cluster.wait_for_nodes()
        ensure_ray(cluster.address)
        tmp = Path(tempfile.mkdtemp(prefix="raytorch-three-nodes-"))
        train, valid = digits_rows(n_train=320)
        compute = {
            "num_workers": 2,
            "num_cpus": 1,
            "resources": {"trainer_slot": 1},
            "placement_strategy": "STRICT_SPREAD",
        }
        # A local storage path is refused before any worker starts.
        try:
            small_trainer(tmp, "local", compute_kwargs=compute).fit(mlp(), train, valid)
            print(json.dumps({"check": "local storage", "refused": False}), flush=True)
        except ResourceError as exc:
            print(json.dumps({"check": "local storage", "refused": True, "error": str(exc)}))
        trainer = small_trainer(
            tmp, "spread", storage_shared=True, max_iterations=20, compute_kwargs=compute
        )
        result = trainer.fit(mlp(), train, valid)
        print(
            json.dumps(
                {"check": "spread", "status": str(result.status), "workers": result.workers}
            ),
            flush=True,
        )
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
