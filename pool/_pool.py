"""Pool and open_pool: checkout, the hot path, sessions, recovery, supervision and shutdown.

The hot path, all circuits closed: the caller encodes its request, takes an idle worker (or joins
a FIFO queue), writes the frame and parks once. The worker's reader task decodes the reply, hands
the worker its next waiting request at once, and reschedules the parked caller directly. One timer
task watches every deadline; there is no lock, cancel scope or extra task per call.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import attrs
import outcome
import trio

from bridge_worker.protocol import (
    EOF,
    NEED_DATA,
    PROTOCOL_VERSION,
    CloseSession,
    CommandInfo,
    EncodeError,
    Encoder,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Reply,
    Shutdown,
    encode,
)
from pool._call import _DONE, _QUEUED, _RUNNING, _Call
from pool._breaker import BreakerStatistics, CircuitBreaker, CircuitRegistry, CircuitState
from pool._config import PoolConfig
from pool._errors import (
    CallerError,
    Category,
    CircuitOpenError,
    InitializationError,
    PoolClosedError,
    PoolError,
    PoolSaturatedError,
    PoolTimeoutError,
    RemoteError,
    ResourceError,
    SessionError,
)
from pool._events import EventBus, PoolEvent
from pool._matrix import PoolErrorHandler
from pool._process import Launcher, LocalLauncher
from pool._recovery import Action, RecoveryOrchestrator, RecoveryStatistics, not_rerun_note
from pool._sessions import Session, SessionStore
from pool._worker import StartFailure, Worker, WorkerState

logger = logging.getLogger("pool")

_IDLE = WorkerState.IDLE
_CLOSED = CircuitState.CLOSED
# Deaths the pool causes for one call's sake; the calls pipelined behind it fail as if the worker
# had died under them.
_ONE_CALLS_FAULT = frozenset({"timeout", "cancelled", "resource_exhausted"})


@attrs.frozen
class WorkerStatistics:
    """One worker in a :class:`PoolStatistics` snapshot."""

    #: Unique within the pool (a replacement gets a new id); ``slot`` is the place it fills.
    id: int
    slot: int
    pid: int
    #: ``starting``, ``idle``, ``busy``, ``retiring`` (recycled: serves nothing more) or ``dead``.
    state: str
    #: Calls written to it and not answered yet (more than one only for pipelined commands).
    in_flight: int
    #: Calls it answered.
    calls: int
    #: Sessions it holds.
    sessions: int
    #: Resident memory in bytes, None if it cannot be read.
    rss: int | None

    @property
    def busy(self) -> bool:
        """Running a call (or several pipelined ones)."""
        return self.in_flight > 0


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool's counters (see ``Pool.statistics``)."""

    size: int
    alive: int
    busy: int
    idle: int
    starting: int
    queued: int
    restarts: int
    failed_starts: int
    calls_ok: int
    calls_failed: int
    retries: int
    failovers: int
    fallbacks: int
    sessions: int
    recoveries: RecoveryStatistics
    pool_circuit: str
    circuits: dict[str, str]
    #: Every worker process that exists, those starting included, by id.
    workers: tuple[WorkerStatistics, ...] = ()


class Pool:
    """A supervised pool of worker processes. Get one from :func:`open_pool`."""

    def __init__(self, config: PoolConfig, launcher: Launcher) -> None:
        self.config = config
        self._depth = config.pipeline_depth
        self._size = config.size
        self._encoder = Encoder(config.max_frame_size)
        # The hot path reads the clock a few times per call: through the clock itself, not
        # trio.current_time()'s two extra layers. (A pool lives inside one trio run.)
        self._now = trio.lowlevel.current_clock().current_time
        self._launcher = launcher
        self._errors = PoolErrorHandler(config.policy)
        self._recovery = RecoveryOrchestrator(self._errors)
        self._events = EventBus(config.event_callbacks)
        self._workers: list[Worker] = []  # said hello and not yet buried
        self._starting: list[Worker] = []
        self._idle: list[Worker] = []
        self._queue: deque[_Call] = deque()  # calls for any worker, first come first served
        self._waiting = 0  # calls waiting anywhere (queues and session turns), for max_queue
        self._sessions = SessionStore(config.max_sessions, config.session_ttl)
        self._commands: dict[str, CommandInfo] = {}
        self._req_ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        self._closing = False
        self._closed = False
        self._pool_circuit = CircuitBreaker(
            "pool", config.pool_circuit, on_state_change=self._circuit_changed
        )
        self._circuits = CircuitRegistry(config.command_circuit, on_state_change=self._circuit_changed)
        self._last_start_error: InitializationError | None = None
        self._open_error: InitializationError | None = None
        self._state_changed = trio.lowlevel.ParkingLot()
        self._slots_wakeup = trio.lowlevel.ParkingLot()  # slots waiting before a restart
        self._timer_scope = trio.CancelScope()
        self._next_deadline = math.inf
        self._nursery: trio.Nursery | None = None
        self._services_scope = trio.CancelScope()  # the timer and the monitor
        self._slots_done = trio.Event()
        self._restarts = 0
        self._failed_starts = 0
        self._calls_ok = 0
        self._calls_failed = 0
        self._retries = 0
        self._failovers = 0
        self._fallbacks = 0

    # ------------------------------------------------------------------ public API

    async def execute(self, command: str, args: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``command(args)`` on any worker and return its plain result, or raise a PoolError.

        ``timeout`` is the whole deadline in seconds (queueing, retries and backoff included);
        default ``PoolConfig.timeout``. ``ctx.session`` is a fresh dict, dropped after the call.
        """
        return await self._call(command, args, None, timeout)

    async def execute_in_session(
        self, session_id: str, command: str, args: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Run ``command(args)`` on the worker that holds session ``session_id``.

        The session is created by its first call. Its calls run one at a time, in arrival order;
        what a successful call writes to ``ctx.session`` is committed, a call that raises commits
        nothing. If its worker dies, the session continues on another one from its committed state.
        """
        if not isinstance(session_id, str) or not session_id:
            raise CallerError(
                f"session_id must be a non-empty string, got {session_id!r}",
                context={"command": command},
            )
        return await self._call(command, args, session_id, timeout)

    async def close_session(self, session_id: str) -> None:
        """Forget a session on the host and its worker; a later call with the same id starts a
        new, empty session. Calls of it still waiting for their turn fail with SessionError."""
        self._close_session(session_id)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool's counters."""
        busy = sum(1 for w in self._workers if w.inflight)
        return PoolStatistics(
            size=self.config.size,
            alive=len(self._workers),
            busy=busy,
            idle=len(self._idle),
            starting=len(self._starting),
            queued=self._waiting,
            restarts=self._restarts,
            failed_starts=self._failed_starts,
            calls_ok=self._calls_ok,
            calls_failed=self._calls_failed,
            retries=self._retries,
            failovers=self._failovers,
            fallbacks=self._fallbacks,
            sessions=len(self._sessions),
            recoveries=self._recovery.statistics(),
            pool_circuit=self._pool_circuit.state.value,
            circuits={name: state.value for name, state in self._circuits.states().items()},
            workers=tuple(
                WorkerStatistics(
                    id=w.id,
                    slot=w.slot,
                    pid=w.pid,
                    state=str(w.state),
                    in_flight=len(w.inflight),
                    calls=w.calls,
                    sessions=len(w.sessions),
                    rss=w.proc.rss(),
                )
                for w in sorted(self._starting + self._workers, key=lambda w: w.id)
            ),
        )

    def health(self) -> dict[str, Any]:
        """``{"status": "healthy" | "degraded" | "unhealthy", "workers": {...}, "circuits": {...}}``.

        healthy: every worker up and every circuit closed. degraded: workers restarting, or a
        command circuit not closed. unhealthy: the pool circuit is open (workers cannot start), or
        no worker can serve.
        """
        now = trio.current_time()
        serving = sum(1 for w in self._workers if w.serving)
        if self._pool_circuit.state is CircuitState.OPEN or serving == 0:
            status = "unhealthy"
        elif serving == self.config.size and self._circuits.all_closed() and self._pool_circuit.state is _CLOSED:
            status = "healthy"
        else:
            status = "degraded"
        workers: dict[str, Any] = {}
        for w in self._starting + self._workers:
            workers[str(w.id)] = {
                "pid": w.pid,
                "state": str(w.state),
                "calls": w.calls,
                "sessions": len(w.sessions),
                "uptime": round(now - w.started_at, 3),
                "rss": w.proc.rss(),
            }
        circuits = {"pool": _circuit_detail(self._pool_circuit.statistics(), self._pool_circuit, now)}
        for name, breaker in self._circuits.items():
            circuits[f"command:{name}"] = _circuit_detail(breaker.statistics(), breaker, now)
        detail: dict[str, Any] = {"status": status, "workers": workers, "circuits": circuits}
        if self._last_start_error is not None:
            detail["last_start_error"] = self._last_start_error.message
        return detail

    def worker_pids(self) -> list[int]:
        """Every worker process that exists, those still starting included."""
        return [w.pid for w in self._starting] + [w.pid for w in self._workers]

    async def aclose(self) -> None:
        """Stop taking calls, let running ones finish within ``shutdown_grace``, then stop every
        worker and reap it. Waiting callers get PoolClosedError. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._slots_wakeup.unpark_all()
        with trio.CancelScope(shield=True):
            for call in list(self._queue) + [c for w in self._workers for c in w.pinned]:
                self._unqueue(call)
                self._fail(call, self._closed_error())
            for session in self._sessions:
                for task in session.waiters:
                    trio.lowlevel.reschedule(task, outcome.Error(self._closed_error()))
                session.waiters.clear()
            with trio.move_on_after(self.config.shutdown_grace):
                while any(w.inflight for w in self._workers):
                    await self._state_changed.park()
            for w in self._starting + self._workers:
                if not w.inflight and w.state is not WorkerState.DEAD:
                    self._retire(w)
                else:
                    self._kill(w, ("pool_closed", "the pool was closed"))
            with trio.move_on_after(max(self.config.shutdown_grace, 1.0)):
                await self._slots_done.wait()
            for w in self._starting + self._workers:
                self._kill(w, ("pool_closed", "the pool was closed"))
            await self._slots_done.wait()
        self._closed = True
        # Only the pool's own service tasks: the application's code in the body of open_pool
        # runs in the same nursery and must go on after an explicit aclose().
        self._services_scope.cancel()

    # ------------------------------------------------------------------ one call, all attempts

    async def _call(self, command: str, args: Any, session_id: str | None, timeout: float | None) -> Any:
        try:
            if self._closing:
                raise self._closed_error()
            info = self._commands.get(command)
            if info is None:
                raise self._unknown_command(command)
            now = self._now()
            deadline = now + (self.config.timeout if timeout is None else timeout)
            breaker = self._circuits.get(command)
            if not breaker.allow(now):
                fallback = self._refused(command, args, breaker, now)
                await trio.lowlevel.checkpoint()  # (see below)
                return fallback
            session: Session | None = None
            try:
                if not self._workers and self._pool_circuit.state is not _CLOSED:
                    raise self._pool_down_error(now)
                req_id = next(self._req_ids)
                try:
                    frame = self._encoder.request(req_id, command, args, session_id, None)
                except EncodeError as exc:
                    advice = (
                        "Pass msgpack-able values (dict, list, str, bytes, int, float, bool, None)."
                        if exc.__cause__ is not None  # msgpack refused a value; else: over the size limit
                        else "Send less per call, or raise PoolConfig.max_frame_size."
                    )
                    raise CallerError(
                        f"the arguments of {command!r} cannot be sent to a worker: {exc}. {advice}",
                        category=Category.COMMUNICATION_ERROR,  # as OUTSIDE_MATRIX says
                        context={"command": command, "session_id": session_id},
                        error=exc,
                    ) from exc
                if session_id is not None:
                    opened = self._sessions.open(session_id, now)
                    await self._session_turn(opened, deadline)
                    session = opened  # this call owns the session's turn until it ends
            except BaseException:
                breaker.release(trio.current_time())  # no outcome: nothing ran
                raise
            try:
                return await self._attempts(info, args, frame, req_id, deadline, session, breaker)
            finally:
                if session is not None:
                    self._session_done(session)
        except PoolError:
            # A call that fails fast (closed pool, open circuit, saturated queue, bad arguments)
            # never parked: yield now, as any trio await does, so that a caller retrying in a
            # loop cannot starve the pool's own tasks (those that restart workers).
            await trio.lowlevel.checkpoint()
            raise

    async def _attempts(
        self,
        info: CommandInfo,
        args: Any,
        frame: bytes,
        req_id: int,
        deadline: float,
        session: Session | None,
        breaker: CircuitBreaker,
    ) -> Any:
        attempt = 1
        consecutive = 0
        failed_over = False
        recovering = False
        first_category = first_strategy = ""
        avoid: Worker | None = None
        ran = False  # an earlier attempt may have run
        while True:
            call = _Call(self, info, args, frame, req_id, attempt, deadline, session, avoid)
            try:
                if self._closing:
                    # A retry (or failover) after the pool started closing: nothing would serve
                    # it, and the timer that enforces its deadline stops with the pool.
                    raise self._closed_error()
                # Route it to a worker (or a queue) and park until it is resolved; failures
                # decided in the host (timeout, dead worker, closed pool) raise PoolError.
                self._route(call)
                if deadline < self._next_deadline:
                    self._next_deadline = deadline
                    self._timer_scope.deadline = deadline
                reply = await trio.lowlevel.wait_task_rescheduled(call.abort)
            except PoolError as exc:
                err = exc
            except BaseException:
                breaker.release(trio.current_time())  # cancelled: no outcome
                raise
            else:
                if type(reply) is Reply:
                    if session is not None:
                        session.last_used = trio.current_time()
                        if reply.session_state is not None and not session.closed:
                            session.state = reply.session_state
                    breaker.record_success(self._now())
                    self._calls_ok += 1
                    if recovering:
                        self._recovery_done(call, first_category, first_strategy, True)
                    return reply.result
                assert isinstance(reply, ErrorReply)
                err = self._reply_error(call, reply)
            consecutive += 1
            now = trio.current_time()
            circuits_closed = self._circuits.all_closed() and self._pool_circuit.state is _CLOSED
            action, delay = self._recovery.decide(
                err, attempt, consecutive, info.idempotent, failed_over, circuits_closed
            )
            if action is not Action.GIVE_UP and now + delay >= deadline:
                action = Action.GIVE_UP
            if action is Action.GIVE_UP:
                if ran and not err.may_have_run:
                    # This attempt did not run, an earlier one may have: the call may have run.
                    err.may_have_run = True
                    err.context["may_have_run"] = True
                return self._give_up(call, err, breaker, recovering)
            ran = ran or err.may_have_run
            if not recovering:
                recovering = True
                first_category, first_strategy = str(err.category), str(err.recovery_strategy)
            self._recovery.initiate(err)
            if action is Action.FAILOVER:
                failed_over = True
                self._failovers += 1
                avoid = call.worker
                if session is not None:
                    session.move_off()
                self._emit("call_failed_over", call, attempt=attempt, category=str(err.category))
            else:
                self._retries += 1
                self._emit(
                    "call_retried",
                    call,
                    attempt=attempt,
                    delay=delay,
                    category=str(err.category),
                    strategy=str(err.recovery_strategy),
                )
            logger.info("retrying %r after %s (attempt %d, in %.2fs)", info.name, err.category, attempt, delay)
            if delay > 0:
                try:
                    await trio.sleep(delay)
                except BaseException:
                    breaker.release(trio.current_time())
                    raise
            attempt += 1
            req_id = next(self._req_ids)
            sid = session.id if session is not None else None
            frame = self._encoder.request(req_id, info.name, args, sid, None)

    def _give_up(self, call: _Call, err: PoolError, breaker: CircuitBreaker, recovering: bool) -> Any:
        """The call failed for good: count it, log it, and raise (or degrade to the fallback)."""
        now = trio.current_time()
        counted = not err.caller_fault and not isinstance(err, (PoolClosedError, PoolSaturatedError))
        if counted:
            breaker.record_failure(now)
        else:
            breaker.release(now)
        if recovering:
            self._recovery_done(call, str(err.category), str(err.recovery_strategy), False)
        if err.may_have_run and not call.info.idempotent and counted and not isinstance(err, RemoteError):
            not_rerun_note(err)
        self._calls_failed += 1
        if counted:
            # A handler's own exception is the application's business; infrastructure is ours.
            level = logging.INFO if isinstance(err, RemoteError) else logging.WARNING
            logger.log(level, "%s", PoolErrorHandler.format_for_logging(err))
        self._emit(
            "call_failed",
            call,
            category=str(err.category),
            severity=str(err.severity),
            strategy=str(err.recovery_strategy),
            attempts=call.attempt,
        )
        fallback = self.config.fallbacks.get(call.command) if counted else None
        if fallback is None:
            raise err
        self._fallbacks += 1
        self._emit("call_fallback", call, category=str(err.category))
        return fallback(call.args, err)

    def _refused(self, command: str, args: Any, breaker: CircuitBreaker, now: float) -> Any:
        retry_after = breaker.time_until_retry(now)
        err = CircuitOpenError(
            f"the circuit for {command!r} is open after repeated failures; calls fail fast for "
            f"{retry_after:.1f}s more. See pool.health() for the cause; retry after that.",
            circuit=command,
            retry_after=retry_after,
            context={"command": command},
        )
        fallback = self.config.fallbacks.get(command)
        if fallback is None:
            raise err
        self._fallbacks += 1
        self._events.emit(PoolEvent("call_fallback", now, command=command, data={"category": "circuit_open"}))
        return fallback(args, err)

    def _recovery_done(self, call: _Call, category: str, strategy: str, succeeded: bool) -> None:
        self._recovery.finish(succeeded)
        self._emit("recovery_done", call, category=category, strategy=strategy, succeeded=succeeded)

    # ------------------------------------------------------------------ sessions

    async def _session_turn(self, session: Session, deadline: float) -> None:
        """Wait for this session's previous calls (one at a time, in arrival order)."""
        if not session.busy:
            session.busy = True
            return
        if self._waiting >= self.config.max_queue:
            raise self._saturated(session.id)
        task = trio.lowlevel.current_task()
        session.waiters.append(task)
        self._waiting += 1

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            session.waiters.remove(task)
            self._waiting -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_at(deadline) as scope:
            await trio.lowlevel.wait_task_rescheduled(abort)
        if scope.cancelled_caught:
            raise PoolTimeoutError(
                f"session {session.id!r}: the deadline passed while this call waited for the "
                "session's earlier calls (a session runs one call at a time)",
                context={"session_id": session.id},
                error=("timeout", "session_turn"),
            )
        # We own the session's turn now (handed over by _session_done).
        if session.closed:
            self._session_done(session)
            raise SessionError(
                f"session {session.id!r} was closed while this call waited for its turn",
                context={"session_id": session.id},
                caller_fault=True,
            )

    def _session_done(self, session: Session) -> None:
        """Hand the session's turn to its next waiting call, or free it."""
        if session.waiters:
            self._waiting -= 1
            trio.lowlevel.reschedule(session.waiters.popleft())
        else:
            session.busy = False

    def _close_session(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            return
        worker = session.worker
        self._sessions.forget(session_id)
        if worker is not None and worker.serving:
            try:
                worker.proc.write(encode(CloseSession(session_id)))
            except OSError:
                pass

    def _least_loaded(self, avoid: Worker | None) -> Worker | None:
        best: Worker | None = None
        best_key: tuple[int, int, int] | None = None
        for w in self._workers:
            if not w.serving or (w is avoid and len(self._workers) > 1):
                continue
            key = (len(w.sessions), len(w.inflight), len(w.pinned))
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    # ------------------------------------------------------------------ checkout and the hot path

    def _route(self, call: _Call) -> None:
        session = call.session
        if session is None:
            idle = self._idle
            if idle and not self._queue:
                worker = idle.pop()
                if worker is call.avoid and idle:
                    idle.append(worker)
                    worker = idle.pop(0)
                self._dispatch(worker, call)
            elif call.pipelined and not self._queue and (busy := self._pipe_target(call)):
                self._dispatch(busy, call)
            else:
                self._enqueue(call, self._queue)
            return
        held = session.worker
        if held is None or not held.serving:
            held = self._least_loaded(call.avoid)
            if held is None:  # no worker up right now: the first one that is takes it
                self._enqueue(call, self._queue)
                return
            session.place(held)
        worker = held
        if worker.state is _IDLE:
            self._idle.remove(worker)
            self._dispatch(worker, call)
        else:
            self._enqueue(call, worker.pinned)

    def _pipelining(self) -> bool:
        """Pipelining is for the fast path: every worker up, every circuit closed. While the
        pool is degraded (a worker restarting, failures piling up) calls wait for a free worker,
        so that one more death fails one call rather than every call behind it."""
        return (
            len(self._workers) == self._size
            and self._circuits.all_closed()
            and self._pool_circuit.state is _CLOSED
        )

    def _pipe_target(self, call: _Call) -> Worker | None:
        """The busy worker with the fewest calls in flight that may take ``call`` behind them."""
        if not self._pipelining():
            return None
        best: Worker | None = None
        best_n = self._depth
        for w in self._workers:
            n = len(w.inflight)
            if n < best_n and self._has_room(w, call):
                best, best_n = w, n
                if n == 1:
                    break
        return best

    def _has_room(self, worker: Worker, call: _Call) -> bool:
        """Whether ``call`` (pipelined) may be written behind the calls ``worker`` is running:
        they are pipelined too and leave room, the worker is not about to be recycled, no session
        call waits for it (those go first, when it is free), and it is not the worker a failover
        avoids."""
        inflight = worker.inflight
        limit = self.config.max_calls_per_worker
        return (
            0 < len(inflight) < self._depth
            and inflight[0].pipelined
            and worker.state is WorkerState.BUSY
            and (call.avoid is not worker or len(self._workers) == 1)
            and not worker.retire
            and not worker.pinned
            and (limit is None or worker.calls + len(inflight) < limit)
            and worker.failures < self.config.recycle_after_failures
            and not self._closing
        )

    def _top_up(self, worker: Worker) -> None:
        """Refill a busy worker's pipeline from the head of the queue (in queue order)."""
        if not self._pipelining():
            return
        queue = self._queue
        while queue and queue[0].pipelined and self._has_room(worker, queue[0]):
            call = queue.popleft()
            call.where = None
            self._waiting -= 1
            self._dispatch(worker, call)

    def _enqueue(self, call: _Call, queue: deque[_Call]) -> None:
        if self._waiting >= self.config.max_queue:
            raise self._saturated(call.session.id if call.session else None)
        queue.append(call)
        call.where = queue
        self._waiting += 1

    def _unqueue(self, call: _Call) -> None:
        if call.where is not None:
            call.where.remove(call)
            call.where = None
            self._waiting -= 1

    def _dispatch(self, worker: Worker, call: _Call) -> None:
        worker.inflight.append(call)
        worker.state = WorkerState.BUSY
        call.worker = worker
        call.state = _RUNNING
        frame = call.frame
        session = call.session
        if session is not None:
            if session.worker is not worker:
                session.place(worker)
            if not session.on_worker:
                # This worker does not hold the session yet: send its committed state along.
                try:
                    frame = self._encoder.request(
                        call.req_id, call.command, call.args, session.id, session.state
                    )
                except EncodeError as exc:
                    worker.inflight.pop()
                    self._fail(call, ResourceError(
                        f"session {session.id!r}: its state and these arguments together are over "
                        f"the frame limit: {exc}. Keep session state smaller.",
                        caller_fault=True,
                        context=self._context(call, False),
                    ))
                    self._release(worker)
                    return
                session.on_worker = True
        attempt_timeout = self.config.attempt_timeout
        if attempt_timeout is not None:
            call.attempt_deadline = min(call.deadline, trio.current_time() + attempt_timeout)
            if call.attempt_deadline < self._next_deadline:
                self._next_deadline = call.attempt_deadline
                self._timer_scope.deadline = call.attempt_deadline
        proc = worker.proc
        call.offset = proc.written
        try:
            proc.write(frame)
        except OSError:
            # The worker is dying; its reader sees the end of stream and fails this call.
            return
        call.sent = True

    def _release(self, worker: Worker) -> None:
        """``worker`` finished a call: give it its next call, or recycle it, or idle it."""
        limit = self.config.max_calls_per_worker
        if (
            worker.retire
            or (limit is not None and worker.calls >= limit)
            or worker.failures >= self.config.recycle_after_failures
            or self._closing
        ):
            self._retire(worker)
            return
        if worker.pinned:
            call = worker.pinned.popleft()
        elif self._queue:
            call = self._queue.popleft()
            if call.avoid is worker and len(self._workers) > 1:
                # A failover must run elsewhere: give this worker the next call that may run here.
                self._queue.appendleft(call)
                call = next((c for c in self._queue if c.avoid is not worker), None)  # type: ignore[assignment]
                if call is None:
                    worker.state = _IDLE
                    self._idle.append(worker)
                    return
                self._queue.remove(call)
        else:
            worker.state = _IDLE
            self._idle.append(worker)
            return
        call.where = None
        self._waiting -= 1
        self._dispatch(worker, call)
        if call.pipelined and self._queue:
            self._top_up(worker)

    def _finish(self, call: _Call, result: outcome.Outcome[Any]) -> None:
        if call.state != _DONE:
            call.state = _DONE
            trio.lowlevel.reschedule(call.task, result)

    def _fail(self, call: _Call, error: BaseException) -> None:
        self._finish(call, outcome.Error(error))

    # ------------------------------------------------------------------ errors

    def _closed_error(self, may_have_run: bool = False) -> PoolClosedError:
        return PoolClosedError(
            "the pool is closed; open a new pool to run more calls", may_have_run=may_have_run
        )

    def _saturated(self, session_id: str | None) -> PoolSaturatedError:
        return PoolSaturatedError(
            f"the pool is saturated: {self._waiting} calls are already waiting for "
            f"{self.config.size} workers. Slow down, or raise PoolConfig.max_queue or size.",
            context={"session_id": session_id},
        )

    def _unknown_command(self, command: str) -> CallerError:
        if not self._commands:
            return CallerError(
                "the pool has no workers up yet, so no command table; "
                "call inside `async with open_pool(...)`",
                context={"command": command},
            )
        known = ", ".join(sorted(self._commands))
        return CallerError(
            f"unknown command {command!r}; the workers have: {known}. "
            "Check the name or add the module that defines it to PoolConfig.handlers.",
            context={"command": command},
        )

    def _pool_down_error(self, now: float) -> PoolError:
        cause = self._last_start_error
        retry_after = self._pool_circuit.time_until_retry(now)
        message = "no worker can start, so the pool refuses calls"
        if cause is not None:
            message += f": {cause.message}"
        return InitializationError(
            message, context={"circuit": "pool"}, retry_after=retry_after, error=cause
        )

    def _context(self, call: _Call, may_have_run: bool) -> dict[str, Any]:
        worker = call.worker
        return {
            "command": call.command,
            "session_id": call.session.id if call.session is not None else None,
            "worker_id": worker.id if worker is not None else None,
            "attempt": call.attempt,
            "may_have_run": may_have_run,
        }

    def _reply_error(self, call: _Call, reply: ErrorReply) -> PoolError:
        context = self._context(call, reply.handler_ran)
        if reply.remote_type == "SessionStateTooLarge":
            return ResourceError(reply.message, caller_fault=True, may_have_run=True, context=context)
        if reply.remote_type == "SessionNotFound" and call.session is not None:
            call.session.on_worker = False  # the retry sends the committed state along
            return self._errors.wrap_pool_error(("session_not_found", reply.message), context)
        if reply.caller_error:
            return RemoteError(
                f"{call.command!r} rejected its input: {reply.remote_type}: {reply.message}",
                caller_fault=True,
                may_have_run=reply.handler_ran,
                context=context,
                remote_type=reply.remote_type,
                remote_traceback=reply.traceback,
            )
        if reply.remote_type == "EncodeError" and reply.handler_ran:
            worker = call.worker
            context["message"] = (
                f"{'worker ' + str(worker.id) if worker is not None else 'the worker'} could not "
                f"send the result of {call.command!r} ({reply.message}); nothing was committed and "
                "the worker keeps serving. Make the command return msgpack-able values within "
                "PoolConfig.max_frame_size."
            )
            return self._errors.wrap_pool_error(("encode_error", reply.message), context)
        return self._errors.wrap_pool_error(
            (
                "python_exception",
                {"type": reply.remote_type, "message": reply.message, "traceback": reply.traceback},
            ),
            context,
        )

    def _worker_error(self, call: _Call, why: tuple[str, Any]) -> PoolError:
        return self._errors.wrap_pool_error(why, self._context(call, call.sent))

    # ------------------------------------------------------------------ events

    def _emit(self, kind: str, call: _Call, **data: Any) -> None:
        if self._events.callbacks:
            worker = call.worker
            self._events.emit(
                PoolEvent(
                    kind,
                    trio.current_time(),
                    worker_id=worker.id if worker is not None else None,
                    pid=worker.pid if worker is not None else None,
                    command=call.command,
                    session_id=call.session.id if call.session is not None else None,
                    data=data,
                )
            )

    def _circuit_changed(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        kind = {
            CircuitState.OPEN: "circuit_opened",
            CircuitState.HALF_OPEN: "circuit_half_opened",
            CircuitState.CLOSED: "circuit_closed",
        }[new]
        if breaker is self._pool_circuit and new is _CLOSED:
            self._slots_wakeup.unpark_all()
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        logger.log(level, "circuit %r: %s -> %s", breaker.name, old.value, new.value)
        self._events.emit(
            PoolEvent(kind, trio.current_time(), circuit=breaker.name, data={"from": old.value})
        )

    def _worker_event(self, kind: str, worker: Worker, **data: Any) -> None:
        if self._events.callbacks:
            self._events.emit(
                PoolEvent(kind, trio.current_time(), worker_id=worker.id, pid=worker.pid, data=data)
            )

    # ------------------------------------------------------------------ killing, timers, health

    def _kill(self, worker: Worker, why: tuple[str, Any]) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
        worker.kill(why)

    def _retire(self, worker: Worker) -> None:
        """Ask a worker to exit after its current call (recycle); the supervisor replaces it."""
        if worker in self._idle:
            self._idle.remove(worker)
        if worker.state is WorkerState.STARTING:
            self._kill(worker, ("recycled", "stopped while starting"))
            return
        worker.state = WorkerState.RETIRING
        self._requeue_pinned(worker)
        try:
            worker.proc.write(encode(Shutdown()))
        except OSError:
            worker.kill(("recycled", "channel broken"))
        if self._closing:
            self._state_changed.unpark_all()

    def _requeue_pinned(self, worker: Worker) -> None:
        """Route the calls that waited for this worker elsewhere; their sessions move with their
        committed state (none of these calls has been sent)."""
        for session in list(worker.sessions):
            session.move_off()
        while worker.pinned:
            call = worker.pinned.popleft()
            call.where = None
            self._waiting -= 1
            if self._closing:
                self._fail(call, self._closed_error())
                continue
            try:
                self._route(call)
            except PoolError as exc:
                self._fail(call, exc)

    async def _timer(self) -> None:
        """The one task that watches every call's deadline."""
        while True:
            with trio.CancelScope(deadline=self._next_deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            upcoming = math.inf
            for w in self._workers:
                if not w.inflight:
                    continue
                # A cancelled call left to finish counts too: a worker is never busy for ever.
                late = [c for c in w.inflight if c.attempt_deadline <= now]
                if late:
                    for call in late:
                        w.inflight.remove(call)
                        if call.state == _RUNNING:
                            self._fail(call, self._worker_error(call, ("timeout", "command_timeout")))
                    self._kill(w, ("timeout", "command_timeout"))
                else:
                    upcoming = min(upcoming, min(c.attempt_deadline for c in w.inflight))
            for queue in [self._queue] + [w.pinned for w in self._workers]:
                for call in [c for c in queue if c.deadline <= now]:
                    self._unqueue(call)
                    self._fail(call, self._worker_error(call, ("timeout", "checkout_timeout")))
                for call in queue:
                    upcoming = min(upcoming, call.deadline)
            self._next_deadline = upcoming

    async def _monitor(self) -> None:
        """Heartbeats to idle workers, memory limits, session TTLs."""
        cfg = self.config
        limits = cfg.max_worker_memory is not None or cfg.hard_worker_memory is not None
        tick = min(cfg.heartbeat_interval, cfg.heartbeat_timeout) / 2
        if limits:
            tick = min(tick, cfg.memory_check_interval)
        if cfg.session_ttl is not None:
            tick = min(tick, cfg.session_ttl / 2)
        ping_ids = itertools.count(1)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for w in list(self._workers):
                if w.state is WorkerState.DEAD:
                    continue
                if w.ping_sent is not None:
                    if now - w.ping_sent > cfg.heartbeat_timeout:
                        logger.warning("worker %d did not answer a heartbeat in %ss: killing it", w.id, cfg.heartbeat_timeout)
                        self._kill(w, ("health_check_failed", f"no heartbeat answer in {cfg.heartbeat_timeout}s"))
                        continue
                elif not w.inflight and now - w.last_io >= cfg.heartbeat_interval:
                    w.ping_sent = now
                    try:
                        w.proc.write(encode(Ping(next(ping_ids))))
                    except OSError:
                        pass
                if limits:
                    self._check_memory(w)
            for session in self._sessions.expired(now):
                logger.debug("session %r expired after %ss idle", session.id, cfg.session_ttl)
                self._close_session(session.id)

    def _check_memory(self, w: Worker) -> None:
        rss = w.proc.rss()
        if rss is None:
            return
        hard = self.config.hard_worker_memory
        soft = self.config.max_worker_memory
        if hard is not None and rss > hard:
            logger.warning("worker %d uses %d bytes, over the hard limit %d: killing it", w.id, rss, hard)
            why = ("resource_exhausted", f"worker memory {rss} bytes over the hard limit {hard}")
            if w.inflight:  # the call it is running; those behind it fail as bystanders
                call = w.inflight.popleft()
                self._fail(call, self._worker_error(call, why))
            self._kill(w, why)
        elif soft is not None and rss > soft and not w.retire:
            logger.info("worker %d uses %d bytes, over %d: recycling it after its call", w.id, rss, soft)
            w.retire = True
            if not w.inflight and w.state is _IDLE:
                self._retire(w)

    # ------------------------------------------------------------------ supervision

    async def _slot(self, slot: int) -> None:
        """Keep one worker alive in this slot: start, serve, bury, restart."""
        consecutive_failures = 0
        while not self._closing:
            now = trio.current_time()
            if not self._pool_circuit.allow(now):
                await self._slot_pause(max(self._pool_circuit.time_until_retry(now), 0.01))
                continue
            worker = await self._start(slot)
            if worker is None:
                consecutive_failures += 1
                # Pace restarts of a worker that keeps failing, below the circuit's threshold.
                await self._slot_pause(min(2.0, 0.05 * 2 ** (consecutive_failures - 1)))
                continue
            consecutive_failures = 0
            try:
                await self._serve(worker)
            finally:
                # Also when the application's cancel scope around the pool cancels this task:
                # the worker is killed and reaped on every way out (shielded inside).
                await self._bury(worker)
            if not self._closing:
                self._restarts += 1

    async def _slot_pause(self, seconds: float) -> None:
        """A slot's wait before its next start. Closing the pool ends it at once (a pool whose
        circuit is open must not take the circuit's timeout to close), and so does the pool
        circuit closing (a worker started again: the others need not sit out their backoff)."""
        if self._closing:
            return
        with trio.move_on_after(seconds):
            await self._slots_wakeup.park()

    async def _start(self, slot: int) -> Worker | None:
        cfg = self.config
        try:
            proc = self._launcher.launch(cfg.handlers, cfg.max_frame_size, cfg.max_session_state)
        except OSError as exc:
            self._start_failed(StartFailure(f"cannot spawn {cfg.python!r}: {exc}"), "")
            return None
        worker = Worker(next(self._worker_ids), slot, proc, cfg.max_frame_size, cfg.stderr_tail_lines)
        self._starting.append(worker)
        assert self._nursery is not None
        self._nursery.start_soon(worker.drain_stderr)
        self._nursery.start_soon(worker.run_writer)
        try:
            hello: Hello | None = None
            with trio.move_on_at(worker.started_at + cfg.start_timeout):
                hello = await worker.handshake()
            if hello is None:
                raise StartFailure(f"worker did not say hello within {cfg.start_timeout}s (PoolConfig.start_timeout)")
            if hello.version != PROTOCOL_VERSION:
                raise StartFailure(
                    f"worker speaks protocol {hello.version}, the host {PROTOCOL_VERSION}: "
                    "install the same version of this package for both"
                )
        except StartFailure as failure:
            self._starting.remove(worker)
            with trio.CancelScope(shield=True):
                worker.kill(("init_failed", failure.message))
                await worker.proc.wait()
                worker.tasks.cancel()
                await worker.stderr_finished()
                worker.proc.close()
            if not self._closing:
                self._start_failed(failure, worker.stderr_text())
            return None
        except BaseException:
            # Cancelled while starting (a cancel scope around the whole pool): the process must
            # not outlive the pool, not even as a zombie.
            self._starting.remove(worker)
            with trio.CancelScope(shield=True):
                worker.kill(("pool_closed", "cancelled while starting"))
                await worker.proc.wait()
                worker.tasks.cancel()
                worker.proc.close()
            raise
        self._starting.remove(worker)
        self._workers.append(worker)
        worker.commands = {c.name: c for c in hello.commands}
        if not self._commands:
            self._commands = dict(worker.commands)
        self._pool_circuit.record_success(trio.current_time())
        self._last_start_error = None
        if self._closing:
            self._retire(worker)
            return worker
        worker.state = _IDLE
        worker.last_io = trio.current_time()
        logger.debug("worker %d (pid %d) ready in slot %d", worker.id, worker.pid, slot)
        self._worker_event("worker_started", worker, startup_seconds=worker.last_io - worker.started_at)
        self._release(worker)  # takes a waiting call at once, or goes idle
        self._state_changed.unpark_all()
        return worker

    def _start_failed(self, failure: StartFailure, stderr_tail: str) -> None:
        message = f"a worker could not start: {failure.message}"
        if failure.module is not None:
            message += ". Fix the module or PoolConfig.handlers"
        if stderr_tail.strip():
            message += f"\n--- worker stderr (last lines) ---\n{stderr_tail}"
        error = self._errors.wrap_pool_error(("init_failed", message), {"message": message})
        assert isinstance(error, InitializationError)
        self._last_start_error = error
        logger.error("%s", message)
        now = trio.current_time()
        if failure.counts:
            self._failed_starts += 1
            self._pool_circuit.record_failure(now)
        else:  # killed from outside while starting: not a crash loop; free a trial slot
            self._pool_circuit.release(now)
        if (failure.module is not None or self._pool_circuit.state is CircuitState.OPEN) and self._open_error is None:
            self._open_error = error  # open_pool reports this instead of waiting any longer
        self._state_changed.unpark_all()

    async def _serve(self, worker: Worker) -> None:
        """The task that owns this worker's pipe: decode replies and hand them over."""
        decoder = worker.decoder
        proc = worker.proc
        data = b""
        try:
            while True:
                data = await proc.receive_some()
                decoder.receive_data(data)
                worker.last_io = self._now()
                # The requests this pass hands the worker (the next queued call per reply) go
                # out in one write.
                proc.hold()
                try:
                    more = self._handle_replies(worker)
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
                # SIGKILL, the OOM killer), which is not a garbled frame: let _bury report how
                # it exited, as for any other end of stream.
                return
            logger.error("worker %d sent a bad frame, killing it: %s", worker.id, exc)
            self._kill(worker, ("decode_error", str(exc)))
        except OSError as exc:
            self._kill(worker, ("port_exited", f"channel error: {exc}"))

    def _handle_replies(self, worker: Worker) -> bool | None:
        """Hand over every message buffered from ``worker``. Returns whether a frame is partly
        buffered, or None at the end of the stream."""
        decoder = worker.decoder
        inflight = worker.inflight
        while True:
            msg = decoder.next_message()
            kind = type(msg)
            if kind is Reply or kind is ErrorReply:
                # The worker answers in the order it was written to.
                if not inflight or inflight[0].req_id != msg.id:  # type: ignore[union-attr]
                    logger.debug("worker %d: dropped a stale reply", worker.id)
                    continue
                call = inflight.popleft()
                worker.calls += 1
                if kind is Reply:
                    worker.failures = 0
                elif not msg.caller_error:  # type: ignore[union-attr]
                    worker.failures += 1
                if not inflight:
                    self._release(worker)
                elif self._queue:
                    self._top_up(worker)
                self._finish(call, outcome.Value(msg))
            elif msg is NEED_DATA:
                return decoder.buffered > 0
            elif kind is Pong:
                worker.ping_sent = None
            elif msg is EOF:
                return None
            else:
                raise ProtocolError(f"unexpected message from a worker: {msg!r}")

    async def _bury(self, worker: Worker) -> None:
        """Reap a worker whose channel ended, fail its call if it had one, free its slot."""
        with trio.CancelScope(shield=True):
            if worker in self._idle:
                self._idle.remove(worker)
            retiring = worker.state is WorkerState.RETIRING
            worker.state = WorkerState.DEAD
            self._requeue_pinned(worker)
            if worker in self._workers:
                self._workers.remove(worker)
            if not retiring:
                worker.proc.kill()
            code: int | None = None
            with trio.move_on_after(self.config.shutdown_grace + 1.0):
                code = await worker.proc.wait()
            if code is None:  # a retiring worker that will not exit
                worker.proc.kill()
                code = await worker.proc.wait()
            calls = list(worker.inflight)
            worker.inflight.clear()
            if calls:
                # A request still unread in the pipe never reached the worker: the call did not
                # run, so it is safe to run again even if its command is not idempotent.
                proc = worker.proc
                delivered = proc.written - proc.undelivered()
                for call in calls:
                    if call.sent:
                        call.sent = delivered > call.offset
            worker.tasks.cancel()
            await worker.stderr_finished(timeout=0.2)
            worker.proc.close()
            why = worker.death or ("port_exited", code)
            if why[0] in _ONE_CALLS_FAULT:
                # The call that caused it has failed already; these only shared its worker.
                why = ("port_exited", code)
            for call in calls:
                if self._closing:
                    self._fail(call, self._closed_error(may_have_run=call.sent))
                else:
                    self._fail(call, self._worker_error(call, why))
            level = logging.DEBUG if retiring or self._closing else logging.WARNING
            logger.log(
                level, "worker %d (pid %d) exited with code %s (%s)", worker.id, worker.pid, code, why[0]
            )
            self._worker_event("worker_exited", worker, exit_code=code, reason=why[0])
            self._state_changed.unpark_all()

    async def _run_services(self) -> None:
        """The timer and the monitor, until ``aclose`` cancels them."""
        with self._services_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timer)
                nursery.start_soon(self._monitor)

    async def _run_slots(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for slot in range(self.config.size):
                    nursery.start_soon(self._slot, slot)
        finally:
            self._slots_done.set()

    async def _wait_ready(self) -> None:
        """Wait until every worker has said hello; raise if workers cannot start."""
        while len(self._workers) < self.config.size:
            if self._open_error is not None:
                raise self._open_error
            await self._state_changed.park()


def _circuit_detail(stats: BreakerStatistics, breaker: CircuitBreaker, now: float) -> dict[str, Any]:
    return {
        "state": stats.state.value,
        "failures": stats.failure_count,
        "opened": stats.opened_count,
        "retry_after": breaker.time_until_retry(now),
        "rejected": stats.rejected,
    }


@asynccontextmanager
async def open_pool(
    config: PoolConfig | None = None, *, launcher: Launcher | None = None
) -> AsyncIterator[Pool]:
    """Start a pool, wait until every worker has said hello, and close it on exit.

    Raises a single InitializationError when workers cannot start (a handlers module that does
    not import, a crash loop). An exception raised in the body comes out as itself.
    """
    config = config or PoolConfig()
    if launcher is None:
        launcher = LocalLauncher(config.python, dict(config.env))
    pool = Pool(config, launcher)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            pool._nursery = nursery
            nursery.start_soon(pool._run_slots)
            nursery.start_soon(pool._run_services)
            try:
                await pool._wait_ready()
                yield pool
            finally:
                await pool.aclose()
    except BaseExceptionGroup as group:
        body_error = _only_exception(group)
        if body_error is None:
            raise
    else:
        return
    raise body_error


def _only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single leaf exception of a group made by the pool's nursery, else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
