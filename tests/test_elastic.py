"""Elastic pools on the fake worker in virtual time: resize, and the checkout's invariants
through it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_worker import FakeLauncher, fake_launcher
from pool import CallerError, InitializationError, Pool, PoolClosedError, PoolConfig, PoolError, PoolEvent, open_pool

# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def fake_pool(config: PoolConfig) -> AsyncIterator[tuple[Pool, FakeLauncher, list[PoolEvent]]]:
    events: list[PoolEvent] = []
    config = attrs.evolve(config, event_callbacks=[*config.event_callbacks, events.append])
    async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
        yield pool, launcher, events


def sizes(events: list[PoolEvent]) -> list[tuple[int, str]]:
    return [(e.data["to"], e.data["cause"]) for e in events if e.kind == "pool_resized"]


def serving_pids(pool: Pool) -> set[int]:
    return {w.pid for w in pool.statistics().workers if w.state in ("idle", "busy")}


async def settle(pool: Pool, size: int) -> None:
    """Wait (virtual time) until exactly ``size`` workers exist and serve."""
    while not (pool.statistics().alive == size and len(serving_pids(pool)) == size and not pool.statistics().starting):
        await trio.sleep(0.01)


# ---------------------------------------------------------------- resize


async def test_resize_grows_and_returns_when_the_new_workers_serve(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=2)) as (pool, launcher, events):
            t0 = trio.current_time()
            await pool.resize(5)
            assert trio.current_time() == pytest.approx(t0 + launcher.start_delay)
            stats = pool.statistics()
            assert (stats.size, stats.alive, stats.size_changes) == (5, 5, 1)
            assert sorted(w.slot for w in stats.workers) == [0, 1, 2, 3, 4]
            assert pool.health()["status"] == "healthy"
            assert sizes(events) == [(5, "resize")]
            assert await pool.execute("echo", 1) == 1


async def test_resize_down_under_load_moves_sessions_with_their_state_and_fails_no_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=4)) as (pool, launcher, events):
            counts: dict[str, list[int]] = {}

            async def session(sid: str) -> None:
                counts[sid] = []
                for _ in range(40):
                    counts[sid].append(await pool.execute_in_session(sid, "counter"))
                    await pool.execute("nsleep", 0.02)  # not idempotent: any failure would show
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(session, f"s{i}")
                await trio.sleep(0.3)
                before = serving_pids(pool)
                assert pool.statistics().sessions == 8
                await pool.resize(2)
                assert pool.statistics().size == 2
                assert len(serving_pids(pool)) == 2 and serving_pids(pool) <= before
            # Every session went on from its committed state: 1, 2, ..., 40, whichever worker.
            assert counts == {f"s{i}": list(range(1, 41)) for i in range(8)}
            await settle(pool, 2)
            stats = pool.statistics()
            assert stats.calls_failed == 0 and stats.retries == 0 and stats.restarts == 0
            # The two that left were asked to (exit code 0), not killed.
            gone = [p for p in launcher.launched if p.pid not in serving_pids(pool)]
            assert len(gone) == 2 and all(p.code == 0 for p in gone)
            exits = [e for e in events if e.kind == "worker_exited"]
            assert [e.data["reason"] for e in exits] == ["retired", "retired"]
            pool._checkout.check_invariants()


async def test_resize_down_takes_idle_workers_first_and_a_busy_one_finishes_its_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=3)) as (pool, launcher, events):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.execute, "nsleep", 5.0)
                await trio.sleep(0.1)
                (first,) = [w.pid for w in pool.statistics().workers if w.state == "busy"]
                await pool.resize(2)
                assert first in serving_pids(pool)  # an idle one left
                nursery.start_soon(pool.execute, "nsleep", 5.0)
                await trio.sleep(0.1)
                busy = serving_pids(pool)
                assert len(busy) == 2 and all(w.busy for w in pool.statistics().workers if w.pid in busy)
                t0 = trio.current_time()
                await pool.resize(1)
                assert trio.current_time() == t0  # a shrink returns at once
                (leaving,) = [w for w in pool.statistics().workers if w.state == "retiring"]
                assert leaving.busy and leaving.pid in busy
            # Both calls (not idempotent) ran to their end, each on its own worker.
            assert pool.statistics().calls_ok == 2 and pool.statistics().calls_failed == 0
            await settle(pool, 1)
            assert leaving.pid not in pool.worker_pids()
            assert [p.code for p in launcher.launched if p.pid == leaving.pid] == [0]


async def test_pipelining_goes_on_while_workers_leave_after_a_shrink(autojump_clock: trio.abc.Clock) -> None:
    # The pool is calm (every worker of its size up) though a leaving worker is still listed.
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=3, pipeline_depth=2)) as (pool, _, _):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(pool.execute, "psleep", 5.0)
                await trio.sleep(0.1)
                await pool.resize(2)  # all busy: one of them leaves after its call
                assert [w.state for w in pool.statistics().workers].count("retiring") == 1
                nursery.start_soon(pool.execute, "psleep", 1.0)
                await trio.sleep(0.1)
                stats = pool.statistics()
                assert stats.queued == 0  # written behind a busy worker that stays
                assert sorted(w.in_flight for w in stats.workers if w.state == "busy") == [1, 2]


async def test_resize_refuses_sizes_it_cannot_have(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=2)) as (pool, _, _):
            for bad in (0, -1, 2.0, "3", True, None):
                with pytest.raises(CallerError, match="resize"):
                    await pool.resize(bad)  # type: ignore[arg-type]
            assert pool.statistics().size_changes == 0
        with pytest.raises(PoolClosedError):
            await pool.resize(3)


async def test_resize_says_when_new_workers_cannot_start_and_keeps_trying(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=2)) as (pool, launcher, _):
            launcher.fail_start = True
            with pytest.raises(InitializationError, match="could not start"):
                await pool.resize(3)
            stats = pool.statistics()
            assert stats.size == 3 and stats.pool_circuit == "open" and len(serving_pids(pool)) == 2
            assert await pool.execute("echo", 1) == 1  # the two keep serving
            launcher.fail_start = False  # the cause goes away: the pool gets there by itself
            await trio.sleep(pool.config.pool_circuit.timeout + 1)
            assert len(serving_pids(pool)) == 3 and pool.health()["status"] == "healthy"


# ---------------------------------------------------------------- invariants through it all

calls = st.tuples(st.just("call"), st.sampled_from(["echo", "sleep", "psleep", "counter", "nsleep"]), st.sampled_from([None, "a", "b"]))
resizes = st.tuples(st.just("resize"), st.integers(1, 4))
waits = st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.3]))
kills = st.tuples(st.just("kill"), st.integers(0, 50))
ops = st.lists(st.one_of(calls, calls, calls, resizes, waits, waits, kills), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_the_checkout_keeps_its_invariants_through_resizes(ops: list[Any]) -> None:
    async def main() -> None:
        with trio.fail_after(600):  # virtual seconds
            async with trio.open_nursery() as outer:
                launcher = FakeLauncher(outer)
                config = PoolConfig(size=2, pipeline_depth=3, timeout=5.0)
                async with open_pool(config, launcher=launcher) as pool:
                    checkout = pool._checkout

                    async def one(command: str, session: str | None) -> None:
                        args: Any = 0.1 if command in ("sleep", "psleep", "nsleep") else "x"
                        try:
                            if session is None:
                                await pool.execute(command, args)
                            else:
                                await pool.execute_in_session(session, command, args)
                        except PoolError:
                            pass

                    async def sized(size: int) -> None:
                        try:
                            await pool.resize(size)
                        except InitializationError:
                            pass

                    async with trio.open_nursery() as n:
                        for op in ops:
                            if op[0] == "call":
                                n.start_soon(one, *op[1:])
                            elif op[0] == "resize":
                                n.start_soon(sized, op[1])
                            elif op[0] == "kill":
                                alive = [p for p in launcher.launched if p.code is None]
                                if alive:
                                    alive[op[1] % len(alive)].exit(-9)
                            else:
                                await trio.sleep(op[1])
                            await trio.testing.wait_all_tasks_blocked()
                            checkout.check_invariants()
                            assert checkout._size == pool.statistics().size
                    await trio.sleep(1)
                    checkout.check_invariants()
                    stats = pool.statistics()
                    assert stats.queued == 0 and len(serving_pids(pool)) == stats.size
                    assert sum(1 for w in stats.workers if w.state in ("idle", "busy")) == stats.size
                outer.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
