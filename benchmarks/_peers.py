"""Functions the peers run in their worker processes.

They live in their own small module so that spawn/forkserver children (ProcessPoolExecutor,
multiprocessing.Pool, trio-parallel) can import them by name quickly: this module imports only
the standard library, never trio, the pool or the benchmark driver.
"""

from __future__ import annotations

import os
import time
from typing import Any

# Set in each worker by ``set_barrier`` (a pool initializer): the startup benchmark makes every
# worker answer one call, and a barrier is the only way to know that N calls landed on N workers
# without adding sleeps that would bias the timing.
_barrier: Any = None


def echo(args: Any) -> Any:
    """Return the arguments unchanged (the hot-path benchmark's payload round trip)."""
    return args


def getpid(_: Any = None) -> int:
    """Return the worker's pid (to learn which processes a peer started)."""
    return os.getpid()


def sleep_pid(seconds: float) -> int:
    """Sleep, then return the worker's pid: a call long enough to be killed in the middle."""
    time.sleep(seconds)
    return os.getpid()


def set_barrier(barrier: Any) -> None:
    """Pool initializer: remember the startup barrier shared by every worker."""
    global _barrier
    _barrier = barrier


def barrier_pid(timeout: float) -> int:
    """Wait until every worker of the pool is running this call, then return the pid."""
    _barrier.wait(timeout)
    return os.getpid()
