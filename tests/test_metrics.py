"""What a pool records for its metrics as calls happen (``pool._metrics``): histograms, call
outcomes and their reasons, queue waits, worker starts, and restarts by reason. In virtual time,
on the testing kit's in-process workers (no prometheus-client needed: ``tests/test_ops.py``
checks what ``/metrics`` makes of it)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from typing import Any

import pytest
import trio

from pool import BreakerConfig, CircuitOpenError, Pool, PoolError, RemoteError
from pool._metrics import CALL_BUCKETS, CALLER_ERROR, CANCELLED, ERROR, OK, REJECTED, START_BUCKETS, Histogram, PoolMetrics
from pool._supervisor import RESTART_REASONS
from pool.testing import InProcessLauncher, fake_pool

HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_shapes"]


def metrics(pool: Pool) -> PoolMetrics:
    assert pool._metrics is not None
    return pool._metrics


def bucket(value: float) -> int:
    """The index of the call bucket whose upper bound is ``value``."""
    return CALL_BUCKETS.index(value)


# ---------------------------------------------------------------------------------------------
# The histogram itself
# ---------------------------------------------------------------------------------------------


def test_a_value_on_a_bound_counts_in_that_bucket_and_above_all_in_the_last() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.0, 0.1, 0.10000001, 1.0, 5.0, math.inf):
        h.observe(value)
    assert h.counts == [2, 2, 2]  # le semantics: a bucket counts values at most its bound
    assert h.count == 6
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 6)]


def test_the_buckets_are_fine_enough_for_calls_of_tens_of_microseconds() -> None:
    assert CALL_BUCKETS[0] == 0.00001 and list(CALL_BUCKETS) == sorted(CALL_BUCKETS)
    assert sum(1 for b in CALL_BUCKETS if b < 0.001) >= 6  # below a millisecond: six buckets
    assert CALL_BUCKETS[-1] == 60.0  # the default deadline
    assert list(START_BUCKETS) == sorted(START_BUCKETS)


# ---------------------------------------------------------------------------------------------
# Calls: durations and outcomes
# ---------------------------------------------------------------------------------------------


async def test_a_call_is_timed_from_its_start_to_its_result(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1) as pool:
            await pool.execute("sleep", 0.3)
            await pool.execute("echo", 1)
            sleep = metrics(pool).commands["sleep"]
            assert sleep.ok == 1 and sleep.calls(OK) == 1
            assert sleep.duration.sum == pytest.approx(0.3, abs=1e-9)
            assert sleep.duration.counts[bucket(0.5)] == 1 and sleep.duration.count == 1
            echo = metrics(pool).commands["echo"]
            assert echo.ok == 1 and echo.duration.counts[0] == 1  # no virtual time passed


async def test_each_attempt_s_wait_for_a_worker_is_recorded(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1) as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.execute, "sleep", 1.0)
                await trio.sleep(0.1)
                nursery.start_soon(pool.execute, "sleep", 0.5)  # waits for the first: 0.9 s
            waits = metrics(pool).queue_wait
            assert waits.count == 2
            assert waits.counts[0] == 1  # the first found its worker at once
            assert waits.counts[bucket(1.0)] == 1
            assert waits.sum == pytest.approx(0.9, abs=1e-9)


async def test_failures_are_counted_by_outcome_and_reason(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, max_queue=1) as pool:
            with pytest.raises(RemoteError):
                await pool.execute("raise_error", "no")  # the handler's own: the matrix gives up
            with pytest.raises(RemoteError):
                await pool.execute("square", -1)  # a declared caller error
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.execute, "sleep", 1.0)
                await trio.sleep(0.1)
                with pytest.raises(PoolError) as info:
                    await pool.execute("slow_item", 0, timeout=0.2)  # waits, and no worker comes
                assert info.value.context["outside_matrix"] == "no_worker_in_time"
                nursery.start_soon(pool.execute, "sleep", 0.1)  # takes the one place in the queue
                await trio.sleep(0.1)
                with pytest.raises(PoolError) as info:
                    await pool.execute("slow_item", 0)
                assert info.value.context["outside_matrix"] == "queue_full"
            with trio.move_on_after(0.5):
                await pool.execute("sleep", 5.0)
            m = metrics(pool).commands
            assert (m["raise_error"].calls(ERROR), dict(m["raise_error"].failures)) == (1, {"python_error": 1})
            assert (m["square"].calls(CALLER_ERROR), dict(m["square"].failures)) == (1, {"declared_caller_error": 1})
            assert m["slow_item"].calls(REJECTED) == 2
            assert dict(m["slow_item"].failures) == {"no_worker_in_time": 1, "queue_full": 1}
            assert m["sleep"].calls(CANCELLED) == 1 and m["sleep"].ok == 2
            # Every call with an outcome is timed, failed ones included; cancelled ones are not.
            assert m["raise_error"].duration.count == 1 and m["sleep"].duration.count == 2
            assert m["slow_item"].duration.sum == pytest.approx(0.2, abs=1e-9)


async def test_calls_an_open_circuit_refuses_are_rejected(autojump_clock: trio.abc.Clock) -> None:
    circuit = BreakerConfig(failure_threshold=1, success_threshold=1, timeout=60.0, half_open_requests=1)
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, command_circuit=circuit) as pool:
            with pytest.raises(RemoteError):
                await pool.execute("raise_error", "no")
            with pytest.raises(CircuitOpenError):
                await pool.execute("raise_error", "no")
            raise_error = metrics(pool).commands["raise_error"]
            assert raise_error.calls(ERROR) == 1 and raise_error.calls(REJECTED) == 1
            assert raise_error.failures["circuit_open"] == 1


async def test_streams_and_map_chunks_count_as_calls(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2) as pool:
            async with pool.open_stream("tokens", 3) as items:
                assert [item async for item in items] == ["tok0", "tok1", "tok2"]
            assert await pool.map("square", range(8), chunksize=2) == [i * i for i in range(8)]
            m = metrics(pool).commands
            assert m["tokens"].ok == 1 and m["tokens"].duration.count == 0  # streams are not timed
            assert m["square"].ok == 4 and m["square"].duration.count == 4


async def test_a_map_chunk_is_timed_from_its_own_start(autojump_clock: trio.abc.Clock) -> None:
    async def slow_square(args: Any, ctx: Any) -> int:
        await trio.sleep(0.1)
        return int(args * args)

    launcher = InProcessLauncher(simulate={"square": slow_square})
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, launcher=launcher) as pool:
            assert await pool.map("square", range(6), chunksize=1) == [i * i for i in range(6)]
            square = metrics(pool).commands["square"]
            # Two chunks in flight at a time on one worker: a chunk waits at most for the one
            # before it, then runs 0.1 s, however long ago the map started (the last started
            # 0.4 s after the first).
            assert square.duration.count == 6
            assert sum(square.duration.counts[bucket(0.25) + 1 :]) == 0
            assert square.duration.sum <= 6 * 0.2 + 1e-9


async def test_the_ok_count_agrees_with_the_pool_s_statistics(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2) as pool:
            for i in range(20):
                await pool.execute("echo", i)
                await pool.execute_in_session(f"s{i % 3}", "counter")
            with pytest.raises(RemoteError):
                await pool.execute("raise_error", "no")
            m = metrics(pool).commands
            stats = pool.statistics()
            assert sum(c.ok for c in m.values()) == stats.calls_ok == 40
            assert sum(c.calls(ERROR) for c in m.values()) == stats.calls_failed == 1


async def test_with_metrics_off_nothing_is_recorded(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, metrics=False) as pool:
            assert pool._metrics is None
            assert await pool.execute("echo", 5) == 5
            assert pool.statistics().calls_ok == 1


async def test_worker_starts_are_timed(autojump_clock: trio.abc.Clock) -> None:
    launcher = InProcessLauncher(start_delay=0.2)
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=3, launcher=launcher) as pool:
            starts = metrics(pool).worker_start
            assert starts.count == 3 and starts.counts[START_BUCKETS.index(0.25)] == 3
            assert starts.sum == pytest.approx(0.6, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Restarts by reason
# ---------------------------------------------------------------------------------------------


async def _run(pool: Pool, command: str, args: Any, *, timeout: float | None = None, cancel_after: float | None = None) -> None:
    with trio.move_on_after(math.inf if cancel_after is None else cancel_after):
        try:
            await pool.execute(command, args, timeout=timeout)
        except PoolError:
            pass


async def _crash(pool: Pool, launcher: InProcessLauncher) -> None:
    await _run(pool, "crash", 3)  # not idempotent: one worker lost, no retry


async def _killed(pool: Pool, launcher: InProcessLauncher) -> None:
    launcher.workers[0].send_signal(signal.SIGKILL)


async def _timeout(pool: Pool, launcher: InProcessLauncher) -> None:
    await _run(pool, "hang", None, timeout=1.0)


async def _cancel(pool: Pool, launcher: InProcessLauncher) -> None:
    await _run(pool, "hang", None, cancel_after=1.0)


async def _calls(pool: Pool, launcher: InProcessLauncher) -> None:
    for _ in range(3):
        await pool.execute("echo", 1)


async def _failures(pool: Pool, launcher: InProcessLauncher) -> None:
    for _ in range(2):
        await _run(pool, "raise_error", "no")


async def _heartbeat(pool: Pool, launcher: InProcessLauncher) -> None:
    launcher.workers[0].send_signal(signal.SIGSTOP)


async def _memory(pool: Pool, launcher: InProcessLauncher) -> None:
    await pool.execute("alloc", 64)  # an in-process worker counts it toward its rss()


async def _age(pool: Pool, launcher: InProcessLauncher) -> None:
    pass  # its age limit comes by itself


RESTARTS = [
    pytest.param(_crash, {}, "crash", id="crash"),
    pytest.param(_killed, {}, "killed", id="killed-from-outside"),
    pytest.param(_timeout, {}, "timeout", id="timeout"),
    pytest.param(_cancel, {}, "cancel", id="cancel"),
    pytest.param(_calls, {"max_calls_per_worker": 3}, "recycled_calls", id="recycled-for-calls"),
    pytest.param(_failures, {"recycle_after_failures": 2}, "recycled_failures", id="recycled-for-failures"),
    pytest.param(_heartbeat, {"heartbeat_interval": 1.0, "heartbeat_timeout": 1.0}, "heartbeat", id="heartbeat"),
    pytest.param(_memory, {"hard_worker_memory": 32 << 20, "memory_check_interval": 0.1}, "memory", id="hard-memory"),
    pytest.param(_memory, {"max_worker_memory": 32 << 20, "memory_check_interval": 0.1}, "memory", id="soft-memory"),
    pytest.param(_age, {"max_worker_age": 10.0}, "age", id="age"),
]


@pytest.mark.parametrize("cause, config, reason", RESTARTS)
async def test_a_restart_is_counted_by_its_reason(
    autojump_clock: trio.abc.Clock, cause: Any, config: dict[str, Any], reason: str
) -> None:
    launcher = InProcessLauncher()
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, launcher=launcher, **config) as pool:
            await cause(pool, launcher)
            while pool.statistics().restarts < 1:
                await trio.sleep(0.05)
            stats = pool.statistics()
            assert stats.restarts_by_reason == {reason: 1}, stats.restarts_by_reason
            assert reason in RESTART_REASONS


async def test_a_rolling_restart_s_replacements_count_as_such(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2) as pool:
            await pool.restart_workers()
            await pool.resize(1)  # a shrink is not a restart
            stats = pool.statistics()
            assert stats.restarts == 2 and stats.restarts_by_reason == {"rolling_restart": 2}


# ---------------------------------------------------------------------------------------------
# The optional dependencies stay optional
# ---------------------------------------------------------------------------------------------

OPTIONAL = ("prometheus_client", "hypercorn", "opentelemetry")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which the optional dependencies cannot be imported."""
    block = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=60)


def test_a_pool_runs_without_prometheus_client_hypercorn_or_opentelemetry() -> None:
    done = _python(
        "import trio\n"
        "from pool import PoolConfig, open_pool\n"
        "async def main():\n"
        "    async with open_pool(PoolConfig(size=1)) as p:\n"
        "        print(await p.execute('echo', 7), p._metrics.commands['echo'].ok)\n"
        "trio.run(main)\n"
    )
    assert (done.returncode, done.stdout) == (0, "7 1\n"), done.stderr


def test_pool_ops_without_its_extra_names_the_extra() -> None:
    done = _python("import pool.ops\n")
    assert done.returncode == 1
    assert "pool.ops needs the 'ops' extra" in done.stderr
    assert "pip install 'trio-worker-pool[ops]'" in done.stderr
