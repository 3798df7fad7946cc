"""Handlers for tests/test_logs_and_traces.py (stdlib and bridge_worker only: workers never import
trio, nor OpenTelemetry)."""

from __future__ import annotations

import sys
from typing import Any

from bridge_worker import Context, command


@command("trace_context", idempotent=True)
def trace_context(args: Any, ctx: Context) -> Any:
    """The trace context this call carried (None when the host does not trace), and whether this
    worker has imported OpenTelemetry (it must not)."""
    return {"trace_context": ctx.trace_context, "otel_imported": "opentelemetry" in sys.modules}


@command("say", idempotent=True)
def say(args: Any, ctx: Context) -> None:
    """Writes ``args`` lines to stderr."""
    for line in args:
        sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
