"""Chaos commands for tests and benchmarks: load with ``handlers=["bridge_worker.testing"]``.

Never load this module in production: it can crash, hang and corrupt its own worker on request.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from bridge_worker import Context, command

# Memory held by ``alloc``, kept alive until the worker exits.
_held: list[bytearray] = []


@command("crash", idempotent=False)
def crash(args: Any, ctx: Context) -> None:
    """Exits the worker at once with exit code ``args`` (default 1), no cleanup."""
    os._exit(int(args) if args is not None else 1)


@command("raise_error", idempotent=True)
def raise_error(args: Any, ctx: Context) -> None:
    """Raises RuntimeError with message ``args``."""
    raise RuntimeError(str(args))


@command("hang", idempotent=False)
def hang(args: Any, ctx: Context) -> None:
    """Never returns."""
    threading.Event().wait()


@command("alloc", idempotent=True)
def alloc(args: Any, ctx: Context) -> int:
    """Allocates and holds ``args`` MB (touched, so it counts in RSS); returns the total held."""
    block = bytearray(int(args) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _held.append(block)
    return sum(len(b) for b in _held) // (1024 * 1024)


@command("garbage", idempotent=False)
def garbage(args: Any, ctx: Context) -> None:
    """Writes bytes that are not a valid frame straight to the protocol channel."""
    from bridge_worker import _loop

    os.write(_loop.protocol_out_fd(), b"\xff\xff\xff\xffthis is not a frame")


@command("print_stdout", idempotent=True)
def print_stdout(args: Any, ctx: Context) -> str:
    """Prints to stdout and writes to fd 1 directly; neither may reach the protocol channel."""
    text = str(args) if args is not None else "hello from print_stdout"
    print(text)
    sys.stdout.flush()
    os.write(1, (text + "\n").encode())
    return text


@command("counter", idempotent=False)
def counter(args: Any, ctx: Context) -> int:
    """Increments ``ctx.session["n"]`` and returns it."""
    n: int = ctx.session.get("n", 0) + 1
    ctx.session["n"] = n
    return n
