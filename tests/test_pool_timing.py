"""The host's timing logic on a fake in-process worker and trio's autojump_clock: deadlines,
heartbeats, start timeouts and the pool circuit, at exact virtual times."""

from __future__ import annotations

import pytest
import trio

from fake_worker import fake_launcher
from pool import InitializationError, PoolConfig, PoolTimeoutError, WorkerConnectionError, open_pool

CONFIG = PoolConfig(size=2, start_timeout=1.0, heartbeat_interval=5.0, heartbeat_timeout=2.0)


async def test_call_returns_at_the_workers_pace(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(CONFIG, launcher=launcher) as pool:
                t0 = trio.current_time()
                assert await pool.execute("sleep", 1.5) == 1.5
                assert trio.current_time() == pytest.approx(t0 + 1.5)


async def test_deadline_fires_exactly_and_replaces_the_worker(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(CONFIG, launcher=launcher) as pool:
                t0 = trio.current_time()
                with pytest.raises(PoolTimeoutError) as info:
                    await pool.execute("hang", timeout=3.0)
                assert trio.current_time() == pytest.approx(t0 + 3.0)
                assert info.value.may_have_run
                hung = launcher.launched[0] if launcher.launched[0].requests else launcher.launched[1]
                assert hung.code == -9  # killed
                await trio.sleep(1)
                assert pool.statistics().alive == 2 and pool.statistics().restarts == 1
                assert len(launcher.launched) == 3


async def test_queued_call_times_out_without_running(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(PoolConfig(size=1), launcher=launcher) as pool:
                async with trio.open_nursery() as calls:
                    calls.start_soon(pool.execute, "sleep", 10.0)
                    await trio.sleep(0.001)
                    t0 = trio.current_time()
                    with pytest.raises(PoolTimeoutError) as info:
                        await pool.execute("echo", 1, timeout=2.0)
                    assert trio.current_time() == pytest.approx(t0 + 2.0)
                    assert not info.value.may_have_run
                assert len(launcher.launched[0].requests) == 1  # the echo never reached it


async def test_attempt_timeout_bounds_one_attempt(autojump_clock: trio.abc.Clock) -> None:
    config = PoolConfig(size=1, attempt_timeout=0.5)
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(config, launcher=launcher) as pool:
                t0 = trio.current_time()
                with pytest.raises(PoolTimeoutError):
                    await pool.execute("hang", timeout=10.0)
                assert trio.current_time() == pytest.approx(t0 + 0.5)


async def test_heartbeat_kills_a_silent_idle_worker(autojump_clock: trio.abc.Clock) -> None:
    config = PoolConfig(size=1, heartbeat_interval=5.0, heartbeat_timeout=2.0)
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(config, launcher=launcher) as pool:
                first = launcher.launched[0]
                first.answer_pings = False
                t0 = trio.current_time()
                while first.code is None:
                    await trio.sleep(0.01)
                # pinged after 5 s idle, killed once 2 s pass without a pong; the monitor ticks
                # every min(interval, timeout) / 2 = 1 s, so both edges land within a tick.
                assert 7.0 <= trio.current_time() - t0 <= 9.0
                assert first.code == -9
                await trio.sleep(1)
                assert pool.statistics().alive == 1


async def test_answering_worker_is_kept(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        async with fake_launcher() as launcher:
            async with open_pool(CONFIG, launcher=launcher) as pool:
                await trio.sleep(600)
                assert len(launcher.launched) == 2
                assert pool.statistics().restarts == 0


async def test_start_timeout_counts_as_failed_start_and_opens_the_circuit(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            launcher.start_delay = 5.0  # over start_timeout
            with pytest.raises(InitializationError, match="did not say hello within 1.0s"):
                async with open_pool(CONFIG, launcher=launcher):
                    pytest.fail("should not open")  # pragma: no cover
            # five consecutive failed starts open the circuit; two slots start concurrently
            assert 5 <= len(launcher.launched) <= 6
            assert all(p.code is not None for p in launcher.launched)


async def test_crash_loop_opens_the_pool_circuit_then_recovers(autojump_clock: trio.abc.Clock) -> None:
    config = PoolConfig(size=1, start_timeout=1.0)
    with trio.fail_after(1000):
        async with fake_launcher() as launcher:
            async with open_pool(config, launcher=launcher) as pool:
                launcher.fail_start = True
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash", 1)
                while pool.statistics().pool_circuit != "open":
                    await trio.sleep(0.01)
                spawns = len(launcher.launched)
                with pytest.raises(InitializationError) as info:
                    await pool.execute("echo", 1)
                assert info.value.retry_after is not None and info.value.retry_after > 0
                await trio.sleep(5)
                assert len(launcher.launched) == spawns  # no restart storm while open
                launcher.fail_start = False
                await trio.sleep(config.pool_circuit.timeout + 1)
                assert pool.statistics().pool_circuit == "closed"
                assert await pool.execute("echo", 2) == 2
