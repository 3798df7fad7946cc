"""The public surface around calls: argument checking, exceptions out of open_pool, statistics,
closing, the pool circuit's trial start, memory held after a call, and logging."""

from __future__ import annotations

import gc
import logging
import os
import sys
import textwrap
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fake_worker import fake_launcher
from pool import (
    CallerError,
    PoolClosedError,
    PoolConfig,
    PoolError,
    PoolTimeoutError,
    RemoteError,
    WorkerConnectionError,
    open_pool,
)

FAKE = PoolConfig(size=2, start_timeout=1.0)
HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_core"]
REPO = Path(__file__).resolve().parent.parent


async def settle() -> None:
    """Let every started call get as far as it can (written, or queued) before going on."""
    await trio.testing.wait_all_tasks_blocked()


async def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


# ---------------------------------------------------------------- commands and session ids

NOT_STRINGS = [["echo"], None, 1, {"echo": 1}, b"echo"]


async def test_a_command_that_is_not_a_string_is_a_caller_error(autojump_clock: trio.abc.Clock) -> None:
    """Before: an unhashable command (execute(["echo"])) raised a raw TypeError."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            for command in NOT_STRINGS:
                with pytest.raises(CallerError) as info:
                    await pool.execute(command, 1)  # type: ignore[arg-type]
                assert info.value.caller_fault, command
            assert sum(len(p.requests) for p in launcher.launched) == 0
            assert await pool.execute("echo", 1) == 1


async def test_in_a_session_a_command_or_session_id_that_is_not_a_string_is_a_caller_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: an unhashable command in execute_in_session raised a raw TypeError."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            for command in NOT_STRINGS:
                with pytest.raises(CallerError):
                    await pool.execute_in_session("s", command, 1)  # type: ignore[arg-type]
            for session_id in [["s"], None, 1, {"s": 1}, b"s", ""]:
                with pytest.raises(CallerError):
                    await pool.execute_in_session(session_id, "echo", 1)  # type: ignore[arg-type]
            assert sum(len(p.requests) for p in launcher.launched) == 0
            assert pool.statistics().sessions == 0
            assert await pool.execute_in_session("s", "echo", 1) == 1


# ---------------------------------------------------------------- exceptions out of open_pool


@pytest.mark.parametrize("leaves", [1, 2])
async def test_an_exception_group_raised_in_the_body_comes_out_as_itself(
    autojump_clock: trio.abc.Clock, leaves: int
) -> None:
    """Before: the application's own ExceptionGroup came out stripped to its single leaf (one
    leaf) or inside the pool nursery's group (two leaves)."""
    plain = KeyError("mine")
    group = ExceptionGroup("the application's", [ValueError(f"leaf {i}") for i in range(leaves)])
    for raised in (plain, group):
        caught: BaseException | None = None
        with trio.fail_after(100):
            async with fake_launcher() as launcher:
                try:
                    async with open_pool(FAKE, launcher=launcher):
                        raise raised
                except BaseException as exc:
                    caught = exc
        assert caught is raised, repr(caught)


# ---------------------------------------------------------------- recovery statistics


async def test_recovery_statistics_count_calls_and_retries_count_attempts(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: recoveries.initiated counted retries while succeeded and failed counted calls."""
    with trio.fail_after(200):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            launcher.flaky_failures = 2  # crashes its worker twice, then answers
            assert await pool.execute("flaky", "ok") == "ok"
            with pytest.raises(WorkerConnectionError):
                await pool.execute("crash_idem", 1)  # crashes every worker it reaches
            await trio.sleep(1.0)
            sent = [r.command for p in launcher.launched for r in p.requests]
            assert sent.count("flaky") == 3
            assert sent.count("crash_idem") >= 2
            stats = pool.statistics()
            rec = stats.recoveries
            assert (rec.initiated, rec.succeeded, rec.failed) == (2, 1, 1), rec
            assert rec.initiated == rec.succeeded + rec.failed
            assert stats.retries == (sent.count("flaky") - 1) + (sent.count("crash_idem") - 1)


# ---------------------------------------------------------------- closing


async def test_aclose_fails_calls_waiting_for_their_sessions_turn_and_leaves_nothing_queued(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: those calls got PoolClosedError but statistics().queued stayed above zero."""
    outcomes: dict[str, Any] = {}
    config = PoolConfig(size=1, shutdown_grace=1.0)
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:

            async def run(name: str, command: str, args: Any) -> None:
                try:
                    outcomes[name] = await pool.execute_in_session("s", command, args)
                except PoolError as exc:
                    outcomes[name] = exc

            async with trio.open_nursery() as n:
                n.start_soon(run, "running", "sleep", 10.0)
                await settle()
                n.start_soon(run, "second", "echo", 2)
                n.start_soon(run, "third", "echo", 3)
                await settle()
                assert pool.statistics().queued == 2
                await pool.aclose()
            assert isinstance(outcomes["second"], PoolClosedError)
            assert isinstance(outcomes["third"], PoolClosedError)
            assert pool.statistics().queued == 0


# ---------------------------------------------------------------- the pool circuit's trial start


async def test_slots_wait_quietly_while_the_pool_circuits_trial_start_runs(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: the other slots asked the half-open circuit every 10 ms, hundreds of refusals
    during one slow trial start."""
    config = PoolConfig(size=3, start_timeout=30.0)
    with trio.fail_after(300):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            launcher.fail_start = True
            for p in list(launcher.launched):
                p.exit(-9)
            await wait_until(lambda: pool.statistics().pool_circuit == "open", 30.0)
            launcher.fail_start = False
            launcher.start_delay = 5.0  # the trial start takes 5 s
            await wait_until(lambda: pool.statistics().pool_circuit == "half_open", 30.0)
            rejected = pool.health()["circuits"]["pool"]["rejected"]
            launched = len(launcher.launched)
            await wait_until(lambda: pool.statistics().pool_circuit == "closed", 30.0)
            during = pool.health()["circuits"]["pool"]["rejected"] - rejected
            assert during < 10, f"{during} refusals during one 5 s trial start"
            await wait_until(lambda: pool.statistics().alive == 3, 30.0)
            assert len(launcher.launched) - launched <= 3  # the trial, then the other two slots
            assert await pool.execute("echo", 1) == 1


# ---------------------------------------------------------------- memory held after a call


class _Args(dict[str, Any]):
    """Arguments a weak reference can watch."""


@pytest.mark.parametrize("where", ["running", "queued"])
async def test_the_arguments_of_a_timed_out_call_are_not_kept_after_it_fails(
    autojump_clock: trio.abc.Clock, where: str
) -> None:
    """Before: the pool's timer kept the last call it timed out (its arguments and its request
    frame) referenced until the timer next woke up: with no other deadline pending, for ever."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=1), launcher=launcher) as pool:
            async with trio.open_nursery() as n:
                if where == "queued":
                    n.start_soon(pool.execute, "sleep", 5.0)  # the only worker is busy
                    await settle()
                args = _Args(payload="x" * 1000)
                ref = weakref.ref(args)
                failure: type[BaseException] | None = None
                try:
                    await pool.execute("hang", args, timeout=1.0)
                except PoolError as exc:
                    failure = type(exc)
                del args
            await trio.sleep(1.0)
            gc.collect()
            assert failure is PoolTimeoutError
            kept = ref() is not None
            assert not kept, "the timed-out call's arguments are still referenced"
            assert await pool.execute("echo", 1) == 1


async def test_a_large_arguments_memory_is_released_on_the_host_after_the_call() -> None:
    """Before: the host's request encoder kept a buffer about twice the largest request it ever
    encoded (41.9 MB after one 20 MiB argument) for the life of the pool."""
    with trio.fail_after(30):
        async with open_pool(PoolConfig(size=2, handlers=HANDLERS, start_timeout=20.0)) as pool:
            args = _Args(x=1)
            ref = weakref.ref(args)
            assert await pool.execute("core_len", args) == 1
            del args
            gc.collect()
            assert ref() is None  # the arguments themselves are not kept
            tracemalloc.start()
            try:
                assert await pool.execute("core_len", b"w") == 1
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                big = b"z" * (20 << 20)
                assert await pool.execute("core_len", big) == 20 << 20
                del big
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert held < 2 << 20, f"{held / 1e6:.1f} MB still held after the call"
            assert await pool.execute("echo", 1) == 1


# ---------------------------------------------------------------- logging

HOST_SCRIPT = textwrap.dedent(
    """
    import trio
    from pool import PoolConfig, PoolError, open_pool

    async def main():
        config = PoolConfig(size=2, handlers=["bridge_worker.builtin", "bridge_worker.testing"])
        async with open_pool(config) as pool:
            for command, args in [("raise_error", "boom"), ("crash", 1)]:
                try:
                    await pool.execute(command, args)
                except PoolError as exc:
                    print("failed:", type(exc).__name__, flush=True)

    trio.run(main)
    """
)


async def test_without_logging_configured_a_failed_call_prints_nothing_to_stderr(tmp_path: Path) -> None:
    """Before: with no logging configured, a failed call printed a 15-line "Pool Error:" block to
    stderr through Python's last-resort handler."""
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, str(script)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stdout.splitlines() == ["failed: RemoteError", "failed: WorkerConnectionError"]
    assert "Pool Error:" not in stderr, stderr
    assert stderr.strip() == "", stderr


async def test_a_failed_call_logs_single_line_records(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a failed call logged PoolErrorHandler.format_for_logging's 15-line block as one
    record."""
    caplog.set_level(logging.DEBUG, logger="pool")
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            with pytest.raises(RemoteError):
                await pool.execute("raise_error", "boom")
            with pytest.raises(WorkerConnectionError):
                await pool.execute("crash", 1)
    records = [r for r in caplog.records if r.name == "pool" or r.name.startswith("pool.")]
    assert records
    multi = [r.getMessage() for r in records if "\n" in r.getMessage()]
    assert not multi, multi[0]
