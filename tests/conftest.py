"""Shared helpers for the tests: process checks for real-process tests, and pool fixtures."""

from __future__ import annotations

import os
import signal
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Iterable

import psutil
import pytest
import trio

from pool import Pool, PoolConfig, open_pool
from pool.launchers import TcpLauncher
from pool.testing import WorkerPools, fake_pool

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


# ---------------------------------------------------------------------------------------------
# Pool fixtures: one contract over every launcher
# ---------------------------------------------------------------------------------------------

#: The launchers the contract suite runs over: the host tests' protocol-level fakes
#: (fake_worker.py), the testing kit's in-process workers (the real handlers, in this process), real
#: local subprocesses over pipes, and real local subprocesses over TCP loopback.
LAUNCHERS = ("fake", "inprocess", "local", "tcp")
#: A token for the TCP tests (any printable secret of 16 characters or more).
TOKEN = "test-token-" + "0123456789abcdef" * 2
#: Commands every kind of worker has, with the same meaning (builtin + bridge_worker.testing).
CONTRACT_HANDLERS = ("bridge_worker.builtin", "bridge_worker.testing")


@pytest.fixture(params=LAUNCHERS)
def pool_factory(
    request: pytest.FixtureRequest, worker_pool: WorkerPools
) -> Callable[..., AsyncContextManager[Pool]]:
    """``async with pool_factory(size=2, **config) as pool``: a pool over this run's launcher.

    With real workers, the testing kit's ``worker_pool`` fails the test if one of the pool's
    processes is still alive after it; here a zombie fails it too (the pool reaps its workers)."""
    kind = request.param

    @asynccontextmanager
    async def make(**config: Any) -> AsyncIterator[Pool]:
        config = {"size": 2, "handlers": CONTRACT_HANDLERS, **config}
        if kind == "fake":
            from fake_worker import fake_launcher

            async with fake_launcher() as launcher, open_pool(PoolConfig(**config), launcher=launcher) as pool:
                yield pool
        elif kind == "inprocess":
            async with fake_pool(**config) as pool:
                yield pool
        else:
            launcher = TcpLauncher(TOKEN) if kind == "tcp" else None
            async with worker_pool(launcher=launcher, **config) as pool:
                yield pool
            await wait_gone(worker_pool.pids, timeout=5.0, zombies_too=True)

    return make
