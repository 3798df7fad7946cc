"""The testing kit (``pool.testing``), tested with itself: the plugin's registration; the
``worker_pool`` fixture's checks (pytester runs whole test files in a subprocess, where a test
fails or leaks a process on purpose); chaos on in-process workers (virtual time, exact) and on
real ones; ``assert_no_orphans``; and the fake pool's in-process workers, which run the real
handlers with the real session semantics (the contract suite, test_contract.py, runs over them
too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

import pool.testing
from bridge_worker import registry
from bridge_worker.protocol import STREAM_WINDOW, Decoder, ErrorReply, RemoteKind, Reply, Request, encode, encode_session_state
from conftest import alive, kill_quietly, wait_gone
from pool import (
    CallerError,
    CommunicationError,
    InitializationError,
    PoolEvent,
    PoolTimeoutError,
    RemoteError,
    WorkerConnectionError,
)
from pool._inprocess import FIRST_FAKE_PID
from pool._kit import POLL
from pool.testing import Chaos, InProcessLauncher, WorkerPools, assert_no_orphans, fake_pool

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent
CHAOS_HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing"]
KIT_HANDLERS = ["bridge_worker.builtin", "handlers_kit"]


def slots(pool: Any) -> dict[int, int]:
    """{slot: pid} of the workers serving now."""
    return {w.slot: w.pid for w in pool.statistics().workers if w.state in ("idle", "busy")}


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------


def test_the_plugin_comes_from_its_entry_point_once(pytestconfig: pytest.Config) -> None:
    (entry,) = [e for e in entry_points(group="pytest11") if e.value == "pool.testing"]
    assert entry.name == "pool.testing"
    manager = pytestconfig.pluginmanager
    assert manager.get_plugin("pool.testing") is pool.testing
    assert [p for p in manager.get_plugins() if p is pool.testing] == [pool.testing]


def test_listing_the_plugin_in_pytest_plugins_as_well_is_harmless(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makeconftest('pytest_plugins = ["pool.testing"]\n')
    pytester.makepyfile(
        """
        import pool.testing

        def test_once(request):
            plugins = request.config.pluginmanager.get_plugins()
            assert [p for p in plugins if p is pool.testing] == [pool.testing]

        async def test_fixtures_work(worker_pool, chaos):
            assert worker_pool.pids == [] and chaos.log == []
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=2)


# ---------------------------------------------------------------------------------------------
# worker_pool
# ---------------------------------------------------------------------------------------------


def test_worker_pool_cleans_up_after_a_failing_test(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        """
        import trio

        async def test_fails_with_its_pool_open(worker_pool):
            with trio.fail_after(30):
                async with worker_pool(size=2) as pool:
                    open("pids", "w").write(" ".join(map(str, pool.worker_pids())))
                    raise AssertionError("deliberate failure")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    pids = [int(p) for p in (pytester.path / "pids").read_text().split()]
    try:
        result.assert_outcomes(failed=1)  # the test's own failure, and no error at teardown
        result.stdout.fnmatch_lines(["*AssertionError: deliberate failure*"])
        assert len(pids) == 2 and all(p < FIRST_FAKE_PID for p in pids)
        assert_no_orphans(pids)
    finally:
        kill_quietly(p for p in pids if alive(p))


LEAKING_TESTS = """
import trio
from pool._process import LocalLauncher


class Undying(LocalLauncher):
    def launch(self, *args):
        return Disowned(super().launch(*args))


class Disowned:
    # A worker process the pool cannot end: its kill only makes the pool stop hearing from it,
    # and the pool's end keeps its pipes open, so it does not see its host leave either.
    def __init__(self, proc):
        self._proc = proc
        self.pid = proc.pid
        self._killed = trio.Event()

    def __getattr__(self, name):
        return getattr(self._proc, name)

    def kill(self):
        self._killed.set()

    async def wait(self):
        return -9 if self._killed.is_set() else await self._proc.wait()

    def close(self):
        pass

    async def receive_some(self):
        got = b""
        async with trio.open_nursery() as nursery:
            async def read():
                nonlocal got
                got = await self._proc.receive_some()
                nursery.cancel_scope.cancel()

            async def until_killed():
                await self._killed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(until_killed)
        return got


async def test_closes_cleanly(worker_pool):
    with trio.fail_after(30):
        async with worker_pool(size=1) as pool:
            assert await pool.execute("echo", 1) == 1


async def test_leaks_a_worker(worker_pool):
    with trio.fail_after(30):
        async with worker_pool(handlers=["bridge_worker.testing"], size=1, launcher=Undying(cgroup=False)) as pool:
            open("leaked", "w").write(str(pool.worker_pids()[0]))
            try:
                await pool.execute("hang", timeout=0.2)  # "killed" by its deadline: it lives on
            except Exception:
                pass
"""


def test_worker_pool_fails_a_test_whose_worker_outlives_the_pool(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(LEAKING_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    leaked = int((pytester.path / "leaked").read_text())
    try:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*test_leaks_a_worker*",
                "*AssertionError: worker processes outlived their pool (killed now):*",
                f"*pid {leaked} (*bridge_worker*",
            ]
        )
        assert not alive(leaked)  # the fixture killed it
    finally:
        kill_quietly([leaked] if alive(leaked) else [])


async def test_worker_pool_watches_every_worker_it_started(worker_pool: WorkerPools) -> None:
    with trio.fail_after(30):
        async with worker_pool(handlers=CHAOS_HANDLERS, size=2) as pool:
            first = sorted(pool.worker_pids())
            with pytest.raises(WorkerConnectionError):
                await pool.execute("crash", 1)
            with trio.fail_after(10):
                while len(slots(pool)) < 2:
                    await trio.sleep(0.01)
            now = pool.worker_pids()
        assert sorted(worker_pool.pids[:2]) == first
        assert set(now) <= set(worker_pool.pids) and len(worker_pool.pids) == 3
        assert_no_orphans(worker_pool.pids)


async def test_worker_pool_fails_a_pool_slow_to_close(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        pools = WorkerPools()
        done: list[Any] = []
        async with trio.open_nursery() as nursery:
            with pytest.raises(AssertionError, match=r"the pool took 2.0s to close, over the bound of 1.0s"):
                async with pools(CHAOS_HANDLERS, launcher=InProcessLauncher(), close_timeout=1.0) as pool:

                    async def call() -> None:
                        done.append(await pool.execute("sleep", 3))

                    t0 = trio.current_time()
                    nursery.start_soon(call)
                    await trio.sleep(1)
            # Closing let the running call finish (within shutdown_grace): 2 s after the body.
            assert trio.current_time() == t0 + 3
        assert done == [3.0]
        pools.check()


async def test_what_a_test_leaves_open_is_killed_and_reported_at_teardown() -> None:
    pools = WorkerPools()
    launcher = InProcessLauncher()
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            pool = await stack.enter_async_context(pools(size=2, launcher=launcher))
            pids = pool.worker_pids()
            with pytest.raises(AssertionError, match="outlived their pool") as info:
                pools.check()  # as the fixture's teardown would, with the pool still open
            assert all(f"pid {pid}: in-process worker" in str(info.value) for pid in pids)
            assert all(w.code == -9 for w in launcher.workers[:2])  # and it killed them
    pools.check()  # closed since: nothing left


# ---------------------------------------------------------------------------------------------
# assert_no_orphans
# ---------------------------------------------------------------------------------------------


def test_assert_no_orphans_fails_on_a_leaked_process_and_lists_it() -> None:
    leaked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Until its exec is done, the child shows its parent's command line.
        give_up = time.monotonic() + 10
        while "time.sleep(60)" not in " ".join(psutil.Process(leaked.pid).cmdline()):
            assert time.monotonic() < give_up, "the child never showed its own command line"
            time.sleep(0.005)
        with pytest.raises(AssertionError) as info:
            assert_no_orphans([leaked.pid])
        assert f"pid {leaked.pid} (" in str(info.value) and "time.sleep(60)" in str(info.value)
    finally:
        leaked.kill()
        leaked.wait()
    assert_no_orphans([leaked.pid])


async def test_a_zombie_is_not_an_orphan() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        proc = psutil.Process(child.pid)
        with trio.fail_after(10):  # it exits at once, and is not reaped until wait(): a zombie
            while proc.status() != psutil.STATUS_ZOMBIE:
                await trio.sleep(0.01)
        assert_no_orphans([child.pid])
    finally:
        child.kill()
        child.wait()


async def test_in_process_workers_count_while_they_run_and_their_pids_are_no_process() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        assert FIRST_FAKE_PID > int(f.read())
    with trio.fail_after(10):
        async with fake_pool(size=2) as pool:
            pids = pool.worker_pids()
            assert min(pids) >= FIRST_FAKE_PID
            with pytest.raises(ProcessLookupError):
                os.kill(pids[0], 0)
            with pytest.raises(AssertionError, match="in-process worker, still running"):
                assert_no_orphans(pids)
        assert_no_orphans(pids)


# ---------------------------------------------------------------------------------------------
# chaos
# ---------------------------------------------------------------------------------------------


async def test_kill_worker_by_slot_waits_for_its_replacement(
    autojump_clock: trio.abc.Clock, chaos: Chaos
) -> None:
    with trio.fail_after(100):
        async with fake_pool(CHAOS_HANDLERS, size=2) as pool:
            before = slots(pool)
            t0 = trio.current_time()
            record = await chaos.kill_worker(pool, worker=1)
            # The replacement says hello start_delay (0.01 s) after the kill; the kit looks every 5 ms.
            took = trio.current_time() - t0
            assert round(took, 9) in (0.01, 0.01 + POLL)
            after = slots(pool)
            assert (record.slot, record.pid, record.action, record.time) == (1, before[1], "SIGKILL", t0)
            assert after[0] == before[0] and after[1] != before[1]
            assert record.note == f"replaced by pid {after[1]} after {took:.3f}s"
            assert chaos.log == [record]
            assert await pool.execute("echo", 1) == 1


async def test_kill_worker_at_random_on_real_workers(worker_pool: WorkerPools, chaos: Chaos) -> None:
    with trio.fail_after(30):
        async with worker_pool(CHAOS_HANDLERS, size=2) as pool:
            before = slots(pool)
            record = await chaos.kill_worker(pool)
            assert before[record.slot] == record.pid
            assert record.pid not in pool.worker_pids() and len(slots(pool)) == 2
            await wait_gone([record.pid], zombies_too=True)  # killed, and reaped by the pool
            assert record.note.startswith(f"replaced by pid {slots(pool)[record.slot]} after ")
            assert await pool.execute("echo", 2) == 2


async def test_kill_worker_fails_when_the_pool_does_not_replace_it(
    autojump_clock: trio.abc.Clock, chaos: Chaos
) -> None:
    with trio.fail_after(100):
        launcher = InProcessLauncher()
        async with fake_pool(size=1, launcher=launcher) as pool:
            launcher.start_delay = 60.0  # the next worker takes a minute to start
            t0 = trio.current_time()
            with pytest.raises(AssertionError, match="did not replace the worker killed in slot 0 within 5.0s"):
                await chaos.kill_worker(pool, timeout=5.0)
            assert trio.current_time() == t0 + 5.0
            assert chaos.log[0].note == "not replaced within 5.0s"
            with pytest.raises(ValueError, match="slot number in 0..0"):
                await chaos.kill_worker(pool, worker=1)


async def test_stop_worker_is_a_hang_the_pool_finds(worker_pool: WorkerPools, chaos: Chaos) -> None:
    with trio.fail_after(30):
        async with worker_pool(size=1, heartbeat_interval=0.2, heartbeat_timeout=0.3) as pool:
            record = await chaos.stop_worker(pool)
            assert record.action == "SIGSTOP"
            assert psutil.Process(record.pid).status() == psutil.STATUS_STOPPED
            await wait_gone([record.pid], timeout=10, zombies_too=True)  # the heartbeat killed it
            with trio.fail_after(10):
                while not slots(pool):
                    await trio.sleep(0.01)
            assert await pool.execute("echo", 1) == 1


async def test_a_stopped_in_process_worker_holds_its_reply_until_it_resumes_or_the_deadline(
    autojump_clock: trio.abc.Clock, chaos: Chaos
) -> None:
    with trio.fail_after(100):
        launcher = InProcessLauncher()
        async with fake_pool(CHAOS_HANDLERS, size=1, launcher=launcher) as pool:
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def resume_later() -> None:
                    await trio.sleep(3)
                    launcher.workers[0].send_signal(signal.SIGCONT)

                nursery.start_soon(resume_later)
                async with trio.open_nursery() as calls:
                    calls.start_soon(pool.execute, "sleep", 1)
                    await trio.sleep(0.5)
                    await chaos.stop_worker(pool)  # its sleep goes on; its answer waits
                assert trio.current_time() == t0 + 3
            launcher.workers[0].send_signal(signal.SIGSTOP)
            with pytest.raises(PoolTimeoutError) as info:
                await pool.execute("echo", 1, timeout=2)
            assert info.value.may_have_run and trio.current_time() == t0 + 5
            assert launcher.workers[0].code == -9  # the deadline killed it
            assert await pool.execute("echo", 2) == 2


async def test_release_kills_what_a_test_left_stopped(worker_pool: WorkerPools, chaos: Chaos) -> None:
    with trio.fail_after(30):
        async with worker_pool(size=2) as pool:
            record = await chaos.stop_worker(pool, worker=0)
            chaos.release()  # what the fixture's teardown does for a test that failed first
            await wait_gone([record.pid], timeout=5)
            with trio.fail_after(10):
                while len(slots(pool)) < 2 or record.pid in pool.worker_pids():
                    await trio.sleep(0.01)


async def test_killing_kills_at_the_asked_rate(autojump_clock: trio.abc.Clock, chaos: Chaos) -> None:
    with trio.fail_after(100):
        async with fake_pool(CHAOS_HANDLERS, size=2) as pool:
            t0 = trio.current_time()
            async with chaos.killing(pool, every=0.05) as kills:
                await trio.sleep(1.025)
            assert [k.time for k in kills] == [t0 + 0.05 * i for i in range(1, 21)]
            assert len({k.pid for k in kills}) == 20 and chaos.log == kills
            assert not {k.pid for k in kills} & set(pool.worker_pids())
            async with chaos.killing(pool, every=0.1, signal=signal.SIGTERM) as terms:
                await trio.sleep(0.35)
            assert [k.action for k in terms] == ["SIGTERM"] * 3
            assert await pool.execute("echo", 3) == 3


async def test_killing_kills_at_about_the_asked_rate_on_real_workers(
    worker_pool: WorkerPools, chaos: Chaos
) -> None:
    with trio.fail_after(30):
        async with worker_pool(size=4) as pool:
            async with chaos.killing(pool, every=0.1) as kills:
                await trio.sleep(1.05)
            # Ten ticks. One sends nothing if it finds no worker serving, or if the event loop
            # was late past the next tick (a busy machine): the exact rate is checked above, in
            # virtual time; here, that real workers are killed, about that often.
            assert 5 <= len(kills) <= 10
            await wait_gone([k.pid for k in kills], zombies_too=True)
            with trio.fail_after(10):
                while len(slots(pool)) < 4:
                    await trio.sleep(0.01)
        assert pool.statistics().restarts >= len(kills)


async def test_an_error_in_a_killing_block_comes_out_as_itself(
    autojump_clock: trio.abc.Clock, chaos: Chaos
) -> None:
    with trio.fail_after(100):
        async with fake_pool(size=1) as pool:
            with pytest.raises(KeyError):
                async with chaos.killing(pool, every=0.05):
                    await trio.sleep(0.12)
                    raise KeyError("the body's own")
            assert len(chaos.log) == 2
            with pytest.raises(ValueError, match="every must be a positive number"):
                async with chaos.killing(pool, every=0):
                    pass


def test_a_failing_tests_report_says_what_chaos_did(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        """
        from pool.testing import fake_pool

        async def test_fails_after_chaos(autojump_clock, chaos):
            async with fake_pool(size=2) as pool:
                await chaos.kill_worker(pool, worker=0)
                await chaos.stop_worker(pool, worker=1)
                assert False, "deliberate"

        async def test_passes_after_chaos(autojump_clock, chaos):
            async with fake_pool(size=2) as pool:
                await chaos.kill_worker(pool)

        async def test_fails_without_chaos(chaos):
            assert False, "nothing done"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_fails_after_chaos*",
            "*AssertionError: deliberate*",
            "*- chaos -*",
            "chaos (seed *), 2 actions:",
            "  t=0.010 SIGKILL slot 0 pid *: replaced by pid * after 0.0*s",
            "  t=0.0* SIGSTOP slot 1 pid *",
        ]
    )
    assert result.stdout.str().count("chaos (seed") == 1


# ---------------------------------------------------------------------------------------------
# The fake pool: in-process workers with the real handlers
# ---------------------------------------------------------------------------------------------


async def test_a_raising_call_commits_nothing_and_a_good_one_commits(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(KIT_HANDLERS, size=2) as pool:
            assert await pool.execute_in_session("s", "kit_remember", "a") == ["a"]
            with pytest.raises(RemoteError, match="raised after appending"):
                await pool.execute_in_session("s", "kit_remember", "raise")
            assert await pool.execute_in_session("s", "kit_remember", "b") == ["a", "b"]
            assert await pool.execute("kit_remember", "x") == ["x"]  # no session: a fresh dict


async def test_a_worker_that_does_not_hold_the_session_says_so(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        worker = InProcessLauncher().launch(("handlers_kit",), 1 << 20, 1 << 20)
        decoder = Decoder()

        async def answer(req: Request) -> Reply | ErrorReply:
            worker.write(encode(req))
            while True:
                msg = next(decoder, None)
                if isinstance(msg, (Reply, ErrorReply)):
                    return msg
                decoder.receive_data(await worker.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run_writer)
            not_held = await answer(Request(1, "kit_remember", "a", "s", None))
            assert isinstance(not_held, ErrorReply) and not_held.remote_type == RemoteKind.SESSION_NOT_FOUND
            sent = await answer(Request(2, "kit_remember", "b", "s", encode_session_state({"log": ["a"]})))
            assert isinstance(sent, Reply) and sent.result == ["a", "b"]
            held = await answer(Request(3, "kit_remember", "c", "s", None))
            assert isinstance(held, Reply) and held.result == ["a", "b", "c"]
            worker.kill()
        assert worker.code == -9


async def test_a_worker_serves_only_its_handlers_modules_commands(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        import bridge_worker.testing  # registered in this process, not in the pool's handlers

        assert "counter" in registry and bridge_worker.testing.counter is registry["counter"].func
        async with fake_pool(["bridge_worker.builtin"], size=1) as pool:
            with pytest.raises(CallerError, match="counter"):
                await pool.execute("counter")
            assert await pool.execute("ping") == "pong"


async def test_a_handlers_module_that_fails_to_import_fails_open_pool_and_registers_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        for _ in range(2):  # the second try fails the same way, not with "registered twice"
            with pytest.raises(InitializationError) as info:
                async with fake_pool(["bridge_worker.builtin", "handlers_kit_broken"], size=2):
                    pass  # pragma: no cover - it cannot open
            message = info.value.message
            assert "'handlers_kit_broken'" in message
            assert "RuntimeError: handlers_kit_broken fails on purpose" in message
            assert "Traceback" in message  # the worker's stderr tail
            assert "kit_half_registered" not in registry


async def test_start_hooks_run_once_per_worker(autojump_clock: trio.abc.Clock, chaos: Chaos) -> None:
    with trio.fail_after(100):
        import handlers_kit

        before = handlers_kit.starts
        async with fake_pool(KIT_HANDLERS, size=3) as pool:
            assert handlers_kit.starts == before + 3
            await chaos.kill_worker(pool)
            assert handlers_kit.starts == before + 4


async def test_the_chaos_commands_run_in_virtual_time(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        events: list[PoolEvent] = []
        async with fake_pool(CHAOS_HANDLERS, size=1, event_callbacks=[events.append]) as pool:
            t0 = trio.current_time()
            assert await pool.execute("sleep", 30) == 30.0
            assert trio.current_time() == t0 + 30
            with pytest.raises(RemoteError) as bad:
                await pool.execute("sleep", -1)
            assert bad.value.caller_fault  # bridge_worker.builtin.sleep's own checks
            with pytest.raises(PoolTimeoutError):
                await pool.execute("hang", timeout=2)
            assert trio.current_time() == t0 + 30 + 2
            with pytest.raises(WorkerConnectionError):
                await pool.execute("crash", 7)
            with pytest.raises(CommunicationError):
                await pool.execute("garbage")
            codes = [(e.data["exit_code"], e.data["reason"]) for e in events if e.kind == "worker_exited"]
            assert codes == [(-9, "timeout"), (7, "port_exited"), (-9, "decode_error")]
            assert await pool.execute("echo", "after") == "after"


async def test_alloc_counts_towards_the_memory_limits(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(CHAOS_HANDLERS, size=1, max_worker_memory=100 * 2**20) as pool:
            (first,) = pool.worker_pids()
            assert await pool.execute("alloc", 60) == 60
            assert await pool.execute("alloc", 60) == 120
            await trio.sleep(1)  # the monitor samples rss every 0.5 s: over the limit, recycled
            assert first not in pool.worker_pids()
            assert await pool.execute("alloc", 1) == 1


async def test_simulate_stands_in_for_a_command_and_can_change_while_the_pool_runs(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        async def slow(args: Any, ctx: Any) -> str:
            await trio.sleep(10)
            ctx.session["slow"] = True
            return "late"

        async def crash(args: Any, ctx: Any) -> None:
            raise SystemExit(5)

        launcher = InProcessLauncher(simulate={"kit_remember": slow})
        async with fake_pool(KIT_HANDLERS, size=1, launcher=launcher) as pool:
            t0 = trio.current_time()
            with pytest.raises(PoolTimeoutError):
                await pool.execute_in_session("s", "kit_remember", "a", timeout=3)
            assert trio.current_time() == t0 + 3
            assert await pool.execute_in_session("s", "kit_remember", "a") == "late"
            assert trio.current_time() == t0 + 13 + launcher.start_delay  # after the replacement
            launcher.simulate["kit_remember"] = crash
            with pytest.raises(WorkerConnectionError, match="code 5"):
                await pool.execute_in_session("s", "kit_remember", "b")
            del launcher.simulate["kit_remember"]
            # The stand-in's commit ({"slow": True}) moved with the session to the new worker.
            assert await pool.execute_in_session("s", "kit_remember", "c") == ["c"]
            assert await pool.execute_in_session("s", "kit_remember", "d") == ["c", "d"]


async def test_a_handler_that_exits_ends_its_worker_with_that_code(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        events: list[PoolEvent] = []
        async with fake_pool(KIT_HANDLERS, size=1, event_callbacks=[events.append]) as pool:
            with pytest.raises(WorkerConnectionError, match="code 3"):
                await pool.execute("kit_exit", 3)
        assert [e.data["exit_code"] for e in events if e.kind == "worker_exited"][0] == 3


async def test_signals_do_to_an_in_process_worker_what_they_do_to_a_process(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        launcher = InProcessLauncher()
        async with fake_pool(size=1, launcher=launcher) as pool:
            worker = launcher.workers[0]
            worker.send_signal(signal.SIGINT)  # workers leave Ctrl-C to their host
            assert await pool.execute("echo", 1) == 1
            worker.send_signal(signal.SIGTERM)
            assert worker.code == -signal.SIGTERM
            assert await pool.execute("echo", 2) == 2


async def test_in_process_workers_run_map_chunks_and_streams_as_worker_processes_do(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    with trio.fail_after(100):
        async with fake_pool(["handlers_shapes"], size=2) as pool:
            assert await pool.map("square", range(10), chunksize=3) == [i * i for i in range(10)]
            with pytest.raises(RemoteError) as bad:
                await pool.map("square", [1, 2, -3, 4], chunksize=2)
            assert bad.value.context["index"] == 2 and bad.value.caller_fault
            # More items than the credit window: the consumer's credit keeps the stream going.
            async with pool.open_stream("tokens", 40) as items:
                assert [t async for t in items] == [f"tok{i}" for i in range(40)]
            # A consumer that leaves early closes the generator, which ran no further ahead
            # than the window.
            path = tmp_path / "produced"
            async with pool.open_stream("produce", {"path": str(path), "n": 1000}) as items:
                async for first in items:
                    break
            assert first == 0
            end = tmp_path / "produced.end"
            while not end.exists():  # the cancel reaches the worker after the block is left
                await trio.sleep(0.01)
            assert end.read_text().startswith("closed after")
            assert int(path.read_text()) <= STREAM_WINDOW + 1
            # A stream in a session commits when it ends, and rolls back when it raises.
            async with pool.open_stream("count_session", 3, session_id="s") as items:
                assert [n async for n in items] == [1, 2, 3]
            with pytest.raises(RemoteError, match="rolled back"):
                async with pool.open_stream("count_session", -2, session_id="s") as items:
                    assert [n async for n in items] == [4, 5]
            async with pool.open_stream("count_session", 1, session_id="s") as items:
                assert [n async for n in items] == [4]


def test_the_readme_shows_the_example_this_suite_runs() -> None:
    readme = (HERE.parent / "README.md").read_text()
    for shown, path in [
        ("myapp/commands.py", "myapp/commands.py"),
        ("myapp/labels.py", "myapp/labels.py"),
        ("tests/test_myapp.py", "test_myapp.py"),
    ]:
        assert f"```python\n# {shown}\n{(HERE / path).read_text()}```" in readme, path
