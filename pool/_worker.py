"""One worker as the host sees it: its process, its channel state, its current call, and the
handshake that makes it ready. The pool's supervisor owns the life cycle; this module has the
per-worker pieces."""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from bridge_worker.protocol import (
    EOF,
    NEED_DATA,
    CommandInfo,
    Decoder,
    Hello,
    ProtocolError,
    StartupFailed,
)
from pool._process import WorkerProcess

if TYPE_CHECKING:
    from pool._call import _Call
    from pool._sessions import Session

logger = logging.getLogger("pool.worker")


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # told to shut down (recycled); serves nothing more
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value


class StartFailure(Exception):
    """A worker did not reach hello. ``counts`` says whether it counts as a failed start for the
    pool circuit (the worker's own fault), as opposed to being killed from outside."""

    def __init__(self, message: str, *, module: str | None = None, counts: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.module = module
        self.counts = counts


class Worker:
    """Host-side record of one worker process."""

    __slots__ = (
        "id",
        "slot",
        "proc",
        "decoder",
        "state",
        "commands",
        "inflight",
        "calls",
        "retire",
        "ping_sent",
        "last_io",
        "started_at",
        "stderr_tail",
        "stderr_done",
        "death",
        "killed_by_pool",
        "tasks",
        "pinned",
        "sessions",
        "failures",
    )

    def __init__(
        self, id: int, slot: int, proc: WorkerProcess, max_frame_size: int, tail_lines: int
    ) -> None:
        self.id = id
        self.slot = slot
        self.proc = proc
        self.decoder = Decoder(max_frame_size)
        self.state = WorkerState.STARTING
        self.commands: dict[str, CommandInfo] = {}
        # Calls written to this worker and not answered yet, in the order it answers them: one,
        # or up to PoolConfig.pipeline_depth calls of pipelined commands.
        self.inflight: deque[_Call] = deque()
        self.calls = 0
        self.retire = False
        self.ping_sent: float | None = None
        self.last_io = trio.current_time()
        self.started_at = self.last_io
        self.stderr_tail: deque[str] = deque(maxlen=tail_lines)
        self.stderr_done = trio.Event()
        # Why the pool ended this worker, as an error tuple; None while nobody has decided.
        self.death: tuple[str, Any] | None = None
        self.killed_by_pool = False
        # Cancels this worker's helper tasks once it is buried.
        self.tasks = trio.CancelScope()
        # Calls of sessions held here, waiting for this worker (session affinity is enforced).
        self.pinned: deque[_Call] = deque()
        self.sessions: set[Session] = set()
        self.failures = 0  # calls in a row that failed here (not by the caller's fault)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serving(self) -> bool:
        """Ready for new calls (not starting, retiring or dead)."""
        return self.state is WorkerState.IDLE or self.state is WorkerState.BUSY

    def kill(self, why: tuple[str, Any]) -> None:
        """Kill the process (and its group); the supervisor reaps it and starts a replacement."""
        if self.death is None:
            self.death = why
        self.killed_by_pool = True
        self.state = WorkerState.DEAD
        self.proc.kill()

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_tail)

    async def handshake(self) -> Hello:
        """Read until the worker's first message. Raises StartFailure for anything but Hello."""
        decoder = self.decoder
        while True:
            try:
                msg = decoder.next_message()
            except ProtocolError as exc:
                raise StartFailure(f"worker sent a bad frame before hello: {exc}") from exc
            if msg is NEED_DATA:
                try:
                    decoder.receive_data(await self.proc.receive_some())
                except ProtocolError as exc:
                    raise StartFailure(f"worker sent a bad frame before hello: {exc}") from exc
                continue
            if msg is EOF:
                code = await self.proc.wait()
                await self.stderr_finished()
                # Killed by SIGKILL without the pool asking: someone outside did it, not a crash.
                counts = code != -9 or self.killed_by_pool
                raise StartFailure(
                    f"worker exited with code {code} before saying hello", counts=counts
                )
            if isinstance(msg, StartupFailed):
                await self.stderr_finished(timeout=0.5)
                raise StartFailure(
                    f"importing/starting {msg.module!r} failed: {msg.message}", module=msg.module
                )
            if isinstance(msg, Hello):
                return msg
            raise StartFailure(f"worker's first message was not hello: {msg!r}")

    async def run_writer(self) -> None:
        """Flush frames the pipe could not take at once, until the worker is buried."""
        with self.tasks:
            try:
                await self.proc.run_writer()
            except (OSError, trio.ClosedResourceError):
                pass  # the worker died; its reader reports that

    async def drain_stderr(self) -> None:
        """Read the worker's stderr until it closes: into the bounded tail and into logging, so a
        chatty handler never blocks on a full pipe."""
        partial = b""
        try:
            while True:
                chunk = await self.proc.receive_stderr()
                if not chunk:
                    break
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                if len(partial) > 8192:  # a line with no end: keep it bounded
                    lines.append(partial)
                    partial = b""
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    self.stderr_tail.append(line)
                    logger.info("worker %d (pid %d): %s", self.id, self.pid, line)
            if partial:
                self.stderr_tail.append(partial.decode("utf-8", "replace"))
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self.stderr_done.set()

    async def stderr_finished(self, timeout: float = 1.0) -> None:
        """Give the stderr reader a moment to collect the last lines of a dead worker."""
        with trio.move_on_after(timeout):
            await self.stderr_done.wait()
