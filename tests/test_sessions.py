"""Real-process tests of sessions: affinity, turn order, transactional state, survival, bounds."""

from __future__ import annotations

import os
import signal

import attrs
import pytest
import trio

from conftest import ALL_HANDLERS, kill_quietly, wait_gone
from pool import PoolConfig, RemoteError, ResourceError, SessionError, open_pool

CONFIG = PoolConfig(size=4, handlers=ALL_HANDLERS, start_timeout=20.0)


async def wait_full(pool, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while pool.statistics().alive < pool.config.size:
            await trio.sleep(0.01)


async def test_a_session_always_runs_on_the_worker_that_holds_it() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            seen = {await pool.execute_in_session("s", "pid") for _ in range(30)}
            assert len(seen) == 1
            # concurrent load on other sessions does not move it
            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(pool.execute_in_session, f"other-{i}", "sleep_idem", 0.05)
                for _ in range(10):
                    seen.add(await pool.execute_in_session("s", "pid"))
            assert len(seen) == 1


async def test_new_sessions_spread_to_the_least_loaded_workers() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = [await pool.execute_in_session(f"s{i}", "pid") for i in range(4)]
            assert sorted(pids) == sorted(pool.worker_pids())


async def test_a_sessions_calls_run_one_at_a_time_in_arrival_order() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            async with trio.open_nursery() as n:
                for i in range(20):
                    n.start_soon(pool.execute_in_session, "ordered", "append", i)
                    await trio.sleep(0)  # arrival order = start order
            assert await pool.execute_in_session("ordered", "get_state") == {"log": list(range(20))}


async def test_a_raising_call_commits_nothing() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            await pool.execute_in_session("t", "append", "kept")
            with pytest.raises(RemoteError):
                await pool.execute_in_session("t", "set_then_raise", "lost")
            assert await pool.execute_in_session("t", "get_state") == {"log": ["kept"]}


async def test_sessions_survive_sigkill_of_every_worker() -> None:
    with trio.fail_after(60):
        async with open_pool(CONFIG) as pool:
            for i in range(8):
                for _ in range(3):
                    await pool.execute_in_session(f"s{i}", "counter")
            old = pool.worker_pids()
            kill_quietly(old)
            # Until the pool has seen them die, a call may still be written to a dying worker,
            # whose kernel can take it off the pipe before the SIGKILL lands: a non-idempotent
            # `counter` then fails with "may have run", rightly. Wait until they are reaped.
            await wait_gone(old, zombies_too=True)
            for i in range(8):
                assert await pool.execute_in_session(f"s{i}", "counter") == 4
            assert not set(old) & set(pool.worker_pids())


async def test_a_session_moves_to_a_new_worker_mid_call_with_its_committed_state() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=2)) as pool:
            await pool.execute_in_session("m", "append", "a")
            holder = await pool.execute_in_session("m", "pid")

            async def kill_soon() -> None:
                await trio.sleep(0.2)
                os.kill(holder, signal.SIGKILL)

            async with trio.open_nursery() as n:
                n.start_soon(kill_soon)
                # idempotent: retried on another worker, where the session continues
                assert await pool.execute_in_session("m", "sleep_idem", 0.5) == 0.5
            assert await pool.execute_in_session("m", "pid") != holder
            assert await pool.execute_in_session("m", "get_state") == {"log": ["a"]}
            assert pool.statistics().retries == 1


async def test_close_session_forgets_it_on_host_and_worker() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            assert await pool.execute_in_session("c", "counter") == 1
            assert await pool.execute_in_session("c", "counter") == 2
            assert pool.statistics().sessions == 1
            await pool.close_session("c")
            assert pool.statistics().sessions == 0
            assert await pool.execute_in_session("c", "counter") == 1
            await pool.close_session("never-opened")  # harmless


async def test_live_sessions_are_bounded() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1, max_sessions=2)) as pool:
            await pool.execute_in_session("a", "counter")
            await pool.execute_in_session("b", "counter")
            with pytest.raises(ResourceError, match="too many live sessions") as info:
                await pool.execute_in_session("c", "counter")
            assert info.value.caller_fault
            assert await pool.execute_in_session("a", "counter") == 2
            await pool.close_session("b")
            assert await pool.execute_in_session("c", "counter") == 1


async def test_session_state_size_is_bounded_and_nothing_is_committed() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1, max_session_state=10_000)) as pool:
            await pool.execute_in_session("big", "set_big", 100)
            with pytest.raises(ResourceError, match="over the limit") as info:
                await pool.execute_in_session("big", "set_big", 50_000)
            assert info.value.caller_fault
            state = await pool.execute_in_session("big", "get_state")
            assert state == {"big": b"x" * 100}
            assert pool.statistics().circuits["set_big"] == "closed"


async def test_waiting_calls_of_a_closed_session_fail_clearly() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            errors: list[BaseException] = []

            async def second() -> None:
                try:
                    await pool.execute_in_session("w", "counter")
                except SessionError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(pool.execute_in_session, "w", "sleep_idem", 0.3)
                await trio.sleep(0.05)
                n.start_soon(second)
                await trio.sleep(0.05)
                await pool.close_session("w")
            assert len(errors) == 1 and "closed" in str(errors[0])


async def test_session_id_must_be_a_string() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            with pytest.raises(Exception, match="session_id must be a non-empty string"):
                await pool.execute_in_session(42, "counter")  # type: ignore[arg-type]
