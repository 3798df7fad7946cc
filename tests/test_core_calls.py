"""One call through the public API: timeouts that cannot be met, calls cancelled before they
start, checkout timeouts, outside kills, cancelled calls left to finish, failover in the queue,
frames at the limit, and calls queued while workers cannot start.

Time-based behaviour runs on the fake worker (tests/fake_worker.py) with trio's autojump_clock, at
exact virtual times; behaviour about processes runs on real workers."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio
import trio.testing

from bridge_worker.protocol import Encoder
from conftest import kill_quietly, wait_gone
from fake_worker import fake_launcher
from pool import (
    BreakerConfig,
    CallerError,
    InitializationError,
    LearningConfig,
    PoolConfig,
    PoolError,
    PoolTimeoutError,
    RemoteError,
    ResourceError,
    WorkerConnectionError,
    open_pool,
)

FAKE = PoolConfig(size=2, start_timeout=1.0)
HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_core"]
REAL = PoolConfig(size=2, handlers=HANDLERS, start_timeout=20.0)


async def settle() -> None:
    """Let every started call get as far as it can (written, or queued) before going on."""
    await trio.testing.wait_all_tasks_blocked()


def requests_sent(launcher: Any) -> int:
    return sum(len(p.requests) for p in launcher.launched)


async def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


# ---------------------------------------------------------------- timeouts that cannot be met


@pytest.mark.parametrize("timeout", [0, 0.0, -1])
async def test_a_zero_or_negative_timeout_fails_at_once_and_touches_no_worker(
    autojump_clock: trio.abc.Clock, timeout: float
) -> None:
    """Before: the call was dispatched, the timer SIGKILLed a healthy worker, "may have run"."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            pids = sorted(pool.worker_pids())
            t0 = trio.current_time()
            with pytest.raises(PoolTimeoutError) as info:
                await pool.execute("sleep", 1.0, timeout=timeout)
            assert trio.current_time() == t0  # at once: no virtual time passed
            assert info.value.may_have_run is False
            await trio.sleep(2.0)  # room for any kill or restart to show
            assert requests_sent(launcher) == 0
            assert all(p.code is None for p in launcher.launched)
            assert len(launcher.launched) == 2
            assert pool.statistics().restarts == 0
            assert sorted(pool.worker_pids()) == pids


async def test_zero_timeouts_count_nowhere_and_open_no_circuit(autojump_clock: trio.abc.Clock) -> None:
    """Before: five calls with timeout=0 opened the command's circuit (each killed a worker)."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            assert await pool.execute("sleep", 0.5) == 0.5
            before = pool.statistics()
            for _ in range(10):
                with pytest.raises(PoolTimeoutError):
                    await pool.execute("sleep", 0.5, timeout=0)
                await trio.sleep(0.1)
            after = pool.statistics()
            assert "open" not in after.circuits.values(), after.circuits
            assert (after.calls_ok, after.calls_failed) == (before.calls_ok, before.calls_failed)
            assert after.restarts == 0
            assert await pool.execute("sleep", 0.5) == 0.5


@pytest.mark.parametrize("timeout", ["1", float("nan")], ids=["str", "nan"])
async def test_a_timeout_that_is_not_a_number_is_a_caller_error(
    autojump_clock: trio.abc.Clock, timeout: Any
) -> None:
    """Before: "1" raised a raw TypeError; nan was taken as a deadline that never comes."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            with pytest.raises(CallerError, match="timeout"):
                await pool.execute("echo", 1, timeout=timeout)
            assert requests_sent(launcher) == 0
            assert await pool.execute("echo", 2) == 2


# ---------------------------------------------------------------- cancelled before it starts


async def test_a_call_cancelled_before_it_starts_sends_nothing_and_kills_no_worker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: the request was written before the first checkpoint, then the abort killed the
    worker."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(FAKE, launcher=launcher) as pool:
            pids = sorted(pool.worker_pids())
            for command, args in [("sleep", 1.0), ("hang", None), ("echo", 1), ("nsleep", 1.0)]:
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await pool.execute(command, args)
                assert scope.cancelled_caught, command
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await pool.execute_in_session("s", command, args)
                assert scope.cancelled_caught, command
            await trio.sleep(1.0)
            assert requests_sent(launcher) == 0
            assert all(p.code is None for p in launcher.launched)
            assert pool.statistics().restarts == 0
            assert sorted(pool.worker_pids()) == pids
            assert await pool.execute("echo", 3) == 3


async def test_calls_cancelled_before_they_start_never_run_and_cost_no_worker(tmp_path: Path) -> None:
    """Before: each such call killed its worker (and its non-idempotent command may have run)."""
    log = tmp_path / "effects.log"
    with trio.fail_after(30):
        async with open_pool(REAL) as pool:
            pids = sorted(pool.worker_pids())
            for i in range(20):
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await pool.execute("core_log_effect", {"path": str(log), "id": i})
                assert scope.cancelled_caught
            await trio.sleep(0.3)  # room for a killed worker to be seen and replaced
            assert pool.statistics().restarts == 0
            assert sorted(pool.worker_pids()) == pids
            assert not log.exists()
            assert await pool.execute("core_log_effect", {"path": str(log), "id": "last"}) == "last"
            assert log.read_text() == "last\n"


# ---------------------------------------------------------------- checkout timeouts


async def test_a_call_that_finds_no_free_worker_in_time_says_that_nothing_ran(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: the message said "the pool killed and replaces it" though nothing ran or died."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=1), launcher=launcher) as pool:
            async with trio.open_nursery() as n:
                n.start_soon(pool.execute, "sleep", 10.0)
                await settle()
                t0 = trio.current_time()
                with pytest.raises(PoolTimeoutError) as info:
                    await pool.execute("echo", 1, timeout=0.05)
                assert trio.current_time() == pytest.approx(t0 + 0.05)
                err = info.value
                assert err.may_have_run is False
                assert "killed" not in str(err), str(err)
                assert re.search(r"no worker|nothing ran|not run", str(err), re.I), str(err)
            assert launcher.launched[0].code is None and len(launcher.launched) == 1


async def test_calls_that_find_no_free_worker_in_time_open_no_circuit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: five checkout timeouts opened the echo circuit for 60 s."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=1), launcher=launcher) as pool:
            async with trio.open_nursery() as n:
                n.start_soon(pool.execute, "sleep", 10.0)
                await settle()
                for i in range(7):
                    try:
                        await pool.execute("echo", i, timeout=0.05)
                    except PoolTimeoutError as exc:
                        assert exc.may_have_run is False
                    else:  # pragma: no cover - the worker is busy for 10 s
                        pytest.fail("a queued echo returned while the only worker was busy")
                    assert pool.statistics().circuits.get("echo", "closed") != "open", i
            # The sleep ended normally: nothing was killed, and echo works.
            assert launcher.launched[0].code is None and len(launcher.launched) == 1
            assert pool.statistics().restarts == 0
            assert await pool.execute("echo", "after") == "after"


# ---------------------------------------------------------------- workers killed from outside


async def test_workers_killed_from_outside_never_open_a_non_idempotent_commands_circuit() -> None:
    """Before: eight outside SIGKILLs of running non-idempotent calls opened its circuit for 60 s."""
    config = PoolConfig(size=8, handlers=HANDLERS, start_timeout=20.0)
    errors: list[BaseException] = []
    with trio.fail_after(30):
        async with open_pool(config) as pool:

            async def call() -> None:
                try:
                    await pool.execute("core_nsleep", 3.0)
                except PoolError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(call)
                await wait_until(lambda: sum(w.busy for w in pool.statistics().workers) == 8, 5.0)
                await trio.sleep(0.3)  # every worker has read its request and runs it
                busy = [w.pid for w in pool.statistics().workers if w.busy]
                assert len(busy) == 8
                kill_quietly(busy)
            await wait_gone(busy, zombies_too=True)
            assert len(errors) == 8
            assert all(isinstance(e, WorkerConnectionError) and e.may_have_run for e in errors), errors
            assert pool.statistics().circuits["core_nsleep"] == "closed"
            assert await pool.execute("core_nsleep", 0.01) == 0.01


async def test_fake_workers_killed_from_outside_never_open_a_non_idempotent_commands_circuit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: eight workers exiting with -9 (nobody in the pool asked) opened nsleep's circuit."""
    errors: list[BaseException] = []
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=8), launcher=launcher) as pool:

            async def call() -> None:
                try:
                    await pool.execute("nsleep", 30.0)
                except PoolError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(call)
                await settle()
                running = [p for p in launcher.launched if p.requests]
                assert len(running) == 8
                for p in running:
                    p.exit(-9)
            assert len(errors) == 8
            assert all(isinstance(e, WorkerConnectionError) and e.may_have_run for e in errors), errors
            assert pool.statistics().circuits["nsleep"] == "closed"
            t0 = trio.current_time()
            assert await pool.execute("nsleep", 0.5) == 0.5
            assert trio.current_time() - t0 < 1.0


# ---------------------------------------------------------------- cancelled calls left to finish


async def test_a_cancelled_call_left_to_finish_is_killed_at_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: a hung finish_on_cancel call held the only worker for ever after its caller left."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=1), launcher=launcher) as pool:
            first = launcher.launched[0]
            t0 = trio.current_time()
            with trio.move_on_after(0.1):
                await pool.execute("hang_finish", None, timeout=2.0)
            assert trio.current_time() == pytest.approx(t0 + 0.1)
            assert [r.command for r in first.requests] == ["hang_finish"]
            await trio.sleep_until(t0 + 1.9)
            assert first.code is None  # left to finish...
            await trio.sleep_until(t0 + 2.1)
            assert first.code == -9  # ...until its deadline: then killed
            await trio.sleep(1.0)
            assert len(launcher.launched) == 2 and pool.statistics().restarts == 1
            with trio.fail_after(5):
                assert await pool.execute("echo", "served") == "served"


async def test_a_cancelled_session_call_left_to_finish_commits_its_state() -> None:
    """Before: the worker committed the call's state change, the host dropped it with the reply,
    so the session lost it when it moved to another worker."""
    with trio.fail_after(30):
        async with open_pool(REAL) as pool:
            assert await pool.execute_in_session("s", "core_fin_incr", 0) == 1
            with trio.move_on_after(0.2) as scope:
                await pool.execute_in_session("s", "core_fin_incr", 0.6)
            assert scope.cancelled_caught
            # It goes on running on its worker; wait until it has finished there.
            await wait_until(lambda: not any(w.busy for w in pool.statistics().workers), 5.0)
            holder = await pool.execute_in_session("s", "core_pid")
            assert holder in pool.worker_pids()  # the worker was not killed
            os.kill(holder, signal.SIGKILL)
            await wait_gone([holder], zombies_too=True)
            # The session moves to another worker with the host's committed state.
            assert await pool.execute_in_session("s", "core_state") == {"n": 2}
            assert await pool.execute_in_session("s", "core_pid") != holder


# ---------------------------------------------------------------- failover in the queue


async def test_an_idle_worker_serves_new_calls_while_a_failover_waits_for_another(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: new calls queued behind a failover call that avoids the idle worker, and timed out
    there while that worker sat idle."""
    outcomes: dict[str, Any] = {}
    with trio.fail_after(300):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=2), launcher=launcher) as pool:

            async def run(name: str, command: str, args: Any, timeout: float = 60.0) -> None:
                try:
                    outcomes[name] = await pool.execute(command, args, timeout=timeout)
                except PoolError as exc:
                    outcomes[name] = exc

            async with trio.open_nursery() as n:
                t0 = trio.current_time()
                n.start_soon(run, "long", "sleep", 100.0, 200.0)  # worker A, busy 100 s
                await settle()
                n.start_soon(run, "fails", "raise_later", 1.0, 200.0)  # B, fails at t0 + 1
                await settle()
                await trio.sleep_until(t0 + 0.5)
                # Waits for a worker; B takes it when its failing call ends, and the failover
                # of that call (which must avoid B) then waits for A.
                n.start_soon(run, "queued", "sleep", 0.5)
                await trio.sleep_until(t0 + 2.0)
                assert outcomes.get("queued") == 0.5  # ran on B from t0 + 1 to t0 + 1.5
                assert "fails" not in outcomes  # its failover waits for A
                # B is idle now: a new call must not wait behind the failover for A.
                t1 = trio.current_time()
                assert await pool.execute("echo", "now", timeout=5.0) == "now"
                assert trio.current_time() - t1 < 0.1
                assert await pool.execute("sleep", 1.0, timeout=5.0) == 1.0
            assert outcomes["long"] == 100.0
            assert isinstance(outcomes["fails"], RemoteError)
            assert pool.statistics().failovers == 1


# ---------------------------------------------------------------- session state over the frame limit


@pytest.fixture
def started_pids() -> Iterator[list[int]]:
    """Pids a test records; whatever is left of them is SIGKILLed after the test, even when the
    test's trio run crashed and left its pool's workers behind."""
    pids: list[int] = []
    yield pids
    kill_quietly(pids)


async def test_a_session_call_over_the_frame_limit_with_its_state_fails_cleanly_even_when_cancelled(
    started_pids: list[int],
) -> None:
    """Before: under an already-cancelled scope the dispatch path rescheduled the caller's task
    while it was still running: trio.run crashed with TrioInternalError, orphaning the workers."""
    config = PoolConfig(size=2, handlers=HANDLERS, start_timeout=20.0, max_frame_size=1024)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            started_pids.extend(pool.worker_pids())
            assert await pool.execute_in_session("s", "core_set_big", 600) == 600
            holder = await pool.execute_in_session("s", "core_pid")
            os.kill(holder, signal.SIGKILL)  # the next call must send the state along
            await wait_gone([holder], zombies_too=True)
            await wait_until(lambda: pool.statistics().alive == 2)
            started_pids.extend(pool.worker_pids())
            args = b"y" * 600  # fits alone (about 620 bytes), not with the 600-byte state
            with trio.CancelScope() as scope:
                scope.cancel()
                await pool.execute_in_session("s", "core_len", args)
            assert scope.cancelled_caught
            with pytest.raises(ResourceError) as info:
                await pool.execute_in_session("s", "core_len", args)
            assert info.value.caller_fault
            assert "frame limit" in str(info.value) and "state" in str(info.value)
            # The pool keeps serving, the session too, with its state.
            assert await pool.execute("echo", 1) == 1
            assert await pool.execute_in_session("s", "core_len", b"y" * 10) == 10
            assert await pool.execute_in_session("s", "core_state") == {"big": b"x" * 600}
            assert pool.statistics().restarts == 1


# ---------------------------------------------------------------- frames at the limit

LIMIT = 1024


def _args_for_exact_frame(command: str) -> bytes:
    """Arguments that make the request of ``command`` exactly LIMIT bytes (the encoded body, which
    the frame limit counts; the frame adds a 4-byte header) with a 1-byte request id."""
    encoder = Encoder(1 << 20)
    pad = b""
    while len(encoder.request(1, command, pad, None, None)) - 4 < LIMIT:
        pad += b"x"
    assert len(encoder.request(1, command, pad, None, None)) - 4 == LIMIT
    return pad


async def test_a_retry_of_a_request_at_the_frame_limit_never_fails_to_encode(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: a retry re-encoded the request with a longer id (127 -> 128 takes one byte more)
    and a raw EncodeError escaped execute."""
    args = _args_for_exact_frame("raise_short")
    assert len(Encoder(LIMIT).request(127, "raise_short", args, None, None)) == LIMIT + 4
    config = PoolConfig(
        size=2,
        max_frame_size=LIMIT,
        command_circuit=BreakerConfig(failure_threshold=10_000),
        recycle_after_failures=10_000,
        # Every call fails: keep to the matrix's plain failover, however often.
        learning=LearningConfig(max_level=1),
        retry_budget=None,
    )
    outcomes: list[BaseException] = []
    with trio.fail_after(1000):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            for _ in range(140):  # request ids pass 128 whether attempts or calls take them
                try:
                    await pool.execute("raise_short", args)
                except Exception as exc:
                    outcomes.append(exc)
                else:  # pragma: no cover - raise_short always fails
                    pytest.fail("raise_short returned")
            not_pool_errors = [e for e in outcomes if not isinstance(e, PoolError)]
            assert not not_pool_errors, not_pool_errors[:3]
            # Each call either failed over once and failed again on another worker (RemoteError),
            # or (once ids take 2 bytes) its first request was over the limit (CallerError).
            remote = [e for e in outcomes if isinstance(e, RemoteError)]
            assert all(isinstance(e, (RemoteError, CallerError)) for e in outcomes)
            refused = [i for i, e in enumerate(outcomes) if isinstance(e, CallerError)]
            first_refused = refused[0] if refused else len(outcomes)
            assert outcomes[:first_refused] == remote  # every call that fit was retried normally
            assert len(remote) >= 64
            assert pool.statistics().failovers == len(remote)
            assert await pool.execute("echo", 1) == 1


# ---------------------------------------------------------------- queued while workers cannot start


async def test_a_queued_call_fails_with_the_startup_error_once_the_pool_circuit_opens(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: it waited out its whole 60 s deadline and then said it timed out."""
    results: dict[str, Any] = {}
    with trio.fail_after(200):
        async with fake_launcher() as launcher, open_pool(PoolConfig(size=1), launcher=launcher) as pool:

            async def busy() -> None:
                try:
                    results["busy"] = await pool.execute("hang", None, timeout=120.0)
                except PoolError as exc:
                    results["busy"] = exc

            async with trio.open_nursery() as n:
                n.start_soon(busy)
                await settle()
                t0 = trio.current_time()

                async def queued() -> None:
                    try:
                        results["queued"] = await pool.execute("echo", 1, timeout=60.0)
                    except PoolError as exc:
                        results["queued"] = exc
                    results["queued_at"] = trio.current_time() - t0

                n.start_soon(queued)
                await settle()
                assert pool.statistics().queued == 1
                launcher.fail_start = True
                launcher.launched[0].exit(-9)  # killed from outside; no new worker can start
                await wait_until(lambda: pool.statistics().pool_circuit == "open", 30.0)
                opened_at = trio.current_time() - t0
                assert opened_at < 10.0
            assert isinstance(results["busy"], WorkerConnectionError)
            assert isinstance(results["queued"], InitializationError), results["queued"]
            assert results["queued_at"] <= opened_at + 1.0  # long before its 60 s deadline
