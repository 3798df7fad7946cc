"""Handlers for tests/test_shapes.py: map items and stream generators (stdlib only)."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

from bridge_worker import Context, command


@command("square", idempotent=True, caller_errors=(ValueError,))
def square(args: Any, ctx: Context) -> int:
    """args * args; a negative number is the caller's mistake."""
    if args < 0:
        raise ValueError(f"no negatives: {args}")
    return int(args * args)


@command("boom_at", idempotent=True)
def boom_at(args: Any, ctx: Context) -> Any:
    """Echoes args, except the string "boom": a handler failure (not the caller's fault)."""
    if args == "boom":
        raise RuntimeError("boom")
    return args


@command("note_item", idempotent=False)
def note_item(args: Any, ctx: Context) -> int:
    """Appends the item's value to the file ``args[0]`` (a side effect), returns it; sleeps
    ``args[2]`` seconds first."""
    path, value, pause = args
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return int(value)


@command("slow_item", idempotent=True)
def slow_item(args: Any, ctx: Context) -> Any:
    """Sleeps ``args`` seconds, returns it."""
    time.sleep(float(args))
    return args


@command("pid_item", idempotent=True)
def pid_item(args: Any, ctx: Context) -> list[int]:
    """[this worker's pid, args]; sleeps a little so that a kill can land mid-chunk."""
    time.sleep(0.01)
    return [os.getpid(), args]


@command("tokens", idempotent=True, stream=True)
def tokens(args: Any, ctx: Context) -> Iterator[str]:
    """Yields ``args`` tokens."""
    for i in range(int(args)):
        yield f"tok{i}"


@command("produce", idempotent=False, stream=True)
def produce(args: Any, ctx: Context) -> Iterator[int]:
    """Yields 0..n-1, writing how many it has produced to the file ``args["path"]`` before each
    item, and "closed after K" when the generator is closed or ends."""
    path, n = args["path"], int(args["n"])
    produced = 0
    try:
        for i in range(n):
            produced += 1
            with open(path, "w") as f:
                f.write(str(produced))
            yield i
            if args.get("pause"):
                time.sleep(float(args["pause"]))
    finally:
        with open(path + ".end", "w") as f:
            f.write(f"closed after {produced}")


@command("fail_after", idempotent=True, stream=True)
def fail_after(args: Any, ctx: Context) -> Iterator[int]:
    """Yields ``args`` items, then raises RuntimeError."""
    for i in range(int(args)):
        yield i
    raise RuntimeError(f"failed after {args} items")


@command("count_session", idempotent=False, stream=True)
def count_session(args: Any, ctx: Context) -> Iterator[int]:
    """Increments ctx.session["n"] per item and yields it; raises at the end if args < 0."""
    for _ in range(abs(int(args))):
        ctx.session["n"] = ctx.session.get("n", 0) + 1
        yield ctx.session["n"]
    if int(args) < 0:
        raise RuntimeError("rolled back")


@command("stall_after", idempotent=True, stream=True)
def stall_after(args: Any, ctx: Context) -> Iterator[Any]:
    """Yields its pid, then ``args - 1`` numbers, then hangs (for kills and deadlines)."""
    yield os.getpid()
    for i in range(int(args) - 1):
        yield i
    time.sleep(3600)
