"""What the pool records for its metrics as calls happen: fixed-bucket histograms (call durations
per command, queue waits, worker starts) and each command's call outcomes.

Counters the pool keeps anyway (retries, restarts, circuits, workers...) are read when metrics
are scraped (``pool.ops``); what only the moment of a call can give is recorded here, on the hot
path, so it is kept cheap: a histogram is a list of counts and a sum, and observing a value is one
``bisect`` over a tuple of bounds and two additions (no lock, no allocation but Python's own
number objects, no prometheus_client object: ``pool.ops`` turns these into Prometheus families at
scrape time, and this module imports nothing outside the standard library).
``PoolConfig(metrics=False)`` records none of it (``benchmarks``' "ops" section measures the cost).

A call's outcome (``calls_total{outcome}``) is one of :data:`OUTCOMES`; its failure reason
(``call_failures_total{reason}``) is the error's category for a failure the matrix decided, else
the ``OUTSIDE_MATRIX`` row it falls under (``queue_full``, ``circuit_open``...).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from typing import Callable, Final

#: Bucket upper bounds, in seconds, for call durations and queue waits: fine enough for calls of
#: tens of microseconds (prometheus_client's defaults start at 5 ms), up to the default deadline.
CALL_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Bucket upper bounds, in seconds, for worker starts (spawn to hello: an interpreter, imports,
#: start hooks).
START_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

OK: Final = "ok"
#: The matrix gave up on it: infrastructure, or the handler's own exception.
ERROR: Final = "error"
#: The caller's mistake, outside the matrix (a declared caller error, a session limit...).
CALLER_ERROR: Final = "caller_error"
#: Refused or dropped without being the caller's fault: an open circuit, a full queue, no worker
#: in time, no worker able to start, the pool closed.
REJECTED: Final = "rejected"
#: Its caller was cancelled: no outcome.
CANCELLED: Final = "cancelled"
OUTCOMES: Final = (OK, ERROR, CALLER_ERROR, REJECTED, CANCELLED)


class Histogram:
    """Counts of observed values per bucket (``counts[i]``: values at most ``bounds[i]`` and above
    the bound before; the last: above every bound), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values at most that)`` for every bucket, ``math.inf`` last (the
        shape Prometheus exposes)."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            total += n
            out.append((bound, total))
        return out


class CommandMetrics:
    """One command's calls: how they ended, why those that failed failed, and how long they
    took (every call with an outcome, ok or not; streams and cancelled calls are not timed)."""

    __slots__ = ("ok", "outcomes", "failures", "duration")

    def __init__(self) -> None:
        self.ok = 0  # the one outcome the hot path counts, kept apart from the dict
        self.outcomes: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.duration = Histogram(CALL_BUCKETS)

    def calls(self, outcome: str) -> int:
        return self.ok if outcome == OK else self.outcomes[outcome]


class PoolMetrics:
    """Everything a pool records for its metrics. One per pool; the checkout, the orchestrator
    and the supervisor each record their part."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._now = clock
        #: By command name (only commands of the workers' table: a bounded set).
        self.commands: dict[str, CommandMetrics] = {}
        #: How long each attempt waited for a worker (0 for one that found one at once).
        self.queue_wait = Histogram(CALL_BUCKETS)
        #: Spawn to hello, for every worker that said hello.
        self.worker_start = Histogram(START_BUCKETS)

    def command(self, name: str) -> CommandMetrics:
        metrics = self.commands.get(name)
        if metrics is None:
            metrics = self.commands[name] = CommandMetrics()
        return metrics

    def call_ok(self, command: str, elapsed: float) -> None:
        """A call of ``command`` returned after ``elapsed`` seconds (the hot path: Histogram.observe
        written out)."""
        metrics = self.commands.get(command) or self.command(command)
        metrics.ok += 1
        duration = metrics.duration
        duration.counts[bisect_left(CALL_BUCKETS, elapsed)] += 1
        duration.sum += elapsed

    def call_ended(self, command: str, outcome: str, reason: str | None, started: float | None) -> None:
        """A call of ``command`` ended otherwise: ``outcome`` (one of OUTCOMES), the failure's
        ``reason``, and its duration if ``started`` is given."""
        metrics = self.command(command)
        if outcome == OK:
            metrics.ok += 1
        else:
            metrics.outcomes[outcome] += 1
        if reason is not None:
            metrics.failures[reason] += 1
        if started is not None:
            metrics.duration.observe(self._now() - started)
