"""raytorch's own actor pool: each actor loads the model once, then runs whole units.

``predict`` knows every unit of a parquet input or a table before it starts, so handing them out
is a queue, not a pipeline: each actor holds at most ``IN_FLIGHT`` units (one running, the next
ready), and gets another as each commits. Ray Data's actor pool would also import Ray Data in every
actor and start its streaming executor on the driver: about 3 s more start-up per job on 2 cores.

Faults: an actor lost with its node (or killed) gives its units back to the queue, and another
actor runs them (a part is written under a temporary name, renamed, then recorded, so a unit run
twice is written once). A new actor replaces the lost one and is given units only once it is up,
so one that cannot be placed on the nodes left delays nothing. An error raised by the model or the
data is not retried: it is raised at once, and the pool is stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from raytorch.core.units import Unit
from raytorch.core.work_queue import WorkQueue

logger = logging.getLogger("raytorch")

IN_FLIGHT = 2  # units given to an actor at a time: one running, the next ready to start
WAIT_NOTICE_S = 60.0  # a pool with no actor up after this long says what it waits for


@dataclass(eq=False)
class _Actor:
    handle: Any
    up: bool = False
    units: dict[Any, Unit] = field(default_factory=dict)  # call ref -> its unit


class UnitPool:
    """Actors of ``cls`` (a Ray actor class with ``load()`` and ``run_unit(json)``) over units.

    Args:
        cls: the actor class, already ``ray.remote`` with its options.
        args: the arguments of ``cls``.
        size: actors to keep running.
        describe: what each actor asks for, for the message of a pool that cannot start.
    """

    def __init__(self, cls: Any, args: Sequence[Any], size: int, describe: str) -> None:
        self._new: Callable[[], Any] = lambda: cls.remote(*args)
        self.size = size
        self.describe = describe

    def run(self, units: Sequence[Unit]) -> Generator[dict[str, Any], None, None]:
        """Run every unit; yield each one's commit record as it commits (in no fixed order).

        The actors are killed when the run ends, fails or is abandoned.
        """
        import ray
        from ray.exceptions import RayActorError

        queue = WorkQueue(units, self.size)
        actors: list[_Actor] = []
        loading: dict[Any, _Actor] = {}  # load() ref -> its actor
        started = time.monotonic()

        def start() -> None:
            actor = _Actor(self._new())
            actors.append(actor)
            loading[actor.handle.load.remote()] = actor

        def feed(actor: _Actor) -> None:
            while len(actor.units) < IN_FLIGHT:
                unit = queue.take()
                if unit is None:
                    return
                actor.units[actor.handle.run_unit.remote(unit.to_json())] = unit

        def lose(actor: _Actor, exc: BaseException) -> None:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("inference actor lost (%s); its units run again elsewhere", cause)
            actors.remove(actor)
            for ref in [r for r, a in loading.items() if a is actor]:
                del loading[ref]
            ray.kill(actor.handle, no_restart=True)
            queue.lost(actor.units.values(), cause)
            start()

        try:
            for _ in range(min(self.size, max(1, queue.waiting))):
                start()
            while queue:
                refs = [*loading, *(r for a in actors for r in a.units)]
                done, _ = ray.wait(refs, num_returns=1, timeout=WAIT_NOTICE_S)
                if not done:
                    if not any(a.up for a in actors):
                        logger.warning(
                            "no inference actor has started after %.0f s; each asks for %s, "
                            "which the cluster may not have free (other jobs?)",
                            time.monotonic() - started,
                            self.describe,
                        )
                    continue
                ref = done[0]
                actor = loading.pop(ref, None)
                if actor is None:
                    actor = next(a for a in actors if ref in a.units)
                try:
                    value = ray.get(ref)
                except RayActorError as exc:
                    if exc.actor_init_failed:
                        raise
                    lose(actor, exc)
                    continue
                if ref in actor.units:
                    queue.done(actor.units.pop(ref))
                    yield value
                else:
                    actor.up = True
                    logger.info("inference actor up: %s", value)  # the device it chose
                feed(actor)
        finally:
            for actor in actors:
                with contextlib.suppress(Exception):  # already dead, or Ray shut down
                    ray.kill(actor.handle, no_restart=True)
