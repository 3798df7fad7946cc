"""Sessions through the public API: closing a session whose call waits for its worker, state left
behind on a worker after failover, and ``ctx.session`` rebound instead of mutated."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from fake_worker import fake_launcher
from pool import PoolConfig, PoolError, RemoteError, SessionError, open_pool

HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_core"]
REAL = PoolConfig(size=2, handlers=HANDLERS, start_timeout=20.0)


async def settle() -> None:
    """Let every started call get as far as it can (written, or queued) before going on."""
    await trio.testing.wait_all_tasks_blocked()


async def test_closing_a_session_fails_its_call_waiting_for_a_busy_worker_unsent(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: the waiting call still ran on the closed session, which was placed again and
    counted on its worker."""
    outcomes: dict[str, Any] = {}
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=1), launcher=launcher) as pool:

            async def run(session: str, command: str, args: Any) -> None:
                try:
                    outcomes[session] = await pool.execute_in_session(session, command, args)
                except PoolError as exc:
                    outcomes[session] = exc

            async with trio.open_nursery() as n:
                n.start_soon(run, "a", "sleep", 5.0)  # the only worker is busy for 5 s
                await settle()
                n.start_soon(run, "b", "echo", "b")  # placed on that worker: waits for it
                await settle()
                stats = pool.statistics()
                assert stats.sessions == 2 and stats.workers[0].sessions == 2
                await pool.close_session("b")
            assert outcomes["a"] == 5.0
            assert isinstance(outcomes["b"], SessionError), outcomes["b"]
            assert [r.session_id for r in launcher.launched[0].requests] == ["a"]  # b never sent
            stats = pool.statistics()
            assert stats.sessions == 1
            assert stats.workers[0].sessions == 1
            assert stats.queued == 0


async def held_sessions(pool: Any) -> dict[int, int]:
    """{worker pid: sessions whose state that worker process holds}, asked of every worker: the
    two calls run at once (each sleeps), so each takes a different idle worker."""
    found: dict[int, int] = {}

    async def ask() -> None:
        pid, n = await pool.execute("core_held_sessions", 0.3)
        found[pid] = n

    async with trio.open_nursery() as nursery:
        for _ in range(pool.config.size):
            nursery.start_soon(ask)
    assert sorted(found) == sorted(pool.worker_pids())
    return found


async def test_a_worker_a_session_failed_over_from_drops_its_state() -> None:
    """Before: after a failover the old worker kept the session's state for ever."""
    with trio.fail_after(30):
        async with open_pool(REAL) as pool:
            assert await pool.execute_in_session("s", "core_set", {"k": 1}) == "set"
            old = await pool.execute_in_session("s", "core_pid")
            assert await held_sessions(pool) == {old: 1, **{p: 0 for p in pool.worker_pids() if p != old}}
            # An idempotent command's exception fails over once, to the other worker: the session
            # moves there with its committed state.
            with pytest.raises(RemoteError):
                await pool.execute_in_session("s", "core_raise", "x")
            assert pool.statistics().failovers == 1
            new = await pool.execute_in_session("s", "core_pid")
            assert new != old and old in pool.worker_pids()  # the old worker is alive
            assert await pool.execute_in_session("s", "core_state") == {"k": 1}
            assert await held_sessions(pool) == {old: 0, new: 1}


async def test_rebinding_ctx_session_to_a_dict_is_committed() -> None:
    """Before: ``ctx.session = {...}`` was silently dropped (only mutations were committed)."""
    with trio.fail_after(30):
        async with open_pool(REAL) as pool:
            assert await pool.execute_in_session("r", "core_set", {"old": 1}) == "set"
            assert await pool.execute_in_session("r", "core_rebind", {"new": 2}) == "rebound"
            assert await pool.execute_in_session("r", "core_state") == {"new": 2}
            # ...committed on the host too: it survives the session moving to another worker.
            holder = await pool.execute_in_session("r", "core_pid")
            with pytest.raises(RemoteError):
                await pool.execute_in_session("r", "core_raise", "move")  # fails over
            assert await pool.execute_in_session("r", "core_pid") != holder
            assert await pool.execute_in_session("r", "core_state") == {"new": 2}


async def test_rebinding_ctx_session_to_a_non_dict_fails_the_call_and_commits_nothing() -> None:
    """Before: rebinding ``ctx.session`` to a list was silently dropped and the call succeeded."""
    with trio.fail_after(30):
        async with open_pool(REAL) as pool:
            assert await pool.execute_in_session("r", "core_set", {"k": 1}) == "set"
            for value in ([1, 2], "text", None):
                with pytest.raises(RemoteError, match=r"ctx\.session"):
                    await pool.execute_in_session("r", "core_rebind", value)
                assert await pool.execute_in_session("r", "core_state") == {"k": 1}
