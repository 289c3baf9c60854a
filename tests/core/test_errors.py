"""Finding raytorch's own error inside Ray's wrapping of a worker's exception."""

from __future__ import annotations

from raytorch.core.errors import ConfigError, DataError, TrainingError, find_raytorch_error


def test_a_ray_task_error_gives_back_the_original_with_its_own_message():
    from ray.exceptions import RayTaskError

    original = DataError("data: reading row group(s) [1] of a.parquet failed")
    wrapped = RayTaskError("run_unit", "Traceback (most recent call last): ...", original)
    copy = wrapped.as_instanceof_cause()  # what ray.get raises on the driver
    assert isinstance(copy, DataError) and copy is not original
    assert find_raytorch_error(copy) is original
    assert find_raytorch_error(wrapped) is original


def test_a_raytorch_error_that_wraps_another_is_kept():
    inner = ConfigError("trainer.lr must be > 0")
    outer = TrainingError("rank 0, setup: trainer.lr must be > 0", cause=inner)
    assert find_raytorch_error(outer) is outer
    assert find_raytorch_error(RuntimeError("plain")) is None


def _crossed(error: BaseException) -> BaseException:
    """``error`` after crossing a process (what Ray does to a task's exception)."""
    import pickle

    return pickle.loads(pickle.dumps(error))


def test_an_error_crosses_a_process_with_its_class_message_and_cause():
    from raytorch.core.errors import JobFileError, same_kind

    cause = ValueError("torch's own words")
    for error in (
        TrainingError("rank 1 failed at iteration 3", cause),
        same_kind(DataError("bad row 7"), "rank 0 of 2 failed at set-up: bad row 7"),
        JobFileError("bad.yaml", ["trainer.lr: unknown key"]),
    ):
        if not isinstance(error, JobFileError) and error.__cause__ is None:
            error.__cause__ = cause
        copy = _crossed(error)
        assert type(copy) is type(error) and str(copy) == str(error)
        if error.__cause__ is not None:
            assert type(copy.__cause__) is type(error.__cause__)
            assert str(copy.__cause__) == str(error.__cause__)
    copy = _crossed(JobFileError("bad.yaml", ["a", "b"]))
    assert copy.source == "bad.yaml" and copy.problems == ["a", "b"]
    assert _crossed(TrainingError("x", cause)).cause is not None  # the attribute too


def test_a_cause_that_cannot_cross_is_kept_as_its_text():
    import threading

    class Unpicklable(Exception):
        def __init__(self) -> None:
            super().__init__("holds a lock")
            self.lock = threading.Lock()

    error = TrainingError("rank 0 failed", Unpicklable())
    copy = _crossed(error)
    assert isinstance(copy, TrainingError) and isinstance(copy.__cause__, RuntimeError)
    assert "Unpicklable: holds a lock" in str(copy.__cause__)
