"""Pool and open_pool: the facade over the runtime's parts.

::

    Pool.execute / execute_in_session ─> RecoveryOrchestrator   one call: circuit, turn, attempts
                                            └─> Checkout        the hot path: route, dispatch,
                                                                replies, deadlines
    open_pool / aclose / health ───────> Supervisor             slots, pool circuit, monitor,
                                                                shutdown
    beside them: Worker (its channel, state table, reap), SessionStore (affinity, turns, committed
    state), Launcher (processes), PoolErrorHandler (the matrix), EventBus (events and logging)

This module hands each call to the orchestrator, opens and closes the pool, and reports what the
parts know (statistics, health).
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, NoReturn

import attrs
import trio

from bridge_worker.protocol import CommandInfo
from pool._breaker import (
    BreakerStatistics,
    CircuitBreaker,
    CircuitRegistry,
    CircuitState,
)
from pool._checkout import Checkout
from pool._config import PoolConfig
from pool._errors import PoolError
from pool._events import EventBus
from pool._matrix import PoolErrorHandler, outside_error
from pool._metrics import PoolMetrics
from pool._process import Launcher, LocalLauncher
from pool._recovery import RecoveryOrchestrator, RecoveryStatistics
from pool._sessions import SessionStore
from pool._shapes import Shapes
from pool._supervisor import Supervisor
from pool._tracing import open_tracing
from pool._worker import RETIRING, Worker

logger = logging.getLogger("pool")
# A library logs; the application decides where it goes. Without this, Python's last-resort
# handler would print every warning of the pool to stderr of an application that set nothing up.
logger.addHandler(logging.NullHandler())

_CLOSED = CircuitState.CLOSED


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
    #: Memory in bytes of the worker and every process it started (what the memory limits
    #: compare; for a remote worker, what it reported), None if it cannot be read.
    rss: int | None
    #: Where it runs: "localhost", or the address its TCP connection came from.
    host: str = "localhost"

    @property
    def busy(self) -> bool:
        """Running a call (or several pipelined ones)."""
        return self.in_flight > 0


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool's counters (see ``Pool.statistics``)."""

    #: Workers the pool runs now: ``PoolConfig.size`` unless resize or the autoscaler changed it.
    size: int
    #: How many times the size changed (resize, autoscale); each is a ``pool_resized`` event.
    size_changes: int
    alive: int
    busy: int
    idle: int
    starting: int
    #: Calls waiting: for a worker, or for their session's turn.
    queued: int
    restarts: int
    failed_starts: int
    calls_ok: int
    calls_failed: int
    #: Attempts the pool ran again (retries) or elsewhere (failovers).
    retries: int
    failovers: int
    fallbacks: int
    sessions: int
    #: Calls that needed recovery, and how they ended.
    recoveries: RecoveryStatistics
    pool_circuit: str
    circuits: dict[str, str]
    #: Every worker process that exists, those starting included, by id.
    workers: tuple[WorkerStatistics, ...] = ()
    #: ``restarts`` by why the worker had to be replaced: ``crash``, ``killed`` (a SIGKILL the
    #: pool did not send), ``timeout``, ``cancel``, ``heartbeat``, ``memory``, ``protocol_error``,
    #: ``recycled_calls``, ``recycled_failures``, ``age``, ``recovery``, ``rolling_restart``.
    restarts_by_reason: dict[str, int] = attrs.field(factory=dict)


class _NoPublicConstructor(type):
    """Pools come from :func:`open_pool` (as trio's ``Process`` comes from ``open_process``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor: use open_pool()")

    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


class Pool(metaclass=_NoPublicConstructor):
    """A supervised pool of worker processes. Get one from :func:`open_pool`."""

    def __init__(self, config: PoolConfig, launcher: Launcher) -> None:
        self.config = config
        # The hot path reads the clock a few times per call: through the clock itself, not
        # trio.current_time()'s two extra layers. (A pool lives inside one trio run.)
        now = self._now = trio.lowlevel.current_clock().current_time
        # The trio run the pool lives in: pool.ops reaches it from a server on another thread.
        self._trio_token = trio.lowlevel.current_trio_token()
        self._closed = trio.Event()
        self._closing = False
        self._services_scope = trio.CancelScope()  # the timer and the monitor
        errors = PoolErrorHandler(config.policy)
        self._events = events = EventBus(config.event_callbacks)
        self._sessions = SessionStore(config.max_sessions, config.session_ttl)
        self._circuits = CircuitRegistry(
            config.command_circuit,
            on_state_change=lambda breaker, old, new: events.circuit_changed(breaker, old, new, now()),
        )
        self._pool_circuit = CircuitBreaker("pool", config.pool_circuit)
        #: What the metrics need at the moment of a call (pool.ops reads it at scrape time).
        self._metrics = PoolMetrics(now) if config.metrics else None
        self._checkout = Checkout(
            config, errors, self._sessions, self._circuits, self._pool_circuit, now, self._metrics
        )
        self._supervisor = Supervisor(
            config,
            launcher,
            self._checkout,
            self._sessions,
            self._pool_circuit,
            errors,
            events,
            now,
            on_tick=lambda t: self._recovery.note_totals(t),
            metrics=self._metrics,
        )
        self._recovery = RecoveryOrchestrator(
            config,
            errors,
            self._checkout,
            self._sessions,
            self._circuits,
            self._pool_circuit,
            events,
            self._supervisor.pool_down,
            now,
            # Level 4 replaces every worker as a rolling restart: a new worker serves before an
            # old one leaves, so the pool keeps its capacity while it recovers.
            restart_all=lambda: self._supervisor.start_rolling_restart(self._adopt_commands),
            metrics=self._metrics,
        )
        self._shapes = Shapes(self._recovery, self._checkout)
        # A call: straight to the orchestrator, or inside its spans when the application has
        # configured OpenTelemetry (decided once, here; see pool._tracing).
        tracing = open_tracing()
        self._call: Callable[[Any, Any, str | None, Any], Awaitable[Any]] = (
            self._recovery.call if tracing is None else partial(tracing.call, self._recovery.call)
        )

    # ------------------------------------------------------------------ calls

    async def execute(self, command: str, args: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``command(args)`` on any worker and return its plain result, or raise a PoolError.

        ``timeout`` is the whole deadline in seconds (queueing, retries and backoff included);
        default ``PoolConfig.timeout``. A timeout of 0 or less fails at once (PoolTimeoutError),
        with no worker touched. ``ctx.session`` is a fresh dict, dropped after the call.
        """
        return await self._call(command, args, None, timeout)

    async def execute_in_session(
        self, session_id: str, command: str, args: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Run ``command(args)`` on the worker that holds session ``session_id``.

        The session is created by its first call. Its calls run one at a time, in arrival order;
        what a successful call leaves in ``ctx.session`` is committed, a call that raises commits
        nothing. If its worker dies, the session continues on another one from its committed state.
        """
        if type(session_id) is not str or not session_id:
            raise _bad_call(f"session_id must be a non-empty string, got {session_id!r}", command)
        return await self._call(command, args, session_id, timeout)

    async def map(
        self, command: str, items: Iterable[Any], *, chunksize: int | None = None, timeout: float | None = None
    ) -> list[Any]:
        """``[command(item) for item in items]``, run on the workers in chunks; results in input
        order. ``chunksize`` items go in one frame and one loop in a worker (None: about four
        chunks per worker, from the input's length). ``timeout`` covers the whole map. A caller
        error in an item fails the map with that item's index; see the README ("map")."""
        return await self._shapes.map(command, items, chunksize, timeout)

    def imap(
        self, command: str, items: Iterable[Any], *, chunksize: int | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """``map``, for inputs too large to hold: ``async with pool.imap(...) as results: async
        for result in results: ...``, in input order, with a bounded number of chunks in flight
        (they wait for the consumer). Leaving the block stops it."""
        return self._shapes.imap(command, items, chunksize, timeout)

    def open_stream(
        self, command: str, args: Any = None, *, session_id: str | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Read what a stream command's generator yields: ``async with pool.open_stream(...) as
        items: async for item in items: ...``, in order, with backpressure. Leaving the block
        early closes the generator in its worker; see the README ("Streams")."""
        if session_id is not None and (type(session_id) is not str or not session_id):
            raise _bad_call(f"session_id must be a non-empty string or None, got {session_id!r}", command)
        return self._shapes.open_stream(command, args, session_id, timeout)

    async def close_session(self, session_id: str) -> None:
        """Forget a session on the host and its worker; a later call with the same id starts a
        new, empty session. Its calls still waiting (for their turn, or for its worker) fail with
        SessionError without running; a call already running finishes, and commits nothing."""
        if type(session_id) is not str:
            raise _bad_call(f"session_id must be a string, got {session_id!r}", None)
        self._sessions.close(session_id)
        self._checkout.session_closed(session_id)
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ what the parts know

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool's counters."""
        checkout = self._checkout
        supervisor = self._supervisor
        recovery = self._recovery
        workers = checkout.workers
        return PoolStatistics(
            size=supervisor.target,
            size_changes=supervisor.size_changes,
            alive=len(workers),
            busy=sum(1 for w in workers if w.inflight),
            idle=len(checkout.idle),
            starting=len(supervisor.starting),
            queued=checkout.waiting,
            restarts=supervisor.restarts,
            failed_starts=supervisor.failed_starts,
            calls_ok=recovery.calls_ok,
            calls_failed=recovery.calls_failed,
            retries=recovery.retries,
            failovers=recovery.failovers,
            fallbacks=recovery.fallbacks,
            sessions=len(self._sessions),
            recoveries=recovery.statistics(),
            pool_circuit=self._pool_circuit.state.value,
            circuits={name: state.value for name, state in self._circuits.states().items()},
            workers=tuple(
                WorkerStatistics(
                    id=w.id,
                    slot=w.slot,
                    pid=w.pid,
                    state=_state(w),
                    in_flight=len(w.inflight),
                    calls=w.calls,
                    sessions=len(w.sessions),
                    rss=w.rss(),
                    host=w.proc.host,
                )
                for w in sorted(supervisor.starting + workers, key=lambda w: w.id)
            ),
            restarts_by_reason=dict(supervisor.restarts_by_reason),
        )

    def health(self) -> dict[str, Any]:
        """``{"status": "healthy" | "degraded" | "unhealthy", "workers": {...}, "circuits": {...}}``.

        healthy: every worker of the current size up and every circuit closed. degraded: workers
        restarting (or starting after the pool grew), or a command circuit not closed. unhealthy:
        the pool circuit is open (workers cannot start), or no worker can serve.
        """
        now = self._now()
        workers = self._checkout.workers
        supervisor = self._supervisor
        pool_state = self._pool_circuit.state
        if pool_state is CircuitState.OPEN or not any(w.serving for w in workers):
            status = "unhealthy"
        elif (
            supervisor.serving_count() >= supervisor.target
            and self._circuits.all_closed()
            and pool_state is _CLOSED
        ):
            status = "healthy"
        else:
            status = "degraded"
        detail: dict[str, Any] = {
            "status": status,
            "workers": {
                str(w.id): {
                    "pid": w.pid,
                    "host": w.proc.host,
                    "state": _state(w),
                    "calls": w.calls,
                    "sessions": len(w.sessions),
                    "uptime": round(now - w.started_at, 3),
                    "rss": w.rss(),
                }
                for w in self._supervisor.starting + workers
            },
            "circuits": {"pool": _circuit_detail(self._pool_circuit, now)}
            | {f"command:{name}": _circuit_detail(b, now) for name, b in self._circuits.items()},
        }
        if self._supervisor.last_start_error is not None:
            detail["last_start_error"] = self._supervisor.last_start_error.message
        return detail

    def recovery_report(self) -> dict[str, Any]:
        """What recovery has learned (seeds 002, 003): ``{"levels": {signature: {"level", ...}},
        "strategies": {name: {"attempts", "succeeded", "success_rate", "mean_seconds"}},
        "by_signature": {...}, "history": [...], "budget": {...}, "attempt_timeouts": {...},
        "calls": {...}}``; a signature is ``command:category``. See ``pool._learning``."""
        return self._recovery.report()

    # ------------------------------------------------------------------ the pool's size

    async def resize(self, size: int) -> None:
        """Grow or shrink the pool to ``size`` workers now.

        Growing returns when the new workers serve; if they cannot start it raises
        InitializationError (at once for a handlers module that does not import, else once the
        pool circuit opens), and the pool keeps the new size as its target and keeps trying.
        Shrinking returns at once: the workers that leave (those that cost least: idle, fewest
        sessions) take no new calls, finish the ones they run, and exit; their sessions move on
        to the others with their committed state. With autoscaling on, ``size`` must lie between
        ``PoolConfig.size`` and ``max_size``, and the autoscaler goes on from there.
        """
        cfg = self.config
        if type(size) is not int or size < 1:
            raise _bad_call(f"resize needs a whole number of workers, 1 or more, got {size!r}", None)
        if cfg.autoscaling and not cfg.size <= size <= (cfg.max_size or size):
            raise _bad_call(
                f"resize({size}): with autoscaling on, the pool's size stays between "
                f"PoolConfig.size ({cfg.size}) and max_size ({cfg.max_size}); resize within those, "
                "or open the pool with other bounds",
                None,
            )
        await self._supervisor.resize(size)

    async def restart_workers(self) -> None:
        """Replace every worker by a new process, one at a time (a rolling restart), to load new
        handler code: each new process imports the handler modules afresh.

        A new worker starts before an old one leaves, so no call fails for it; an old worker
        leaves once its calls are done, and its sessions move on to the others with their
        committed state. When the roll is done, the pool takes the new workers' command table
        (commands added or changed by the new code). A new worker that fails to start stops the
        roll with InitializationError: the workers not replaced yet keep serving.
        """
        replaced, commands = await self._supervisor.restart_workers()
        if replaced:
            self._adopt_commands(commands)

    def _adopt_commands(self, commands: dict[str, CommandInfo]) -> None:
        self._recovery.commands = commands

    # ------------------------------------------------------------------ processes

    def worker_pids(self) -> list[int]:
        """Every worker process that exists on this machine, those still starting included.
        Workers on other hosts are left out (their pids mean nothing here): ``health()`` shows
        every worker's host and pid."""
        return [w.pid for w in self._supervisor.starting + self._checkout.workers if w.pid and w.proc.local]

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Stop taking calls, let running ones finish within ``shutdown_grace``, then stop every
        worker and reap it. Waiting callers get PoolClosedError. Idempotent; bounded."""
        if self._closing:
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._closing = True
        try:
            await self._supervisor.shut_down()
        finally:
            self._recovery.close()
            self._closed.set()
            # Only the pool's own service tasks: the application's code in the body of open_pool
            # runs in the same nursery and must go on after an explicit aclose().
            self._services_scope.cancel()

    async def _run_services(self) -> None:
        """The timer and the monitor, until ``aclose`` cancels them."""
        with self._services_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._checkout.run_timer)
                nursery.start_soon(self._supervisor.monitor)

    async def _open(self) -> None:
        """Wait until every worker has said hello; then calls may come."""
        await self._supervisor.wait_ready()
        self._recovery.commands = dict(self._checkout.workers[0].commands)


def _state(worker: Worker) -> str:
    # A worker chosen to leave (recycled, or the pool shrank) serves nothing more: it only
    # finishes the calls it runs, so that is what it is, though its state is still busy.
    return str(RETIRING) if worker.retire is not None and worker.serving else str(worker.state)


def _bad_call(message: str, command: Any) -> PoolError:
    return outside_error("bad_call", message, context={"command": command})


def _circuit_detail(breaker: CircuitBreaker, now: float) -> dict[str, Any]:
    stats: BreakerStatistics = breaker.statistics()
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
    not import, a crash loop). An exception raised in the body comes out as itself (the very
    same object, an ExceptionGroup of the application's own included).
    """
    config = config or PoolConfig()
    if launcher is None:
        launcher = LocalLauncher(config.python, dict(config.env))
    pool: Pool = Pool._create(config, launcher)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool._supervisor.run_slots)
            nursery.start_soon(pool._run_services)
            try:
                await pool._open()
                try:
                    yield pool
                except BaseException as exc:
                    # Kept aside, not raised through the nursery: it would come out wrapped.
                    body_error = exc
            finally:
                await pool.aclose()
    except BaseExceptionGroup as group:
        # The pool's own tasks ended with an error: opening failed, or they were cancelled
        # with the body. Say it as one exception, outside this handler.
        if body_error is None:
            body_error = _only_exception(group)
            if body_error is None:
                raise
    if body_error is not None:
        raise body_error


def _only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single leaf exception of a group made by the pool's nursery, else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
