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
