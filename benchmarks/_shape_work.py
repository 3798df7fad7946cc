"""Handlers of the benchmarks' shapes and learning sections (stdlib + bridge_worker only: pool workers load them)."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

from bridge_worker import Context, command


@command("token", idempotent=True)
def token(args: Any, ctx: Context) -> str:
    """One item of what ``tokens`` streams, fetched with a call of its own."""
    return f"token {args}"


@command("tokens", idempotent=True, stream=True)
def tokens(args: Any, ctx: Context) -> Iterator[str]:
    """``args`` items, streamed."""
    for i in range(int(args)):
        yield f"token {i}"


_calls = 0


@command("sometimes_hang", idempotent=True)
def sometimes_hang(args: Any, ctx: Context) -> int:
    """Takes ``args["seconds"]``; every ``args["every"]``-th call in this worker hangs for a minute
    instead (the learning section's 1 in N hung attempts)."""
    global _calls
    _calls += 1
    if _calls % int(args["every"]) == 0:
        time.sleep(60)
    time.sleep(float(args["seconds"]))
    return _calls


@command("sometimes_crash", idempotent=True)
def sometimes_crash(args: Any, ctx: Context) -> int:
    """Every ``args``-th call in this worker ends the worker (os._exit), as a poison input
    does; the others answer at once."""
    global _calls
    _calls += 1
    if _calls % int(args) == 0:
        os._exit(1)
    return _calls
