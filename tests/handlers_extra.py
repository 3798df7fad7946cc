"""Handlers used by the real-process tests (imported inside workers via the host's sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from bridge_worker import Context, command


@command("unencodable_result", idempotent=True)
def unencodable_result(args: Any, ctx: Context) -> object:
    return object()


@command("spawn_child", idempotent=False)
def spawn_child(args: Any, ctx: Context) -> int:
    """Starts a long-sleeping grandchild process and returns its pid."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    return child.pid


@command("to_stderr", idempotent=True)
def to_stderr(args: Any, ctx: Context) -> str:
    sys.stderr.write(f"{args}\n")
    sys.stderr.flush()
    return "ok"


@command("pid", idempotent=True)
def pid(args: Any, ctx: Context) -> int:
    return os.getpid()


@command("big_result", idempotent=True)
def big_result(args: Any, ctx: Context) -> bytes:
    return b"x" * int(args)


@command("append", idempotent=False)
def append(args: Any, ctx: Context) -> list[Any]:
    """Appends ``args`` to the session's log and returns the log."""
    log: list[Any] = ctx.session.setdefault("log", [])
    log.append(args)
    return log


@command("get_state", idempotent=True)
def get_state(args: Any, ctx: Context) -> dict[Any, Any]:
    return dict(ctx.session)


@command("set_then_raise", idempotent=True)
def set_then_raise(args: Any, ctx: Context) -> None:
    """Writes to the session, then raises: nothing may be committed."""
    ctx.session["written"] = args
    raise RuntimeError("after writing to the session")


@command("set_big", idempotent=True)
def set_big(args: Any, ctx: Context) -> int:
    ctx.session["big"] = b"x" * int(args)
    return int(args)


@command("crash_idem", idempotent=True)
def crash_idem(args: Any, ctx: Context) -> None:
    """A poison input: kills every worker it reaches (declared idempotent, so it is retried)."""
    os._exit(1)


@command("sleep_idem", idempotent=True)
def sleep_idem(args: Any, ctx: Context) -> float:
    import time

    time.sleep(float(args))
    return float(args)


@command("psleep", idempotent=True, pipelined=True)
def psleep(args: Any, ctx: Context) -> float:
    """A pipelined command that takes its time (to see when its reply goes out)."""
    import time

    time.sleep(float(args))
    return float(args)


@command("log_effect", idempotent=False)
def log_effect(args: Any, ctx: Context) -> str:
    """Appends a line to the file ``args["path"]`` (a side effect), sleeps, then returns."""
    import time

    with open(args["path"], "a") as f:
        f.write(f"{args['id']}\n")
    time.sleep(float(args.get("sleep", 0)))
    return str(args["id"])


# ---------------------------------------------------------------- chaos tests (test_chaos.py)


@command("append_once", idempotent=True)
def append_once(args: Any, ctx: Context) -> int:
    """Appends ``args["id"]`` to the session's log unless it is already the last entry (so running
    it twice in a row is harmless: idempotent), after sleeping ``args["sleep"]``; returns the log's
    length."""
    import time

    time.sleep(float(args.get("sleep", 0)))
    log: list[Any] = ctx.session.setdefault("log", [])
    if not log or log[-1] != args["id"]:
        log.append(args["id"])
    return len(log)


@command("spawn_child_and_hang", idempotent=False)
def spawn_child_and_hang(args: Any, ctx: Context) -> None:
    """Starts a long-sleeping grandchild, writes its pid to the file ``args``, then never returns."""
    import threading

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(str(args), "w") as f:
        f.write(str(child.pid))
    threading.Event().wait()


@command("oversized_frame", idempotent=False)
def oversized_frame(args: Any, ctx: Context) -> None:
    """Writes a frame header that announces ``args`` bytes (over the pool's frame limit) straight to
    the protocol channel, followed by a little of that body."""
    import struct

    from bridge_worker import _loop

    os.write(_loop.protocol_out_fd(), struct.pack(">I", int(args)) + b"x" * 64)


@command("tuple_keys", idempotent=True)
def tuple_keys(args: Any, ctx: Context) -> dict[Any, Any]:
    """Returns ``{(1, 2): args}`` and stores the same key in the session: tuple keys both ways."""
    ctx.session[(1, 2)] = args
    return {(1, 2): args, "state": dict(ctx.session)}


@command("env_var", idempotent=True)
def env_var(args: Any, ctx: Context) -> str | None:
    """The worker's environment variable ``args`` (None if unset)."""
    return os.environ.get(str(args))
