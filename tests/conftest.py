"""Shared helpers for the tests: process checks for real-process tests."""

from __future__ import annotations

import os
import signal
from typing import Iterable

import psutil
import trio

ALL_HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_extra"]


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exists(pid: int) -> bool:
    """True if ``pid`` exists at all (zombies included)."""
    return psutil.pid_exists(pid)


async def wait_gone(pids: Iterable[int], timeout: float = 5.0, *, zombies_too: bool = False) -> None:
    """Wait (real time, bounded) until none of ``pids`` is alive (or exists, with zombies_too)."""
    check = exists if zombies_too else alive
    pids = list(pids)
    with trio.fail_after(timeout):
        while any(check(p) for p in pids):
            await trio.sleep(0.02)


def kill_quietly(pids: Iterable[int]) -> None:
    """End processes a test started (by pid), ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
