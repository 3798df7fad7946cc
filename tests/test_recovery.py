"""Recovery: retry, failover, fallback, circuits, idempotency, health and events.

Real processes where the behaviour is about processes; the fake worker on autojump_clock where it
is about time (backoff delays, circuit timeouts)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import attrs
import pytest
import trio

from conftest import ALL_HANDLERS
from fake_worker import fake_launcher
from pool import (
    CircuitOpenError,
    PoolConfig,
    RemoteError,
    WorkerConnectionError,
    open_pool,
)
from pool._matrix import DEFAULT_POLICY, Strategy

CONFIG = PoolConfig(size=2, handlers=ALL_HANDLERS, start_timeout=20.0)
# Real-time tests keep the seed's decisions but not its 1-16 s delays.
FAST_POLICY = attrs.evolve(
    DEFAULT_POLICY,
    delays={**DEFAULT_POLICY.delays, Strategy.BACKOFF_RETRY: (0.01,), Strategy.IMMEDIATE_RETRY: (0.0,)},
)


async def test_idempotent_call_on_a_killed_worker_is_retried_at_once() -> None:
    events: list[object] = []
    config = attrs.evolve(CONFIG, event_callbacks=[events.append])
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            async with trio.open_nursery() as n:

                async def kill_busy() -> None:
                    await trio.sleep(0.2)
                    (busy,) = [w.pid for w in pool.statistics().workers if w.busy]
                    os.kill(busy, signal.SIGKILL)

                n.start_soon(kill_busy)
                t0 = trio.current_time()
                assert await pool.execute("sleep_idem", 0.5) == 0.5
                # 0.2 s on the dead worker, then 0.5 s again at once on the other one: no backoff
                assert trio.current_time() - t0 < 1.5
            stats = pool.statistics()
            assert stats.retries == 1 and stats.calls_ok == 1 and stats.calls_failed == 0
            assert stats.recoveries.initiated == 1 and stats.recoveries.succeeded == 1
            assert stats.recoveries.by_category == {"connection_error": 1}
            assert stats.recoveries.by_strategy == {"backoff_retry": 1}
            assert stats.circuits["sleep_idem"] == "closed"
            kinds = [e.kind for e in events]
            assert "call_retried" in kinds and "worker_exited" in kinds and "recovery_done" in kinds


async def test_non_idempotent_call_is_never_silently_rerun(tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            async with trio.open_nursery() as n:

                async def kill_busy() -> None:
                    await trio.sleep(0.3)
                    (busy,) = [w.pid for w in pool.statistics().workers if w.busy]
                    os.kill(busy, signal.SIGKILL)

                n.start_soon(kill_busy)
                with pytest.raises(WorkerConnectionError) as info:
                    await pool.execute("log_effect", {"path": str(log), "id": 1, "sleep": 1.0})
            err = info.value
            assert err.may_have_run and "may or may not have run" in str(err)
            assert log.read_text() == "1\n"  # ran once, never again
            assert pool.statistics().retries == 0


async def test_poison_input_opens_its_command_circuit_and_other_commands_work() -> None:
    config = attrs.evolve(CONFIG, policy=FAST_POLICY)
    with trio.fail_after(60):
        async with open_pool(config) as pool:
            for _ in range(config.command_circuit.failure_threshold):
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash_idem", 1)
            assert pool.statistics().circuits["crash_idem"] == "open"
            with pytest.raises(CircuitOpenError) as info:
                await pool.execute("crash_idem", 1)
            assert info.value.retry_after is not None and info.value.retry_after > 50
            assert info.value.circuit == "crash_idem"
            assert await pool.execute("echo", "fine") == "fine"
            health = pool.health()
            assert health["status"] == "degraded"
            assert health["circuits"]["command:crash_idem"]["state"] == "open"


async def test_outside_kills_do_not_open_a_commands_circuit() -> None:
    with trio.fail_after(60):
        async with open_pool(attrs.evolve(CONFIG, size=2)) as pool:
            for _ in range(8):
                async with trio.open_nursery() as n:
                    n.start_soon(pool.execute, "sleep_idem", 0.2)
                    await trio.sleep(0.1)
                    for w in pool.statistics().workers:
                        if w.busy:
                            os.kill(w.pid, signal.SIGKILL)
            assert pool.statistics().circuits["sleep_idem"] == "closed"
            assert pool.statistics().calls_ok == 8


async def test_failover_then_fallback_gives_the_caller_a_plain_value() -> None:
    events: list[object] = []
    config = attrs.evolve(
        CONFIG,
        fallbacks={"raise_error": lambda args, err: {"degraded": True, "why": str(err.category)}},
        event_callbacks=[events.append],
    )
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            result = await pool.execute("raise_error", "boom")
            assert result == {"degraded": True, "why": "python_error"}
            stats = pool.statistics()
            assert stats.failovers == 1 and stats.fallbacks == 1
            assert [e.kind for e in events if e.kind.startswith("call_")] == [
                "call_failed_over", "call_failed", "call_fallback"]


async def test_failover_runs_on_a_different_worker() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            with pytest.raises(RemoteError) as info:
                await pool.execute("raise_error", "boom")
            assert info.value.context["attempt"] == 2
            assert pool.statistics().failovers == 1
            assert sorted(w.calls for w in pool.statistics().workers) == [1, 1]


async def test_caller_mistakes_are_never_retried_or_counted() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            for _ in range(10):
                with pytest.raises(RemoteError) as info:
                    await pool.execute("sleep", "not a number")
                assert info.value.caller_fault
            stats = pool.statistics()
            assert stats.retries == 0 and stats.failovers == 0
            assert stats.circuits["sleep"] == "closed"
            assert pool.health()["circuits"]["command:sleep"]["failures"] == 0


async def test_a_worker_whose_calls_keep_failing_is_recycled() -> None:
    config = attrs.evolve(CONFIG, size=1, recycle_after_failures=3)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            (first,) = pool.worker_pids()
            for _ in range(2):  # each call fails twice (failover on the same, only, worker)
                with pytest.raises(RemoteError):
                    await pool.execute("raise_error", "x")
            with trio.fail_after(10):
                while pool.worker_pids() == [first] or pool.statistics().alive < 1:
                    await trio.sleep(0.01)
            assert await pool.execute("echo", 1) == 1


async def test_health_is_healthy_then_unhealthy_when_no_worker_serves() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            health = pool.health()
            assert health["status"] == "healthy"
            (wid,) = health["workers"]
            assert health["workers"][wid]["pid"] == pool.worker_pids()[0]
            assert health["circuits"]["pool"]["state"] == "closed"


# ---------------------------------------------------------------- virtual time (fake worker)

async def test_backoff_applies_from_the_second_consecutive_failure(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(PoolConfig(size=2), launcher=launcher) as pool:
                t0 = trio.current_time()
                with pytest.raises(WorkerConnectionError) as info:
                    await pool.execute("crash_idem", 1)
                # connection_error: retried after attempts 1, 2, 3 (abandoned at 4: critical);
                # delays 0 (first failure), then backoff 1 s, 2 s -> attempts at 0, 0, 1, 3 (+starts)
                assert info.value.context["attempt"] == 4
                elapsed = trio.current_time() - t0
                assert 3.0 <= elapsed < 3.5
                assert pool.statistics().retries == 3


async def test_deadline_bounds_retries_and_backoff(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(PoolConfig(size=2), launcher=launcher) as pool:
                t0 = trio.current_time()
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash_idem", 1, timeout=1.5)
                assert trio.current_time() - t0 < 1.5


async def test_command_circuit_opens_half_opens_and_closes(autojump_clock: trio.abc.Clock) -> None:
    events: list[str] = []
    config = PoolConfig(size=2, event_callbacks=[lambda e: events.append(e.kind)])
    with trio.fail_after(1000):
        async with fake_launcher() as launcher:
            async with open_pool(config, launcher=launcher) as pool:
                for _ in range(5):
                    with pytest.raises(WorkerConnectionError):
                        await pool.execute("crash_idem", 1)
                assert pool.statistics().circuits["crash_idem"] == "open"
                assert "circuit_opened" in events
                with pytest.raises(CircuitOpenError):
                    await pool.execute("crash_idem", 1)
                await trio.sleep(60)
                # half-open: a trial goes through; the fake's crash_idem crashes again -> reopen
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash_idem", 1)
                assert "circuit_half_opened" in events
                assert pool.statistics().circuits["crash_idem"] == "open"
                # the same breaker closes after three successful trials (echo's stays closed)
                breaker = pool._circuits.get("crash_idem")
                await trio.sleep(60)
                now = trio.current_time()
                for _ in range(3):
                    assert breaker.allow(now)
                    breaker.record_success(now)
                assert pool.statistics().circuits["crash_idem"] == "closed"
                assert "circuit_closed" in events


async def test_health_unhealthy_while_the_pool_circuit_is_open(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(1000):
        async with fake_launcher() as launcher:
            async with open_pool(PoolConfig(size=1), launcher=launcher) as pool:
                assert pool.health()["status"] == "healthy"
                launcher.fail_start = True
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash", 1)
                while pool.statistics().pool_circuit != "open":
                    await trio.sleep(0.01)
                health = pool.health()
                assert health["status"] == "unhealthy"
                assert "exited with code 1 before saying hello" in health["last_start_error"]


async def test_health_degraded_while_a_worker_restarts(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            async with open_pool(PoolConfig(size=2), launcher=launcher) as pool:
                launcher.start_delay = 2.0
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash", 1)
                assert pool.health()["status"] == "degraded"
                await trio.sleep(3)
                assert pool.health()["status"] == "healthy"


async def test_session_ttl_forgets_idle_sessions(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_launcher() as launcher:
            config = PoolConfig(size=1, session_ttl=10.0)
            async with open_pool(config, launcher=launcher) as pool:
                await pool.execute_in_session("idle", "echo", 1)
                await trio.sleep(4)
                await pool.execute_in_session("busy", "echo", 1)
                assert pool.statistics().sessions == 2
                # Expiry is checked every ttl/2 at most (here every 2.5 s, the heartbeat tick), so
                # a session goes between ttl and ttl + 2.5 s idle: at t=13 "idle" (last used at 0)
                # is gone, "busy" (used at 4) is not yet.
                await trio.sleep(9)
                assert pool._sessions.get("idle") is None
                assert pool._sessions.get("busy") is not None
                await trio.sleep(10)
                assert pool.statistics().sessions == 0
