"""One worker as the host sees it: its state table, the task that owns its channel, its handshake,
and the one way it ends (:meth:`Worker.reap`).

::

    STARTING ──> IDLE <──> BUSY
        │          │        │
        │          v        v
        └──────> RETIRING ──> DEAD      (any state may go to DEAD: killed, or its channel ended)

IDLE: serving and free; BUSY: running one call (or several pipelined ones); RETIRING: asked to
exit after its calls (recycled), it serves nothing more. :data:`TRANSITIONS` is the whole table,
and :meth:`Worker.set_state` the only place a state changes: it also keeps the checkout's idle
list, so a worker is in that list exactly when it is IDLE.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import Any, Callable, Final, Mapping, Protocol

import trio

from bridge_worker.protocol import (
    EOF,
    NEED_DATA,
    BatchError,
    CloseSession,
    CommandInfo,
    Decoder,
    ErrorReply,
    Hello,
    Pong,
    ProtocolError,
    Reply,
    Shutdown,
    StartupFailed,
    StreamItem,
    encode,
)
from pool._call import Call, TransitionError
from pool._events import worker_fields
from pool._process import WorkerProcess
from pool._sessions import Session

logger = logging.getLogger("pool.worker")


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value


STARTING, IDLE, BUSY, RETIRING, DEAD = WorkerState

#: Every state change a worker may make.
TRANSITIONS: Final[Mapping[WorkerState, frozenset[WorkerState]]] = {
    STARTING: frozenset({IDLE, RETIRING, DEAD}),
    IDLE: frozenset({BUSY, RETIRING, DEAD}),
    BUSY: frozenset({IDLE, RETIRING, DEAD}),
    RETIRING: frozenset({DEAD}),
    DEAD: frozenset(),
}

#: How long a worker killed with SIGKILL may take to exit before the host gives up waiting (a
#: process stuck in the kernel); it is then left unreaped, and said so in the log.
KILL_WAIT: Final = 5.0

WorkerCall = Call["Worker", Session]


class ReplySink(Protocol):
    """Where a worker's reader hands each answered call, and each item of a stream (the
    checkout)."""

    def replied(self, worker: Worker, call: WorkerCall, msg: Reply | ErrorReply | BatchError) -> None:
        ...

    def stream_item(self, call: WorkerCall, item: Any) -> None:
        ...


class StartFailure(Exception):
    """A worker did not reach hello. ``counts`` says whether it counts as a failed start for the
    pool circuit (the worker's own fault), as opposed to being killed from outside; ``module`` names
    the handlers module (or start hook) that failed, when the worker said so."""

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
        "pinned",
        "sessions",
        "calls",
        "failures",
        "retire",
        "ping_sent",
        "reported_rss",
        "last_io",
        "started_at",
        "stderr_tail",
        "stderr_done",
        "death",
        "killed_by_pool",
        "exit_code",
        "delivered",
        "tasks",
        "_idle",
        "_sink",
        "_clock",
    )

    def __init__(
        self,
        id: int,
        slot: int,
        proc: WorkerProcess,
        *,
        max_frame_size: int,
        tail_lines: int,
        idle: list[Worker],
        sink: ReplySink,
        clock: Callable[[], float],
    ) -> None:
        self.id = id
        self.slot = slot
        self.proc = proc
        self.decoder = Decoder(max_frame_size)
        self.state = STARTING
        self.commands: dict[str, CommandInfo] = {}
        # Calls written to this worker and not answered yet, in the order it answers them: one,
        # or up to PoolConfig.pipeline_depth calls of pipelined commands.
        self.inflight: deque[WorkerCall] = deque()
        # Calls of sessions held here, waiting for this worker (session affinity is enforced).
        self.pinned: deque[WorkerCall] = deque()
        self.sessions: set[Session] = set()
        self.calls = 0  # calls it answered
        self.failures = 0  # calls in a row that failed here (not by the caller's fault)
        # Why it is to leave once its calls are done (recycled, or its slot retired), as a restart
        # reason (see pool._supervisor.restart_reason); None while it serves on.
        self.retire: str | None = None
        self.ping_sent: float | None = None
        self.reported_rss: int | None = None  # what its last heartbeat answer said
        self.last_io = clock()
        self.started_at = self.last_io
        self.stderr_tail: deque[str] = deque(maxlen=tail_lines)
        self.stderr_done = trio.Event()
        # Why the pool ended this worker, as an error tuple; None while nobody has decided.
        self.death: tuple[str, Any] | None = None
        self.killed_by_pool = False
        self.exit_code: int | None = None
        self.delivered = 0  # bytes of its input it had read when it died (see reap)
        self.tasks = trio.CancelScope()  # its helper tasks, cancelled when it is reaped
        self._idle = idle
        self._sink = sink
        self._clock = clock

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serving(self) -> bool:
        """Ready for new calls (not starting, retiring or dead)."""
        return self.state is IDLE or self.state is BUSY

    def rss(self) -> int | None:
        """Resident memory in bytes: measured here where this host can see the process, else
        as the worker last reported it (a worker on another machine)."""
        rss = self.proc.rss()
        return self.reported_rss if rss is None else rss

    def set_state(self, new: WorkerState) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise TransitionError(f"worker {self.id}: {old} -> {new}")
        self.state = new
        if old is IDLE:
            self._idle.remove(self)
        elif new is IDLE:
            self._idle.append(self)

    def kill(self, why: tuple[str, Any]) -> None:
        """Kill the process and everything it started; the supervisor reaps it and starts a
        replacement. ``why`` (an error tuple) is what its calls fail with."""
        if self.death is None:
            self.death = why
        self.killed_by_pool = True
        if self.state is not DEAD:
            self.set_state(DEAD)
        self.proc.kill()

    def stop(self) -> None:
        """Ask the worker to exit after the calls written to it (recycling); it serves nothing
        more. A worker still starting is killed instead."""
        if self.state is STARTING:
            self.kill(("recycled", "stopped while starting"))
            return
        self.set_state(RETIRING)
        try:
            self.proc.write(encode(Shutdown()))
        except OSError:
            self.kill(("recycled", "channel broken"))

    def drop_session(self, session_id: str) -> None:
        """The session left this worker: the worker process forgets its copy of the state."""
        if self.serving:
            try:
                self.proc.write(encode(CloseSession(session_id)))
            except OSError:
                pass  # dying: its reader reports that

    def stderr_text(self, lines: int | None = None) -> str:
        tail = list(self.stderr_tail)
        return "\n".join(tail if lines is None else tail[-lines:])

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

    async def serve(self) -> None:
        """Own the worker's channel until it ends: decode what it sends, hand each answered call
        to the sink. A bad frame or a broken channel kills the worker."""
        decoder = self.decoder
        proc = self.proc
        clock = self._clock
        data = b""
        try:
            while True:
                data = await proc.receive_some()
                decoder.receive_data(data)
                self.last_io = clock()
                # The requests this pass hands the worker (the next queued call per reply) go
                # out in one write.
                proc.hold()
                try:
                    more = self._handle_messages()
                finally:
                    proc.release()
                if more is None:
                    return
                if more:
                    # In the middle of a frame (a big reply): reads can succeed for tens of
                    # milliseconds without ever waiting, so yield between them and let the
                    # other tasks run. Small replies never get here.
                    await trio.lowlevel.checkpoint()
        except ProtocolError as exc:
            if not data:
                # The channel ended inside a frame: the worker died while writing its reply (a
                # SIGKILL, the OOM killer), which is not a garbled frame: let the supervisor
                # report how it exited, as for any other end of stream.
                return
            logger.error("worker %d sent a bad frame, killing it: %s", self.id, exc, extra=worker_fields(self))
            self.kill(("decode_error", str(exc)))
        except OSError as exc:
            self.kill(("port_exited", f"channel error: {exc}"))

    def _handle_messages(self) -> bool | None:
        """Hand over every message buffered. Returns whether a frame is partly buffered, or None
        at the end of the stream."""
        decoder = self.decoder
        inflight = self.inflight
        replied = self._sink.replied
        while True:
            batch = decoder.messages()
            if not batch:
                if decoder.next_message() is EOF:  # else NEED_DATA (or it raises)
                    return None
                return decoder.buffered > 0
            for msg in batch:
                kind = type(msg)
                if kind is Reply or kind is ErrorReply or kind is BatchError:
                    # The worker answers in the order it was written to.
                    if not inflight or inflight[0].req_id != msg.id:  # type: ignore[union-attr]
                        if logger.isEnabledFor(logging.DEBUG):
                            stale = msg.id  # type: ignore[union-attr]
                            extra = {**worker_fields(self), "call_id": stale}
                            logger.debug("worker %d: dropped a stale reply to call %d", self.id, stale, extra=extra)
                        continue
                    call = inflight.popleft()
                    self.calls += 1
                    if kind is Reply:
                        self.failures = 0
                    elif not msg.caller_error:  # type: ignore[union-attr]
                        self.failures += 1
                    replied(self, call, msg)  # type: ignore[arg-type]
                elif kind is StreamItem:
                    # A stream call is alone on its worker (never pipelined): the oldest in flight.
                    if inflight and inflight[0].req_id == msg.id:  # type: ignore[union-attr]
                        self._sink.stream_item(inflight[0], msg.item)  # type: ignore[union-attr]
                elif kind is Pong:
                    self.ping_sent = None
                    self.reported_rss = msg.rss  # type: ignore[union-attr]
                else:
                    raise ProtocolError(f"unexpected message from a worker: {msg!r}")

    async def run_helpers(self) -> None:
        """The worker's helper tasks (its stderr, the writer for a full pipe), until reaped."""
        with self.tasks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_stderr)
                nursery.start_soon(self._run_writer)

    async def _run_writer(self) -> None:
        try:
            await self.proc.run_writer()
        except (OSError, trio.ClosedResourceError):
            pass  # the worker died; its reader reports that

    async def _drain_stderr(self) -> None:
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
                    if logger.isEnabledFor(logging.INFO):
                        logger.info(
                            "worker %d (slot %d, pid %d): %s", self.id, self.slot, self.pid, line, extra=worker_fields(self)
                        )
            if partial:
                self.stderr_tail.append(partial.decode("utf-8", "replace"))
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self.stderr_done.set()

    async def stderr_finished(self, timeout: float = 1.0) -> None:
        """Give the stderr reader a moment to collect the last lines of a dead worker (a process
        the worker started may hold its stderr open: this never waits longer than ``timeout``)."""
        with trio.move_on_after(timeout):
            await self.stderr_done.wait()

    async def reap(self, stop_grace: float = 0.0) -> int:
        """The one way a worker ends, whatever ended it: kill it (after ``stop_grace`` seconds
        for a worker that was asked to stop), wait for it and everything it started, note how
        much of its input it had read, stop its helper tasks, keep the last of its stderr, and
        release its channel. Shielded, and bounded however the process behaves. Returns its
        exit code (negative: the signal that killed it)."""
        proc = self.proc
        with trio.CancelScope(shield=True):
            code: int | None = None
            if stop_grace > 0:
                with trio.move_on_after(stop_grace):
                    code = await proc.wait()
            if code is None:
                proc.kill()
                with trio.move_on_after(KILL_WAIT):
                    code = await proc.wait()
            if code is None:
                logger.error(
                    "worker %d (pid %d) did not exit %ss after SIGKILL; it is left unreaped",
                    self.id,
                    self.pid,
                    KILL_WAIT,
                )
                code = -9
            if self.state is not DEAD:
                self.set_state(DEAD)
            # Bytes still in its input pipe never reached it: the calls they carried did not run.
            self.delivered = proc.written - proc.undelivered()
            self.tasks.cancel()
            await self.stderr_finished(timeout=0.5)
            proc.close()
            self.exit_code = code
        assert code is not None  # the shield means the block above always ran to its end
        return code

