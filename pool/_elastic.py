"""The pure rules of an elastic pool: when the autoscaler changes the size, what it looks at, and
how old a worker may get.

Nothing here reads a clock or touches a process: :class:`ScaleRule` is a function of plain
numbers (``now``, the oldest queued call's wait, the longest idle time, the current size, the last
changes), so it is tested with numbers; the monitor (``pool._supervisor``) feeds it and applies
its answer. The two observations it feeds it are taken at the monitor's ticks, not on the hot
path: :class:`QueueWatch` (how long the oldest call has waited for a worker) and
:class:`IdleWatch` (how long each worker has been idle). Both are lower bounds, late by at most
one tick, so the autoscaler never acts on a wait or an idleness that did not happen.

The autoscaler's rule (:meth:`ScaleRule.target`), with ``size <= current <= max_size``:

- **Grow** while the oldest call waiting for a worker has waited longer than ``scale_up_after``:
  to ``min(max_size, 2 x current, current + calls waiting)``, and only once the workers of the
  previous size all serve (the pool is *settled*: no worker starting, the pool circuit closed).
  At most doubling per step, no more workers than calls waiting.
- **Shrink** by one worker (the one idle longest) once a worker has been idle for
  ``scale_down_after``, no call waits, and the last growth was at least ``scale_down_after`` ago.
- **Rate**: two changes are at least ``scale_up_after`` apart, whatever their direction.

Hysteresis: growing needs calls waiting, shrinking needs none waiting for ``scale_down_after``
and no growth for as long, so the size turns from growing to shrinking at most once per
``scale_down_after`` (no flapping), while it still grows within about ``scale_up_after`` of a
burst.
"""

from __future__ import annotations

from collections import deque

import attrs

from pool._call import QUEUED
from pool._worker import IDLE, Worker, WorkerCall


@attrs.frozen
class ScaleRule:
    """The autoscaler's rule for one pool (see the module docstring)."""

    #: The fewest workers (``PoolConfig.size``) and the most (``PoolConfig.max_size``).
    smallest: int
    largest: int
    #: ``PoolConfig.scale_up_after`` and ``PoolConfig.scale_down_after``, in seconds.
    up_after: float
    down_after: float

    def target(
        self,
        now: float,
        current: int,
        *,
        oldest_wait: float | None,
        waiting: int,
        longest_idle: float,
        settled: bool,
        last_grow: float,
        last_change: float,
    ) -> int:
        """The size the pool should have now (``current`` when nothing should change).

        ``oldest_wait``: how long the oldest call waiting for a worker has waited (None: none
        waits); ``waiting``: how many calls wait for a worker; ``longest_idle``: the longest any
        worker has been idle (0 when none is); ``settled``: every worker of ``current`` serves and
        workers can start; ``last_grow``, ``last_change``: when the size last grew, and last
        changed in either direction.
        """
        if now - last_change < self.up_after:
            return current
        if oldest_wait is not None and oldest_wait > self.up_after:
            if settled and current < self.largest:
                return min(self.largest, 2 * current, current + waiting)
            return current
        if (
            current > self.smallest
            and waiting == 0
            and longest_idle >= self.down_after
            and now - last_grow >= self.down_after
        ):
            return current - 1
        return current


class QueueWatch:
    """How long the oldest call waiting in the queue has waited, from marks the monitor takes.

    At each look, the call at the tail of the queue is marked with the time: it was in the queue
    then, so while it still is, it has waited at least that long. The oldest mark whose call is
    still queued gives the answer: a lower bound, late by at most one tick. Marks of calls that
    left the queue are dropped at the next look (a mark keeps its call alive until then).
    """

    def __init__(self) -> None:
        self._marks: deque[tuple[float, WorkerCall]] = deque()

    def oldest_wait(self, queue: deque[WorkerCall], now: float) -> float | None:
        """Seconds the oldest call in ``queue`` has waited, at least; None if none waits."""
        marks = self._marks
        while marks and not _queued_in(marks[0][1], queue):
            marks.popleft()
        if queue and (not marks or marks[-1][1] is not queue[-1]):
            marks.append((now, queue[-1]))
        if not marks:
            return None
        return now - marks[0][0]


def _queued_in(call: WorkerCall, queue: deque[WorkerCall]) -> bool:
    return call.state is QUEUED and call.where is queue


class IdleWatch:
    """How long each worker has been idle, from what the monitor sees at its ticks.

    A worker seen IDLE with the same count of answered calls as at the look before has been idle
    all along (a call it took and answered in between would have changed the count; one it is
    still running would make it BUSY), so it has been idle since the first of those looks.
    """

    def __init__(self) -> None:
        self._since: dict[Worker, tuple[int, float]] = {}

    def idle_times(self, workers: list[Worker], now: float) -> dict[Worker, float]:
        """Seconds each idle worker of ``workers`` has been idle, at least."""
        seen = self._since
        times: dict[Worker, float] = {}
        for w in workers:
            if w.state is not IDLE:
                continue
            mark = seen.get(w)
            if mark is None or mark[0] != w.calls:
                mark = seen[w] = (w.calls, now)
            times[w] = now - mark[1]
        for w in [w for w in seen if w not in times]:
            del seen[w]
        return times


def age_limit(max_age: float, jitter: float, draw: float) -> float:
    """How old one worker may get: ``max_age`` less up to the fraction ``jitter`` of it, by
    ``draw`` (uniform in [0, 1)), so that workers started together leave at different times and
    none is older than ``max_age``."""
    return max_age * (1.0 - jitter * draw)
