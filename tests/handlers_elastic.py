"""Handlers for test_elastic_process.py: a command that starts a process holding memory (a
worker's memory counts what it started). Stdlib only, never trio."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from bridge_worker import Context, command

_HOLDER = """
import sys, time
block = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(block), 4096):
    block[i] = 1  # touched, so it counts in RSS
print("ready", flush=True)
time.sleep(600)
"""

# Starts the holder (which writes to the same pipe), says its pid and exits: the holder is an
# orphan, so it is the worker's descendant only if the worker is a subreaper (no cgroup), and
# in the worker's cgroup otherwise.
_PARENT = """
import os, subprocess, sys
holder = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(holder.pid, flush=True)
os._exit(0)
"""


@command("orphan_holding", idempotent=False)
def orphan_holding(args: Any, ctx: Context) -> int:
    """Starts an orphaned grandchild that holds ``args`` MB and sleeps; returns its pid once it
    holds them."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _HOLDER, str(int(args))], stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    with parent.stdout:
        pid = int(parent.stdout.readline())
        parent.wait()
        if parent.stdout.readline() != b"ready\n":
            raise RuntimeError("the holder did not start")
    return pid
