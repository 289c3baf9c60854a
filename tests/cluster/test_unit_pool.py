"""raytorch's own actor pool for predict: lost actors' units run again, errors stop the run.

Each test starts a few actor processes on the session's Ray (about a second each on 2 cores);
the actor classes are defined inside the tests, so Ray ships them by value.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from raytorch.cluster.unit_pool import UnitPool
from raytorch.core.errors import ConfigError, PoolError
from raytorch.core.units import Unit
from raytorch.core.work_queue import MAX_ATTEMPTS


def _units(n: int) -> list[Unit]:
    return [Unit(f"u{i}", i * 10, 10) for i in range(n)]


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether process ``pid`` has exited within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_lost_actor_s_unit_runs_again_and_every_unit_commits_once(ray_local, tmp_path):
    marker = tmp_path / "die-on-u2"
    marker.touch()

    class Worker:
        def load(self) -> str:
            return "up"

        def run_unit(self, text: str) -> dict:
            unit = json.loads(text)
            if unit["id"] == "u2" and marker.exists():
                marker.unlink()
                os._exit(1)  # the process dies mid-unit, as with a lost node
            time.sleep(0.05)
            return {"unit": unit["id"], "pid": os.getpid()}

    cls = ray_local.remote(Worker).options(num_cpus=0.5, max_restarts=0)
    records = list(UnitPool(cls, (), 2, "num_cpus=0.5").run(_units(8)))
    assert sorted(r["unit"] for r in records) == [f"u{i}" for i in range(8)]
    assert not marker.exists()  # u2's first actor died, and u2 committed all the same
    # The pool's actors are stopped when the run ends (they hold the model).
    assert all(_gone(pid) for pid in {r["pid"] for r in records})


def test_a_unit_that_kills_every_actor_fails_the_run_naming_it(ray_local):
    class Worker:
        def load(self) -> str:
            return "up"

        def run_unit(self, text: str) -> dict:
            os._exit(1)

    cls = ray_local.remote(Worker).options(num_cpus=0.5, max_restarts=0)
    started = time.monotonic()
    with pytest.raises(PoolError, match=rf"unit u0 .*lost {MAX_ATTEMPTS} times"):
        list(UnitPool(cls, (), 1, "num_cpus=0.5").run(_units(3)))
    assert time.monotonic() - started < 60


def test_an_error_while_loading_is_raised_as_itself(ray_local):
    class Worker:
        def load(self) -> str:
            raise ConfigError("model.path='x.pt' is not a saved TorchModel")

        def run_unit(self, text: str) -> dict:
            raise AssertionError("never called")

    cls = ray_local.remote(Worker).options(num_cpus=0.5, max_restarts=0)
    with pytest.raises(ConfigError, match="is not a saved TorchModel"):
        list(UnitPool(cls, (), 1, "num_cpus=0.5").run(_units(2)))
