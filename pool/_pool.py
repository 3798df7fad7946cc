"""Pool and open_pool: checkout, the hot path, deadlines, supervision and shutdown.

The hot path, all circuits closed: the caller encodes its request, takes an idle worker (or joins
the FIFO queue), writes the frame and parks once. The worker's reader task decodes the reply, hands
the worker its next queued request at once, and reschedules the parked caller directly. One timer
task watches every deadline; there is no lock, cancel scope or extra task per call.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import attrs
import outcome
import trio

from bridge_worker.protocol import (
    EOF,
    NEED_DATA,
    PROTOCOL_VERSION,
    CommandInfo,
    EncodeError,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Reply,
    Request,
    Shutdown,
    encode,
)
from pool._breaker import CircuitBreaker, CircuitState
from pool._config import PoolConfig
from pool._errors import (
    CallerError,
    InitializationError,
    PoolClosedError,
    PoolError,
    PoolSaturatedError,
    RemoteError,
)
from pool._matrix import PoolErrorHandler
from pool._process import Launcher, LocalLauncher
from pool._worker import StartFailure, Worker, WorkerState

logger = logging.getLogger("pool")

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Call:
    """One attempt of one call: what the caller parks on until a reply, an error or a timeout."""

    __slots__ = (
        "command",
        "info",
        "frame",
        "req_id",
        "deadline",
        "attempt_deadline",
        "task",
        "state",
        "worker",
        "sent",
        "pool",
    )

    def __init__(
        self, pool: Pool, info: CommandInfo, frame: bytes, req_id: int, deadline: float
    ) -> None:
        self.pool = pool
        self.command = info.name
        self.info = info
        self.frame = frame
        self.req_id = req_id
        self.deadline = deadline
        self.attempt_deadline = deadline
        self.task = trio.lowlevel.current_task()
        self.state = _QUEUED
        self.worker: Worker | None = None
        self.sent = False

    def abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # The caller was cancelled while parked.
        state = self.state
        self.state = _DONE
        if state == _QUEUED:
            try:
                self.pool._queue.remove(self)
            except ValueError:
                pass
        elif state == _RUNNING and self.worker is not None:
            worker = self.worker
            if self.info.finish_on_cancel:
                pass  # the worker finishes the call; its reply is dropped on arrival
            elif worker.current is self:
                worker.current = None
                self.pool._kill(worker, ("cancelled", "caller cancelled the call"))
        return trio.lowlevel.Abort.SUCCEEDED


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
    pool_circuit: str


class Pool:
    """A supervised pool of worker processes. Get one from :func:`open_pool`."""

    def __init__(self, config: PoolConfig, launcher: Launcher) -> None:
        self.config = config
        self._launcher = launcher
        self._errors = PoolErrorHandler(config.policy)
        self._workers: list[Worker] = []  # ready (idle or busy or retiring), in start order
        self._starting: list[Worker] = []
        self._idle: list[Worker] = []
        self._queue: deque[_Call] = deque()
        self._commands: dict[str, CommandInfo] = {}
        self._req_ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        self._closing = False
        self._closed = False
        self._pool_circuit = CircuitBreaker("pool", config.pool_circuit)
        self._last_start_error: InitializationError | None = None
        self._open_error: InitializationError | None = None
        self._state_changed = trio.lowlevel.ParkingLot()
        self._timer_scope = trio.CancelScope()
        self._next_deadline = math.inf
        self._nursery: trio.Nursery | None = None
        self._slots_done = trio.Event()
        self._restarts = 0
        self._failed_starts = 0
        self._calls_ok = 0
        self._calls_failed = 0

    # ------------------------------------------------------------------ public API

    async def execute(self, command: str, args: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``command(args)`` on any worker and return its result, or raise a PoolError.

        ``timeout`` is the whole deadline in seconds (queueing included); default from config.
        """
        if self._closing:
            raise self._closed_error()
        info = self._commands.get(command)
        if info is None:
            raise self._unknown_command(command)
        now = trio.current_time()
        deadline = now + (self.config.timeout if timeout is None else timeout)
        if not self._workers and self._pool_circuit.state is not CircuitState.CLOSED:
            raise self._pool_down_error(now)
        req_id = next(self._req_ids)
        try:
            frame = encode(Request(req_id, command, args, None, None), self.config.max_frame_size)
        except EncodeError as exc:
            raise CallerError(
                f"the arguments of {command!r} cannot be sent to a worker: {exc}. "
                "Pass msgpack-able values (dict, list, str, bytes, int, float, bool, None).",
                context={"command": command},
                error=exc,
            ) from exc
        call = _Call(self, info, frame, req_id, deadline)
        reply = await self._run(call)
        if isinstance(reply, Reply):
            self._calls_ok += 1
            return reply.result
        self._calls_failed += 1
        raise self._reply_error(call, reply)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool's counters."""
        busy = sum(1 for w in self._workers if w.current is not None)
        return PoolStatistics(
            size=self.config.size,
            alive=len(self._workers),
            busy=busy,
            idle=len(self._idle),
            starting=len(self._starting),
            queued=len(self._queue),
            restarts=self._restarts,
            failed_starts=self._failed_starts,
            calls_ok=self._calls_ok,
            calls_failed=self._calls_failed,
            pool_circuit=self._pool_circuit.state.value,
        )

    def worker_pids(self) -> list[int]:
        """Every worker process that exists, those still starting included."""
        return [w.pid for w in self._starting] + [w.pid for w in self._workers]

    async def aclose(self) -> None:
        """Stop taking calls, let running ones finish within ``shutdown_grace``, then stop every
        worker and reap it. Waiting callers get PoolClosedError. Idempotent."""
        if self._closed:
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            while self._queue:
                call = self._queue.popleft()
                self._fail(call, self._closed_error())
            with trio.move_on_after(self.config.shutdown_grace):
                while any(w.current is not None for w in self._workers):
                    await self._state_changed.park()
            for w in self._starting + self._workers:
                if w.current is None and w.state is not WorkerState.DEAD:
                    self._retire(w)
                else:
                    self._kill(w, ("pool_closed", "the pool was closed"))
            with trio.move_on_after(max(self.config.shutdown_grace, 1.0)):
                await self._slots_done.wait()
            for w in self._starting + self._workers:
                self._kill(w, ("pool_closed", "the pool was closed"))
            await self._slots_done.wait()
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ checkout and the hot path

    async def _run(self, call: _Call) -> Reply | ErrorReply:
        """Dispatch or queue ``call`` and park until it is resolved. Raises PoolError for
        failures decided in the host (timeout, dead worker, closed pool)."""
        idle = self._idle
        if idle and not self._queue:
            self._dispatch(idle.pop(), call)
        elif len(self._queue) >= self.config.max_queue:
            raise PoolSaturatedError(
                f"the pool is saturated: {len(self._queue)} calls are already waiting for "
                f"{self.config.size} workers. Slow down, or raise PoolConfig.max_queue or size.",
                context={"command": call.command},
            )
        else:
            self._queue.append(call)
        if call.deadline < self._next_deadline:
            self._next_deadline = call.deadline
            self._timer_scope.deadline = call.deadline
        result: Reply | ErrorReply = await trio.lowlevel.wait_task_rescheduled(call.abort)
        return result

    def _dispatch(self, worker: Worker, call: _Call) -> None:
        worker.current = call
        worker.state = WorkerState.BUSY
        call.worker = worker
        call.state = _RUNNING
        attempt_timeout = self.config.attempt_timeout
        if attempt_timeout is not None:
            call.attempt_deadline = min(call.deadline, trio.current_time() + attempt_timeout)
            if call.attempt_deadline < self._next_deadline:
                self._next_deadline = call.attempt_deadline
                self._timer_scope.deadline = call.attempt_deadline
        try:
            worker.proc.write(call.frame)
        except OSError:
            # The worker is dying; its reader sees the end of stream and fails this call.
            return
        call.sent = True

    def _release(self, worker: Worker) -> None:
        """``worker`` finished a call: give it the next queued call, or recycle it, or idle it."""
        limit = self.config.max_calls_per_worker
        if worker.retire or (limit is not None and worker.calls >= limit) or self._closing:
            self._retire(worker)
            if self._closing:
                self._state_changed.unpark_all()
            return
        if self._queue:
            self._dispatch(worker, self._queue.popleft())
        else:
            worker.state = WorkerState.IDLE
            self._idle.append(worker)

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

    def _reply_error(self, call: _Call, reply: ErrorReply) -> PoolError:
        worker = call.worker
        context: dict[str, Any] = {
            "command": call.command,
            "worker_id": worker.id if worker is not None else None,
            "may_have_run": reply.handler_ran,
        }
        if reply.caller_error:
            return RemoteError(
                f"{call.command!r} rejected its input: {reply.remote_type}: {reply.message}",
                caller_fault=True,
                may_have_run=True,
                context=context,
                remote_type=reply.remote_type,
                remote_traceback=reply.traceback,
            )
        if reply.remote_type == "EncodeError" and reply.handler_ran:
            return self._errors.wrap_pool_error(("encode_error", reply.message), context)
        err = self._errors.wrap_pool_error(
            ("python_exception", {"type": reply.remote_type, "message": reply.message}), context
        )
        if isinstance(err, RemoteError):
            err.remote_type = reply.remote_type
            err.remote_traceback = reply.traceback
        return err

    def _worker_error(self, call: _Call, why: tuple[str, Any]) -> PoolError:
        worker = call.worker
        return self._errors.wrap_pool_error(
            why,
            {
                "command": call.command,
                "worker_id": worker.id if worker is not None else None,
                "may_have_run": call.sent,
            },
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
        try:
            worker.proc.write(encode(Shutdown()))
        except OSError:
            worker.kill(("recycled", "channel broken"))

    async def _timer(self) -> None:
        """The one task that watches every call's deadline."""
        while True:
            with trio.CancelScope(deadline=self._next_deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            upcoming = math.inf
            for w in self._workers:
                call = w.current
                if call is None or call.state != _RUNNING:
                    continue
                if call.attempt_deadline <= now:
                    w.current = None
                    self._fail(call, self._worker_error(call, ("timeout", "command_timeout")))
                    self._kill(w, ("timeout", "command_timeout"))
                else:
                    upcoming = min(upcoming, call.attempt_deadline)
            expired = [c for c in self._queue if c.deadline <= now]
            for call in expired:
                self._queue.remove(call)
                self._fail(call, self._worker_error(call, ("timeout", "checkout_timeout")))
            for call in self._queue:
                upcoming = min(upcoming, call.deadline)
            self._next_deadline = upcoming

    async def _monitor(self) -> None:
        """Heartbeats to idle workers, memory limits."""
        cfg = self.config
        limits = cfg.max_worker_memory is not None or cfg.hard_worker_memory is not None
        tick = min(cfg.heartbeat_interval, cfg.heartbeat_timeout) / 2
        if limits:
            tick = min(tick, cfg.memory_check_interval)
        ping_ids = itertools.count(1)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for w in list(self._workers):
                if w.state is WorkerState.DEAD:
                    continue
                if w.ping_sent is not None:
                    if now - w.ping_sent > cfg.heartbeat_timeout:
                        self._kill(w, ("health_check_failed", f"no heartbeat answer in {cfg.heartbeat_timeout}s"))
                        continue
                elif w.current is None and now - w.last_io >= cfg.heartbeat_interval:
                    w.ping_sent = now
                    try:
                        w.proc.write(encode(Ping(next(ping_ids))))
                    except OSError:
                        pass
                if limits:
                    self._check_memory(w)

    def _check_memory(self, w: Worker) -> None:
        rss = w.proc.rss()
        if rss is None:
            return
        hard = self.config.hard_worker_memory
        soft = self.config.max_worker_memory
        if hard is not None and rss > hard:
            logger.warning("worker %d uses %d bytes, over the hard limit %d: killing it", w.id, rss, hard)
            call = w.current
            if call is not None:
                w.current = None
                self._fail(call, self._worker_error(call, ("resource_exhausted", f"worker memory {rss} bytes over the hard limit {hard}")))
            self._kill(w, ("resource_exhausted", f"memory {rss} > {hard}"))
        elif soft is not None and rss > soft and not w.retire:
            logger.info("worker %d uses %d bytes, over %d: recycling it after its call", w.id, rss, soft)
            w.retire = True
            if w.current is None and w.state is WorkerState.IDLE:
                self._retire(w)

    # ------------------------------------------------------------------ supervision

    async def _slot(self, slot: int) -> None:
        """Keep one worker alive in this slot: start, serve, bury, restart."""
        consecutive_failures = 0
        while not self._closing:
            now = trio.current_time()
            if not self._pool_circuit.allow(now):
                await trio.sleep(max(self._pool_circuit.time_until_retry(now), 0.01))
                continue
            worker = await self._start(slot)
            if worker is None:
                consecutive_failures += 1
                # Pace restarts of a worker that keeps failing, below the circuit's threshold.
                await trio.sleep(min(2.0, 0.05 * 2 ** (consecutive_failures - 1)))
                continue
            consecutive_failures = 0
            await self._serve(worker)
            await self._bury(worker)
            if not self._closing:
                self._restarts += 1

    async def _start(self, slot: int) -> Worker | None:
        cfg = self.config
        try:
            proc = self._launcher.launch(cfg.handlers, cfg.max_frame_size)
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
                await worker.stderr_finished()
                worker.proc.close()
            if not self._closing:
                self._start_failed(failure, worker.stderr_text())
            return None
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
        worker.state = WorkerState.IDLE
        worker.last_io = trio.current_time()
        logger.debug("worker %d (pid %d) ready in slot %d", worker.id, worker.pid, slot)
        self._release(worker)  # takes a queued call at once, or goes idle
        self._state_changed.unpark_all()
        return worker

    def _start_failed(self, failure: StartFailure, stderr_tail: str) -> None:
        message = f"a worker could not start: {failure.message}"
        if failure.module is not None:
            message += f". Fix the module or PoolConfig.handlers"
        if stderr_tail.strip():
            message += f"\n--- worker stderr (last lines) ---\n{stderr_tail}"
        error = self._errors.wrap_pool_error(("init_failed", message), {"message": message})
        assert isinstance(error, InitializationError)
        self._last_start_error = error
        logger.error("%s", message)
        if failure.counts:
            self._failed_starts += 1
            self._pool_circuit.record_failure(trio.current_time())
        else:  # killed from outside while starting: not a crash loop; free a trial slot
            self._pool_circuit.release(trio.current_time())
        if (failure.module is not None or self._pool_circuit.state is CircuitState.OPEN) and self._open_error is None:
            self._open_error = error  # open_pool reports this instead of waiting any longer
        self._state_changed.unpark_all()

    async def _serve(self, worker: Worker) -> None:
        """The task that owns this worker's pipe: decode replies and hand them over."""
        decoder = worker.decoder
        proc = worker.proc
        try:
            while True:
                data = await proc.receive_some()
                decoder.receive_data(data)
                worker.last_io = trio.current_time()
                while True:
                    msg = decoder.next_message()
                    kind = type(msg)
                    if kind is Reply or kind is ErrorReply:
                        call = worker.current
                        if call is None or call.req_id != msg.id:  # type: ignore[union-attr]
                            logger.debug("worker %d: dropped a stale reply", worker.id)
                            continue
                        worker.current = None
                        worker.calls += 1
                        self._release(worker)
                        self._finish(call, outcome.Value(msg))
                    elif msg is NEED_DATA:
                        break
                    elif kind is Pong:
                        worker.ping_sent = None
                    elif msg is EOF:
                        return
                    else:
                        raise ProtocolError(f"unexpected message from a worker: {msg!r}")
        except ProtocolError as exc:
            logger.error("worker %d sent a bad frame, killing it: %s", worker.id, exc)
            self._kill(worker, ("decode_error", str(exc)))
        except OSError as exc:
            self._kill(worker, ("port_exited", f"channel error: {exc}"))

    async def _bury(self, worker: Worker) -> None:
        """Reap a worker whose channel ended, fail its call if it had one, free its slot."""
        with trio.CancelScope(shield=True):
            if worker in self._idle:
                self._idle.remove(worker)
            if worker in self._workers:
                self._workers.remove(worker)
            retiring = worker.state is WorkerState.RETIRING
            worker.state = WorkerState.DEAD
            if not retiring:
                worker.proc.kill()
            code: int | None = None
            with trio.move_on_after(self.config.shutdown_grace + 1.0):
                code = await worker.proc.wait()
            if code is None:  # a retiring worker that will not exit
                worker.proc.kill()
                code = await worker.proc.wait()
            worker.tasks.cancel()
            await worker.stderr_finished(timeout=0.2)
            worker.proc.close()
            why = worker.death or ("port_exited", code)
            call = worker.current
            worker.current = None
            if call is not None:
                if self._closing:
                    self._fail(call, self._closed_error(may_have_run=call.sent))
                else:
                    self._fail(call, self._worker_error(call, why))
            level = logging.DEBUG if retiring or self._closing else logging.WARNING
            logger.log(
                level, "worker %d (pid %d) exited with code %s (%s)", worker.id, worker.pid, code, why[0]
            )
            self._state_changed.unpark_all()

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
            nursery.start_soon(pool._timer)
            nursery.start_soon(pool._monitor)
            try:
                await pool._wait_ready()
                yield pool
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                await pool.aclose()
    except BaseExceptionGroup as group:
        inner = _only_exception(group)
        if inner is None:
            raise
        body_error = inner
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
