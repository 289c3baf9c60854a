"""Which unit of work goes next, and when lost work must stop a run (no Ray, no I/O).

The actor pool of ``raytorch.predict`` hands units to actors from this queue. An actor lost with its
node gives its units back; they go to the front, so they finish soon, and each may be lost a few
times before the run fails, naming it. Actors lost again and again with nothing committed in
between are a crash loop (a model that kills its process, an actor that cannot start), not bad
luck: the run fails instead of restarting actors for ever.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from raytorch.core.errors import PoolError

# A unit given back this many times (its actor lost each time) fails the run.
MAX_ATTEMPTS = 3


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


U = TypeVar("U", bound=_HasId)


class WorkQueue(Generic[U]):
    """Units not yet committed: waiting ones in order, and the ones out with an actor.

    Args:
        units: the units to run, in the order to run them.
        pool_size: actors in the pool; more losses than ``2 * pool_size + 1`` with no unit
            committed in between fail the run.
    """

    def __init__(self, units: Iterable[U], pool_size: int) -> None:
        self._waiting: deque[U] = deque(units)
        self._out: dict[str, U] = {}
        self._lost: Counter[str] = Counter()
        self._losses = 0
        self._max_losses = 2 * max(1, pool_size) + 1

    def __bool__(self) -> bool:
        """Whether any unit is still to run or out with an actor."""
        return bool(self._waiting or self._out)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def take(self) -> U | None:
        """The next unit to hand out, or None when none waits."""
        if not self._waiting:
            return None
        unit = self._waiting.popleft()
        self._out[unit.id] = unit
        return unit

    def done(self, unit: U) -> None:
        """``unit`` committed."""
        del self._out[unit.id]
        self._losses = 0

    def lost(self, units: Iterable[U], cause: str) -> None:
        """An actor was lost with ``units`` (possibly none); they go back to the front.

        Raises:
            PoolError: a unit was lost ``MAX_ATTEMPTS`` times, or actors keep being lost with
                nothing committed in between.
        """
        self._losses += 1
        back = list(units)
        for unit in back:
            del self._out[unit.id]
            self._lost[unit.id] += 1
            if self._lost[unit.id] >= MAX_ATTEMPTS:
                raise PoolError(
                    f"unit {unit.id} was running on an actor that was lost {MAX_ATTEMPTS} times "
                    f"(last: {cause}); if the model or this unit's rows kill the process (out of "
                    "memory, a crash in native code), lower batch_size or give each actor more "
                    "memory with compute_kwargs={'memory': ...}"
                )
        if self._losses > self._max_losses:
            raise PoolError(
                f"{self._losses} inference actors were lost in a row with no unit committed "
                f"(last: {cause}); the actors cannot run here: check the nodes' memory and the "
                "Ray logs of the lost workers"
            )
        self._waiting.extendleft(reversed(back))
