"""Elastic pools with real worker processes, in real time (each test bounded, every process it
started gone after it): resize under load with sessions, the autoscaler once for real."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import attrs
import trio

from conftest import ALL_HANDLERS, alive, kill_quietly, wait_gone
from pool import Pool, PoolConfig, PoolEvent, open_pool
from pool._process import LocalLauncher

CONFIG = PoolConfig(size=2, handlers=ALL_HANDLERS, start_timeout=20.0)


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
