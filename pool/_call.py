"""One attempt of one call: what the caller parks on until a reply, an error or a timeout."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from bridge_worker.protocol import CommandInfo

if TYPE_CHECKING:
    from pool._pool import Pool
    from pool._sessions import Session
    from pool._worker import Worker

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Call:
    """One attempt of one call: what the caller parks on until a reply, an error or a timeout."""

    __slots__ = (
        "pool",
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
    )

    def __init__(
        self,
        pool: Pool,
        info: CommandInfo,
        args: Any,
        frame: bytes,
        req_id: int,
        attempt: int,
        deadline: float,
        session: Session | None,
        avoid: Worker | None,
    ) -> None:
        self.pool = pool
        self.info = info
        self.args = args
        self.frame = frame
        self.req_id = req_id
        self.attempt = attempt
        self.deadline = deadline
        self.attempt_deadline = deadline
        self.task = trio.lowlevel.current_task()
        self.state = _QUEUED
        self.worker: Worker | None = None
        self.sent = False
        self.session = session
        self.avoid = avoid  # failover: a worker this attempt should not run on
        self.where: deque[_Call] | None = None  # the queue it waits in
        self.offset = 0  # where its frame starts in the worker's input stream
        # May be written behind other calls on a busy worker (see PoolConfig.pipeline_depth).
        self.pipelined = info.pipelined and session is None

    @property
    def command(self) -> str:
        return self.info.name

    def abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # The caller was cancelled while parked.
        state = self.state
        self.state = _DONE
        pool = self.pool
        if state == _QUEUED and self.where is not None:
            pool._unqueue(self)
        elif state == _RUNNING and self.worker is not None:
            worker = self.worker
            inflight = worker.inflight
            # Kill the worker whenever in doubt, unless the command chose to let a cancelled call
            # finish, or other calls share the worker's pipeline (killing it would fail them;
            # pipelined commands are short by declaration). The reply is dropped on arrival.
            if not self.info.finish_on_cancel and len(inflight) == 1 and inflight[0] is self:
                inflight.clear()
                pool._kill(worker, ("cancelled", "caller cancelled the call"))
        return trio.lowlevel.Abort.SUCCEEDED
