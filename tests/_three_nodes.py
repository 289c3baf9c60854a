"""Run by tests/cluster/test_three_nodes.py in a process of its own: a Ray cluster on this machine
(a CPU-less head and three 1-CPU worker nodes, each its own raylet), owned and torn down here
(never `ray stop`). Nodes are removed mid-run, the way a machine is lost. Prints one JSON line
per check.

1. ``local storage``: a local storage_path is refused on several nodes.
2. ``node lost``: 2 workers, one per node; a worker's node is removed after a checkpoint; the group
   restarts on the nodes left and finishes with the uninterrupted run's rows.
3. ``node lost for good``: the same on the two nodes left, so the group cannot be placed again; it
   fails in bounded time, naming what is missing.
4. ``inference``: a node is added back; a predict spreads its actors over the two nodes, one is
   removed mid-run, and every row is written exactly once.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STEP_S = 0.1  # seconds per training step: a run lasts long enough to lose a node mid-way


def _say(check: str, **fields: Any) -> None:
    print(json.dumps({"check": check, **fields}, default=str), flush=True)


def _nodes_of(class_part: str) -> list[str]:
    """Node IDs of the alive actors whose class name contains ``class_part``."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return sorted({a.node_id for a in actors if class_part in a.class_name})


def _remove_when(cluster: Any, ready: Any, class_part: str, out: dict[str, Any]) -> None:
    """A thread: once ``ready()`` holds, remove the node of an alive ``class_part`` actor."""

    stop = threading.Event()

    def run() -> None:
        while not ready():
            if stop.wait(0.05):  # the run ended before the moment came
                return
        nodes = _nodes_of(class_part)
        for node in cluster.list_all_nodes():
            if not node.head and node.node_id in nodes:
                out["node"] = node.node_id
                out["at"] = time.monotonic()
                cluster.remove_node(node, allow_graceful=False)
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"], out["stop"] = thread, stop


def _stop(out: dict[str, Any]) -> None:
    out["stop"].set()
    out["thread"].join()


def _checkpointed(run_dir: Path) -> Any:
    """Ready once Ray Train holds two checkpoints of the run, iterations 0 and 10 (plus a second:
    it registers a reported checkpoint asynchronously)."""
    return lambda: len(list(run_dir.glob("checkpoint_*/meta.json"))) >= 2 and time.sleep(1) is None


def main() -> None:
    from ray.cluster_utils import Cluster

    from raytorch.cluster.session import ensure_ray
    from raytorch.core.errors import ResourceError, TrainingError
    from tests._digits import digits_rows, mlp, small_trainer
    from tests._flaky import flaky_model, ship_by_value

    # A removed node is found dead in about 5 s (health checks every second, 5 missed), not 15 s
    # (3 s x 5, Ray's default): the same events, sooner, with a margin for a loaded machine.
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health}
    )
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
        cluster.wait_for_nodes()
        ensure_ray(cluster.address)
        ship_by_value()
        tmp = Path(tempfile.mkdtemp(prefix="raytorch-three-nodes-"))
        train, valid = digits_rows(n_train=320)
        compute = {
            "num_workers": 2,
            "num_cpus": 1,
            "resources": {"trainer_slot": 1},
            "placement_strategy": "STRICT_SPREAD",
        }
        # 1. A local storage path is refused before any worker starts.
        try:
            small_trainer(tmp, "local", compute_kwargs=compute).fit(mlp(), train, valid)
            _say("local storage", refused=False)
        except ResourceError as exc:
            _say("local storage", refused=True, error=str(exc))

        # 2. A worker's node is lost; the group restarts on the two nodes left.
        over = {
            "storage_shared": True,
            "max_failures": 1,
            "compute_kwargs": compute,
            "loader_kwargs": {"batch_size": 16},  # 160 rows per worker: 10 steps an epoch
        }
        removed: dict[str, Any] = {}
        _remove_when(cluster, _checkpointed(tmp / "runs" / "lost"), "RayTrainWorker", removed)
        result = small_trainer(tmp, "lost", run_name="lost", **over).fit(
            flaky_model(step_s=STEP_S), train, valid
        )
        _stop(removed)
        _say(
            "node lost",
            status=str(result.status),
            removed=removed.get("node"),
            history=result.history["iteration"],
            restarts=result.restarts,
            workers=result.workers,
        )

        # 3. The same on the two nodes left: the group cannot be placed again. Each placement
        # wait (two, with max_failures=1) outlasts the GCS's detection of a removed node (about
        # 5 s here): the failure message counts the nodes alive then.
        removed = {}
        _remove_when(cluster, _checkpointed(tmp / "runs" / "gone"), "RayTrainWorker", removed)
        try:
            small_trainer(tmp, "gone", run_name="gone", worker_start_timeout_s=8, **over).fit(
                flaky_model(step_s=STEP_S), train, valid
            )
            _stop(removed)
            _say("node lost for good", failed=False, removed=removed.get("node"))
        except TrainingError as exc:
            ended = time.monotonic()
            _stop(removed)
            summary = json.loads((tmp / "runs" / "gone" / "result.json").read_text())
            _say(
                "node lost for good",
                failed=True,
                error=str(exc),
                seconds_after_loss=round(ended - removed["at"], 1),
                status=summary["status"],
            )

        # 4. Inference over two nodes, one lost mid-run.
        cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
        cluster.wait_for_nodes()
        _say("inference", **_inference(cluster, tmp))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def _inference(cluster: Any, tmp: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raytorch.cluster.inference import predict
    from raytorch.engine.model import TorchModel
    from tests._flaky import SlowNet

    rows = 4000
    data = tmp / "features"
    data.mkdir()
    x = torch.rand(rows, 64, generator=torch.Generator().manual_seed(0))
    table = pa.table({"x": pa.array(x.tolist(), pa.list_(pa.float32(), 64))})
    pq.write_table(table, data / "part-0.parquet", row_group_size=100)
    # Each 100-row unit (one batch) lasts about 0.2 s.
    model = TorchModel("slow", object=SlowNet(0.2), preferred_devices=("cpu",))
    done = {"units": 0}
    removed: dict[str, Any] = {}

    def progress(update: Any) -> None:
        done["units"] = update.units_done

    _remove_when(cluster, lambda: done["units"] >= 6, "_UnitActor", removed)
    summary = predict(
        model,
        str(data),
        str(tmp / "preds"),
        key="x",
        batch_size=100,
        unit_rows=100,
        concurrency=2,
        # Half a CPU each (the other half reads), and a node's one slot: one actor per node.
        compute_kwargs={"num_cpus": 0.5, "resources": {"trainer_slot": 1}},
        progress=progress,
        progress_interval_s=60,
    )
    _stop(removed)
    ids = pq.read_table(tmp / "preds", columns=["_id"]).column("_id").to_pylist()
    manifest = json.loads((tmp / "preds" / "_manifest.json").read_text())
    return {
        "removed": removed.get("node"),
        "rows_read": summary.rows_read,
        "rows_written": summary.rows_written,
        "ids_sorted_equal": sorted(ids) == list(range(rows)),
        "ids_unique": len(ids) == len(set(ids)),
        "rows_by_node": summary.rows_by_node,
        "units": len(manifest["units"]),
    }


if __name__ == "__main__":
    sys.exit(main())
