"""The error matrix: an error tuple or exception -> category, severity, recovery strategy (pure).

A port of DSPex's ``PoolErrorHandler`` (seed 004). Every decision is data in one frozen
:class:`MatrixPolicy`; :data:`DEFAULT_POLICY` holds the seed's values and an application tunes
them with ``attrs.evolve``. Where the seed's decision table and its code disagree, DESIGN.md
rules: category, severity and strategy follow the seed's code (``categorize_error``,
``determine_severity``, ``determine_recovery_strategy``); the number of retries is capped by the
table's Max Retries column; delays follow the code's per-strategy lists.

:data:`OUTSIDE_MATRIX` is the second table: the failures that never go through the matrix
(caller mistakes, a refusing circuit, a full queue, a closed pool).

No I/O. The one clock read is the ``timestamp`` stamped into a wrapped error's context, and only
when the context does not bring its own.
"""

from __future__ import annotations

import copy
import enum
import pprint
import time
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, Final, Generic, ParamSpec, TypeVar

import attrs
import msgpack
import trio

from bridge_worker.protocol import EncodeError, ProtocolError
from pool._errors import (
    CALLER_FAULT_SEVERITY,
    CALLER_FAULT_STRATEGY,
    ERROR_CLASSES,
    EXIT_UNKNOWN,
    CallerError,
    Category,
    CircuitOpenError,
    ErrorInput,
    InitializationError,
    PoolClosedError,
    PoolError,
    PoolSaturatedError,
    PoolTimeoutError,
    RemoteError,
    ResourceError,
    SessionError,
    Severity,
    Strategy,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_E = TypeVar("_E", bound=PoolError)


def _read_only(table: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A read-only copy: a policy is shared (DEFAULT_POLICY by every pool), so nobody edits it."""
    return types.MappingProxyType(dict(table))


def _delay_table(table: Mapping[Strategy, Iterable[float]]) -> Mapping[Strategy, tuple[float, ...]]:
    return types.MappingProxyType({s: tuple(float(d) for d in ds) for s, ds in table.items()})


def _rule_tuple(rules: Iterable[StrategyRule]) -> tuple[StrategyRule, ...]:
    return tuple(rules)


def _exception_tuple(
    table: Iterable[tuple[type[BaseException], Category]],
) -> tuple[tuple[type[BaseException], Category], ...]:
    return tuple(table)


_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _covers(members: type[enum.Enum]) -> _Validator:
    """Validator: the table has a row for every member, so a new member cannot be forgotten."""

    def check(_: Any, attribute: attrs.Attribute[Any], table: Mapping[Any, Any]) -> None:
        missing = [str(m) for m in members if m not in table]
        if missing:
            raise ValueError(f"{attribute.name} has no row for {', '.join(missing)}")

    return check


def _check_max_retries(
    _: Any, attribute: attrs.Attribute[Any], table: Mapping[Category, int]
) -> None:
    bad = {str(c): n for c, n in table.items() if n < 0}
    if bad:
        raise ValueError(f"{attribute.name} must be >= 0, got {bad}")


def _check_delays(
    _: Any, attribute: attrs.Attribute[Any], table: Mapping[Strategy, tuple[float, ...]]
) -> None:
    bad = {str(s): ds for s, ds in table.items() if not ds or min(ds) < 0}
    if bad:
        raise ValueError(f"{attribute.name} needs a non-empty list of delays >= 0, got {bad}")


def _check_catch_all(
    _: Any, attribute: attrs.Attribute[Any], rules: tuple[StrategyRule, ...]
) -> None:
    # The last rule must match everything so that every error gets a strategy (the seed's `_ ->`).
    if not rules or rules[-1] != StrategyRule(None, None, rules[-1].strategy):
        raise ValueError(f"the last of {attribute.name} must match any category, severity, attempt")


@attrs.frozen
class StrategyRule:
    """One case of the seed's ``determine_recovery_strategy``; the first rule that matches wins.

    ``None`` matches any category or severity; the rule applies only when
    ``attempt > after_attempt``.
    """

    category: Category | None
    severity: Severity | None
    strategy: Strategy
    after_attempt: int = attrs.field(default=0, validator=attrs.validators.ge(0))

    def matches(self, category: Category, severity: Severity, attempt: int) -> bool:
        return (
            (self.category is None or self.category == category)
            and (self.severity is None or self.severity == severity)
            and attempt > self.after_attempt
        )


@attrs.frozen(kw_only=True)
class MatrixPolicy:
    """Every decision of the error matrix, as tables. Change them with ``attrs.evolve``."""

    #: ``categorize_error``: an error tuple's tag -> category.
    categories: Mapping[str, Category] = attrs.field(converter=_read_only)
    #: The category of an unknown tag or exception (the seed's ``_ -> :system_error``).
    default_category: Category
    #: Exceptions met at the boundary (the seed, in Elixir, has tuples only): first match wins.
    exception_categories: tuple[tuple[type[BaseException], Category], ...] = attrs.field(
        converter=_exception_tuple
    )
    #: ``determine_severity``'s base severity per category.
    base_severity: Mapping[Category, Severity] = attrs.field(
        converter=_read_only, validator=_covers(Category)
    )
    #: Past this attempt, severity goes up one step (``severity_upgrades``).
    upgrade_after_attempt: int = attrs.field(validator=attrs.validators.ge(0))
    #: One step up; a severity without a row stays as it is.
    severity_upgrades: Mapping[Severity, Severity] = attrs.field(converter=_read_only)
    #: ``determine_recovery_strategy``'s cases, in order; the last must match everything.
    strategy_rules: tuple[StrategyRule, ...] = attrs.field(
        converter=_rule_tuple, validator=_check_catch_all
    )
    #: The table's Max Retries column: attempts 1..N of a category may be retried.
    max_retries: Mapping[Category, int] = attrs.field(
        converter=_read_only, validator=[_covers(Category), _check_max_retries]
    )
    #: ``get_retry_delay``'s lists, seconds per attempt; the last repeats beyond the list.
    delays: Mapping[Strategy, tuple[float, ...]] = attrs.field(
        converter=_delay_table, validator=[_covers(Strategy), _check_delays]
    )


#: The seed's values.
DEFAULT_POLICY: Final = MatrixPolicy(
    categories={
        "port_exited": Category.CONNECTION_ERROR,
        "connect_failed": Category.CONNECTION_ERROR,
        "checkout_failed": Category.RESOURCE_ERROR,
        # Ours, not the seed's: a worker killed for going over the hard memory limit.
        "resource_exhausted": Category.RESOURCE_ERROR,
        "timeout": Category.TIMEOUT_ERROR,
        "encode_error": Category.COMMUNICATION_ERROR,
        "decode_error": Category.COMMUNICATION_ERROR,
        "health_check_failed": Category.HEALTH_CHECK_ERROR,
        "python_exception": Category.PYTHON_ERROR,
        "init_failed": Category.INITIALIZATION_ERROR,
        "session_not_found": Category.SESSION_ERROR,
    },
    default_category=Category.SYSTEM_ERROR,
    exception_categories=(
        (TimeoutError, Category.TIMEOUT_ERROR),
        (trio.TooSlowError, Category.TIMEOUT_ERROR),
        (ConnectionError, Category.CONNECTION_ERROR),  # BrokenPipeError, ConnectionResetError, ...
        (trio.BrokenResourceError, Category.CONNECTION_ERROR),
        (EncodeError, Category.COMMUNICATION_ERROR),
        (ProtocolError, Category.COMMUNICATION_ERROR),
        (msgpack.UnpackException, Category.COMMUNICATION_ERROR),
        (msgpack.ExtraData, Category.COMMUNICATION_ERROR),  # a ValueError, not an UnpackException
    ),
    # Every category has a row, so the seed's fallback `_ -> :warning` cannot happen.
    base_severity={
        Category.INITIALIZATION_ERROR: Severity.CRITICAL,
        Category.RESOURCE_ERROR: Severity.CRITICAL,
        Category.SYSTEM_ERROR: Severity.CRITICAL,
        Category.CONNECTION_ERROR: Severity.MAJOR,
        Category.COMMUNICATION_ERROR: Severity.MAJOR,
        Category.TIMEOUT_ERROR: Severity.MAJOR,
        Category.PYTHON_ERROR: Severity.MAJOR,
        Category.HEALTH_CHECK_ERROR: Severity.MINOR,
        Category.SESSION_ERROR: Severity.MINOR,
    },
    upgrade_after_attempt=3,
    severity_upgrades={Severity.MINOR: Severity.MAJOR, Severity.MAJOR: Severity.CRITICAL},
    strategy_rules=(
        StrategyRule(None, Severity.CRITICAL, Strategy.ABANDON, after_attempt=2),
        StrategyRule(Category.RESOURCE_ERROR, Severity.CRITICAL, Strategy.CIRCUIT_BREAK),
        StrategyRule(Category.INITIALIZATION_ERROR, None, Strategy.CIRCUIT_BREAK),
        StrategyRule(Category.CONNECTION_ERROR, None, Strategy.BACKOFF_RETRY),
        StrategyRule(Category.TIMEOUT_ERROR, None, Strategy.BACKOFF_RETRY),
        StrategyRule(Category.COMMUNICATION_ERROR, Severity.MAJOR, Strategy.IMMEDIATE_RETRY),
        StrategyRule(Category.HEALTH_CHECK_ERROR, None, Strategy.BACKOFF_RETRY),
        StrategyRule(Category.SESSION_ERROR, None, Strategy.IMMEDIATE_RETRY),
        StrategyRule(Category.PYTHON_ERROR, None, Strategy.FAILOVER),
        StrategyRule(None, None, Strategy.ABANDON),
    ),
    max_retries={
        Category.INITIALIZATION_ERROR: 3,
        Category.CONNECTION_ERROR: 5,
        Category.COMMUNICATION_ERROR: 3,
        Category.TIMEOUT_ERROR: 2,
        Category.RESOURCE_ERROR: 1,
        Category.HEALTH_CHECK_ERROR: 3,
        Category.SESSION_ERROR: 2,
        Category.PYTHON_ERROR: 1,
        Category.SYSTEM_ERROR: 0,
    },
    # The seed's lists in ms, here in seconds. Its third list (`exponential`) is keyed by a backoff
    # name, not a strategy, so get_retry_delay never reads it; the strategies without a list get
    # the seed's fallback [1_000], written out so that every strategy has a row.
    delays={
        Strategy.IMMEDIATE_RETRY: (0.0, 0.1, 0.2),
        Strategy.BACKOFF_RETRY: (1.0, 2.0, 4.0, 8.0, 16.0),
        Strategy.CIRCUIT_BREAK: (1.0,),
        Strategy.FAILOVER: (1.0,),
        Strategy.ABANDON: (1.0,),
    },
)


@attrs.frozen
class OutsideCase:
    """One failure that never goes through the matrix: the error it raises, and why."""

    #: The name the pool's code uses for the case (``context["outside_matrix"]`` of its errors).
    key: str
    case: str
    error_class: type[PoolError]
    category: Category
    severity: Severity
    strategy: Strategy
    caller_fault: bool
    handling: str


#: The second table. None of these is retried, failed over or counted by any circuit, and none
#: harms a worker. The pool builds these errors with :func:`outside_error`, and every rule about
#: them asks :func:`outside_case`.
OUTSIDE_MATRIX: Final[tuple[OutsideCase, ...]] = (
    OutsideCase(
        "unencodable_arguments",
        "arguments cannot be encoded",
        CallerError,
        Category.COMMUNICATION_ERROR,
        CALLER_FAULT_SEVERITY,
        CALLER_FAULT_STRATEGY,
        True,
        "fails in the host before anything is sent (may_have_run=False); pass msgpack-able values",
    ),
    OutsideCase(
        "bad_call",
        "unknown command, or an argument of the wrong type (command, session id, timeout)",
        CallerError,
        Category.PYTHON_ERROR,
        CALLER_FAULT_SEVERITY,
        CALLER_FAULT_STRATEGY,
        True,
        "fails in the host from the workers' command table, without a round trip",
    ),
    OutsideCase(
        "declared_caller_error",
        "handler raised one of its declared caller_errors",
        RemoteError,
        Category.PYTHON_ERROR,
        CALLER_FAULT_SEVERITY,
        CALLER_FAULT_STRATEGY,
        True,
        "returned as is (may_have_run=True); the session rolls back, the worker keeps serving",
    ),
    OutsideCase(
        "session_limit",
        "a session limit: too many live sessions, or session state over its size limit",
        ResourceError,
        Category.RESOURCE_ERROR,
        CALLER_FAULT_SEVERITY,
        CALLER_FAULT_STRATEGY,
        True,
        "that call fails and commits nothing; every other session is unaffected",
    ),
    OutsideCase(
        "session_closed",
        "the session was closed while this call waited for it",
        SessionError,
        Category.SESSION_ERROR,
        CALLER_FAULT_SEVERITY,
        CALLER_FAULT_STRATEGY,
        True,
        "the call never ran; a new call with the same id starts a new, empty session",
    ),
    OutsideCase(
        "circuit_open",
        "circuit open",
        CircuitOpenError,
        Category.SYSTEM_ERROR,
        Severity.MAJOR,
        Strategy.CIRCUIT_BREAK,
        False,
        "fails fast with retry_after (seconds) and the circuit's name; the refusal is not counted",
    ),
    OutsideCase(
        "pool_down",
        "no worker can start (the pool circuit is open and no worker serves)",
        InitializationError,
        Category.INITIALIZATION_ERROR,
        Severity.CRITICAL,
        Strategy.CIRCUIT_BREAK,
        False,
        "fails fast, and calls already waiting fail too, with the startup error and retry_after",
    ),
    OutsideCase(
        "queue_full",
        "wait queue full",
        PoolSaturatedError,
        Category.RESOURCE_ERROR,
        Severity.MINOR,
        Strategy.ABANDON,
        False,
        "fails fast, nothing ran; overload is not an outage, so no circuit counts it",
    ),
    OutsideCase(
        "no_worker_in_time",
        "the deadline passed before a worker took the call (a timeout of 0 or less included)",
        PoolTimeoutError,
        Category.TIMEOUT_ERROR,
        Severity.MINOR,
        Strategy.ABANDON,
        False,
        "nothing ran and no worker was touched; overload is not an outage, so no circuit counts it",
    ),
    OutsideCase(
        "pool_closed",
        "pool closed",
        PoolClosedError,
        Category.SYSTEM_ERROR,
        Severity.WARNING,
        Strategy.ABANDON,
        False,
        "your code closed the pool; calls after aclose, and calls still waiting, get this",
    ),
)

_OUTSIDE_BY_KEY: Final[Mapping[str, OutsideCase]] = types.MappingProxyType(
    {case.key: case for case in OUTSIDE_MATRIX}
)
#: The context key that names an error's OUTSIDE_MATRIX row.
OUTSIDE_KEY: Final = "outside_matrix"


def outside_error(key: str, message: str, *, context: dict[str, Any] | None = None, **options: Any) -> PoolError:
    """The error of OUTSIDE_MATRIX row ``key``, with that row's verdict."""
    case = _OUTSIDE_BY_KEY[key]
    given = {} if context is None else context
    given[OUTSIDE_KEY] = key
    return case.error_class(
        message,
        category=case.category,
        severity=case.severity,
        recovery_strategy=case.strategy,
        caller_fault=case.caller_fault,
        context=given,
        **options,
    )


def outside_case(err: PoolError) -> OutsideCase | None:
    """The OUTSIDE_MATRIX row ``err`` falls under, or None when the matrix decides for it.

    Errors built by :func:`outside_error` name their row. One built another way (by an
    application, or :meth:`PoolErrorHandler.caller_error`) falls under the first row of its exact
    class and ``caller_fault`` if it is a caller fault or of a class the matrix never raises, and
    a caller fault of any other class under ``bad_call``; a timeout, say, stays the matrix's.
    """
    case = _OUTSIDE_BY_KEY.get(err.context.get(OUTSIDE_KEY, ""))
    if case is not None:
        return case
    cls = type(err)
    if not err.caller_fault and cls in _MATRIX_CLASSES:
        return None
    for case in OUTSIDE_MATRIX:
        if cls is case.error_class and err.caller_fault == case.caller_fault:
            return case
    return _OUTSIDE_BY_KEY["bad_call"] if err.caller_fault else None


_MATRIX_CLASSES: Final = frozenset(ERROR_CLASSES.values())


_RETRYING: Final = frozenset({Strategy.IMMEDIATE_RETRY, Strategy.BACKOFF_RETRY})

# Default messages: what happened, what the pool did, what to do. Fields: worker ("worker 3"),
# running (" while running 'echo'"), command ("'echo'"), session ("session 'u1'"), detail.
_MESSAGES: Final[Mapping[Category, str]] = types.MappingProxyType(
    {
        Category.INITIALIZATION_ERROR: "{worker} could not start: {detail}. Fix the handlers "
        "module or its start hook; starts that keep failing open the pool's circuit.",
        Category.CONNECTION_ERROR: "{worker} was lost{running} ({detail}); the pool replaces it. "
        "Retry if the command is idempotent.",
        Category.COMMUNICATION_ERROR: "a frame to or from {worker} was invalid{running} "
        "({detail}); the pool replaces the worker. If it repeats, make the command return "
        "msgpack-able values.",
        Category.TIMEOUT_ERROR: "{worker} did not answer in time{running} ({detail}); the pool "
        "killed and replaces it. Raise the timeout if the command is just slow.",
        Category.RESOURCE_ERROR: "the pool could not serve {command} ({detail}). Retry later, or "
        "raise the pool size or its limits.",
        Category.HEALTH_CHECK_ERROR: "{worker} failed its health check ({detail}); the pool "
        "replaces it. Nothing to do unless it keeps happening.",
        Category.SESSION_ERROR: "{session} is gone: it expired, was closed, or its state could "
        "not be restored. Start the session again.",
        Category.PYTHON_ERROR: "the handler raised{running} on {worker}: {detail}. Fix the "
        "handler or its input; .remote_traceback has the worker's traceback.",
        Category.SYSTEM_ERROR: "unexpected failure{running}: {detail}. This is probably a bug in "
        "the pool; please report it with the logged error.",
    }
)
_CALLER_FAULT_MESSAGE: Final = (
    "{command} rejected its input: {detail}. Fix the call; it is not retried."
)


def _attempt(context: Mapping[str, Any]) -> int:
    # The seed compares `context[:attempt] > 3` even when there is no attempt; in Erlang's term
    # order nil > 3 is true, so every first failure would be upgraded. It plainly means attempt 1.
    attempt = context.get("attempt")
    return 1 if attempt is None else int(attempt)


def _payload(error: ErrorInput) -> Mapping[str, Any]:
    """An error tuple's payload when it describes an exception, else an empty mapping.

    Keys: ``type``, ``message``, ``traceback``; for ``init_failed`` also ``module`` (the handlers
    module that failed) and ``stderr`` (the tail of the worker's stderr).
    """
    if isinstance(error, tuple) and len(error) > 1 and isinstance(error[1], Mapping):
        return error[1]
    return {}


def _describe(error: ErrorInput) -> str:
    """The failure in a few words, for the default message."""
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    if len(error) < 2:
        return repr(error)
    tag, payload = error[0], error[1]
    if tag == "port_exited" and type(payload) is int:
        if payload == EXIT_UNKNOWN:
            return "its connection ended (it runs elsewhere: its exit status is not known here)"
        # An exit status as Python reports it: negative means killed by that signal.
        return f"killed by signal {-payload}" if payload < 0 else f"exited with code {payload}"
    if not isinstance(payload, Mapping):
        return str(payload)
    kind, text, module = payload.get("type"), payload.get("message", ""), payload.get("module")
    described = f"{kind}: {text}" if kind else str(text)
    return described if module is None else f"handlers module {module!r} failed: {described}"


def _default_message(
    category: Category, error: ErrorInput, context: Mapping[str, Any], caller_fault: bool
) -> str:
    worker_id, command = context.get("worker_id"), context.get("command")
    session_id = context.get("session_id")
    fields = {
        "worker": "a worker" if worker_id is None else f"worker {worker_id}",
        "running": "" if command is None else f" while running {command!r}",
        "command": "the command" if command is None else repr(command),
        "session": "the session" if session_id is None else f"session {session_id!r}",
        # An unrecognised tuple is shown whole: its tag is the only clue to what it was.
        "detail": repr(error)
        if category is Category.SYSTEM_ERROR and isinstance(error, tuple)
        else _describe(error),
    }
    template = _CALLER_FAULT_MESSAGE if caller_fault else _MESSAGES[category]
    message = template.format_map(fields)
    stderr = _payload(error).get("stderr") or context.get("stderr")
    if stderr:  # seed 003: show what the worker said, so the fix is in the message
        message += f"\nworker stderr (last lines):\n{stderr}"
    return message


def _stamp(err: _E, attempt: int) -> _E:
    """Record the verdict in the error's context, as the seed's enhanced_context does."""
    context = err.context
    context["error_category"] = err.category
    context["severity"] = err.severity
    context["recovery_strategy"] = err.recovery_strategy
    context["attempt"] = attempt
    if "timestamp" not in context:
        context["timestamp"] = time.time()
    return err


class _DefaultOnClass(Generic[_P, _R]):
    """A handler method that, looked up on the class, runs on the default handler.

    So ``PoolErrorHandler.wrap_pool_error(...)`` works as in the seed, while
    ``PoolErrorHandler(policy).wrap_pool_error(...)`` uses that policy.
    """

    def __init__(self, method: Callable[Concatenate[PoolErrorHandler, _P], _R]) -> None:
        self._method = method

    def __get__(
        self, handler: PoolErrorHandler | None, owner: type[PoolErrorHandler]
    ) -> Callable[_P, _R]:
        return types.MethodType(self._method, _DEFAULT_HANDLER if handler is None else handler)


class PoolErrorHandler:
    """The error matrix as operations: wrap, decide on a retry, pick a delay, log.

    Call the methods on the class for the seed's defaults, or on ``PoolErrorHandler(policy)``.
    """

    __slots__ = ("policy",)

    def __init__(self, policy: MatrixPolicy = DEFAULT_POLICY) -> None:
        self.policy = policy

    @_DefaultOnClass
    def wrap_pool_error(
        self, error: ErrorInput, context: Mapping[str, Any] | None = None
    ) -> PoolError:
        """Classify ``error`` and return it as the category's :class:`PoolError` subclass.

        ``error`` is an error tuple (``("port_exited", -9)``, ``("timeout", "command_timeout")``,
        ``("python_exception", {"type": ..., "message": ..., "traceback": ...})``, ...), an
        exception (``policy.exception_categories``; other exceptions are system errors), or a
        :class:`PoolError`, which is re-classified for the attempt in ``context``: a copy with
        the contexts merged, the same category, class and message.

        Context keys read: ``attempt`` (missing means 1), ``affecting_all_workers``,
        ``worker_id``, ``command``, ``session_id`` (for the message), ``may_have_run`` and
        ``caller_fault`` (set on the error; a caller fault skips the matrix: severity warning,
        strategy abandon), ``message`` (replaces the default message), ``stderr`` (the last lines
        of the worker's stderr, shown at the end of the default message), ``timestamp`` (else
        ``time.time()``). The error's context is a new dict: the given one plus
        ``error_category``, ``severity``, ``recovery_strategy``, ``attempt`` and ``timestamp``.
        """
        given: dict[str, Any] = {} if context is None else dict(context)
        if isinstance(error, PoolError):
            return self._rewrap(error, given)
        attempt = _attempt(given)
        category = self._categorize(error)
        caller_fault = bool(given.get("caller_fault", False))
        severity, strategy = self._verdict(category, given, attempt, caller_fault)
        message = given.get("message") or _default_message(category, error, given, caller_fault)
        cls = ERROR_CLASSES[category]
        options: dict[str, Any] = {
            "category": category,
            "severity": severity,
            "recovery_strategy": strategy,
            "context": given,
            "error": error,
            "may_have_run": bool(given.get("may_have_run", False)),
            "caller_fault": caller_fault,
        }
        if issubclass(cls, RemoteError):
            payload = _payload(error)
            options["remote_type"] = str(payload.get("type", ""))
            options["remote_traceback"] = str(payload.get("traceback", ""))
        return _stamp(cls(message, **options), attempt)

    @_DefaultOnClass
    def should_retry(self, err: PoolError, attempt: int) -> bool:
        """Whether to try again after attempt number ``attempt`` (1 = the first try) failed.

        True iff the strategy retries (immediate_retry, backoff_retry; failover only after the
        first attempt, as in the seed) and ``attempt <= policy.max_retries[err.category]``.
        So connection_error's max of 5 allows retrying after attempts 1..5: at most 6 tries in
        all. circuit_break and abandon never retry, nor does a caller fault. ``err`` should be
        wrapped for the same attempt: with the default rules the strategy itself turns to
        abandon from attempt 3 (critical) or 4 (severity upgrade).
        """
        if attempt < 1:
            raise ValueError(f"attempts count from 1, got {attempt}")
        if err.caller_fault:
            return False
        strategy = err.recovery_strategy
        retries = strategy in _RETRYING or (strategy is Strategy.FAILOVER and attempt == 1)
        return retries and attempt <= self.policy.max_retries[err.category]

    @_DefaultOnClass
    def get_retry_delay(self, err: PoolError, attempt: int) -> float:
        """Seconds to wait before the try after failed attempt ``attempt`` (1 = the first try).

        ``policy.delays[err.recovery_strategy][attempt - 1]``; past the list, its last delay.
        """
        if attempt < 1:
            raise ValueError(f"attempts count from 1, got {attempt}")
        delays = self.policy.delays[err.recovery_strategy]
        return delays[min(attempt, len(delays)) - 1]

    @_DefaultOnClass
    def caller_error(
        self,
        message: str,
        *,
        context: Mapping[str, Any] | None = None,
        error: ErrorInput | None = None,
    ) -> CallerError:
        """A :class:`CallerError` for a mistake found in the host (OUTSIDE_MATRIX).

        ``error`` is what exposed it, if anything (an ``EncodeError`` for unencodable
        arguments: category communication_error); without one (an unknown command) the
        category is python_error. Nothing ran, so ``may_have_run`` is False.
        """
        given: dict[str, Any] = {} if context is None else dict(context)
        category = None if error is None else self._categorize(error)
        err = CallerError(message, category=category, context=given, error=error)
        return _stamp(err, _attempt(given))

    @_DefaultOnClass
    def format_for_logging(self, err: PoolError) -> str:
        """The error on several lines, with its verdict and context, for a log record."""
        context = err.context
        shown = {k: str(v) if isinstance(v, enum.Enum) else v for k, v in context.items()}
        worker, session = context.get("worker_id"), context.get("session_id")
        return "\n".join(
            [
                f"Pool Error: {err.message}",
                f"Type: {type(err).__name__}",
                f"Category: {err.category}",
                f"Severity: {err.severity}",
                f"Recovery: {err.recovery_strategy}",
                f"Worker: {'N/A' if worker is None else worker}",
                f"Session: {'N/A' if session is None else session}",
                f"Attempt: {_attempt(context)}",
                f"May have run: {err.may_have_run}",
                f"Caller fault: {err.caller_fault}",
                f"Retry after: {'N/A' if err.retry_after is None else err.retry_after}",
                f"Context: {pprint.pformat(shown)}",
            ]
        )

    def _categorize(self, error: ErrorInput) -> Category:
        policy = self.policy
        if isinstance(error, BaseException):
            for exc_type, category in policy.exception_categories:
                if isinstance(error, exc_type):
                    return category
            return policy.default_category
        tag = error[0] if error else None
        if isinstance(tag, str):
            return policy.categories.get(tag, policy.default_category)
        return policy.default_category

    def _verdict(
        self, category: Category, context: Mapping[str, Any], attempt: int, caller_fault: bool
    ) -> tuple[Severity, Strategy]:
        if caller_fault:
            return CALLER_FAULT_SEVERITY, CALLER_FAULT_STRATEGY
        policy = self.policy
        severity = policy.base_severity[category]
        # The seed's `cond` order: the attempt upgrade is tested first, so past
        # upgrade_after_attempt affecting_all_workers is not applied (minor becomes major only).
        if attempt > policy.upgrade_after_attempt:
            severity = policy.severity_upgrades.get(severity, severity)
        elif context.get("affecting_all_workers"):
            severity = Severity.CRITICAL
        # The last rule matches everything (validated), so next() always finds one.
        rules = policy.strategy_rules
        strategy = next(r.strategy for r in rules if r.matches(category, severity, attempt))
        return severity, strategy

    def _rewrap(self, err: PoolError, given: dict[str, Any]) -> PoolError:
        """A copy of ``err`` with the contexts merged and its verdict redone for the attempt."""
        context = {**err.context, **given}
        if "timestamp" not in given:
            context.pop("timestamp", None)  # stamped afresh: this failure's time, not the first's
        new = copy.copy(err)
        # copy.copy rebuilds from args and __dict__; keep the chain and where it was raised.
        new.__cause__, new.__context__ = err.__cause__, err.__context__
        new.__suppress_context__ = err.__suppress_context__
        new.__traceback__ = err.__traceback__
        new.context = context
        if "message" in given:
            new.message = given["message"]
            new.args = (new.message,)
        if "may_have_run" in given:
            new.may_have_run = bool(given["may_have_run"])
        if "caller_fault" in given:
            new.caller_fault = bool(given["caller_fault"])
        attempt = _attempt(context)
        if new.caller_fault or outside_case(new) is None:
            new.severity, new.recovery_strategy = self._verdict(
                new.category, context, attempt, new.caller_fault
            )
        return _stamp(new, attempt)


_DEFAULT_HANDLER: Final = PoolErrorHandler()
