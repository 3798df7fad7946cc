"""Handlers for test_core_processes.py: handlers that fork, start grandchildren in their own
session, raise BaseExceptions, return objects whose encoding raises, crash after writing to stderr,
and a start hook that fails every other start.

Imported inside workers via the host's sys.path. Every handler that starts a process returns its
pid, so the test can check it and kill it (by pid) if it is still alive. Stdlib only, never trio.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any

from bridge_worker import Context, command, on_start

#: Set (through PoolConfig.env) to the path of a counter file to make :func:`flaky_start` fail
#: every other start; unset, the hook does nothing (every other test loads this module too).
FLAKY_COUNTER_ENV = "POOL_TEST_FLAKY_COUNTER"


class RefusingDict(dict):  # type: ignore[type-arg]
    """A dict whose encoding raises RuntimeError (msgpack calls ``items()`` on dict subclasses),
    not one of msgpack's own errors."""

    def items(self) -> Any:
        raise RuntimeError("RefusingDict.items() refuses on purpose")


# ------------------------------------------------------------------ forked children (issue 10)


def _sleep_when_started(started: Any, seconds: float) -> None:
    started.set()
    time.sleep(seconds)


@command("mp_process_terminate", idempotent=False)
def mp_process_terminate(args: Any, ctx: Context) -> int:
    """Starts a child with multiprocessing's "fork" context, waits until it runs its target,
    terminates it (SIGTERM) and joins it; returns its pid."""
    mp = multiprocessing.get_context("fork")
    started = mp.Event()
    child = mp.Process(target=_sleep_when_started, args=(started, 30), daemon=True)
    child.start()
    pid = child.pid
    assert pid is not None
    try:
        assert started.wait(10), "the child did not start"
        child.terminate()
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
    return pid


def _double(x: int) -> int:
    return 2 * x


#: Filled in the "fork" children of :func:`mp_pool_exit_busy` (created before they fork).
_started: Any = None


def _busy(seconds: float) -> None:
    _started.put(os.getpid())
    time.sleep(seconds)


@command("mp_pool_exit_busy", idempotent=False)
def mp_pool_exit_busy(args: Any, ctx: Context) -> dict[str, Any]:
    """Runs a map in a ``multiprocessing.get_context("fork").Pool(2)`` block, then leaves the
    block while both children run a long task, so that its exit terminates them (SIGTERM).
    Returns the map's result and the children's pids."""
    global _started
    mp = multiprocessing.get_context("fork")
    _started = mp.Queue()
    try:
        with mp.Pool(2) as p:
            pids = [w.pid for w in p._pool]  # type: ignore[attr-defined]
            result = p.map(_double, [1, 2, 3])
            p.map_async(_busy, [30, 30], chunksize=1)
            busy = {_started.get(timeout=10) for _ in range(2)}  # both children are in _busy
            assert busy == set(pids), (busy, pids)
    finally:
        _started.close()
        _started = None
    return {"result": result, "pids": pids}


# ------------------------------------------------------------------ fd holders (issue 11)


@command("fork_holder", idempotent=False)
def fork_holder(args: Any, ctx: Context) -> int:
    """``os.fork()``: the child sleeps ``args`` seconds holding every fd it inherited (the
    worker's protocol pipes included), then exits. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(float(args))
        finally:
            os._exit(0)
    return pid


@command("fork_setsid_holder", idempotent=False)
def fork_setsid_holder(args: Any, ctx: Context) -> int:
    """``os.fork()`` then ``setsid()`` in the child (a new session, outside the worker's process
    group): the child sleeps ``args`` seconds holding the inherited fds. Returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            time.sleep(float(args))
        finally:
            os._exit(0)
    return pid


# ------------------------------------------------------------------ setsid grandchild (issue 12)


@command("spawn_setsid_sleep", idempotent=False)
def spawn_setsid_sleep(args: Any, ctx: Context) -> int:
    """Starts ``sleep 300`` in a new session (``setsid``); returns its pid."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    return child.pid


# ------------------------------------------------------------------ BaseExceptions (issue 13)


def _raise_base(kind: Any) -> None:
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    raise BaseException("x")


@command("raise_base", idempotent=False)
def raise_base(args: Any, ctx: Context) -> None:
    """Raises ``BaseException("x")``, or ``KeyboardInterrupt`` if ``args`` says so."""
    _raise_base(args)


@command("raise_base_idem", idempotent=True)
def raise_base_idem(args: Any, ctx: Context) -> None:
    """:func:`raise_base`, declared idempotent."""
    _raise_base(args)


# ------------------------------------------------------------------ encoding raises (issue 14)


@command("refusing_result", idempotent=False)
def refusing_result(args: Any, ctx: Context) -> RefusingDict:
    """Returns a dict whose encoding raises RuntimeError."""
    return RefusingDict(a=1)


# ------------------------------------------------------------------ last words (issue 15)


@command("stderr_then_exit", idempotent=False)
def stderr_then_exit(args: Any, ctx: Context) -> None:
    """Writes the line ``args`` to stderr, then exits the worker at once with code 3."""
    sys.stderr.write(f"{args}\n")
    sys.stderr.flush()
    os._exit(3)


# ------------------------------------------------------------------ flaky start hook (issue 17)


@on_start
def flaky_start() -> None:
    """Fails every other start (the 1st, 3rd, ...) across all workers of a pool, counted in the
    file named by $POOL_TEST_FLAKY_COUNTER under an exclusive lock; does nothing when unset."""
    path = os.environ.get(FLAKY_COUNTER_ENV)
    if not path:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.pread(fd, 64, 0).decode().strip()
        n = (int(text) if text else 0) + 1
        os.pwrite(fd, b"%20d" % n, 0)  # one fixed-width write: never seen half done
    finally:
        os.close(fd)  # releases the lock
    if n % 2 == 1:
        raise RuntimeError(f"flaky start hook: start #{n} fails on purpose")
