"""Built-in commands every pool can load: ping, echo, sleep."""

from __future__ import annotations

import time
from typing import Any

from bridge_worker import Context, command


@command("ping", idempotent=True, pipelined=True)
def ping(args: Any, ctx: Context) -> str:
    """Answers "pong": a round trip with no work."""
    return "pong"


@command("echo", idempotent=True, pipelined=True)
def echo(args: Any, ctx: Context) -> Any:
    """Returns its arguments unchanged."""
    return args


@command("sleep", idempotent=True, caller_errors=(TypeError, ValueError))
def sleep(args: Any, ctx: Context) -> float:
    """Sleeps ``args`` seconds (a number), then returns it."""
    seconds = float(args)
    if seconds < 0:
        raise ValueError(f"sleep needs a non-negative number of seconds, got {args!r}")
    time.sleep(seconds)
    return seconds
