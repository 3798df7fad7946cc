"""Pool events: what happened, when, with its measurements; delivered to plain callbacks. And
the structured fields of the pool's log records (:func:`call_fields`, :func:`worker_fields`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable

import attrs

from pool._breaker import CircuitBreaker, CircuitState
from pool._call import Call

if TYPE_CHECKING:
    from pool._worker import Worker

logger = logging.getLogger("pool.events")
_circuit_logger = logging.getLogger("pool")

#: The kinds of events a pool emits.
EVENT_KINDS = (
    "worker_started",  # data: slot, startup_seconds
    "worker_exited",  # data: exit_code, reason
    "call_retried",  # data: attempt, delay, category, strategy
    "call_failed_over",  # data: attempt, category
    "call_fallback",  # data: category (the caller got the fallback's value)
    "call_failed",  # data: category, severity, strategy, attempts
    "circuit_opened",
    "circuit_half_opened",
    "circuit_closed",
    "recovery_done",  # data: category, strategy, succeeded, seconds
    # data: from, to, cause ("resize" or "autoscale"); an autoscaler's growth: queue_wait,
    # waiting; its shrink: idle_seconds (of the worker that leaves)
    "pool_resized",
    # a rolling restart ended: replaced, workers (to replace), seconds, stopped (why, or None)
    "workers_restarted",
)


@attrs.frozen
class PoolEvent:
    """One event. ``data`` holds the kind's measurements (see EVENT_KINDS)."""

    kind: str
    time: float
    worker_id: int | None = None
    pid: int | None = None
    command: str | None = None
    session_id: str | None = None
    circuit: str | None = None
    data: dict[str, Any] = attrs.field(factory=dict)


class EventBus:
    """Calls each callback synchronously; a callback that raises is logged and skipped."""

    def __init__(self, callbacks: Iterable[Callable[[PoolEvent], None]]) -> None:
        self.callbacks = tuple(callbacks)

    def emit(self, event: PoolEvent) -> None:
        for callback in self.callbacks:
            try:
                callback(event)
            except Exception:  # a broken observer must not break the pool
                logger.exception("pool event callback %r raised on %s", callback, event.kind)

    def circuit_changed(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState, now: float) -> None:
        """Log a circuit's state change and emit its event."""
        kind = {
            CircuitState.OPEN: "circuit_opened",
            CircuitState.HALF_OPEN: "circuit_half_opened",
            CircuitState.CLOSED: "circuit_closed",
        }[new]
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        _circuit_logger.log(level, "circuit %r: %s -> %s", breaker.name, old.value, new.value)
        self.emit(PoolEvent(kind, now, circuit=breaker.name, data={"from": old.value}))


def call_fields(call: Call[Any, Any]) -> dict[str, Any]:
    """The ``extra`` fields of a log record about one call: ``call_id`` (the same for all its
    attempts), ``command``, ``session_id``, ``attempt``, and the worker it ran on (``worker_slot``,
    ``worker_id``; None if it reached none). Build it only for a record that is emitted
    (``logger.isEnabledFor``): a call that succeeds logs nothing."""
    worker = call.worker
    return {
        "call_id": call.req_id,
        "command": call.command,
        "session_id": call.session.id if call.session is not None else None,
        "attempt": call.attempt,
        "worker_slot": worker.slot if worker is not None else None,
        "worker_id": worker.id if worker is not None else None,
    }


def worker_fields(worker: Worker) -> dict[str, Any]:
    """The ``extra`` fields of a log record about one worker: ``worker_slot``, ``worker_id``,
    ``pid``."""
    return {"worker_slot": worker.slot, "worker_id": worker.id, "pid": worker.pid}
