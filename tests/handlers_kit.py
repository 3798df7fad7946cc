"""Handlers for the testing kit's own tests (tests/test_kit.py), run by in-process workers."""

from __future__ import annotations

from typing import Any

from bridge_worker import Context, command, on_start

#: Start hooks run so far, in this process (each in-process worker runs the hook as it starts).
starts = 0


@on_start
def count_starts() -> None:
    global starts
    starts += 1


@command("kit_remember", idempotent=False)
def kit_remember(args: Any, ctx: Context) -> list[Any]:
    """Appends ``args`` to ``ctx.session["log"]`` and returns the log; with ``"raise"``, raises
    after appending (so nothing may be committed)."""
    log: list[Any] = ctx.session.setdefault("log", [])
    log.append(args)
    if args == "raise":
        raise RuntimeError("raised after appending")
    return log


@command("kit_exit", idempotent=False)
def kit_exit(args: Any, ctx: Context) -> None:
    """Ends its worker with exit code ``args``, as ``sys.exit`` does."""
    raise SystemExit(args)
