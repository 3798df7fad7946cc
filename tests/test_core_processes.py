"""Real-process regression tests: what a handler does with processes, signals, exceptions and
encodings must not cost its worker, hide its worker's death, or leave a process behind; and the
pool's own process plumbing (spawning, opening, closing) must hold up.

Public API only (``open_pool``, ``PoolConfig``, ``execute``, ``statistics``, ``worker_pids``,
``aclose`` and the exceptions), except the spawn test, which drives ``LocalLauncher`` directly.
Every test is bounded by ``trio.fail_after`` (or a bounded wait that turns a hang into a failed
assertion) and kills, by pid, every process its handlers started.
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Any, Iterable

import attrs
import pytest
import trio

from conftest import alive, kill_quietly
from pool import (
    DEFAULT_POLICY,
    CallerError,
    InitializationError,
    Pool,
    PoolClosedError,
    PoolConfig,
    PoolError,
    RemoteError,
    Strategy,
    WorkerConnectionError,
    open_pool,
)
from pool._process import LocalLauncher

HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_procs"]
# The matrix's decisions without its 1-16 s backoff delays (real time).
FAST_POLICY = attrs.evolve(
    DEFAULT_POLICY,
    delays={**DEFAULT_POLICY.delays, Strategy.BACKOFF_RETRY: (0.01,), Strategy.IMMEDIATE_RETRY: (0.0,)},
)
CONFIG = PoolConfig(size=1, handlers=HANDLERS, start_timeout=20.0, policy=FAST_POLICY)
#: handlers_procs.flaky_start counts starts in the file this names (PoolConfig.env).
FLAKY_COUNTER_ENV = "POOL_TEST_FLAKY_COUNTER"


class RefusingDict(dict):  # type: ignore[type-arg]
    """A dict whose encoding raises RuntimeError (msgpack calls ``items()`` on dict subclasses),
    not one of msgpack's own errors (as handlers_procs.RefusingDict, on the host side)."""

    def items(self) -> Any:
        raise RuntimeError("RefusingDict.items() refuses on purpose")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


async def wait_busy(pool: Pool, timeout: float = 5.0) -> None:
    """Wait until a worker of ``pool`` runs a call."""
    with trio.fail_after(timeout):
        while pool.statistics().busy == 0:
            await trio.sleep(0.01)


async def survivors(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait (real time, at most ``timeout``) until none of ``pids`` is alive; return those that
    still are."""
    pids = list(pids)
    with trio.move_on_after(timeout):
        while any(alive(p) for p in pids):
            await trio.sleep(0.02)
    return [p for p in pids if alive(p)]


def kill_alive(pids: Iterable[int]) -> None:
    """End the processes a test's handlers started that are still alive (by pid)."""
    kill_quietly([p for p in pids if p and alive(p)])


async def execute_ok(pool: Pool, command: str, args: Any = None) -> Any:
    """``pool.execute`` that turns a PoolError into a test failure saying what it was."""
    try:
        return await pool.execute(command, args, timeout=20)
    except PoolError as exc:
        pytest.fail(f"{command!r} failed with {type(exc).__name__}: {exc}")


def assert_same_worker(pool: Pool, pids: list[int]) -> None:
    stats = pool.statistics()
    assert pool.worker_pids() == pids, f"the worker was replaced: {pids} -> {pool.worker_pids()}"
    assert stats.restarts == 0, f"restarts == {stats.restarts}"


# ---------------------------------------------------------------------------------------------
# Forked children and the worker's SIGTERM handler (issue 10)
# ---------------------------------------------------------------------------------------------


async def test_terminating_a_forked_multiprocessing_child_leaves_the_worker_alive() -> None:
    """Process.terminate() on a "fork" child ran the inherited SIGTERM handler: the group died."""
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            child = await execute_ok(pool, "mp_process_terminate")
            try:
                assert isinstance(child, int)
                assert_same_worker(pool, pids)
                assert await pool.execute("echo", 1) == 1
                assert_same_worker(pool, pids)
            finally:
                kill_alive([child])


async def test_leaving_a_forked_multiprocessing_pool_block_leaves_the_worker_alive() -> None:
    """Leaving a "fork" Pool(2) block (it terminates its children) SIGKILLed the worker's group."""
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            out = await execute_ok(pool, "mp_pool_exit_busy")
            try:
                assert out["result"] == [2, 4, 6]
                assert_same_worker(pool, pids)
                assert await pool.execute("echo", 1) == 1
                assert_same_worker(pool, pids)
            finally:
                kill_alive(out["pids"])


# ---------------------------------------------------------------------------------------------
# A child holding the protocol pipe must not hide its worker's death (issue 11)
# ---------------------------------------------------------------------------------------------


async def test_sigkilled_worker_fails_its_call_at_once_though_its_forked_child_lives() -> None:
    """A forked child holding the pipe hid a SIGKILLed worker: the caller heard at its deadline."""
    child = 0
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            try:
                (worker,) = pool.worker_pids()
                child = await execute_ok(pool, "fork_holder", 60)
                assert alive(child)
                errors: list[BaseException] = []
                done = trio.Event()

                async def call() -> None:
                    try:
                        await pool.execute("hang", timeout=25)
                    except PoolError as exc:
                        errors.append(exc)
                    finally:
                        done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    await wait_busy(pool)
                    os.kill(worker, signal.SIGKILL)
                    t0 = trio.current_time()
                    with trio.move_on_after(2.0):
                        await done.wait()
                    waited = trio.current_time() - t0
                    heard = done.is_set()
                    nursery.cancel_scope.cancel()  # a call still parked (the bug) is abandoned
                assert heard, (
                    f"the caller heard nothing {waited:.1f}s after its worker was SIGKILLed "
                    f"(its forked child {child} is alive: {alive(child)})"
                )
                assert len(errors) == 1 and isinstance(errors[0], WorkerConnectionError), errors
            finally:
                kill_alive([child])


async def test_recycled_worker_with_a_forked_child_is_replaced_promptly() -> None:
    """A recycled worker whose forked child held the pipe was replaced only after a heartbeat."""
    child = 0
    config = attrs.evolve(CONFIG, max_calls_per_worker=1)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            try:
                (old,) = pool.worker_pids()
                child = await execute_ok(pool, "fork_holder", 60)
                assert alive(child)
                t0 = trio.current_time()
                replaced = False
                with trio.move_on_after(2.0):
                    while not replaced:
                        stats = pool.statistics()
                        pids = [w.pid for w in stats.workers]
                        replaced = stats.alive == stats.size and old not in pids
                        await trio.sleep(0.01)
                stats = pool.statistics()
                assert replaced, (
                    f"{trio.current_time() - t0:.1f}s after the recycling call the slot was not "
                    f"refilled: alive {stats.alive}/{stats.size}, workers "
                    f"{[(w.pid, w.state) for w in stats.workers]} (old pid {old})"
                )
                assert await pool.execute("echo", 1) == 1
            finally:
                kill_alive([child])


@pytest.mark.parametrize("kill_worker", [False, True], ids=["worker-exits", "worker-sigkilled"])
async def test_aclose_is_bounded_when_a_setsid_child_holds_the_channel(kill_worker: bool) -> None:
    """A setsid child holding the worker's pipe made aclose() wait until that child exited."""
    holder = 0
    grace = 1.0
    bound = grace + 3.0
    config = attrs.evolve(CONFIG, shutdown_grace=grace)
    with trio.fail_after(40):
        async with open_pool(config) as pool:
            try:
                (worker,) = pool.worker_pids()
                holder = await execute_ok(pool, "fork_setsid_holder", 60)
                assert alive(holder)
                if kill_worker:
                    os.kill(worker, signal.SIGKILL)
                    assert await survivors([worker], 2.0) == []
                closed = trio.Event()

                async def close() -> None:
                    await pool.aclose()
                    closed.set()

                t0 = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(close)
                    with trio.move_on_after(bound):
                        await closed.wait()
                    took = trio.current_time() - t0
                    in_time = closed.is_set()
                    if not in_time:
                        # aclose() is shielded: end the holder so that it can return at all.
                        kill_alive([holder])
                        with trio.fail_after(15):
                            await closed.wait()
                assert in_time, (
                    f"aclose() did not finish within {bound}s (shutdown_grace {grace}s); it waited "
                    f"{took:.1f}s and returned only after the setsid child {holder} was killed"
                )
            finally:
                kill_alive([holder])


# ---------------------------------------------------------------------------------------------
# A setsid grandchild must not outlive the pool (issue 12)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", [None, False], ids=["cgroup-where-possible", "subreaper"])
async def test_setsid_grandchild_does_not_outlive_the_pool(cgroup: bool | None) -> None:
    """A grandchild in its own session (setsid) lived on after aclose(). Both ways of keeping a
    worker's family: its own cgroup (where this process may make one), and without one."""
    child = 0
    launcher = LocalLauncher(CONFIG.python, cgroup=cgroup)
    try:
        with trio.fail_after(30):
            config = attrs.evolve(CONFIG, shutdown_grace=1.0)
            async with open_pool(config, launcher=launcher) as pool:
                child = await execute_ok(pool, "spawn_setsid_sleep")
                assert alive(child)
            left = await survivors([child], 3.0)
        assert left == [], f"the setsid grandchild {child} (sleep 300) outlived the pool by 3 s"
    finally:
        kill_alive([child])


def _may_unshare_pid() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


async def test_a_pool_in_another_pid_namespace_leaves_this_pools_workers_alone() -> None:
    """A pool starting in another pid namespace (a container sharing the cgroup mount) cleans up
    what dead pools left in its cgroup, judging each by its host's pid. It saw this pool's
    directory, could not see this pool's pid in its own namespace, took it for a dead host's and
    SIGKILLed every worker of this pool."""
    import subprocess
    import sys

    if not _may_unshare_pid():
        pytest.skip("unshare --pid is not permitted here")
    launcher = LocalLauncher(CONFIG.python, cgroup=True)
    with trio.fail_after(60):
        async with open_pool(attrs.evolve(CONFIG, size=2), launcher=launcher) as pool:
            pids = pool.worker_pids()
            if not any(Path(f"/proc/{pid}/cgroup").read_text().count("trio-worker-pool.") for pid in pids):
                pytest.skip("this process may not make cgroups")
            # In a pid namespace of its own, a launcher makes its cgroup (a sibling of ours).
            code = "from pool._process import LocalLauncher as L; l = L(cgroup=True); l._worker_cgroup(); l.close()"
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                    capture_output=True,
                    timeout=30,
                )
            )
            assert done.returncode == 0, done.stderr.decode()
            await trio.sleep(0.2)
            assert all(alive(pid) for pid in pids), "a pool in another pid namespace killed our workers"
            assert pool.worker_pids() == pids
            assert await pool.execute("echo", 1) == 1


async def test_what_a_dead_host_of_this_namespace_left_in_its_cgroup_is_cleaned_up() -> None:
    """The other side of the rule above: a directory of a host of this pid namespace that is gone
    (SIGKILLed, it could not clean up) is emptied and removed by the next launcher."""
    import subprocess

    from pool._process import _own_cgroup_dir, _pid_namespace

    own = _own_cgroup_dir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this namespace whose process is gone
    stale = Path(own or "/nonexistent") / f"trio-worker-pool.{gone.pid}.1.{_pid_namespace()}"
    try:
        (stale / "w1").mkdir(parents=True)
    except OSError:
        pytest.skip("this process may not make cgroups")
    leftover = subprocess.Popen(["sleep", "300"])
    try:
        (stale / "w1" / "cgroup.procs").write_text(str(leftover.pid))
        launcher = LocalLauncher(cgroup=True)
        assert launcher._worker_cgroup() is not None
        launcher.close()
        with trio.fail_after(10):
            while leftover.poll() is None:
                await trio.sleep(0.01)
        assert leftover.returncode == -signal.SIGKILL
        assert not stale.exists()
    finally:
        kill_alive([leftover.pid])
        leftover.wait()
        for path in (stale / "w1", stale):
            if path.exists():
                path.rmdir()


# The setsid grandchild of a host that is SIGKILLed: test_pool_process.py,
# test_parent_sigkill_leaves_no_worker_and_no_grandchild.


# ---------------------------------------------------------------------------------------------
# BaseExceptions in handlers (issue 13)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", ["BaseException", "KeyboardInterrupt"])
@pytest.mark.parametrize("command", ["raise_base", "raise_base_idem"])
async def test_handler_raising_a_base_exception_is_a_remote_error_and_the_worker_lives(
    command: str, exc_type: str
) -> None:
    """A handler raising a BaseException (not SystemExit) killed its worker, four if idempotent."""
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            with pytest.raises(PoolError) as info:
                await pool.execute(command, exc_type, timeout=20)
            err = info.value
            assert isinstance(err, RemoteError), (
                f"expected RemoteError, got {type(err).__name__}: {err} "
                f"(restarts {pool.statistics().restarts})"
            )
            assert exc_type in err.remote_type
            assert_same_worker(pool, pids)
            assert await pool.execute("echo", 1) == 1
            assert_same_worker(pool, pids)


# ---------------------------------------------------------------------------------------------
# Encodings that raise something other than msgpack's own errors (issue 14)
# ---------------------------------------------------------------------------------------------


async def test_result_whose_encoding_raises_fails_the_call_and_the_worker_lives() -> None:
    """A result whose encoding raised RuntimeError (not a msgpack error) killed the worker."""
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            with pytest.raises(PoolError) as info:
                await pool.execute("refusing_result", timeout=20)
            err = info.value
            assert not isinstance(err, WorkerConnectionError), (
                f"the worker was lost: {type(err).__name__}: {err}"
            )
            assert_same_worker(pool, pids)
            assert await pool.execute("echo", 1) == 1
            assert_same_worker(pool, pids)


async def test_argument_whose_encoding_raises_is_a_caller_error() -> None:
    """An argument whose encoding raised RuntimeError escaped execute() as that RuntimeError."""
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            pids = pool.worker_pids()
            calls = pool.statistics().workers[0].calls
            with pytest.raises(Exception) as info:
                await pool.execute("echo", RefusingDict(a=1), timeout=20)
            err = info.value
            assert isinstance(err, CallerError), (
                f"expected CallerError, got {type(err).__name__}: {err}"
            )
            assert err.caller_fault and not err.may_have_run
            assert pool.statistics().workers[0].calls == calls  # nothing was sent
            assert_same_worker(pool, pids)
            assert await pool.execute("echo", 1) == 1


# ---------------------------------------------------------------------------------------------
# A worker's last words (issue 15)
# ---------------------------------------------------------------------------------------------


async def test_crash_mid_call_error_carries_the_last_stderr_lines() -> None:
    """A worker crashing mid-call: its last stderr lines were missing from the caller's error."""
    marker = "last words of the worker before os._exit(3): zq7-marker"
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            with pytest.raises(WorkerConnectionError) as info:
                await pool.execute("stderr_then_exit", marker, timeout=20)
            assert marker in str(info.value), f"no stderr tail in: {info.value}"


# ---------------------------------------------------------------------------------------------
# Spawning without fds (issue 16)
# ---------------------------------------------------------------------------------------------


def open_fds() -> set[int]:
    """The fds open in this process (without the one used to list them)."""
    d = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {int(name) for name in os.listdir(d)} - {d}
    finally:
        os.close(d)


def test_spawn_failing_for_lack_of_fds_leaks_no_fd() -> None:
    """A spawn failing with EMFILE leaked the pipes it had opened before failing."""
    launcher = LocalLauncher(cgroup=False)  # only the pipes, the pidfd and the epoll take fds
    before = open_fds()
    # Leave exactly 4 free fd numbers under the limit: two pipes fit, the third does not.
    free: list[int] = []
    fd = 0
    while len(free) < 4:
        if fd not in before:
            free.append(fd)
        fd += 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = free[-1] + 1
    assert limit <= soft
    leaked: set[int] = set()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            with pytest.raises(OSError):
                proc = launcher.launch(("bridge_worker.builtin",), 1 << 20, 1 << 16)
                kill_quietly([proc.pid])  # pragma: no cover - the launch must fail
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        leaked = open_fds() - before
        assert not leaked, f"the failed spawn left {len(leaked)} fds open: {sorted(leaked)}"
    finally:
        for fd in leaked:  # (only on failure) do not leak them into the other tests
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Opening a pool whose start hook is flaky (issue 17)
# ---------------------------------------------------------------------------------------------


async def test_open_pool_survives_a_start_hook_that_fails_every_other_start(tmp_path: Path) -> None:
    """open_pool gave up at the first failed start of a hook that fails every other start."""
    counter = tmp_path / "starts"
    config = PoolConfig(
        size=2, handlers=HANDLERS, start_timeout=20.0, env={FLAKY_COUNTER_ENV: str(counter)}
    )
    with trio.fail_after(30):
        try:
            async with open_pool(config) as pool:
                stats = pool.statistics()
                assert stats.alive == 2
                assert await pool.execute("echo", 1) == 1
        except InitializationError as exc:
            starts = counter.read_text().strip()
            pytest.fail(
                f"open_pool gave up after {starts} starts of a hook that fails every other start: "
                f"{exc}"
            )
    starts = int(counter.read_text())
    assert starts >= 3, f"only {starts} starts: the hook's failures were not exercised"


# ---------------------------------------------------------------------------------------------
# A worker dying during shutdown_grace (issue 18)
# ---------------------------------------------------------------------------------------------


async def test_worker_killed_during_shutdown_grace_is_a_connection_error_with_its_signal() -> None:
    """A worker SIGKILLed during shutdown_grace was reported as PoolClosedError, its signal lost."""
    config = attrs.evolve(CONFIG, shutdown_grace=5.0)
    errors: list[BaseException] = []
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            (worker,) = pool.worker_pids()
            done = trio.Event()

            async def call() -> None:
                try:
                    await pool.execute("hang", timeout=25)
                except PoolError as exc:
                    errors.append(exc)
                finally:
                    done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await wait_busy(pool)
                closed = trio.Event()

                async def close() -> None:
                    await pool.aclose()
                    closed.set()

                nursery.start_soon(close)
                await trio.sleep(0.3)  # aclose() now waits for the running call
                assert not closed.is_set() and not done.is_set()
                os.kill(worker, signal.SIGKILL)
                with trio.fail_after(3):
                    await done.wait()
                with trio.fail_after(10):
                    await closed.wait()
    assert len(errors) == 1
    err = errors[0]
    assert not isinstance(err, PoolClosedError), f"reported as PoolClosedError: {err}"
    assert isinstance(err, WorkerConnectionError), f"{type(err).__name__}: {err}"
    assert "killed by signal 9" in str(err), str(err)
