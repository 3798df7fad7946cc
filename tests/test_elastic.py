"""Elastic pools on the fake worker in virtual time, and their pure rules with plain numbers:
resize, the autoscaler (its rule, what it observes, no flapping), rolling restarts, recycling by
age with jitter, the recycle-loop guard, and the checkout's invariants through all of it."""

from __future__ import annotations

import logging
import math
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_worker.protocol import CommandInfo
from fake_worker import FakeLauncher, fake_launcher
from pool import CallerError, InitializationError, Pool, PoolClosedError, PoolConfig, PoolError, PoolEvent, open_pool
from pool._call import DONE, QUEUED, RUNNING, Call
from pool._elastic import IdleWatch, QueueWatch, ScaleRule, age_limit
from pool._worker import BUSY, IDLE

# ---------------------------------------------------------------- the autoscaler's rule, in numbers

RULE = ScaleRule(smallest=2, largest=8, up_after=0.05, down_after=30.0)
CALM: dict[str, Any] = dict(oldest_wait=None, waiting=0, longest_idle=0.0, settled=True, last_grow=-math.inf, last_change=-math.inf)


def target(now: float, current: int, **changes: Any) -> int:
    return RULE.target(now, current, **{**CALM, **changes})


def test_the_rule_grows_once_the_oldest_call_has_waited_longer_than_scale_up_after() -> None:
    assert target(100.0, 2, oldest_wait=0.05, waiting=10) == 2  # not longer: no change
    assert target(100.0, 2, oldest_wait=0.051, waiting=10) == 4  # doubles
    assert target(100.0, 4, oldest_wait=1.0, waiting=10) == 8
    assert target(100.0, 6, oldest_wait=1.0, waiting=10) == 8  # up to max_size
    assert target(100.0, 8, oldest_wait=1.0, waiting=10) == 8
    assert target(100.0, 2, oldest_wait=1.0, waiting=1) == 3  # no more workers than calls waiting


def test_the_rule_grows_only_once_the_last_step_serves_and_not_faster_than_scale_up_after() -> None:
    assert target(100.0, 2, oldest_wait=1.0, waiting=10, settled=False) == 2
    assert target(100.0, 2, oldest_wait=1.0, waiting=10, last_change=99.96) == 2
    assert target(100.0, 2, oldest_wait=1.0, waiting=10, last_change=99.94) == 4


def test_the_rule_shrinks_one_worker_after_scale_down_after_of_idleness() -> None:
    assert target(100.0, 5, longest_idle=29.9) == 5
    assert target(100.0, 5, longest_idle=30.0) == 4  # one at a time
    assert target(100.0, 2, longest_idle=500.0) == 2  # never below size
    assert target(100.0, 5, longest_idle=30.0, waiting=1, oldest_wait=0.01) == 5  # calls wait


def test_the_rule_never_turns_from_growing_to_shrinking_within_scale_down_after() -> None:
    # A worker idle for long, but the pool grew 20 s ago: it stays (no flapping).
    assert target(100.0, 5, longest_idle=40.0, last_grow=80.0, last_change=80.0) == 5
    assert target(110.0, 5, longest_idle=40.0, last_grow=80.0, last_change=80.0) == 4
    # Shrinking steps are rate-limited too.
    assert target(110.0, 5, longest_idle=40.0, last_grow=0.0, last_change=109.99) == 5


# ---------------------------------------------------------------- what the autoscaler observes


def _call(state: Any = QUEUED) -> Call[Any, Any]:
    info = CommandInfo("echo", True, (), False, False)
    call: Call[Any, Any] = Call(info, None, b"", 1, 1, math.inf, None, None, lambda c: None)
    call.state = state
    return call


async def test_the_queue_watch_gives_a_lower_bound_of_the_oldest_wait() -> None:
    watch = QueueWatch()
    queue: deque[Any] = deque()
    assert watch.oldest_wait(queue, 0.0) is None
    a, b, c = _call(), _call(), _call()
    for call in (a, b):
        queue.append(call)
        call.where = queue
    assert watch.oldest_wait(queue, 1.0) == 0.0  # b (the tail) is marked at 1.0
    queue.append(c)
    c.where = queue
    assert watch.oldest_wait(queue, 1.5) == 0.5  # b's mark; c is marked at 1.5
    # a and b leave the queue: c's mark is the oldest left
    for call in (a, b):
        queue.remove(call)
        call.where = None
        call.state = RUNNING
    assert watch.oldest_wait(queue, 2.0) == 0.5
    queue.remove(c)
    c.state = DONE
    assert watch.oldest_wait(queue, 3.0) is None
    assert not watch._marks  # nothing kept once the queue is empty


class _W:
    """What IdleWatch reads of a worker."""

    def __init__(self) -> None:
        self.state = IDLE
        self.calls = 0


def test_the_idle_watch_counts_from_the_first_look_with_the_same_calls() -> None:
    watch = IdleWatch()
    w = _W()
    workers: list[Any] = [w]
    assert watch.idle_times(workers, 10.0) == {w: 0.0}
    assert watch.idle_times(workers, 15.0) == {w: 5.0}
    w.calls += 1  # took a call and answered it between two looks
    assert watch.idle_times(workers, 16.0) == {w: 0.0}
    w.state = BUSY
    assert watch.idle_times(workers, 17.0) == {}
    w.state = IDLE
    assert watch.idle_times(workers, 18.0) == {w: 0.0}
    assert watch.idle_times([], 19.0) == {} and not watch._since


def test_an_age_limit_is_max_age_less_up_to_the_jitter() -> None:
    assert age_limit(100.0, 0.2, 0.0) == 100.0
    assert age_limit(100.0, 0.2, 0.5) == pytest.approx(90.0)
    assert 80.0 < age_limit(100.0, 0.2, 0.999999) < 80.001
    assert age_limit(100.0, 0.0, 0.7) == 100.0


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
        async with fake_pool(PoolConfig(size=2, max_size=4)) as (pool, _, _):
            for bad in (0, -1, 2.0, "3", True, None):
                with pytest.raises(CallerError, match="resize"):
                    await pool.resize(bad)  # type: ignore[arg-type]
            for outside in (1, 5):
                with pytest.raises(CallerError, match=r"between PoolConfig.size \(2\) and max_size \(4\)"):
                    await pool.resize(outside)
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


# ---------------------------------------------------------------- autoscale

AUTO = PoolConfig(size=1, max_size=8, scale_up_after=0.05, scale_down_after=30.0)


async def _load(pool: Pool, callers: int, seconds: float, until: float) -> None:
    async def caller() -> None:
        while trio.current_time() < until:
            await pool.execute("sleep", seconds)

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)


async def test_autoscale_grows_while_calls_wait_and_shrinks_after_idleness(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        async with fake_pool(AUTO) as (pool, launcher, events):
            t0 = trio.current_time()
            await _load(pool, 16, 1.0, until=t0 + 5)
            grown = [e for e in events if e.kind == "pool_resized"]
            # Doubling, each step once the last one serves: 1 -> 2 -> 4 -> 8, then no further.
            assert sizes(events) == [(2, "autoscale"), (4, "autoscale"), (8, "autoscale")]
            # The first step waits until the oldest call has waited over scale_up_after (the
            # monitor looks every scale_up_after / 2, so it sees it at most one look later).
            assert 0.05 < grown[0].time - t0 <= 0.05 + 0.025 * 2
            assert grown[0].data["queue_wait"] > 0.05 and grown[0].data["waiting"] >= 1
            # 1 to 8 in three steps, each after the last one's workers said hello.
            assert grown[-1].time - t0 < 0.5
            assert pool.statistics().size == 8 and pool.statistics().size_changes == 3
            # No worker is idle before the load stops (t0 + 5: calls wait until then).
            await trio.sleep_until(t0 + 5 + 29.9)  # idle, but not for scale_down_after yet
            assert pool.statistics().size == 8
            await trio.sleep(8.0)
            shrunk = [e for e in events if e.kind == "pool_resized"][3:]
            assert [e.data["to"] for e in shrunk] == [7, 6, 5, 4, 3, 2, 1]  # one at a time
            assert all(e.data["idle_seconds"] >= 30.0 for e in shrunk)
            assert shrunk[0].time >= t0 + 5 + 30.0
            # Rate-limited: two changes at least scale_up_after apart.
            assert all(b.time - a.time >= 0.05 - 1e-9 for a, b in zip(shrunk, shrunk[1:]))
            await settle(pool, 1)
            stats = pool.statistics()
            assert stats.calls_failed == 0 and stats.size == 1 and stats.size_changes == 10
            assert [p.code for p in launcher.launched].count(0) == 7  # seven left, asked to
            pool._checkout.check_invariants()


async def test_autoscale_does_not_flap_between_bursts(autojump_clock: trio.abc.Clock) -> None:
    # A burst every 10 s: the pool grows for the first and stays grown, since no worker is ever
    # idle for scale_down_after (30 s) between bursts.
    with trio.fail_after(1000):
        async with fake_pool(AUTO) as (pool, _, events):
            for _ in range(10):
                t = trio.current_time()
                await _load(pool, 16, 1.0, until=t + 1.5)
                await trio.sleep(10 - (trio.current_time() - t))
            assert sizes(events) == [(2, "autoscale"), (4, "autoscale"), (8, "autoscale")]
            await trio.sleep(40)  # then the load is gone: it shrinks
            assert pool.statistics().size == 1


async def test_autoscale_goes_on_after_a_resize(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        async with fake_pool(AUTO) as (pool, launcher, events):
            launcher.start_delay = 2.0
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_load, pool, 16, 1.0, t0 + 5)
                await trio.sleep(0.01)
                await pool.resize(2)  # calls wait meanwhile, but only the resize acts
                assert trio.current_time() == pytest.approx(t0 + 2.01)
                assert sizes(events) == [(2, "resize")]
            # Then the autoscaler goes on from there (the resize changed the size at its start,
            # over scale_up_after ago, and its worker serves: it may grow at once).
            assert sizes(events)[1:3] == [(4, "autoscale"), (8, "autoscale")]
            assert [e.time for e in events if e.kind == "pool_resized"][1] >= t0 + 2.01


async def test_autoscale_stays_still_during_a_rolling_restart(autojump_clock: trio.abc.Clock) -> None:
    # An idle pool above its size, during a roll that lasts longer than scale_down_after: the
    # autoscaler would retire slots of the roll itself; it waits for the roll to end.
    with trio.fail_after(1000):
        async with fake_pool(attrs.evolve(AUTO, scale_down_after=1.0)) as (pool, launcher, events):
            await pool.resize(3)
            launcher.start_delay = 2.0
            await pool.restart_workers()
            t_end = trio.current_time()
            assert sizes(events) == [(3, "resize")]
            (done,) = [e for e in events if e.kind == "workers_restarted"]
            assert done.data["replaced"] == 3 and done.data["stopped"] is None
            await trio.sleep(2)
            shrunk = [e for e in events if e.kind == "pool_resized"][1:]
            assert [e.data["to"] for e in shrunk] == [2, 1] and shrunk[0].time >= t_end


async def test_autoscale_does_not_grow_while_workers_cannot_start(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        async with fake_pool(attrs.evolve(AUTO, size=2)) as (pool, launcher, events):
            launcher.fail_start = True
            t0 = trio.current_time()
            await _load(pool, 8, 1.0, until=t0 + 3)
            # It grew once (2 -> 4); those workers never started, so it did not grow again.
            assert sizes(events) == [(4, "autoscale")]
            assert pool.statistics().calls_failed == 0


# ---------------------------------------------------------------- rolling restart


async def test_rolling_restart_replaces_every_worker_one_at_a_time_with_no_failed_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=4)) as (pool, launcher, events):
            floor: list[int] = []  # serving workers (not leaving) at each worker event

            def watch(event: PoolEvent) -> None:
                if event.kind in ("worker_started", "worker_exited"):
                    floor.append(pool._supervisor.serving_count())

            events_before = len(events)
            pool._events.callbacks += (watch,)
            counts: dict[str, list[int]] = {}
            t_stop = trio.current_time() + 2.0

            async def caller(sid: str) -> None:
                counts[sid] = []
                while trio.current_time() < t_stop:
                    counts[sid].append(await pool.execute_in_session(sid, "counter"))
                    await pool.execute("nsleep", 0.03)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(caller, f"s{i}")
                await trio.sleep(0.2)
                old = serving_pids(pool)
                await pool.restart_workers()
                new = serving_pids(pool)
                assert len(new) == 4 and not old & new
            assert all(c == list(range(1, len(c) + 1)) and len(c) > 10 for c in counts.values())
            stats = pool.statistics()
            assert stats.calls_failed == 0 and stats.retries == 0 and stats.failovers == 0
            assert stats.restarts == 4 and stats.size == 4 and stats.size_changes == 0
            # A new worker serves before each old one leaves: never fewer than 4 serving.
            assert min(floor) >= 4
            kinds = [e.kind for e in events[events_before:] if e.kind in ("worker_started", "worker_exited")]
            assert kinds == ["worker_started", "worker_exited"] * 4
            done = [e for e in events if e.kind == "workers_restarted"]
            assert len(done) == 1 and done[0].data["replaced"] == 4 and done[0].data["stopped"] is None
            assert all(p.code == 0 for p in launcher.launched if p.pid in old)  # asked, not killed
            pool._checkout.check_invariants()


async def test_a_new_worker_that_fails_to_start_stops_the_roll(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=3)) as (pool, launcher, events):
            def break_after_first(event: PoolEvent) -> None:
                if event.kind == "worker_started":  # the roll's first new worker: the next fails
                    launcher.fail_start = True

            pool._events.callbacks += (break_after_first,)
            old = serving_pids(pool)
            with pytest.raises(InitializationError) as info:
                await pool.restart_workers()
            assert "replacing 1 of 3 workers" in info.value.message
            assert "exited with code 1 before saying hello" in info.value.message
            now = serving_pids(pool)
            assert len(now) == 3 and len(old & now) == 2  # the other two keep serving
            stats = pool.statistics()
            assert stats.size == 3 and stats.failed_starts == 1 and stats.pool_circuit == "closed"
            done = [e for e in events if e.kind == "workers_restarted"]
            assert done[0].data["replaced"] == 1 and "replacing 1 of 3" in done[0].data["stopped"]
            assert await pool.execute("echo", 2) == 2
            # Once the cause is gone, the roll goes through.
            launcher.fail_start = False
            pool._events.callbacks = pool._events.callbacks[:-1]
            await pool.restart_workers()
            assert not serving_pids(pool) & now


async def test_a_cancelled_roll_leaves_the_pool_at_its_size(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=3)) as (pool, launcher, events):
            launcher.start_delay = 1.0
            with trio.move_on_after(1.5):  # the first replacement serves, the second is starting
                await pool.restart_workers()
            (done,) = [e for e in events if e.kind == "workers_restarted"]
            assert done.data["replaced"] == 1 and done.data["stopped"] == "cancelled"
            await trio.sleep(5)
            await settle(pool, 3)  # the second replacement (the spare) left again
            assert pool.statistics().size == 3 and len(launcher.launched) == 5


async def test_the_roll_takes_the_new_workers_command_table(autojump_clock: trio.abc.Clock) -> None:
    import fake_worker

    with trio.fail_after(100):
        async with fake_pool(PoolConfig(size=2)) as (pool, _, _):
            with pytest.raises(CallerError, match="unknown command 'new_echo'"):
                await pool.execute("new_echo", 1)
            fake_worker.COMMANDS += (CommandInfo("new_echo", True, (), False, False),)  # "redeployed"
            try:
                await pool.restart_workers()
            finally:
                fake_worker.COMMANDS = fake_worker.COMMANDS[:-1]
            # The fake answers no unknown command: what matters is that the host sends it.
            with trio.move_on_after(1):
                await pool.execute("new_echo", 1)
            assert any(r.command == "new_echo" for p in _launched(pool) for r in p.requests)


def _launched(pool: Pool) -> list[Any]:
    return list(pool._supervisor._launcher.launched)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- recycling by age


async def _recycle_times(jitter: float, n: int = 8, max_age: float = 100.0) -> list[float]:
    config = PoolConfig(size=n, max_worker_age=max_age, worker_age_jitter=jitter)
    async with fake_pool(config) as (pool, _, events):
        first = set(pool.worker_pids())
        t0 = trio.current_time()
        await trio.sleep(max_age + 10)
        # (A replacement with a short limit may leave again within the window: not counted.)
        exits = [e.time - t0 for e in events if e.kind == "worker_exited" and e.pid in first]
        assert pool.statistics().calls_failed == 0
        await settle(pool, n)
        return exits


async def test_workers_are_recycled_by_age_with_jitter_spreading_them(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        tick = 2.5  # the monitor's tick with the default heartbeats
        together = await _recycle_times(0.0)
        # Without jitter, eight workers started together all leave at the same tick.
        assert len(together) == 8 and max(together) - min(together) == pytest.approx(0.0)
        assert 100.0 <= together[0] <= 100.0 + tick
        spread = await _recycle_times(0.5)
        # With jitter 0.5, each between 50 and 100 s (no worker older than max_worker_age,
        # give or take a tick), at different times. (Eight uniform draws over 50 s fall within
        # 5 s of each other, or on two ticks, about once in a million runs.)
        assert len(spread) == 8 and all(50.0 <= t <= 100.0 + tick for t in spread)
        assert len({round(t / tick) for t in spread}) >= 3
        assert max(spread) - min(spread) >= 5.0


async def test_a_busy_worker_is_recycled_by_age_after_its_call(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        async with fake_pool(PoolConfig(size=1, max_worker_age=10.0, worker_age_jitter=0.0)) as (pool, _, events):
            (first,) = pool.worker_pids()
            assert await pool.execute("nsleep", 20.0) == 20.0  # runs past the age limit
            await settle(pool, 1)
            exits = [e for e in events if e.kind == "worker_exited"]
            assert [(e.pid, e.data["reason"]) for e in exits] == [(first, "retired")]
            assert exits[0].time >= 20.0 and pool.statistics().restarts == 1


# ---------------------------------------------------------------- the recycle-loop guard


async def test_a_worker_over_the_soft_limit_from_its_start_is_not_recycled_again_and_again(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    config = PoolConfig(size=2, max_worker_memory=100, memory_check_interval=0.1)
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            launcher.memory = 150  # every fresh worker is over the limit after its start hooks
            with caplog.at_level(logging.WARNING, logger="pool"):
                async with open_pool(config, launcher=launcher) as pool:
                    pids = pool.worker_pids()
                    await trio.sleep(10)
                    assert pool.worker_pids() == pids and pool.statistics().restarts == 0
                    said = [r for r in caplog.records if "right after starting" in r.getMessage()]
                    assert len(said) == 1  # once, not per worker or per sample
                    assert "Raise PoolConfig.max_worker_memory" in said[0].getMessage()
                    # A worker that grows over the limit after its start is recycled, once.
                    launcher.memory = 50
                    await pool.resize(3)
                    (grower,) = [p for p in launcher.launched if p.pid not in pids]
                    grower.memory = 150
                    await trio.sleep(1)
                    assert grower.code == 0 and pool.statistics().restarts == 1
                    await trio.sleep(10)
                    assert pool.statistics().restarts == 1


# ---------------------------------------------------------------- invariants through it all

calls = st.tuples(st.just("call"), st.sampled_from(["echo", "sleep", "psleep", "counter", "nsleep"]), st.sampled_from([None, "a", "b"]))
resizes = st.tuples(st.just("resize"), st.integers(1, 4))
waits = st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.3]))
kills = st.tuples(st.just("kill"), st.integers(0, 50))
restarts = st.tuples(st.just("restart"))
ops = st.lists(st.one_of(calls, calls, calls, resizes, waits, waits, kills, restarts), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_the_checkout_keeps_its_invariants_through_resizes_and_rolls(ops: list[Any]) -> None:
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

                    async def sized(op: Any) -> None:
                        try:
                            if op[0] == "resize":
                                await pool.resize(op[1])
                            else:
                                await pool.restart_workers()
                        except InitializationError:
                            pass

                    async with trio.open_nursery() as n:
                        for op in ops:
                            if op[0] == "call":
                                n.start_soon(one, *op[1:])
                            elif op[0] in ("resize", "restart"):
                                n.start_soon(sized, op)
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
