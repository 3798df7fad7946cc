"""Elastic pools with real worker processes, in real time (each test bounded, every process it
started gone after it): resize under load with sessions, the autoscaler once for real, a rolling
restart that loads new handler code under 8 callers, a broken new version stopping the roll, and
memory limits that count a worker's children."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import attrs
import pytest
import trio

from conftest import ALL_HANDLERS, alive, kill_quietly, wait_gone
from pool import InitializationError, Pool, PoolConfig, PoolEvent, open_pool
from pool._process import LocalLauncher

CONFIG = PoolConfig(size=2, handlers=[*ALL_HANDLERS, "handlers_elastic"], start_timeout=20.0)


@asynccontextmanager
async def real_pool(
    config: PoolConfig, launcher: LocalLauncher | None = None
) -> AsyncIterator[tuple[Pool, list[PoolEvent]]]:
    """A pool of real workers; every worker it ever started must be gone after it."""
    events: list[PoolEvent] = []
    config = attrs.evolve(config, event_callbacks=[*config.event_callbacks, events.append])
    seen: set[int] = set()
    try:
        async with open_pool(config, launcher=launcher) as pool:
            yield pool, events
            seen.update(pool.worker_pids())
        seen.update(e.pid for e in events if e.pid is not None)
        await wait_gone(seen, timeout=5.0, zombies_too=True)
    finally:
        seen.update(e.pid for e in events if e.pid is not None)
        kill_quietly(p for p in seen if alive(p))


def serving(pool: Pool) -> set[int]:
    return {w.pid for w in pool.statistics().workers if w.state in ("idle", "busy")}


async def settled(pool: Pool, size: int, timeout: float = 20.0) -> None:
    """Wait until exactly ``size`` workers exist and all serve."""
    with trio.fail_after(timeout):
        while not (len(pool.worker_pids()) == size and len(serving(pool)) == size):
            await trio.sleep(0.01)


async def test_resize_up_and_down_under_load_with_sessions() -> None:
    with trio.fail_after(60):
        async with real_pool(CONFIG) as (pool, events):
            counts: dict[str, list[int]] = {}
            stop = trio.Event()

            async def caller(sid: str) -> None:
                counts[sid] = []
                while not stop.is_set():
                    # Neither is idempotent: a call lost or run twice would show.
                    counts[sid].append(await pool.execute_in_session(sid, "counter"))
                    await pool.execute("sleep", 0.005)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(caller, f"s{i}")
                await trio.sleep(0.3)
                await pool.resize(5)
                assert len(serving(pool)) == 5 and pool.statistics().size == 5
                await trio.sleep(0.3)
                await pool.resize(1)
                assert pool.statistics().size == 1
                await trio.sleep(0.3)
                stop.set()
            await settled(pool, 1)
            assert all(c == list(range(1, len(c) + 1)) and len(c) > 5 for c in counts.values())
            stats = pool.statistics()
            assert stats.calls_failed == 0 and stats.restarts == 0 and stats.sessions == 8
            exits = [e for e in events if e.kind == "worker_exited"]
            assert len(exits) == 4 and all(e.data == {"exit_code": 0, "reason": "retired"} for e in exits)


async def test_autoscale_with_real_workers() -> None:
    config = attrs.evolve(CONFIG, size=1, max_size=4, scale_up_after=0.05, scale_down_after=0.5)
    with trio.fail_after(60):
        async with real_pool(config) as (pool, events):
            until = trio.current_time() + 1.5

            async def caller() -> None:
                while trio.current_time() < until:
                    await pool.execute("sleep", 0.05)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(caller)
            resized = [(e.data["from"], e.data["to"]) for e in events if e.kind == "pool_resized"]
            assert resized[:2] == [(1, 2), (2, 4)]
            assert max(to for _, to in resized) == 4
            await settled(pool, 1)  # idle for scale_down_after: back to size, one at a time
            resized = [(e.data["from"], e.data["to"]) for e in events if e.kind == "pool_resized"]
            assert resized[-3:] == [(4, 3), (3, 2), (2, 1)]
            assert pool.statistics().calls_failed == 0


VERSION_MODULE = '''
from bridge_worker import command

VERSION = {version!r}

@command("version", idempotent=True)
def version(args, ctx):
    return VERSION
'''


def deploy(path: Path, version: str) -> None:
    path.write_text(VERSION_MODULE.format(version=version))


@pytest.fixture
def deployed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, PoolConfig]:
    """A handlers module in a directory of its own that the test redeploys; workers find it
    through the host's sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "deployed_handlers.py"
    deploy(module, "v1")
    # A rewrite in the same second as the first import, at the same size, would leave Python's
    # cached bytecode looking fresh (it keeps the source's mtime in whole seconds): no cache.
    config = attrs.evolve(
        CONFIG, size=3, handlers=[*CONFIG.handlers, "deployed_handlers"], env={"PYTHONDONTWRITEBYTECODE": "1"}
    )
    return module, config


async def test_rolling_restart_under_8_callers_with_sessions_loads_new_code_and_fails_no_call(
    deployed: tuple[Path, PoolConfig],
) -> None:
    module, config = deployed
    with trio.fail_after(60):
        async with real_pool(config) as (pool, events):
            counts: dict[str, list[int]] = {}
            versions: list[str] = []
            stop = trio.Event()

            async def caller(sid: str) -> None:
                counts[sid] = []
                while not stop.is_set():
                    counts[sid].append(await pool.execute_in_session(sid, "counter"))
                    versions.append(await pool.execute("version"))
                    await pool.execute("sleep", 0.002)  # not idempotent

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(caller, f"s{i}")
                await trio.sleep(0.3)
                old = serving(pool)
                deploy(module, "v2")
                await pool.restart_workers()
                new = serving(pool)
                await trio.sleep(0.3)
                stop.set()
            assert len(new) == 3 and not old & new
            assert await pool.execute("version") == "v2"
            assert versions[0] == "v1" and versions[-1] == "v2"
            assert all(c == list(range(1, len(c) + 1)) and len(c) > 5 for c in counts.values())
            stats = pool.statistics()
            assert stats.calls_failed == 0 and stats.retries == 0 and stats.restarts == 3
            exits = [e for e in events if e.kind == "worker_exited"]
            assert {e.pid for e in exits} == old and all(e.data["exit_code"] == 0 for e in exits)


async def test_a_broken_new_version_stops_the_roll_and_the_old_workers_serve_on(
    deployed: tuple[Path, PoolConfig],
) -> None:
    module, config = deployed
    with trio.fail_after(60):
        async with real_pool(config) as (pool, events):
            old = serving(pool)
            module.write_text("raise ImportError('the new version is broken')\n")
            with pytest.raises(InitializationError) as info:
                await pool.restart_workers()
            message = info.value.message
            assert "stopped after replacing 0 of 3 workers" in message
            assert "'deployed_handlers'" in message and "the new version is broken" in message
            assert serving(pool) == old
            assert await pool.execute("version") == "v1"  # the old code serves on
            stats = pool.statistics()
            assert stats.failed_starts == 1 and stats.pool_circuit == "closed" and stats.size == 3
            assert pool.health()["status"] == "healthy"
            deploy(module, "v3")  # fixed: the roll goes through
            await pool.restart_workers()
            assert await pool.execute("version") == "v3"


@pytest.mark.parametrize("cgroup", [None, False], ids=["cgroup-if-possible", "process-tree"])
async def test_memory_limits_count_what_a_worker_started(cgroup: bool | None) -> None:
    launcher = LocalLauncher(CONFIG.python, cgroup=cgroup)
    children: list[int] = []
    try:
        with trio.fail_after(60):
            config = attrs.evolve(CONFIG, size=1, memory_check_interval=0.05)
            async with real_pool(config, launcher) as (pool, _):
                (worker,) = pool.statistics().workers
                assert worker.rss is not None
                children.append(await pool.execute("orphan_holding", 64))
                (holding,) = pool.statistics().workers
                assert holding.pid == worker.pid and holding.rss is not None
                assert holding.rss - worker.rss > 60 * 2**20  # the orphan's 64 MB count
            # Over a soft limit only with the orphan's memory: recycled, and the orphan ends with it.
            limit = worker.rss + 40 * 2**20
            async with real_pool(attrs.evolve(config, max_worker_memory=limit), launcher) as (pool, events):
                (first,) = pool.worker_pids()
                children.append(await pool.execute("orphan_holding", 64))
                await wait_gone([first, children[-1]], timeout=10)
                await settled(pool, 1)
                exits = [e for e in events if e.kind == "worker_exited"]
                assert [(e.pid, e.data["reason"]) for e in exits] == [(first, "retired")]
                assert pool.statistics().restarts == 1
    finally:
        kill_quietly(c for c in children if alive(c))
