"""Handlers for the test_core_*.py real-process tests (imported inside workers via the host's
sys.path). Standard library and bridge_worker only: workers never import trio."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from bridge_worker import Context, command


@command("core_log_effect", idempotent=False)
def core_log_effect(args: Any, ctx: Context) -> str:
    """Appends ``args["id"]`` to the file ``args["path"]`` (a side effect), then returns it."""
    with open(args["path"], "a") as f:
        f.write(f"{args['id']}\n")
    return str(args["id"])


@command("core_nsleep", idempotent=False)
def core_nsleep(args: Any, ctx: Context) -> float:
    """Sleeps ``args`` seconds; not idempotent, so the pool never runs a call of it twice."""
    time.sleep(float(args))
    return float(args)


@command("core_fin_incr", idempotent=False, finish_on_cancel=True)
def core_fin_incr(args: Any, ctx: Context) -> int:
    """Increments ``ctx.session["n"]``, sleeps ``args`` seconds, returns the new count. A cancelled
    call of it is left to finish on its worker."""
    n: int = ctx.session.get("n", 0) + 1
    ctx.session["n"] = n
    time.sleep(float(args or 0))
    return n


@command("core_state", idempotent=True)
def core_state(args: Any, ctx: Context) -> dict[Any, Any]:
    """The session's state as this call sees it."""
    return dict(ctx.session)


@command("core_pid", idempotent=True)
def core_pid(args: Any, ctx: Context) -> int:
    return os.getpid()


@command("core_set_big", idempotent=True)
def core_set_big(args: Any, ctx: Context) -> int:
    """Stores ``args`` bytes in the session."""
    ctx.session["big"] = b"x" * int(args)
    return int(args)


@command("core_len", idempotent=True)
def core_len(args: Any, ctx: Context) -> int:
    return len(args)


@command("core_raise", idempotent=True)
def core_raise(args: Any, ctx: Context) -> None:
    """Always raises (idempotent: a python_error fails over once, then gives up)."""
    raise RuntimeError(f"core_raise: {args}")


@command("core_held_sessions", idempotent=True)
def core_held_sessions(args: Any, ctx: Context) -> list[int]:
    """Sleeps ``args`` seconds (so concurrent calls land on different workers), then returns
    ``[pid, number of sessions whose state this worker process holds]``: the length of the
    ``sessions`` dict of the worker's request handler (found with the garbage collector)."""
    time.sleep(float(args or 0))
    servers = []
    for o in gc.get_objects():
        module = getattr(type(o), "__module__", None)
        if (
            isinstance(module, str)
            and module.startswith("bridge_worker")
            and not isinstance(o, type)
            and isinstance(getattr(o, "sessions", None), dict)
        ):
            servers.append(o)
    assert len(servers) == 1, servers
    return [os.getpid(), len(servers[0].sessions)]


@command("core_rebind", idempotent=False)
def core_rebind(args: Any, ctx: Context) -> str:
    """Rebinds ``ctx.session`` to ``args`` instead of mutating it."""
    ctx.session = args
    return "rebound"


@command("core_set", idempotent=False)
def core_set(args: Any, ctx: Context) -> str:
    """Mutates the session: ``ctx.session.update(args)``."""
    ctx.session.update(args)
    return "set"
