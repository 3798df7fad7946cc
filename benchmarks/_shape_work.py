"""Handlers of the benchmarks' shapes section (stdlib + bridge_worker only: loaded by pool workers)."""

from __future__ import annotations

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
