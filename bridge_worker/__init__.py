"""The worker side of the pool: register command handlers with :func:`command`.

This package never imports trio (workers must start fast); it needs only the standard library and
msgpack. The host (``pool``) imports its protocol module, never the reverse.

    from bridge_worker import command

    @command("predict", idempotent=True, caller_errors=(ValueError,))
    def predict(args, ctx):
        ctx.session["calls"] = ctx.session.get("calls", 0) + 1
        return {"label": "greeting"}
"""

from __future__ import annotations

from typing import Any, Callable, Final

__all__ = ["command", "on_start", "Context", "Command", "registry"]


class Context:
    """What a handler gets besides its arguments.

    ``session`` is the session's state, a dict of msgpack-able values. It is committed back to the
    host only when the call returns normally; a call that raises leaves the committed state as it
    was. Outside a session it is a fresh dict that is dropped after the call.

    ``trace_context`` is the caller's trace context when the host traces its calls
    (OpenTelemetry: a dict such as ``{"traceparent": "00-..."}``), else None. The worker never
    imports OpenTelemetry; a handler that does can join the caller's trace with
    ``opentelemetry.propagate.extract(ctx.trace_context)``.
    """

    __slots__ = ("session", "session_id", "request_id", "command", "trace_context")

    def __init__(
        self,
        session: dict[Any, Any],
        session_id: str | None,
        request_id: int,
        command: str,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.session_id = session_id
        self.request_id = request_id
        self.command = command
        self.trace_context = trace_context


Handler = Callable[[Any, Context], Any]


class Command:
    """A registered handler and what the host must know about it."""

    __slots__ = ("name", "func", "idempotent", "caller_errors", "finish_on_cancel", "pipelined", "stream")

    def __init__(
        self,
        name: str,
        func: Handler,
        idempotent: bool,
        caller_errors: tuple[type[BaseException], ...],
        finish_on_cancel: bool,
        pipelined: bool = False,
        stream: bool = False,
    ) -> None:
        self.name = name
        self.func = func
        self.idempotent = idempotent
        self.caller_errors = caller_errors
        self.finish_on_cancel = finish_on_cancel
        self.pipelined = pipelined
        self.stream = stream


_CO_GENERATOR: Final = 0x20  # inspect.CO_GENERATOR, without importing inspect (workers start fast)

#: Every command registered in this process, by name.
registry: Final[dict[str, Command]] = {}
#: Start hooks registered in this process, run once before the worker says hello.
start_hooks: Final[list[Callable[[], None]]] = []


def command(
    name: str,
    *,
    idempotent: bool = False,
    caller_errors: tuple[type[BaseException], ...] = (),
    finish_on_cancel: bool = False,
    pipelined: bool = False,
    stream: bool = False,
) -> Callable[[Handler], Handler]:
    """Register ``handler(args, ctx)`` as the command ``name``.

    ``idempotent``: running it twice is harmless, so the pool may re-run a call that may have run
    (retry, failover). Default False: the pool never re-runs it and reports ``may_have_run``.
    ``caller_errors``: exception types that mean the caller's input was wrong; they go straight back
    to the caller, never retried and never counted against any circuit.
    ``finish_on_cancel``: when the caller is cancelled mid-call, let the handler finish (its reply
    is dropped) instead of killing the worker; for workers that are expensive to start.
    ``pipelined``: the command is short and idempotent, so when every worker is busy the pool may
    write a call of it behind the calls a worker is running (up to ``PoolConfig.pipeline_depth``)
    instead of queueing it: more throughput, but a call can wait behind its neighbours on the same
    worker. Only for commands that always return quickly; requires ``idempotent=True``.
    ``stream``: the handler is a generator function; the host reads what it yields with
    ``pool.open_stream``, item by item, with backpressure (the generator waits when it is
    ``STREAM_WINDOW`` items ahead of the consumer). What it ``return``s is ignored; in a session,
    its state is committed when the generator ends normally.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"command name must be a non-empty string, got {name!r}")
    for exc_type in caller_errors:
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise TypeError(f"caller_errors must be exception types, got {exc_type!r}")
    if pipelined and not idempotent:
        raise ValueError(
            f"command {name!r}: pipelined=True needs idempotent=True (a pipelined call may be "
            "re-run when a neighbour on the same worker kills it)"
        )
    if pipelined and stream:
        raise ValueError(f"command {name!r}: a stream cannot be pipelined (it holds its worker)")

    def register(func: Handler) -> Handler:
        if stream and not getattr(getattr(func, "__code__", None), "co_flags", 0) & _CO_GENERATOR:
            raise TypeError(
                f"command {name!r}: stream=True needs a generator function (one that yields its "
                f"items), got {func!r}"
            )
        if name in registry and registry[name].func is not func:
            raise ValueError(f"command {name!r} is registered twice")
        registry[name] = Command(
            name, func, idempotent, tuple(caller_errors), finish_on_cancel, pipelined, stream
        )
        return func

    return register


def on_start(func: Callable[[], None]) -> Callable[[], None]:
    """Run ``func()`` once in each worker after the handler modules are imported, before the
    worker says hello (load a model once per worker). A slow hook is fine within the pool's start
    timeout; a hook that raises fails the worker's start with its traceback shown."""
    start_hooks.append(func)
    return func
