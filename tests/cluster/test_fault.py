"""Fault tolerance on the shared local Ray: a training worker killed with SIGKILL mid-run is
replaced and training continues from the last checkpoint, up to ``max_failures``.

Two Ray runs: one worker killed and retried by the driver (a few seconds), and one worker killed
with no restarts left (fails fast). A marker file makes each kill fire only once. A Ray Train
group whose rank 1 is killed restarts from its checkpoint to the uninterrupted run's weights:
tests/jobs/test_object_storage.py (DDP, checkpoints on S3) and tests/cluster/test_fsdp.py (FSDP,
sharded checkpoints).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from raytorch.cluster.trainer import TorchTrainer
from raytorch.core.errors import TrainingError
from tests._digits import digits_rows, small_trainer
from tests._flaky import flaky_model, ship_by_value

EXPECTED = [0, 10, 20, 30, 40, 50, 60]  # validation iterations of an uninterrupted run


@pytest.fixture(scope="module", autouse=True)
def _ship():
    ship_by_value()


@pytest.fixture(scope="module")
def digits():
    return digits_rows(n_train=320)


def _trainer(tmp_path: Path, **over) -> TorchTrainer:
    return small_trainer(tmp_path, "fault", **over)


def _assert_history_whole(history: dict[str, list[float]]) -> None:
    """Nothing lost or duplicated: the same rows, in order, as an uninterrupted run."""
    assert history["iteration"] == EXPECTED
    assert all(len(values) == len(EXPECTED) for values in history.values())


@pytest.mark.timeout(180)
def test_killed_single_worker_is_rerun_from_its_last_checkpoint(
    ray_local, digits, tmp_path, caplog
):
    train, valid = digits
    marker = tmp_path / "killed"
    trainer = _trainer(tmp_path, max_failures=1)
    with caplog.at_level(logging.INFO, logger="raytorch"):
        result = trainer.fit(flaky_model(str(marker), fail_at=25, how="kill"), train, valid)

    assert marker.exists()  # the kill did happen
    messages = [r.getMessage() for r in caplog.records]
    assert any("the training worker died (WorkerCrashedError)" in m for m in messages)
    assert any("resumed from a checkpoint at iteration 20" in m for m in messages)
    _assert_history_whole(result.history)
    assert result.stopped_iteration == 60 and result.stop_reason.value == "max_iterations"
    assert json.loads((result.run_dir / "result.json").read_text())["status"] == "completed"
    # The restart is part of the result, not only a log line.
    assert [r["iteration"] for r in result.restarts] == [20]
    assert "WorkerCrashedError" in result.restarts[0]["reason"]
    saved = json.loads((result.run_dir / "result.json").read_text())["restarts"]
    assert saved == result.restarts


@pytest.mark.timeout(120)
def test_killed_worker_without_restarts_fails_and_marks_the_run_failed(ray_local, digits, tmp_path):
    train, valid = digits
    trainer = _trainer(tmp_path, max_failures=0, run_name="no-restarts")
    with pytest.raises(TrainingError, match="max_failures=0 restarts are used up"):
        trainer.fit(flaky_model(str(tmp_path / "killed"), fail_at=5, how="kill"), train, valid)
    run_dir = tmp_path / "runs" / "no-restarts"
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["status"] == "failed" and "WorkerCrashedError" in summary["error"]
    assert not (run_dir / "checkpoints" / "last").exists()


@pytest.mark.timeout(60)
def test_a_worker_no_alive_node_can_run_fails_instead_of_waiting_forever(ray_local):
    """A 1-worker run resubmitted after its node was lost, when no node left can hold it."""
    import ray

    from raytorch.cluster.launcher import _await_task

    ref = ray.remote(lambda: 1).options(resources={"lost_node_slot": 1}).remote()
    with pytest.raises(TrainingError, match=r"cannot run: the worker asks for lost_node_slot=1"):
        _await_task(ref, {"resources": {"lost_node_slot": 1.0}}, poll_s=0.2)
    assert ray.get(ray.remote(lambda: 2).remote()) == 2  # Ray goes on serving


@pytest.mark.timeout(60)
def test_with_an_autoscaler_a_pending_worker_is_left_to_wait(ray_local, monkeypatch):
    """RAYTORCH_ALLOW_PENDING=1: a node may still come, so the wait is not cut short."""
    import threading

    import ray

    from raytorch.cluster.launcher import _await_task

    monkeypatch.setenv("RAYTORCH_ALLOW_PENDING", "1")
    ref = ray.remote(lambda: 1).options(resources={"coming_node_slot": 1}).remote()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            _await_task(ref, {"resources": {"coming_node_slot": 1.0}}, poll_s=0.2)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiter.join(timeout=1.5)  # several polls
    assert waiter.is_alive() and not outcome  # still waiting, not failed
    ray.cancel(ref, force=True)
    waiter.join(timeout=20)
    assert outcome and not isinstance(outcome[0], TrainingError)
