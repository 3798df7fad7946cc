"""The exceptions a pool raises, and the three enums that classify them.

Every failure a caller sees is a :class:`PoolError`. ``category``, ``severity`` and
``recovery_strategy`` say what failed and what the pool did about it (the error matrix in
``_matrix`` decides them); ``message`` says what happened and what to do; ``may_have_run``,
``caller_fault`` and ``retry_after`` answer the questions a caller asks next: did my command run,
was it my mistake, when may I try again?

    PoolError
    ├── InitializationError     initialization_error  a worker could not start
    ├── WorkerConnectionError   connection_error      a worker died or its pipe broke
    ├── CommunicationError      communication_error   a frame could not be encoded or decoded
    ├── PoolTimeoutError        timeout_error         no answer within the deadline
    ├── ResourceError           resource_error        no worker, or a limit reached
    │   └── PoolSaturatedError                        the wait queue is full (overload)
    ├── HealthCheckError        health_check_error    a worker missed its heartbeat
    ├── SessionError            session_error         a session is gone
    ├── RemoteError             python_error          the command's handler raised
    ├── PoolSystemError         system_error          anything else: probably a bug
    ├── CallerError                                   the caller's mistake (unknown command, ...)
    ├── CircuitOpenError                              a circuit refused the call; see retry_after
    └── PoolClosedError                               your code closed the pool
                                                      (also a trio.ClosedResourceError)

The first nine are one class per category (:data:`ERROR_CLASSES`). The last four (and a
``RemoteError`` with ``caller_fault=True``) never go through the matrix: see ``OUTSIDE_MATRIX``
in ``_matrix``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeAlias, TypedDict, Unpack

import trio

#: What the matrix classifies: an error tuple such as ``("port_exited", -9)`` (a string tag,
#: then a payload), or an exception.
ErrorInput: TypeAlias = tuple[Any, ...] | BaseException

#: The exit code reported for a worker whose exit status the pool cannot know (a process on
#: another host that something else started): its connection ended, and that is all it knows.
EXIT_UNKNOWN: Final = -256


class Category(enum.StrEnum):
    """What failed: the seed's nine error categories. ``str()`` gives the plain value."""

    INITIALIZATION_ERROR = "initialization_error"
    CONNECTION_ERROR = "connection_error"
    COMMUNICATION_ERROR = "communication_error"
    TIMEOUT_ERROR = "timeout_error"
    RESOURCE_ERROR = "resource_error"
    HEALTH_CHECK_ERROR = "health_check_error"
    SESSION_ERROR = "session_error"
    PYTHON_ERROR = "python_error"
    SYSTEM_ERROR = "system_error"


class Severity(enum.StrEnum):
    """How badly the pool is hurt, most severe first."""

    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"


class Strategy(enum.StrEnum):
    """What the pool does about a failure."""

    IMMEDIATE_RETRY = "immediate_retry"
    BACKOFF_RETRY = "backoff_retry"
    CIRCUIT_BREAK = "circuit_break"
    FAILOVER = "failover"
    ABANDON = "abandon"


#: The verdict on a caller's mistake, whatever its class: nothing in the pool is hurt, and
#: retrying or failing over cannot help.
CALLER_FAULT_SEVERITY: Final = Severity.WARNING
CALLER_FAULT_STRATEGY: Final = Strategy.ABANDON


class _Options(TypedDict, total=False):
    """The keyword arguments every PoolError takes, so subclasses can pass them on typed."""

    category: Category | None
    severity: Severity | None
    recovery_strategy: Strategy | None
    context: dict[str, Any] | None
    error: ErrorInput | None
    may_have_run: bool
    caller_fault: bool | None
    retry_after: float | None


class PoolError(Exception):
    """Base of every error a pool call raises; catch it to handle them all.

    Whose fault it is depends on the subclass; ``caller_fault`` is True when it was the caller's.

    Attributes:
        message: what happened and what to do, in a sentence or two (also ``str(err)``).
        category, severity, recovery_strategy: the matrix's verdict.
        context: the facts recorded with the error (worker_id, command, session_id, attempt,
            timestamp, ...).
        error: the original error tuple or exception, if any.
        may_have_run: the command may have executed (its side effects may have happened).
        caller_fault: the caller's mistake; never retried.
        retry_after: seconds until a refusing circuit lets a call through again, else None.
    """

    # Per-class defaults, so that ``SomeError("message")`` is a complete error; for the nine
    # category classes they equal the matrix's verdict on a first attempt (a test pins this).
    # A caller fault defaults to the CALLER_FAULT_* verdict instead, in any class.
    _default_category: ClassVar[Category] = Category.SYSTEM_ERROR
    _default_severity: ClassVar[Severity] = Severity.CRITICAL
    _default_strategy: ClassVar[Strategy] = Strategy.ABANDON
    _default_caller_fault: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        category: Category | None = None,
        severity: Severity | None = None,
        recovery_strategy: Strategy | None = None,
        context: dict[str, Any] | None = None,
        error: ErrorInput | None = None,
        may_have_run: bool = False,
        caller_fault: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.caller_fault = self._default_caller_fault if caller_fault is None else caller_fault
        if self.caller_fault:
            default_severity, default_strategy = CALLER_FAULT_SEVERITY, CALLER_FAULT_STRATEGY
        else:
            default_severity, default_strategy = self._default_severity, self._default_strategy
        self.category = self._default_category if category is None else category
        self.severity = default_severity if severity is None else severity
        self.recovery_strategy = (
            default_strategy if recovery_strategy is None else recovery_strategy
        )
        # Kept as given, not copied: built on failure paths, usually from a fresh dict.
        self.context: dict[str, Any] = {} if context is None else context
        self.error = error
        self.may_have_run = may_have_run
        self.retry_after = retry_after

    def __str__(self) -> str:
        # The message may be replaced after construction (a re-wrapped error); follow it.
        return self.message


class InitializationError(PoolError):
    """A worker could not start: usually your handlers module or its start hook.

    An import error, an exception in the start hook, or a start slower than the start timeout.
    The message names the module and ends with the tail of the worker's stderr; ``error`` holds
    the worker's own report. Starts that keep failing open the pool's circuit instead of
    restarting workers in a loop.
    """

    _default_category = Category.INITIALIZATION_ERROR
    _default_severity = Severity.CRITICAL
    _default_strategy = Strategy.CIRCUIT_BREAK


class WorkerConnectionError(PoolError):
    """The worker process died or its pipe broke: external circumstances, as a rule.

    A kill from outside, the OOM killer, a crash in native code, or a handler that exited. The
    pool replaces the worker. ``may_have_run`` says whether the command may have executed; the
    pool re-runs a command that may have run only if it is declared idempotent.
    """

    _default_category = Category.CONNECTION_ERROR
    _default_severity = Severity.MAJOR
    _default_strategy = Strategy.BACKOFF_RETRY


class CommunicationError(PoolError):
    """A frame on a worker's channel could not be encoded or decoded: the worker's side, usually.

    A handler that wrote to the protocol channel, a result msgpack cannot represent, a frame over
    the size limit. A bad frame ends that worker's channel (as in h11), so the worker is killed and
    replaced. Arguments the host cannot encode are a :class:`CallerError` instead.
    """

    _default_category = Category.COMMUNICATION_ERROR
    _default_severity = Severity.MAJOR
    _default_strategy = Strategy.IMMEDIATE_RETRY


class PoolTimeoutError(PoolError):
    """The call did not finish within its deadline: the command was slow or hung.

    The worker running it was killed and replaced. Raise the call's ``timeout`` if the command
    is just slow.
    """

    _default_category = Category.TIMEOUT_ERROR
    _default_severity = Severity.MAJOR
    _default_strategy = Strategy.BACKOFF_RETRY


class ResourceError(PoolError):
    """The pool ran out of something: load or configuration, rarely a bug.

    No worker could be checked out, a worker went over its hard memory limit, or a session limit
    (live sessions, committed state size) was reached. Raise the limits or the pool size.
    """

    _default_category = Category.RESOURCE_ERROR
    _default_severity = Severity.CRITICAL
    _default_strategy = Strategy.CIRCUIT_BREAK


class PoolSaturatedError(ResourceError):
    """The wait queue is full: more concurrent calls than the pool and its queue can hold.

    Overload, not an outage: no circuit counts it and nothing ran (``may_have_run`` is False).
    Retry later, or enlarge the pool or its queue.
    """

    _default_severity = Severity.MINOR
    _default_strategy = Strategy.ABANDON


class HealthCheckError(PoolError):
    """A worker missed its heartbeat: a hung or starved worker process.

    External circumstances, or a handler that blocks the worker between calls. The pool replaces
    the worker.
    """

    _default_category = Category.HEALTH_CHECK_ERROR
    _default_severity = Severity.MINOR
    _default_strategy = Strategy.BACKOFF_RETRY


class SessionError(PoolError):
    """A session is gone: it expired, was closed, or its committed state could not be restored.

    Nobody's bug as a rule, but the session's state is lost: start the session again. The pool
    never silently replaces it with an empty one.
    """

    _default_category = Category.SESSION_ERROR
    _default_severity = Severity.MINOR
    _default_strategy = Strategy.IMMEDIATE_RETRY


class RemoteError(PoolError):
    """The command's handler raised: your handler code, or the input it was given.

    ``remote_type`` is the worker-side exception's type name and ``remote_traceback`` its
    traceback. With ``caller_fault`` True the exception is one of the command's declared
    ``caller_errors``: the arguments were wrong, and the call is never retried (severity
    warning, strategy abandon).
    """

    _default_category = Category.PYTHON_ERROR
    _default_severity = Severity.MAJOR
    _default_strategy = Strategy.FAILOVER

    def __init__(
        self,
        message: str,
        *,
        remote_type: str = "",
        remote_traceback: str = "",
        **options: Unpack[_Options],
    ) -> None:
        super().__init__(message, **options)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class PoolSystemError(PoolError):
    """A failure the matrix does not recognise: most likely a bug in the pool.

    ``error`` (and ``__cause__``) hold the original. Please report it with the output of
    ``PoolErrorHandler.format_for_logging``.
    """

    _default_category = Category.SYSTEM_ERROR
    _default_severity = Severity.CRITICAL
    _default_strategy = Strategy.ABANDON


class CallerError(PoolError):
    """The caller's mistake, found before any worker ran anything: fix the call.

    An unknown command, or arguments that cannot be encoded. Never retried, never failed over,
    never counted by a circuit, and no worker is harmed.
    """

    _default_category = Category.PYTHON_ERROR
    _default_caller_fault = True


class CircuitOpenError(PoolError):
    """A circuit refused the call without trying it: the command, or the pool, failed too often.

    Not this call's fault, and it is not counted again. ``retry_after`` is the number of seconds
    until the circuit lets a trial call through; ``circuit`` names the circuit.
    """

    _default_category = Category.SYSTEM_ERROR
    _default_severity = Severity.MAJOR
    _default_strategy = Strategy.CIRCUIT_BREAK

    def __init__(
        self, message: str, *, circuit: str | None = None, **options: Unpack[_Options]
    ) -> None:
        super().__init__(message, **options)
        self.circuit = circuit


class PoolClosedError(PoolError, trio.ClosedResourceError):
    """Your code closed the pool, then used it (or a call was still waiting when it closed).

    Also a :class:`trio.ClosedResourceError`, like any trio resource used after ``aclose``.
    """

    _default_category = Category.SYSTEM_ERROR
    _default_severity = Severity.WARNING
    _default_strategy = Strategy.ABANDON


#: The class a category's errors are raised as.
ERROR_CLASSES: Final[Mapping[Category, type[PoolError]]] = MappingProxyType(
    {
        Category.INITIALIZATION_ERROR: InitializationError,
        Category.CONNECTION_ERROR: WorkerConnectionError,
        Category.COMMUNICATION_ERROR: CommunicationError,
        Category.TIMEOUT_ERROR: PoolTimeoutError,
        Category.RESOURCE_ERROR: ResourceError,
        Category.HEALTH_CHECK_ERROR: HealthCheckError,
        Category.SESSION_ERROR: SessionError,
        Category.PYTHON_ERROR: RemoteError,
        Category.SYSTEM_ERROR: PoolSystemError,
    }
)
