"""RecoveryOrchestrator: one call from its arguments to its final outcome.

The attempt loop lives here: check the call and encode its request, admit it through its
command's circuit, take its session's turn, run attempts through the checkout, and after a failed attempt decide: retry, fail over (once,
on another worker), or give up with a clear error (or the command's fallback value). The matrix
(``PoolErrorHandler`` with the pool's policy) classifies a failure; this module applies the pool's
own rules on top:

- what stays outside the matrix (``OUTSIDE_MATRIX``: caller mistakes, refusals, overload) is never
  retried and never counted by a circuit;
- a call that may have run is re-run only if its command is idempotent;
- failover happens once;
- backoff delays pace only systemic failures: from a call's second consecutive failure, or while a
  circuit is not closed;
- the command's circuit records the call's final outcome, after its retries, and not a failure
  whose last attempt died of a SIGKILL the pool did not send (so killing workers from outside
  never opens a command's circuit, whether the command is idempotent or not).

Recovery statistics count calls: a call that needed recovery is *initiated* once, and ends
*succeeded*, *failed* or *cancelled*; retries and failovers (attempts) are counted apart.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import attrs
import trio

from bridge_worker.protocol import (
    Batch,
    BatchError,
    CommandInfo,
    EncodeError,
    Encoder,
    ErrorReply,
    RemoteKind,
    Reply,
)
from pool._breaker import CircuitBreaker, CircuitRegistry, CircuitState
from pool._call import Call
from pool._checkout import Checkout, closed_error
from pool._config import PoolConfig
from pool._errors import PoolError, RemoteError, Strategy
from pool._events import EventBus, PoolEvent, call_fields
from pool._learning import (
    SHAPE,
    BudgetConfig,
    LevelChange,
    RecoveryLearner,
    RecoveryStore,
    RetryBudget,
)
from pool._matrix import PoolErrorHandler, outside_case, outside_error
from pool._metrics import CALLER_ERROR, CANCELLED, ERROR, OK, REJECTED, PoolMetrics
from pool._sessions import Session, SessionStore
from pool._tracing import CallTrace
from pool._worker import Worker, WorkerCall

logger = logging.getLogger("pool")

_RETRYING = (Strategy.IMMEDIATE_RETRY, Strategy.BACKOFF_RETRY)
_CLOSED = CircuitState.CLOSED


class Action(enum.Enum):
    RETRY = "retry"
    FAILOVER = "failover"
    GIVE_UP = "give_up"


@attrs.frozen
class RecoveryStatistics:
    """Calls that needed recovery (a failed attempt the pool acted on: retry or failover), and
    how they ended. ``initiated == succeeded + failed + cancelled`` plus those still running;
    ``by_category`` and ``by_strategy`` count them by their first failure."""

    initiated: int
    succeeded: int
    failed: int
    by_category: dict[str, int]
    by_strategy: dict[str, int]
    cancelled: int = 0


def decide(
    handler: PoolErrorHandler,
    err: PoolError,
    attempt: int,
    consecutive: int,
    idempotent: bool,
    failed_over: bool,
    circuits_closed: bool,
) -> tuple[Action, float]:
    """What to do after attempt number ``attempt`` failed with ``err`` (pure).

    ``consecutive`` counts this call's failures in a row (1 for its first); ``failed_over`` says
    the call already used its one failover.
    """
    if outside_case(err) is not None:
        return Action.GIVE_UP, 0.0
    if err.may_have_run and not idempotent:
        return Action.GIVE_UP, 0.0
    strategy = err.recovery_strategy
    if strategy in _RETRYING and handler.should_retry(err, attempt):
        # One dead worker is not an outage: its call goes again at once. Delays pace repeated
        # failures of the same call, or any failure while a circuit says the trouble is wider.
        n = consecutive - 1 if circuits_closed else consecutive
        delay = handler.get_retry_delay(err, n) if n >= 1 else 0.0
        return Action.RETRY, delay
    if strategy is Strategy.FAILOVER and not failed_over and handler.should_retry(err, attempt):
        return Action.FAILOVER, 0.0
    return Action.GIVE_UP, 0.0


@attrs.frozen
class _Recovery:
    """How a call's recovery started: its first failure, the level and the strategy chosen."""

    error: PoolError
    level: int
    strategy: str
    started: float


class _Refused(Exception):
    """A call's circuit refused it (inside the orchestrator: the caller gets the fallback's value
    or a CircuitOpenError)."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        super().__init__()
        self.breaker = breaker


def not_rerun_note(err: PoolError) -> None:
    """Say plainly, on an error the pool did not retry because its command is not idempotent,
    that the command may or may not have run."""
    err.message += (
        " The command is not idempotent, so the pool did not run it again: it may or may not "
        "have run. Check its effects before calling it again."
    )


class RecoveryOrchestrator:
    """Runs calls to their final outcome, and keeps the call and recovery counters."""

    def __init__(
        self,
        config: PoolConfig,
        handler: PoolErrorHandler,
        checkout: Checkout,
        sessions: SessionStore,
        circuits: CircuitRegistry,
        pool_circuit: CircuitBreaker,
        events: EventBus,
        pool_down: Callable[[float], PoolError | None],
        clock: Callable[[], float],
        restart_all: Callable[[], object],
        metrics: PoolMetrics | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self.handler = handler
        self._checkout = checkout
        self._sessions = sessions
        self._circuits = circuits
        self._pool_circuit = pool_circuit
        self._events = events
        self._pool_down = pool_down
        self._now = clock
        self._abort = checkout.abort  # one bound method for every call
        self.learner = RecoveryLearner(config.learning)
        self._restart_all = restart_all  # level 4: replace every worker (a rolling restart)
        self._store: RecoveryStore | None = None
        if config.recovery_store is not None:
            self._store = RecoveryStore(config.recovery_store)
            self._store.load(self.learner, clock())
        self._budget = (
            None
            if config.retry_budget is None
            else RetryBudget(
                BudgetConfig(config.retry_budget, config.retry_budget_floor, config.retry_budget_window), clock()
            )
        )
        self._adaptive = checkout.adaptive
        self.calls_started = 0  # every call (and map chunk) admitted: what the retry budget is a share of
        self._timeout = config.timeout
        self._encoder = Encoder(config.max_frame_size)
        self._req_ids = itertools.count(1)
        #: The workers' command table (from the first hello), by name.
        self.commands: dict[str, CommandInfo] = {}
        self.calls_ok = 0
        self.calls_failed = 0
        self.retries = 0
        self.failovers = 0
        self.fallbacks = 0
        self._initiated = 0
        self._succeeded = 0
        self._failed = 0
        self._cancelled = 0
        self._by_category: Counter[str] = Counter()
        self._by_strategy: Counter[str] = Counter()

    def statistics(self) -> RecoveryStatistics:
        return RecoveryStatistics(
            initiated=self._initiated,
            succeeded=self._succeeded,
            failed=self._failed,
            by_category=dict(self._by_category),
            by_strategy=dict(self._by_strategy),
            cancelled=self._cancelled,
        )

    def request(
        self,
        command: Any,
        args: Any,
        session_id: str | None,
        timeout: Any,
        trace_context: dict[str, str] | None = None,
    ) -> tuple[CommandInfo, bytes, int, float, float]:
        """Check a call and encode its request: ``(info, frame, request id, now, deadline)``.
        Raises the PoolError of a call that cannot start (see OUTSIDE_MATRIX)."""
        info, now, deadline = self.check(command, timeout)
        req_id = next(self._req_ids)
        try:
            frame = self._encoder.request(req_id, command, args, session_id, None, trace_context)
        except EncodeError as exc:
            advice = (
                "Pass msgpack-able values (dict, list, str, bytes, int, float, bool, None)."
                if exc.__cause__ is not None  # msgpack refused a value; else: over the size limit
                else "Send less per call, or raise PoolConfig.max_frame_size."
            )
            raise outside_error(
                "unencodable_arguments",
                f"the arguments of {command!r} cannot be sent to a worker: {exc}. {advice}",
                context={"command": command, "session_id": session_id},
                error=exc,
            ) from exc
        return info, frame, req_id, now, deadline

    def check(self, command: Any, timeout: Any) -> tuple[CommandInfo, float, float]:
        """Check a call: ``(info, now, deadline)``. Raises the PoolError of a call that cannot
        start (see OUTSIDE_MATRIX)."""
        if self._checkout.closing:
            raise closed_error()
        info = self.commands.get(command) if type(command) is str else None
        if info is None:
            raise self._unknown_command(command)
        now = self._now()
        deadline = now + (self._timeout if timeout is None else self._check_timeout(timeout, command))
        return info, now, deadline

    def batch_request(self, info: CommandInfo, items: list[Any], first_index: int) -> tuple[bytes, int]:
        """The frame and request id of a chunk of ``map``."""
        req_id = next(self._req_ids)
        try:
            return self._encoder.encode(Batch(req_id, info.name, items)), req_id
        except EncodeError as exc:
            raise outside_error(
                "unencodable_arguments",
                f"the items {first_index}..{first_index + len(items) - 1} of the map over "
                f"{info.name!r} cannot be sent to a worker: {exc}. Pass msgpack-able values, or a "
                "smaller chunksize (or raise PoolConfig.max_frame_size).",
                context={"command": info.name, "first_index": first_index},
                error=exc,
            ) from exc

    async def call(
        self, command: Any, args: Any, session_id: str | None, timeout: Any, trace: CallTrace | None = None
    ) -> Any:
        """One call, all attempts: its plain result, its fallback's value, or a PoolError.
        ``trace``: its spans, when the pool traces calls (``pool._tracing``)."""
        try:
            info, frame, req_id, now, deadline = self.request(
                command, args, session_id, timeout, None if trace is None else trace.context
            )
            if info.stream:
                raise self.bad_call(
                    f"{command!r} is a stream command: read it with pool.open_stream", command
                )
        except PoolError:
            await trio.lowlevel.checkpoint()  # (see run)
            raise
        return await self.run(info, args, frame, req_id, session_id, now, deadline, trace=trace)

    async def run(
        self,
        info: CommandInfo,
        args: Any,
        frame: bytes,
        req_id: int,
        session_id: str | None,
        now: float,
        deadline: float,
        *,
        batch: bool = False,
        trace: CallTrace | None = None,
    ) -> Any:
        """The attempts of one encoded request (``call``'s, or a chunk of ``map``'s: ``batch``,
        whose fallback, if any, is applied to each of its items). ``trace``: the call's spans,
        when it is traced (an attempt's span starts and ends here; the call's, in the caller)."""
        started = now
        circuits = self._circuits
        if session_id is None and not circuits.not_closed and self._checkout.workers:
            # The usual case, without a coroutine: every circuit closed (allow() would say yes
            # and change nothing), workers up, no session turn to take.
            breaker, session = circuits.get(info.name), None
        else:
            try:
                breaker, session = await self.enter(info, session_id, now, deadline)
            except _Refused as refused:
                return self._refused(info.name, args, refused.breaker, now, batch)
            except PoolError as exc:  # refused by the pool's state, a full queue, a session limit
                self._record_failure(info.name, exc, None)
                raise
            except BaseException:  # cancelled while waiting for its session's turn
                if self._metrics is not None:
                    self._metrics.call_ended(info.name, CANCELLED, None, None)
                raise
        self.calls_started += 1
        checkout = self._checkout
        waited = False  # the caller has parked or slept: no yield needed before a fast failure
        try:
            attempt = 1
            consecutive = 0
            failed_over = False
            first: _Recovery | None = None  # how this call's recovery started
            avoid: Worker | None = None
            ran = False  # an earlier attempt may have run
            while True:
                # Every attempt sends the same frame (and request id): a retry never re-encodes.
                # A first attempt outside a session reaches the queue (if it must wait) at once,
                # in this task, at the call's start: its queue wait needs no clock read of its own.
                call: WorkerCall = Call(
                    info,
                    args,
                    frame,
                    req_id,
                    attempt,
                    deadline,
                    session,
                    avoid,
                    self._abort,
                    started if attempt == 1 and session is None else 0.0,
                )
                if trace is not None:
                    trace.attempt(call)
                try:
                    if attempt == 1:
                        # A caller cancelled before it starts must cost nothing: not a write,
                        # not a worker.
                        await trio.lowlevel.checkpoint_if_cancelled()
                    elif self._pool_circuit.state is not _CLOSED:
                        refusal = self._pool_down(self._now())
                        if refusal is not None:
                            raise refusal
                    checkout.start(call)
                    result = call.outcome
                    if result is None:
                        call.parked = True
                        waited = True
                        reply = await trio.lowlevel.wait_task_rescheduled(call.abort)
                    else:  # finished while routing (in this task): nothing to wait for
                        reply = result.unwrap()
                except PoolError as exc:
                    err = exc
                except BaseException:
                    breaker.release(self._now())  # cancelled: no outcome
                    if first is not None:
                        self._cancelled += 1
                    if self._metrics is not None:
                        self._metrics.call_ended(info.name, CANCELLED, None, None)
                    raise
                else:
                    if type(reply) is Reply:
                        # (A closed breaker does not read the time.)
                        breaker.record_success(self._now() if circuits.not_closed else now)
                        self.calls_ok += 1
                        if self._metrics is not None:
                            # Until its reply arrived: when the worker's reader read it (and the
                            # clock), which spares this call a clock read of its own.
                            self._metrics.call_ok(info.name, call.worker.last_io - started)  # type: ignore[union-attr]
                        if self._adaptive is not None:
                            self._adaptive.observe(info.name, self._now() - call.started)
                        if first is not None:
                            self._recovery_done(call, first, True)
                        return reply.result
                    err = self.reply_error(call, reply)
                if trace is not None:
                    trace.attempt_failed(err)
                consecutive += 1
                now = self._now()
                calm = not circuits.not_closed and self._pool_circuit.state is _CLOSED
                action, delay = decide(
                    self.handler, err, attempt, consecutive, info.idempotent, failed_over, calm
                )
                strategy = level = None
                if action is not Action.GIVE_UP:  # the matrix allows a recovery: which one?
                    action, delay, strategy, level = self._learned(
                        info, err, call, consecutive, failed_over, delay, breaker, now
                    )
                if action is not Action.GIVE_UP and (now + delay >= deadline or checkout.closing):
                    action = Action.GIVE_UP
                    if checkout.closing:
                        err.message += " The pool is closing, so it was not tried again."
                if action is Action.GIVE_UP:
                    if ran and not err.may_have_run:
                        # This attempt did not run, an earlier one may have: the call may have run.
                        err.may_have_run = True
                        err.context["may_have_run"] = True
                    if not waited:
                        await trio.lowlevel.checkpoint()  # (see above)
                    return self._give_up(call, err, breaker, first, args, batch, started)
                ran = ran or err.may_have_run
                if first is None:
                    assert strategy is not None and level is not None
                    first = _Recovery(err, level, strategy, now)
                    self._initiated += 1
                    self._by_category[str(err.category)] += 1
                    self._by_strategy[str(err.recovery_strategy)] += 1
                if action is Action.FAILOVER:
                    failed_over = True
                    self.failovers += 1
                    avoid = call.worker
                    if session is not None:
                        session.move_off()
                    self._emit("call_failed_over", call, attempt=attempt, category=str(err.category))
                else:
                    self.retries += 1
                    self._emit(
                        "call_retried",
                        call,
                        attempt=attempt,
                        delay=delay,
                        category=str(err.category),
                        strategy=str(err.recovery_strategy),
                    )
                if logger.isEnabledFor(logging.INFO):
                    logger.info(
                        "retrying %r after %s (attempt %d, in %.2fs)",
                        info.name,
                        err.category,
                        attempt,
                        delay,
                        extra=call_fields(call),
                    )
                if delay > 0:
                    try:
                        waited = True
                        await trio.sleep(delay)
                    except BaseException:
                        breaker.release(self._now())
                        self._cancelled += 1
                        if self._metrics is not None:
                            self._metrics.call_ended(info.name, CANCELLED, None, None)
                        raise
                attempt += 1
        finally:
            if session is not None:
                session.last_used = self._now()
                session.end_turn()

    async def enter(
        self, info: CommandInfo, session_id: str | None, now: float, deadline: float
    ) -> tuple[CircuitBreaker, Session | None]:
        """Admit a call: through its command's circuit (raises _Refused), past the pool's own
        state (raises the pool-down error), into its session's turn. A call that fails here
        never parked: it yields first, as any trio await does, so that a caller retrying in a
        loop cannot starve the pool's own tasks (those that restart workers)."""
        circuits = self._circuits
        breaker = circuits.get(info.name)
        # Every circuit closed: allow() would say yes and change nothing.
        if circuits.not_closed and not breaker.allow(now):
            await trio.lowlevel.checkpoint()
            raise _Refused(breaker)
        waited = False
        try:
            if not self._checkout.workers:  # (the cheap test first: it is rarely empty)
                refusal = self._pool_down(now)
                if refusal is not None:
                    raise refusal
            if session_id is None:
                return breaker, None
            session = self._sessions.open(session_id, now)
            if not session.try_turn():
                self._checkout.check_room(session_id)
                waited = True
                await session.take_turn(deadline)
            return breaker, session  # this call holds the session's turn until it ends
        except BaseException as exc:
            breaker.release(self._now())  # no outcome: nothing ran
            if isinstance(exc, PoolError) and not waited:
                await trio.lowlevel.checkpoint()
            raise

    @asynccontextmanager
    async def admitted(
        self, info: CommandInfo, session_id: str | None, now: float, deadline: float
    ) -> AsyncIterator[tuple[CircuitBreaker, Session | None]]:
        """:meth:`enter` for a stream (no fallback: a refusal raises), giving back the session's
        turn on the way out."""
        try:
            breaker, session = await self.enter(info, session_id, now, deadline)
        except _Refused as refused:
            raise self._refusal(info.name, refused.breaker, now) from None
        try:
            yield breaker, session
        finally:
            if session is not None:
                session.last_used = self._now()
                session.end_turn()

    def stream_done(
        self, call: WorkerCall, breaker: CircuitBreaker, err: PoolError | None, finished: bool = True
    ) -> None:
        """Count a stream's outcome: ended normally, failed with ``err``, or left early by its
        consumer (``finished=False``: no outcome for its circuit)."""
        now = self._now()
        if err is None:
            if finished:
                breaker.record_success(now)
            else:
                breaker.release(now)
            self.calls_ok += 1
            if self._metrics is not None:
                self._metrics.call_ended(call.command, OK, None, None)
            return
        self._count_failure(call, err, breaker, now)

    def _check_timeout(self, timeout: Any, command: str) -> float:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or math.isnan(timeout):
            raise self.bad_call(
                f"timeout must be a number of seconds (or None for PoolConfig.timeout), got {timeout!r}",
                command,
            )
        if timeout <= 0:
            # A budget already spent (a computed remaining time easily is): nothing may start.
            raise outside_error(
                "no_worker_in_time",
                f"timeout={timeout!r}: the call's deadline has already passed, so it did not run "
                "and no worker was touched. Pass a timeout above 0.",
                context={"command": command},
                error=("timeout", "deadline_passed"),
            )
        return float(timeout)

    def bad_call(self, message: str, command: Any) -> PoolError:
        return outside_error("bad_call", message, context={"command": command})

    def _unknown_command(self, command: Any) -> PoolError:
        if type(command) is not str:
            return self.bad_call(f"command must be a string naming a command, got {command!r}", command)
        if not self.commands:
            return self.bad_call(
                "the pool has no workers up yet, so no command table; "
                "call inside `async with open_pool(...)`",
                command,
            )
        known = ", ".join(sorted(self.commands))
        return self.bad_call(
            f"unknown command {command!r}; the workers have: {known}. "
            "Check the name or add the module that defines it to PoolConfig.handlers.",
            command,
        )

    def _give_up(
        self,
        call: WorkerCall,
        err: PoolError,
        breaker: CircuitBreaker,
        first: _Recovery | None,
        args: Any,
        batch: bool = False,
        started: float | None = None,
    ) -> Any:
        """The call failed for good: count it, log it, and raise (or degrade to the fallback).
        ``started``: when the call started, for its duration."""
        if first is not None:
            self._recovery_done(call, first, False)
        matrix = self._count_failure(call, err, breaker, self._now(), started)
        fallback = self.config.fallbacks.get(call.command) if matrix else None
        if fallback is None:
            raise err
        self.fallbacks += 1
        self._emit("call_fallback", call, category=str(err.category))
        return [fallback(item, err) for item in args] if batch else fallback(args, err)

    def _count_failure(
        self, call: WorkerCall, err: PoolError, breaker: CircuitBreaker, now: float, started: float | None = None
    ) -> bool:
        """Record a call's final failure in its circuit, the counters and the metrics (its
        duration if ``started`` is given), log it, emit it. Returns whether the matrix decided it
        (the error is not outside it)."""
        matrix = outside_case(err) is None
        self._record_failure(call.command, err, started)
        # Killed from outside: not the command's doing, whatever it is (see the module docstring).
        counted = matrix and not err.context.get("killed_from_outside", False)
        if counted:
            breaker.record_failure(now)
        else:
            breaker.release(now)
        if matrix and err.may_have_run and not call.info.idempotent and not isinstance(err, RemoteError):
            not_rerun_note(err)
        self.calls_failed += 1
        if matrix:
            # A handler's own exception is the application's business; infrastructure is ours.
            level = logging.INFO if isinstance(err, RemoteError) else logging.WARNING
            if logger.isEnabledFor(level):
                logger.log(
                    level,
                    "call %r failed after %d attempt(s) [%s, %s, %s]: %s",
                    call.command,
                    call.attempt,
                    err.category,
                    err.severity,
                    err.recovery_strategy,
                    err.message.splitlines()[0] if err.message else "",
                    extra=call_fields(call),
                )
        self._emit(
            "call_failed",
            call,
            category=str(err.category),
            severity=str(err.severity),
            strategy=str(err.recovery_strategy),
            attempts=call.attempt,
        )
        return matrix

    def _record_failure(self, command: str, err: PoolError, started: float | None) -> None:
        """Count a call that ended with ``err`` in the metrics: its outcome and reason (see
        ``pool._metrics``)."""
        if self._metrics is None:
            return
        case = outside_case(err)
        if case is None:
            self._metrics.call_ended(command, ERROR, str(err.category), started)
        else:
            self._metrics.call_ended(command, CALLER_ERROR if case.caller_fault else REJECTED, case.key, started)

    def _refused(self, command: str, args: Any, breaker: CircuitBreaker, now: float, batch: bool = False) -> Any:
        err = self._refusal(command, breaker, now)
        self._record_failure(command, err, None)
        fallback = self.config.fallbacks.get(command)
        if fallback is None:
            raise err
        self.fallbacks += 1
        self._events.emit(PoolEvent("call_fallback", now, command=command, data={"category": "circuit_open"}))
        return [fallback(item, err) for item in args] if batch else fallback(args, err)

    def _refusal(self, command: str, breaker: CircuitBreaker, now: float) -> PoolError:
        retry_after = breaker.time_until_retry(now)
        return outside_error(
            "circuit_open",
            f"the circuit for {command!r} is open after repeated failures; calls fail fast for "
            f"{retry_after:.1f}s more. See pool.health() for the cause; retry after that.",
            circuit=command,
            retry_after=retry_after,
            context={"command": command},
        )

    def _recovery_done(self, call: WorkerCall, first: _Recovery, succeeded: bool) -> None:
        if succeeded:
            self._succeeded += 1
        else:
            self._failed += 1
        now = self._now()
        category = str(first.error.category)
        self._level_changes(
            self.learner.record(
                command=call.command,
                category=category,
                level=first.level,
                strategy=first.strategy,
                succeeded=succeeded,
                seconds=now - first.started,
                attempts=call.attempt,
                now=now,
            ),
            now,
        )
        self._emit(
            "recovery_done",
            call,
            category=category,
            strategy=first.strategy,
            level=first.level,
            succeeded=succeeded,
            seconds=now - first.started,
        )

    def _learned(
        self,
        info: CommandInfo,
        err: PoolError,
        call: WorkerCall,
        consecutive: int,
        failed_over: bool,
        delay: float,
        breaker: CircuitBreaker,
        now: float,
    ) -> tuple[Action, float, str | None, int | None]:
        """The matrix allows a recovery: the signature's level and the measured success of its
        strategies choose it, and the retry budget may still refuse it (see ``pool._learning``).
        Returns ``(action, delay, strategy, level)``; a refusal is GIVE_UP with a note on ``err``."""
        signature = RecoveryLearner.signature(info.name, str(err.category))
        level, changes = self.learner.level(signature, now)
        self._level_changes(changes, now)
        strategy = self.learner.choose(signature, level, err.recovery_strategy, failed_over, now)
        if strategy is None:
            err.message += f" (Recovery level {level} of {signature} has no strategy the matrix allows here.)"
            return Action.GIVE_UP, 0.0, None, level
        if strategy == "circuit_open":
            breaker.trip(now)
            err.message += (
                f" Recovery of {signature} is at level 5: the command's circuit was opened "
                "(its fallback serves, if it has one)."
            )
            return Action.GIVE_UP, 0.0, strategy, level
        budget = self._budget
        if budget is not None and not budget.allows(now, self.calls_started, self.retries + self.failovers):
            err.message += f" It was not tried again: {budget.describe(now, self.calls_started, self.retries + self.failovers)}."
            return Action.GIVE_UP, 0.0, strategy, level
        other_worker, backoff = SHAPE[strategy]
        if backoff:
            delay = max(delay, self.handler.get_retry_delay(err, consecutive))
        worker = call.worker
        if strategy == "recycle" and worker is not None:
            self._checkout.recycle(worker)
        elif strategy == "restart_all":
            self._restart_all()
        return (Action.FAILOVER if other_worker else Action.RETRY), delay, strategy, level

    def _level_changes(self, changes: list[LevelChange], now: float) -> None:
        if changes and self._store is not None:
            self._store.save(self.learner)  # a level change is rare, and what most needs keeping
        for change in changes:
            level = logging.WARNING if change.new > change.old else logging.INFO
            logger.log(level, "recovery of %s: level %d -> %d (%s)", change.signature, change.old, change.new, change.reason)
            command, _, category = change.signature.partition(":")
            self._events.emit(
                PoolEvent(
                    "recovery_level_changed",
                    now,
                    command=command,
                    data={"category": category, "from": change.old, "to": change.new, "reason": change.reason},
                )
            )

    def report(self) -> dict[str, Any]:
        """``pool.recovery_report()``."""
        now = self._now()
        report = self.learner.report(now)
        report["budget"] = None if self._budget is None else {
            "ratio": self._budget.config.ratio,
            "floor_per_s": self._budget.config.floor_per_s,
            "window": self._budget.config.window,
            "refused": self._budget.refused,
        }
        report["attempt_timeouts"] = None if self._adaptive is None else self._adaptive.report()
        report["calls"] = {"started": self.calls_started, "retries": self.retries, "failovers": self.failovers}
        return report

    def close(self) -> None:
        """The pool closes: keep what was learned, if there is a store."""
        if self._store is not None:
            self._store.save(self.learner)
            self._store.close()
            self._store = None

    def note_totals(self, now: float) -> None:
        """The monitor's tick: the retry budget keeps a snapshot of the totals."""
        if self._budget is not None:
            self._budget.note(now, self.calls_started, self.retries + self.failovers)

    def reply_error(self, call: WorkerCall, reply: ErrorReply | BatchError) -> PoolError:
        if type(reply) is BatchError:
            return self._item_error(call, reply)
        assert type(reply) is ErrorReply
        context = self._checkout.call_context(call, reply.handler_ran)
        kind = reply.remote_type
        if kind == RemoteKind.SESSION_STATE_TOO_LARGE:
            return outside_error("session_limit", reply.message, may_have_run=True, context=context)
        if kind == RemoteKind.SESSION_NOT_FOUND and call.session is not None:
            call.session.on_worker = False  # the retry sends the committed state along
            return self.handler.wrap_pool_error(("session_not_found", reply.message), context)
        if reply.caller_error:
            return outside_error(
                "declared_caller_error",
                f"{call.command!r} rejected its input: {kind}: {reply.message}",
                may_have_run=reply.handler_ran,
                context=context,
                remote_type=kind,
                remote_traceback=reply.traceback,
            )
        if kind == RemoteKind.RESULT_NOT_ENCODABLE and reply.handler_ran:
            worker = call.worker
            context["message"] = (
                f"{'worker ' + str(worker.id) if worker is not None else 'the worker'} could not "
                f"send the result of {call.command!r} ({reply.message}); nothing was committed and "
                "the worker keeps serving. Make the command return msgpack-able values within "
                "PoolConfig.max_frame_size."
            )
            return self.handler.wrap_pool_error(("encode_error", reply.message), context)
        return self.handler.wrap_pool_error(
            ("python_exception", {"type": kind, "message": reply.message, "traceback": reply.traceback}),
            context,
        )

    def _item_error(self, call: WorkerCall, reply: BatchError) -> PoolError:
        """An item of a map's chunk raised: ``context["position"]`` is its place in the chunk
        (the map turns it into its index in the input)."""
        context = self._checkout.call_context(call, True)
        context["position"] = reply.position
        if reply.caller_error:
            return outside_error(
                "declared_caller_error",
                f"{call.command!r} rejected its input: {reply.remote_type}: {reply.message}",
                may_have_run=True,
                context=context,
                remote_type=reply.remote_type,
                remote_traceback=reply.traceback,
            )
        return self.handler.wrap_pool_error(
            ("python_exception", {"type": reply.remote_type, "message": reply.message, "traceback": reply.traceback}),
            context,
        )

    def _emit(self, kind: str, call: WorkerCall, **data: Any) -> None:
        if self._events.callbacks:
            worker = call.worker
            self._events.emit(
                PoolEvent(
                    kind,
                    self._now(),
                    worker_id=worker.id if worker is not None else None,
                    pid=worker.pid if worker is not None else None,
                    command=call.command,
                    session_id=call.session.id if call.session is not None else None,
                    data=data,
                )
            )
