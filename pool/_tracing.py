"""Tracing with OpenTelemetry (the ``otel`` extra), when the application has configured it: one
span per call (``execute``, ``execute_in_session``) and one per attempt under it, and the call's
trace context in its request frame, so that a handler's own spans join the caller's trace
(``ctx.trace_context`` in the worker).

::

    caller's span
     └── pool.call <command>          kind CLIENT; pool.command, pool.session_id
          ├── pool.attempt <command>  pool.call_id, pool.attempt, pool.worker_slot, pool.worker_id; error status
          │                           and the error's category when it failed
          ├── pool.attempt <command>  (a retry, or the failover)
          └── (the handler's spans, in the worker, from ctx.trace_context)

The frame carries the call span's context (every attempt sends the same frame: a retry never
re-encodes), so a handler's spans are children of the call span. Tracing is decided once, when
the pool opens: it is on when ``opentelemetry.trace`` has been imported and a real tracer provider
set (the API's default proxy and no-op providers mean "not configured"). This module never imports
OpenTelemetry itself, so a pool without it pays nothing: no import, no span, no context in the
frame; the worker only passes the dict through and never imports OpenTelemetry.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Awaitable, Callable

from pool._call import Call
from pool._errors import PoolError

# The call a traced wrapper runs: RecoveryOrchestrator.call with its trace.
TracedCall = Callable[[Any, Any, "str | None", Any, "CallTrace"], Awaitable[Any]]


def open_tracing() -> Tracing | None:
    """The pool's tracing, if the application has configured OpenTelemetry; else None."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return Tracing(trace, importlib.import_module("opentelemetry.propagate"), provider)


class Tracing:
    """Starts each call's spans (see the module docstring)."""

    def __init__(self, trace: Any, propagate: Any, provider: Any) -> None:
        self.trace = trace
        self.propagate = propagate
        self.tracer = provider.get_tracer("trio-worker-pool")

    async def call(
        self, run: TracedCall, command: Any, args: Any, session_id: str | None, timeout: Any
    ) -> Any:
        """``run`` (the orchestrator's call) inside a call span."""
        trace = CallTrace(self, command, session_id)
        try:
            result = await run(command, args, session_id, timeout, trace)
        except BaseException as exc:
            trace.end(exc)
            raise
        trace.end(None)
        return result


class CallTrace:
    """One call's spans: the call span, and the span of the attempt running now."""

    __slots__ = ("_tracing", "_name", "span", "_parent", "context", "_attempt", "_call")

    def __init__(self, tracing: Tracing, command: Any, session_id: str | None) -> None:
        self._tracing = tracing
        trace = tracing.trace
        self._name = f"pool.attempt {command}"
        attributes = {"pool.command": str(command)}
        if session_id is not None:
            attributes["pool.session_id"] = session_id
        self.span = tracing.tracer.start_span(f"pool.call {command}", kind=trace.SpanKind.CLIENT, attributes=attributes)
        self._parent = trace.set_span_in_context(self.span)  # the attempts' parent
        #: What the request frame carries (W3C trace context: ``traceparent``...).
        self.context: dict[str, str] = {}
        tracing.propagate.inject(self.context, context=self._parent)
        self._attempt: Any = None
        self._call: Call[Any, Any] | None = None

    def attempt(self, call: Call[Any, Any]) -> None:
        """An attempt starts: its span, and the trace context on its call (a request re-encoded
        for another worker carries it too)."""
        call.trace_context = self.context
        self._call = call
        self._attempt = self._tracing.tracer.start_span(
            self._name, context=self._parent, attributes={"pool.call_id": call.req_id, "pool.attempt": call.attempt}
        )

    def attempt_failed(self, err: PoolError) -> None:
        """The attempt running now failed with ``err`` (the call may go on with another)."""
        self._end_attempt(err)

    def end(self, exc: BaseException | None) -> None:
        """The call ended: returned (``exc`` None) or raised ``exc``."""
        self._end_attempt(exc)
        _finish(self._tracing.trace, self.span, exc)

    def _end_attempt(self, exc: BaseException | None) -> None:
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        worker = self._call.worker if self._call is not None else None
        if worker is not None:
            span.set_attributes({"pool.worker_slot": worker.slot, "pool.worker_id": worker.id})
        _finish(self._tracing.trace, span, exc)


def _finish(trace: Any, span: Any, exc: BaseException | None) -> None:
    if exc is not None:
        if isinstance(exc, PoolError):
            span.set_attribute("pool.error.category", str(exc.category))
            description = f"{type(exc).__name__}: {exc.message.splitlines()[0] if exc.message else ''}"
        else:
            description = type(exc).__name__
        span.set_status(trace.Status(trace.StatusCode.ERROR, description))
    span.end()
