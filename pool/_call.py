"""One attempt of one call, and the states it goes through (a leaf: imports nothing of the pool).

A call is made for each attempt and lives until its caller has an outcome::

    NEW ──> QUEUED ──> RUNNING ──> DONE
     │        │           │          ^
     │        └───────────┼──────────┤      (a timeout, a cancellation, a closed pool, ...)
     └────────────────────┼──────────┘
                          └──> ABANDONED ──> DONE

QUEUED: waiting for a worker, in the pool's queue or behind its session's worker. RUNNING: written
to a worker; the caller is parked on it. ABANDONED: written to a worker, and its caller was
cancelled, but the worker was left to finish it (the command asked for that, or other calls share
the worker's pipeline): its reply is dropped when it comes, and its deadline still bounds it. DONE:
the caller has its outcome. :data:`TRANSITIONS` is the whole table; any other move raises
:class:`TransitionError`, since it can only be a bug.

The caller parks on a call at most once, after routing it. An outcome that arrives before the
caller parks (a failure found while routing, in the caller's own task) is kept in ``outcome`` for
the caller to take: a task that is still running is never rescheduled.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, Callable, Final, Generic, Mapping, TypeVar

import outcome
import trio

from bridge_worker.protocol import CommandInfo


class CallState(enum.IntEnum):
    NEW = 0
    QUEUED = 1
    RUNNING = 2
    ABANDONED = 3
    DONE = 4


NEW, QUEUED, RUNNING, ABANDONED, DONE = CallState

#: Every move a call may make.
TRANSITIONS: Final[Mapping[CallState, frozenset[CallState]]] = {
    NEW: frozenset({QUEUED, RUNNING, DONE}),
    QUEUED: frozenset({RUNNING, DONE}),
    RUNNING: frozenset({ABANDONED, DONE}),
    ABANDONED: frozenset({DONE}),
    DONE: frozenset(),
}


class TransitionError(RuntimeError):
    """A state change that the table does not allow: a bug in the pool, never the caller's."""


W = TypeVar("W")  # the worker type
S = TypeVar("S")  # the session type


class StreamBuffer:
    """The items of a stream call that arrived and its consumer has not taken yet."""

    __slots__ = ("items", "taken", "unacked")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.taken = 0  # items the consumer took
        self.unacked = 0  # items taken since the worker was last given credit for them


class Call(Generic[W, S]):
    """One attempt of one call: what the caller parks on until a reply, an error or a timeout."""

    __slots__ = (
        "info",
        "args",
        "frame",
        "req_id",
        "attempt",
        "deadline",
        "attempt_deadline",
        "task",
        "state",
        "worker",
        "sent",
        "session",
        "avoid",
        "where",
        "offset",
        "pipelined",
        "parked",
        "outcome",
        "on_abort",
        "stream",
        "started",
        "queued_at",
        "trace_context",
    )

    def __init__(
        self,
        info: CommandInfo,
        args: Any,
        frame: bytes,
        req_id: int,
        attempt: int,
        deadline: float,
        session: S | None,
        avoid: W | None,
        on_abort: Callable[[Call[W, S]], None],
        queued_at: float = 0.0,
    ) -> None:
        self.info = info
        self.args = args
        self.frame = frame
        self.req_id = req_id
        self.attempt = attempt
        self.deadline = deadline
        self.attempt_deadline = deadline
        self.task = trio.lowlevel.current_task()
        self.state = NEW
        self.worker: W | None = None
        self.sent = False  # written to the worker (it may have run)
        self.session = session
        self.avoid = avoid  # failover: a worker this attempt should not run on
        self.where: Any = None  # the queue it waits in, while QUEUED
        self.offset = 0  # where its frame starts in the worker's input stream
        # May be written behind other calls on a busy worker (see PoolConfig.pipeline_depth).
        self.pipelined = info.pipelined and session is None
        self.parked = False
        self.outcome: outcome.Outcome[Any] | None = None
        self.on_abort = on_abort  # the owner's handler for a cancelled caller
        self.stream: StreamBuffer | None = None  # a stream's items on their way to its consumer
        self.started = 0.0  # when it was written (kept only for adaptive attempt timeouts)
        # When it began to wait for a worker, for the queue-wait metric: given when the caller
        # knows it without reading the clock (0.0: read when it is queued).
        self.queued_at = queued_at
        # The caller's trace context, when the call is traced: a request re-encoded for another
        # worker (with its session's state) carries it too.
        self.trace_context: dict[str, str] | None = None

    @property
    def command(self) -> str:
        return self.info.name

    def move(self, new: CallState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise TransitionError(
                f"call {self.req_id} ({self.info.name!r}): {self.state.name} -> {new.name}"
            )
        self.state = new

    def finish(self, result: outcome.Outcome[Any]) -> bool:
        """Give the caller its outcome (or drop it, for an abandoned call). False if the call had
        one already."""
        state = self.state
        if state is DONE:  # (the table's rule for DONE: reachable from every other state)
            return False
        self.state = DONE
        # What only the worker needed: the caller keeps its own arguments.
        self.args = None
        self.frame = b""
        if state is not ABANDONED:
            if self.parked:
                self.parked = False
                trio.lowlevel.reschedule(self.task, result)
            else:
                self.outcome = result
        return True

    def drop(self) -> None:
        """End a call whose caller is gone (cancelled): nobody gets an outcome."""
        self.move(DONE)
        self.args = None
        self.frame = b""

    def fail(self, error: BaseException) -> bool:
        """:meth:`finish` with an error."""
        return self.finish(outcome.Error(error))

    def abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """The parked caller was cancelled: the owner decides what becomes of the call."""
        self.parked = False
        self.on_abort(self)
        return trio.lowlevel.Abort.SUCCEEDED
