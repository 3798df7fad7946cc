"""Real-process tests of the pool's first half: calls, failures, supervision, shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import attrs
import pytest
import trio

from conftest import ALL_HANDLERS, alive, exists, kill_quietly, wait_gone
from pool import (
    CallerError,
    CommunicationError,
    InitializationError,
    PoolClosedError,
    PoolConfig,
    PoolSaturatedError,
    PoolTimeoutError,
    RemoteError,
    ResourceError,
    WorkerConnectionError,
    open_pool,
)
from pool.testing import Chaos

CONFIG = PoolConfig(size=2, handlers=ALL_HANDLERS, start_timeout=20.0)


async def wait_full(pool, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while pool.statistics().alive < pool.config.size:
            await trio.sleep(0.01)


async def test_echo_round_trip_and_statistics() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            assert await pool.execute("echo", {"a": 1, "b": "hello", "c": [1, 2, 3]}) == {
                "a": 1, "b": "hello", "c": [1, 2, 3]}
            assert await pool.execute("ping") == "pong"
            stats = pool.statistics()
            assert stats.calls_ok == 2 and stats.calls_failed == 0
            assert stats.alive == 2 and stats.size == 2
            assert len(pool.worker_pids()) == 2


async def test_concurrent_calls_all_answered() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            results: dict[int, object] = {}

            async def one(i: int) -> None:
                results[i] = await pool.execute("echo", i)

            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(one, i)
            assert results == {i: i for i in range(200)}


async def test_caller_mistakes_fail_in_the_host_and_harm_no_worker() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            with pytest.raises(CallerError, match="unknown command 'nope'") as info:
                await pool.execute("nope")
            assert info.value.caller_fault and not info.value.may_have_run
            with pytest.raises(CallerError, match="cannot be sent") as info:
                await pool.execute("echo", {"x": object()})
            assert info.value.caller_fault and not info.value.may_have_run
            with pytest.raises(RemoteError, match="ValueError") as rinfo:
                await pool.execute("sleep", -1)  # a declared caller error of `sleep`
            assert rinfo.value.caller_fault and rinfo.value.remote_type == "ValueError"
            assert pool.worker_pids() == pids
            assert pool.statistics().restarts == 0


async def test_handler_exception_is_a_remote_error_and_the_worker_lives() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            pids = pool.worker_pids()
            with pytest.raises(RemoteError) as info:
                await pool.execute("raise_error", "boom")
            err = info.value
            assert err.category == "python_error"
            assert err.remote_type == "RuntimeError" and "boom" in str(err)
            assert "raise RuntimeError" in err.remote_traceback
            assert err.may_have_run and not err.caller_fault
            assert await pool.execute("echo", 1) == 1
            assert pool.worker_pids() == pids


async def test_unencodable_result_is_an_error_reply_and_the_worker_lives() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            pids = pool.worker_pids()
            with pytest.raises(CommunicationError) as info:
                await pool.execute("unencodable_result")
            assert info.value.may_have_run
            assert await pool.execute("echo", 2) == 2
            assert pool.worker_pids() == pids


async def test_prints_do_not_corrupt_the_channel() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            pids = pool.worker_pids()
            assert await pool.execute("print_stdout", "noise") == "noise"
            assert await pool.execute("echo", "after") == "after"
            assert pool.worker_pids() == pids


async def test_garbage_frame_kills_only_that_worker() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            async def slow_ok() -> None:
                assert await pool.execute("sleep", 0.5) == 0.5

            async with trio.open_nursery() as n:
                n.start_soon(slow_ok)
                await trio.sleep(0.1)
                with pytest.raises(CommunicationError) as info:
                    await pool.execute("garbage")
                assert info.value.may_have_run
            await wait_full(pool)
            assert pool.statistics().restarts == 1


async def test_crash_fails_the_call_with_a_connection_error_and_is_replaced() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            (old,) = pool.worker_pids()
            with pytest.raises(WorkerConnectionError) as info:
                await pool.execute("crash", 7)
            assert info.value.may_have_run
            assert info.value.category == "connection_error"
            await wait_full(pool)
            assert pool.worker_pids() != [old]
            await wait_gone([old], zombies_too=True)
            assert await pool.execute("echo", 3) == 3


async def test_deadline_kills_the_worker_and_replaces_it() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            (old,) = pool.worker_pids()
            t0 = trio.current_time()
            with pytest.raises(PoolTimeoutError) as info:
                await pool.execute("hang", timeout=0.3)
            assert trio.current_time() - t0 < 5
            assert info.value.may_have_run
            await wait_gone([old], zombies_too=True)
            await wait_full(pool)
            assert await pool.execute("echo", 4) == 4


async def test_cancelled_caller_kills_the_worker() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            (old,) = pool.worker_pids()
            with trio.move_on_after(0.3):
                await pool.execute("hang")
            await wait_gone([old], zombies_too=True)
            await wait_full(pool)
            assert await pool.execute("echo", 5) == 5


async def test_queue_bound_fails_fast_when_saturated() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1, max_queue=1)) as pool:
            async with trio.open_nursery() as n:
                n.start_soon(pool.execute, "sleep", 0.5)
                await trio.sleep(0.05)
                n.start_soon(pool.execute, "sleep", 0.0)
                await trio.sleep(0.05)
                t0 = trio.current_time()
                with pytest.raises(PoolSaturatedError, match="saturated"):
                    await pool.execute("echo", 1)
                assert trio.current_time() - t0 < 0.1
            assert pool.statistics().calls_ok == 2


async def test_bad_handler_module_fails_open_pool_with_the_import_error() -> None:
    config = PoolConfig(size=2, handlers=["bridge_worker.builtin", "handlers_broken"])
    t0 = time.monotonic()
    with trio.fail_after(30):
        with pytest.raises(InitializationError) as info:
            async with open_pool(config):
                pytest.fail("open_pool should not succeed")  # pragma: no cover
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert "handlers_broken" in message
    assert "no_such_module_for_pool_tests" in message
    assert "about to fail on purpose" in message  # the worker's stderr tail


async def test_body_exception_comes_out_unwrapped() -> None:
    with trio.fail_after(30):
        with pytest.raises(KeyError) as info:
            async with open_pool(attrs.evolve(CONFIG, size=1)):
                raise KeyError("mine")
        assert type(info.value) is KeyError


async def test_close_reaps_every_worker_and_later_calls_fail() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            assert all(alive(p) for p in pids)
        assert not any(exists(p) for p in pids)  # reaped: not even a zombie
        with pytest.raises(PoolClosedError):
            await pool.execute("echo", 1)
        with pytest.raises(trio.ClosedResourceError):
            await pool.execute("echo", 1)


async def test_close_lets_running_calls_finish_and_fails_waiting_ones() -> None:
    with trio.fail_after(30):
        outcomes: list[object] = []
        async with open_pool(attrs.evolve(CONFIG, size=1, shutdown_grace=5.0)) as pool:

            async def call(args: float) -> None:
                try:
                    outcomes.append(await pool.execute("sleep", args))
                except PoolClosedError as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(call, 0.3)
                await trio.sleep(0.05)
                n.start_soon(call, 0.0)
                await trio.sleep(0.05)
                await pool.aclose()
        assert outcomes[0] == 0.3 or outcomes[1] == 0.3
        assert any(isinstance(o, PoolClosedError) for o in outcomes)


async def test_recycle_after_max_calls() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1, max_calls_per_worker=3)) as pool:
            seen = set()
            for _ in range(7):
                seen.add(await pool.execute("pid"))
            assert len(seen) == 3
            assert pool.statistics().calls_ok == 7


async def test_memory_soft_limit_recycles_after_the_call() -> None:
    config = attrs.evolve(CONFIG, size=1, max_worker_memory=80 * 2**20, memory_check_interval=0.05)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            (old,) = pool.worker_pids()
            assert await pool.execute("alloc", 120) == 120  # the call itself succeeds
            await wait_gone([old], zombies_too=True)
            await wait_full(pool)
            assert await pool.execute("echo", 1) == 1


async def test_memory_hard_limit_kills_with_a_resource_error() -> None:
    config = attrs.evolve(CONFIG, size=1, hard_worker_memory=100 * 2**20, memory_check_interval=0.05)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            with pytest.raises(ResourceError):
                # Killed during an allocation once the worker holds over 100 MB. (A sample that
                # falls between two calls kills an idle worker, and no call fails: the next
                # allocations start again on its replacement.)
                for _ in range(100):
                    await pool.execute("alloc", 40)
            await wait_full(pool)
            assert await pool.execute("echo", 1) == 1


async def test_heartbeat_kills_a_stopped_idle_worker(chaos: Chaos) -> None:
    config = attrs.evolve(CONFIG, size=1, heartbeat_interval=0.2, heartbeat_timeout=0.3)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            old = (await chaos.stop_worker(pool)).pid
            await wait_gone([old], timeout=10, zombies_too=True)
            await wait_full(pool)
            assert await pool.execute("echo", 1) == 1


async def test_stderr_is_drained_and_large_frames_pass() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            for _ in range(50):  # more than a pipe buffer of stderr
                await pool.execute("to_stderr", "x" * 4000)
            big = await pool.execute("big_result", 3 * 2**20)
            assert len(big) == 3 * 2**20
            assert await pool.execute("echo", b"y" * 2**20) == b"y" * 2**20


async def test_grandchild_dies_with_its_worker() -> None:
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            child = await pool.execute("spawn_child")
            try:
                assert alive(child)
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("crash", 1)
                await wait_gone([child])
            finally:
                kill_quietly([child])


async def test_sigkill_storm_keeps_the_pool_serving(chaos: Chaos) -> None:
    config = attrs.evolve(CONFIG, size=4)
    with trio.fail_after(60):
        async with open_pool(config) as pool:
            ok = 0

            async def load() -> None:
                nonlocal ok
                while True:
                    try:
                        await pool.execute("echo", 1)
                        ok += 1
                    except WorkerConnectionError:
                        pass
                    await trio.sleep(0)

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(load)
                async with chaos.killing(pool, every=0.05) as kills:
                    await trio.sleep(2.0)
                n.cancel_scope.cancel()
            assert len(kills) >= 20  # of 40 ticks (a tick finding no worker serving kills none)
            await wait_full(pool)
            assert pool.statistics().pool_circuit == "closed"
            assert await pool.execute("echo", "still here") == "still here"
            assert ok > 0


PARENT_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from pool import open_pool, PoolConfig

    async def main():
        handlers = ["bridge_worker.builtin", "handlers_extra", "handlers_procs"]
        async with open_pool(PoolConfig(size=2, handlers=handlers)) as p:
            child = await p.execute(sys.argv[1])
            print(" ".join(map(str, p.worker_pids() + [child])), flush=True)
            await trio.sleep(120)

    trio.run(main)
    """
)


# spawn_setsid_sleep: a grandchild in its own session (setsid) lived on after its host's SIGKILL
# (issue 10); it dies with its worker's cgroup, or its worker's tree.
@pytest.mark.parametrize("grandchild", ["spawn_child", "spawn_setsid_sleep"])
async def test_parent_sigkill_leaves_no_worker_and_no_grandchild(grandchild: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, grandchild], stdout=subprocess.PIPE, env=env, text=True
    )
    pids: list[int] = []
    try:
        with trio.fail_after(30):
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        pids = [int(p) for p in line.split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        await wait_gone(pids, timeout=5)
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.wait()
        kill_quietly(pids)


@pytest.mark.slow
async def test_idle_pool_keeps_its_workers_for_15_seconds() -> None:
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits; trio's worker threads exit after
    # ~10 s idle. Spawning from the trio thread keeps the workers alive past that.
    with trio.fail_after(60):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            await trio.to_thread.run_sync(lambda: None)  # make a trio worker thread exist
            await trio.sleep(15)
            assert pool.worker_pids() == pids
            assert all(alive(p) for p in pids)
            assert await pool.execute("echo", 1) == 1
