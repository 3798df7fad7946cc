"""The pool's contract, run over every launcher (``pool_factory`` in conftest): in-process fake
workers, real local subprocesses over pipes and over TCP loopback must be indistinguishable
through the public API.

Real time (the real launchers need it); every wait is short and bounded.
"""

from __future__ import annotations

from typing import Any, AsyncContextManager, Callable

import pytest
import trio

from pool import (
    CallerError,
    Pool,
    PoolClosedError,
    PoolTimeoutError,
    RemoteError,
    WorkerConnectionError,
)

Factory = Callable[..., AsyncContextManager[Pool]]


async def test_calls_return_their_results(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            results: dict[int, Any] = {}

            async def one(i: int) -> None:
                results[i] = await pool.execute("echo", {"i": i, "payload": [i] * 3})

            async with trio.open_nursery() as n:
                for i in range(40):
                    n.start_soon(one, i)
            assert results == {i: {"i": i, "payload": [i] * 3} for i in range(40)}
            stats = pool.statistics()
            assert stats.calls_ok == 40 and stats.calls_failed == 0
            assert sum(w.calls for w in stats.workers) == 40


async def test_the_snapshot_lists_every_worker(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory(size=3) as pool:
            stats = pool.statistics()
            assert sorted(w.pid for w in stats.workers) == sorted(pool.worker_pids())
            assert sorted(w.slot for w in stats.workers) == [0, 1, 2]
            assert all(w.state == "idle" and not w.busy for w in stats.workers)
            assert stats.alive == stats.idle == 3 and stats.queued == 0
            assert pool.health()["status"] == "healthy"


async def test_caller_mistakes_fail_in_the_host(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            with pytest.raises(CallerError):
                await pool.execute("no_such_command")
            with pytest.raises(CallerError):
                await pool.execute("echo", object())
            with pytest.raises(CallerError):
                await pool.execute("echo", 1, timeout="soon")  # type: ignore[arg-type]
            with pytest.raises(PoolTimeoutError) as info:
                await pool.execute("echo", 1, timeout=0)
            assert not info.value.may_have_run
            assert pool.statistics().restarts == 0 and pool.statistics().calls_failed == 0


async def test_a_handler_exception_is_a_remote_error_and_the_worker_serves_on(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            pids = sorted(pool.worker_pids())
            with pytest.raises(RemoteError) as info:
                await pool.execute("raise_error", "boom")
            assert info.value.remote_type == "RuntimeError" and "boom" in info.value.message
            assert pool.statistics().failovers == 1  # idempotent: tried once more elsewhere
            assert sorted(pool.worker_pids()) == pids


async def test_a_session_keeps_its_state_and_its_turns(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            got: list[int] = []

            async def count() -> None:
                got.append(await pool.execute_in_session("s", "counter"))

            async with trio.open_nursery() as n:
                for _ in range(5):
                    n.start_soon(count)
            assert sorted(got) == [1, 2, 3, 4, 5]
            assert pool.statistics().sessions == 1
            await pool.close_session("s")
            assert await pool.execute_in_session("s", "counter") == 1  # a new, empty session


async def test_a_session_moves_with_its_state_when_its_worker_dies(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            for _ in range(3):
                await pool.execute_in_session("s", "counter")
            (holder,) = [w for w in pool.statistics().workers if w.sessions]
            # The holder crashes in a call of the session (not idempotent: not retried).
            with pytest.raises(WorkerConnectionError):
                await pool.execute_in_session("s", "crash", 1)
            with trio.fail_after(10):
                while holder.pid in pool.worker_pids() or pool.statistics().alive < 2:
                    await trio.sleep(0.01)
            assert await pool.execute_in_session("s", "counter") == 4


async def test_a_crash_is_retried_if_idempotent_and_reported_if_not(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            with pytest.raises(WorkerConnectionError) as info:
                await pool.execute("crash", 3)
            assert info.value.may_have_run
            assert "not idempotent" in info.value.message
            assert pool.statistics().retries == 0
            with trio.fail_after(10):
                while pool.statistics().alive < 2:
                    await trio.sleep(0.01)
            assert pool.statistics().restarts == 1
            assert await pool.execute("echo", 1) == 1


async def test_a_deadline_kills_a_hung_call_and_the_slot_is_refilled(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory() as pool:
            with pytest.raises(PoolTimeoutError) as info:
                await pool.execute("hang", timeout=0.3)
            assert info.value.may_have_run
            with trio.fail_after(10):
                while pool.statistics().restarts < 1 or pool.statistics().alive < 2:
                    await trio.sleep(0.01)
            assert await pool.execute("echo", 2) == 2


async def test_closing_fails_waiting_calls_and_later_ones(pool_factory: Factory) -> None:
    with trio.fail_after(30):
        async with pool_factory(size=1, shutdown_grace=0.2) as pool:
            errors: list[BaseException] = []

            async def waiting() -> None:
                try:
                    await pool.execute("echo", 1)
                except PoolClosedError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(pool.execute, "sleep", 0.1)
                await trio.sleep(0.05)
                n.start_soon(waiting)
                await trio.sleep(0.01)
                await pool.aclose()
            assert len(errors) == 1
            assert pool.statistics().queued == 0
            with pytest.raises(PoolClosedError):
                await pool.execute("echo", 1)
