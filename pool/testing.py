"""A testing kit for applications that use the pool: a pytest plugin, and a fake pool.

Installed with the package and registered through the ``pytest11`` entry point (as
``pool.testing``), so a test suite needs no conftest line; it works with pytest-trio (the
fixtures are plain fixtures whose objects are used inside the test's trio run)::

    async def test_predictions_survive_a_dead_worker(worker_pool, chaos):
        async with worker_pool(handlers=["myapp.commands"], size=2) as pool:
            await chaos.kill_worker(pool)              # SIGKILL, then wait for the replacement
            async with chaos.killing(pool, every=0.05):
                assert await predict_all(pool) == EXPECTED

Fixtures:

- ``worker_pool``: ``async with worker_pool(handlers=[...], size=2, **config) as pool`` opens a
  real pool (:class:`WorkerPools`); once it is closed, a worker process still alive fails the test
  (and is killed).
- ``chaos``: a :class:`Chaos` seeded from the test's id: ``await chaos.kill_worker(pool,
  worker=None)``, ``await chaos.stop_worker(pool)``, ``async with chaos.killing(pool, every=0.05,
  signal=SIGKILL)``. A failing test's report ends with what it did.

Functions: :func:`assert_no_orphans`, and :func:`fake_pool`, the same pool over
:class:`InProcessLauncher` workers that run the real handler functions in this process, on trio's
clock (with ``autojump_clock``, in virtual time), for unit tests that must not start processes.
"""

from __future__ import annotations

import zlib
from typing import Any, Generator, Iterator

import pytest

from pool._inprocess import InProcessLauncher as InProcessLauncher
from pool._inprocess import InProcessWorker as InProcessWorker
from pool._inprocess import Simulation as Simulation
from pool._kit import Chaos as Chaos
from pool._kit import ChaosRecord as ChaosRecord
from pool._kit import WorkerPools as WorkerPools
from pool._kit import assert_no_orphans as assert_no_orphans
from pool._kit import fake_pool as fake_pool

_CHAOS = pytest.StashKey[Chaos]()


@pytest.fixture
def worker_pool() -> Iterator[WorkerPools]:
    """``async with worker_pool(handlers=[...], size=2, **config) as pool``: a pool of real worker
    processes, checked for leftovers when it closes and at the end of the test."""
    pools = WorkerPools()
    yield pools
    pools.check()


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> Iterator[Chaos]:
    """Kill and stop workers; what it did is added to the report of a test that fails."""
    kit = Chaos(seed=zlib.crc32(request.node.nodeid.encode()))
    request.node.stash[_CHAOS] = kit
    try:
        yield kit
    finally:
        kit.release()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    kit = item.stash.get(_CHAOS, None)
    if kit is None or not kit.log or not report.failed:
        return
    # In the failure's own text when it has sections (a traceback's), so that it shows wherever
    # the failure does (terminal, junit xml); else beside the captured output.
    addsection = getattr(report.longrepr, "addsection", None)
    if addsection is not None:
        addsection("chaos", kit.describe())
    else:
        report.sections.append(("chaos", kit.describe()))
