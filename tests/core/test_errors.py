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
