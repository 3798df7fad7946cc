"""Chaos and reliability: real workers killed, stopped, fed garbage and starved while callers run.

Every test is bounded by ``trio.fail_after`` and asserts outcomes that do not depend on timing:
where the chaos is random (which worker is killed, when), the assertions are the invariants that
must hold whatever it hit (an idempotent call fails only if more kills hit it than its retry cap
allows; a side effect never happens twice; committed session state is never lost).

The crash-phase table (``PHASES``) is data: ``python tests/test_chaos.py`` prints it as the
markdown table in the README (Reliability).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import attrs
import psutil
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import ALL_HANDLERS, TOKEN, alive, exists, kill_quietly, wait_gone
from pool import (
    CallerError,
    CommunicationError,
    HealthCheckError,
    InitializationError,
    PoolClosedError,
    PoolConfig,
    PoolError,
    PoolTimeoutError,
    WorkerConnectionError,
    WorkerStatistics,
    open_pool,
)
from pool._breaker import BreakerConfig
from pool._errors import Strategy
from pool._inprocess import ChannelProcess
from pool._matrix import DEFAULT_POLICY
from pool._process import LocalLauncher
from pool.launchers import TcpLauncher
from pool.testing import Chaos, ChaosRecord

#: The states of a worker that serves calls (in the public snapshot).
SERVING = ("idle", "busy")

from bridge_worker.protocol import (
    PROTOCOL_VERSION,
    CommandInfo,
    Decoder,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    Reply,
    Request,
    Shutdown,
    StartupFailed,
    encode,
)

# The seed's decisions, without its 1-16 s backoff delays (real time).
FAST_POLICY = attrs.evolve(
    DEFAULT_POLICY,
    delays={**DEFAULT_POLICY.delays, Strategy.BACKOFF_RETRY: (0.01,), Strategy.IMMEDIATE_RETRY: (0.0,)},
)
CONFIG = PoolConfig(size=4, handlers=ALL_HANDLERS, start_timeout=20.0, policy=FAST_POLICY)
#: connection_error is retried after attempts 1, 2 and 3: a call may fail only from attempt 4.
CONNECTION_RETRY_CAP = 3
HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


async def wait_full(pool: Any, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while pool.statistics().alive < pool.config.size:
            await trio.sleep(0.01)


def is_worker(pid: int) -> bool:
    """True if ``pid`` is alive and still runs ``bridge_worker`` (so a recycled pid is left alone)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "bridge_worker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


async def wait_stopped(pid: int) -> None:
    """Wait until a SIGSTOPped process is really stopped (not about to read one more time)."""
    with trio.fail_after(5):
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            await trio.sleep(0.001)


async def survive_kills(call: Callable[[], Any]) -> Any:
    """Run an idempotent call while workers are being killed: it succeeds (its result is returned)
    unless more kills hit it than its retry cap allows (then None)."""
    try:
        return await call()
    except WorkerConnectionError as exc:
        assert exc.context["attempt"] > CONNECTION_RETRY_CAP, exc
        return None


def release_stopped(pids: list[int]) -> None:
    """End every worker a test SIGSTOPped that is still around (by pid, after checking it)."""
    for pid in pids:
        if is_worker(pid):
            kill_quietly([pid])
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass


def my_workers() -> list[psutil.Process]:
    """Worker processes (zombies included) that descend from this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "bridge_worker" in " ".join(child.cmdline()) or child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            pass
    return found


def kills_between(kills: list[ChaosRecord], start: float, end: float) -> int:
    """How many of the kills ``chaos.killing`` made fell between ``start`` and ``end``."""
    return sum(1 for k in kills if start <= k.time <= end)


# ---------------------------------------------------------------------------------------------
# SIGKILL storms
# ---------------------------------------------------------------------------------------------

#: A storm's period. chaos.killing keeps to its grid; the helper these tests had before slept
#: 30 ms after each kill, which on a busy machine made a quarter fewer kills (45-51 against 58-65
#: in 4 s, measured side by side): 40 ms keeps the storms as they were.
STORM_EVERY = 0.04


async def test_sigkill_storm_idempotent_calls_and_sessions_lose_nothing(chaos: Chaos) -> None:
    """16 callers (12 in sessions) run idempotent commands while a random worker is SIGKILLed
    every 40 ms. Every call succeeds unless at least 4 of its attempts were killed; every
    session's committed log is exactly its successful calls; the pool ends at full size."""
    events: list[Any] = []
    config = attrs.evolve(CONFIG, event_callbacks=[events.append])
    failed: list[tuple[PoolError, float, float]] = []
    ok = 0
    committed: dict[str, list[int]] = {}
    mid_checks = 0
    with trio.fail_after(90):
        async with open_pool(config) as pool:
            stop = trio.current_time() + 4.0

            async def attempt(fn: Callable[[], Any]) -> tuple[bool, Any]:
                nonlocal ok
                t0 = trio.current_time()
                try:
                    result = await fn()
                except PoolError as exc:
                    failed.append((exc, t0, trio.current_time()))
                    return False, None
                ok += 1
                return True, result

            async def session_caller(c: int) -> None:
                nonlocal mid_checks
                sid = f"chaos-{c}"
                log = committed[sid] = []
                i = 0
                while trio.current_time() < stop:
                    args = {"id": i, "sleep": 0.002}
                    done, n = await attempt(
                        lambda: pool.execute_in_session(sid, "append_once", args, timeout=30)
                    )
                    if done:
                        log.append(i)
                        assert n == len(log)
                    if i % 10 == 9:
                        done, state = await attempt(lambda: pool.execute_in_session(sid, "get_state"))
                        if done:
                            assert state == {"log": log}
                            mid_checks += 1
                    i += 1

            async def plain_caller(c: int) -> None:
                i = 0
                while trio.current_time() < stop:
                    done, result = await attempt(lambda: pool.execute("sleep_idem", 0.001, timeout=30))
                    assert not done or result == 0.001
                    done, result = await attempt(lambda: pool.execute("echo", [c, i], timeout=30))
                    assert not done or result == [c, i]
                    i += 1

            async with chaos.killing(pool, every=STORM_EVERY) as kills:
                async with trio.open_nursery() as callers:
                    for c in range(12):
                        callers.start_soon(session_caller, c)
                    for c in range(4):
                        callers.start_soon(plain_caller, c)

            for exc, t0, t1 in failed:
                assert isinstance(exc, WorkerConnectionError), exc
                assert exc.context["attempt"] > CONNECTION_RETRY_CAP, exc
                assert kills_between(kills, t0, t1) > CONNECTION_RETRY_CAP
            await wait_full(pool)
            for sid, log in committed.items():
                assert await pool.execute_in_session(sid, "get_state") == {"log": log}
            stats = pool.statistics()
            # The storm ran and calls went through it (how many depends on the machine's load).
            assert len(kills) >= 10
            assert stats.retries > 0 and ok > 100 and mid_checks > 0
            assert stats.pool_circuit == "closed"
            assert pool.health()["status"] == "healthy"
            assert len(pool.worker_pids()) == config.size
            exits = [e for e in events if e.kind == "worker_exited"]
            killed = {k.pid for k in kills}
            assert killed <= {e.pid for e in exits}  # every kill was seen and reaped


async def test_sigkill_storm_never_duplicates_a_side_effect(tmp_path: Path, chaos: Chaos) -> None:
    """Non-idempotent calls (a line appended to a file) under the same kills: each call either
    succeeded and its line is there exactly once, or failed saying it may or may not have run and
    its line is there at most once (never, if it cannot have run). No line is ever doubled."""
    effects = tmp_path / "effects.log"
    outcomes: dict[str, BaseException | None] = {}
    with trio.fail_after(90):
        async with open_pool(CONFIG) as pool:
            stop = trio.current_time() + 3.0

            async def caller(c: int, in_session: bool) -> None:
                i = 0
                while trio.current_time() < stop:
                    call_id = f"{c}-{i}"
                    args = {"path": str(effects), "id": call_id, "sleep": 0.003}
                    try:
                        if in_session:
                            result = await pool.execute_in_session(f"s{c}", "log_effect", args, timeout=30)
                        else:
                            result = await pool.execute("log_effect", args, timeout=30)
                    except PoolError as exc:
                        outcomes[call_id] = exc
                    else:
                        assert result == call_id
                        outcomes[call_id] = None
                    i += 1

            async with chaos.killing(pool, every=STORM_EVERY) as kills:
                async with trio.open_nursery() as callers:
                    for c in range(16):
                        callers.start_soon(caller, c, c % 2 == 0)
            await wait_full(pool)
            assert pool.health()["status"] == "healthy"

    lines = Counter(effects.read_text().split())
    assert max(lines.values()) == 1, [k for k, v in lines.items() if v > 1]
    assert set(lines) <= set(outcomes)
    hit = 0
    for call_id, exc in outcomes.items():
        if exc is None:
            assert lines[call_id] == 1, call_id
            continue
        assert isinstance(exc, WorkerConnectionError), exc
        if exc.may_have_run:
            hit += 1
            assert "may or may not have run" in str(exc)
            # (it may have been retried before: an attempt whose request was still unread in a
            # dead worker's pipe did not run; never after one that may have run)
            assert lines[call_id] <= 1
        else:  # never reached a worker on any attempt: retried, then failed; it never ran
            assert lines[call_id] == 0
    # The storm ran, hit calls, and calls went through it (how many depends on the machine's load).
    assert len(kills) >= 10 and hit > 0
    assert sum(1 for e in outcomes.values() if e is None) > 50


async def test_tcp_chaos_kills_closed_connections_partitions_and_rogue_peers_lose_nothing(
    tmp_path: Path,
) -> None:
    """Workers over TCP loopback, 16 callers (sessions, idempotent calls and a non-idempotent side
    effect) while every 40 ms a worker is SIGKILLed, has its connection shut from outside the
    pool, or is SIGSTOPped (a partition: no end of stream; the heartbeats find it), and a rogue
    peer hammers the listening port. An idempotent call fails only past its retry cap of
    disruptions; every session's committed log is its successful calls; a side effect never
    happens twice; every rogue connection is dropped; the pool ends at full size and healthy."""
    from benchmarks.chaos import _close_connection_of

    effects = tmp_path / "effects.log"
    config = attrs.evolve(CONFIG, heartbeat_interval=0.2, heartbeat_timeout=0.3)
    launcher = TcpLauncher(TOKEN, handshake_timeout=0.5)
    rng = random.Random(3)
    # Every kind of disruption, whatever the machine's speed: 6 kills, 3 closes, 1 stop in 10.
    plan = itertools.cycle(["kill", "close", "kill", "stop", "kill", "close", "kill", "kill", "close", "kill"])
    disruptions: list[float] = []
    stopped: list[int] = []
    actions: Counter[str] = Counter()
    committed: dict[str, list[int]] = {}
    outcomes: dict[str, BaseException | None] = {}
    failed: list[tuple[PoolError, float, float]] = []
    rogues = 0
    seen: set[int] = set()
    try:
        with trio.fail_after(90):
            async with open_pool(config, launcher=launcher) as pool:
                stop = trio.current_time() + 3.0

                async def disrupt() -> None:
                    while True:
                        await trio.sleep(0.04)
                        ready = [w.pid for w in pool.statistics().workers if w.state in SERVING and w.pid not in stopped]
                        if not ready:
                            continue
                        pid = rng.choice(ready)
                        seen.add(pid)
                        action = next(plan)
                        if action == "close":
                            if not _close_connection_of(pid):
                                continue
                        else:
                            os.kill(pid, signal.SIGSTOP if action == "stop" else signal.SIGKILL)
                            if action == "stop":
                                stopped.append(pid)
                        actions[action] += 1
                        disruptions.append(trio.current_time())

                async def rogue() -> None:
                    nonlocal rogues
                    payloads = [os.urandom(300), b"\xff" * 4 + bytes(100), b"GET / HTTP/1.0\r\n\r\n"]
                    while True:
                        sock = trio.socket.socket()
                        with sock:
                            await sock.connect(launcher.address)
                            rogues += 1
                            try:
                                await sock.send(rng.choice(payloads))
                                with trio.move_on_after(1):
                                    while await sock.recv(4096):
                                        pass
                            except OSError:  # reset: the pool dropped it before reading all
                                pass
                        await trio.sleep(0.005)

                async def attempt(fn: Callable[[], Any]) -> tuple[bool, Any]:
                    t0 = trio.current_time()
                    try:
                        return True, await fn()
                    except PoolError as exc:
                        failed.append((exc, t0, trio.current_time()))
                        return False, exc

                async def session_caller(c: int) -> None:
                    sid = f"chaos-{c}"
                    log = committed[sid] = []
                    i = 0
                    while trio.current_time() < stop:
                        done, n = await attempt(lambda: pool.execute_in_session(sid, "append_once", {"id": i}, timeout=30))
                        if done:
                            log.append(i)
                            assert n == len(log)
                        i += 1

                async def effect_caller(c: int) -> None:
                    i = 0
                    while trio.current_time() < stop:
                        call_id = f"{c}-{i}"
                        done, result = await attempt(
                            lambda: pool.execute("log_effect", {"path": str(effects), "id": call_id}, timeout=30)
                        )
                        outcomes[call_id] = None if done else result
                        assert not done or result == call_id
                        done, result = await attempt(lambda: pool.execute("echo", [c, i], timeout=30))
                        assert not done or result == [c, i]
                        i += 1

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(disrupt)
                    nursery.start_soon(rogue)
                    async with trio.open_nursery() as callers:
                        for c in range(8):
                            callers.start_soon(session_caller, c)
                            callers.start_soon(effect_caller, c)
                    nursery.cancel_scope.cancel()
                await wait_full(pool)
                for sid, log in committed.items():
                    assert await pool.execute_in_session(sid, "get_state") == {"log": log}
                with trio.fail_after(5):
                    while launcher.rejected < rogues:  # the last ones are being dropped
                        await trio.sleep(0.01)
                assert launcher.rejected == rogues > 2
                assert not set(stopped) & set(pool.worker_pids())  # found and replaced
                assert pool.health()["status"] == "healthy"
                seen.update(pool.worker_pids())
        assert actions["kill"] >= 6 and actions["close"] >= 3 and actions["stop"] >= 1
        for exc, t0, t1 in failed:
            if exc.context.get("command") == "log_effect":
                # Not idempotent: lost with its worker, or found stopped; it may have run.
                assert isinstance(exc, (WorkerConnectionError, HealthCheckError)) and exc.may_have_run, exc
                assert "may or may not have run" in str(exc)
            else:
                assert isinstance(exc, (WorkerConnectionError, HealthCheckError)), exc
                assert sum(1 for t in disruptions if t0 <= t <= t1) > CONNECTION_RETRY_CAP, exc
        lines = Counter(effects.read_text().split())
        assert not lines or max(lines.values()) == 1
        assert all(lines[i] == 1 for i, exc in outcomes.items() if exc is None)
        assert sum(1 for exc in outcomes.values() if exc is None) > 20
        await wait_gone(seen, zombies_too=True)
    finally:
        release_stopped(stopped)


async def test_a_worker_killed_while_writing_its_reply_is_a_lost_worker_not_a_bad_frame() -> None:
    """SIGKILL in the middle of an 8 MB reply: the host holds half a frame when the channel ends.
    That is a dead worker (connection_error, retried for an idempotent command), not garbage."""
    events: list[Any] = []
    config = attrs.evolve(CONFIG, size=2, event_callbacks=[events.append])
    size = 8 * 2**20
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            async with trio.open_nursery() as n:
                results: list[bytes] = []

                async def call() -> None:
                    results.append(await pool.execute("big_result", size))

                n.start_soon(call)
                with trio.fail_after(10):
                    while True:  # until the host has part of the reply, not all of it
                        busy = [w for w in pool._checkout.workers if w.inflight]
                        if busy and 0 < len(busy[0].decoder._buf) - busy[0].decoder._pos < size:
                            break
                        await trio.sleep(0)
                kill_quietly([busy[0].pid])
            assert results == [b"x" * size]
            retried = [e for e in events if e.kind == "call_retried"]
            assert [e.data["category"] for e in retried] == ["connection_error"]
            exits = [e for e in events if e.kind == "worker_exited"]
            assert [(e.data["exit_code"], e.data["reason"]) for e in exits] == [(-9, "port_exited")]


class Ticker:
    """A task that only yields and counts its turns: evidence that other tasks got to run."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.sleep(0)


async def test_a_big_reply_streaming_in_does_not_starve_other_tasks() -> None:
    """A 32 MB reply arrives in 512 reads that may all succeed without waiting: the host yields
    between them, so other tasks (callers, the timer, a heartbeat) keep running meanwhile."""
    ticker = Ticker()

    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            async with trio.open_nursery() as n:
                n.start_soon(ticker.run)
                await trio.sleep(0.05)
                before = ticker.ticks
                assert len(await pool.execute("big_result", 32 * 2**20)) == 32 * 2**20
                assert ticker.ticks - before >= 100
                n.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# SIGSTOP: a worker that stops answering
# ---------------------------------------------------------------------------------------------


async def busy_worker(pool: Any) -> WorkerStatistics:
    with trio.fail_after(5):
        while True:
            busy = [w for w in pool.statistics().workers if w.busy]
            if busy:
                return busy[0]
            await trio.sleep(0.005)


# The chaos fixture kills at the test's end what is still stopped (a test that failed first).


async def test_sigstop_mid_call_is_caught_by_the_call_deadline(chaos: Chaos) -> None:
    config = attrs.evolve(CONFIG, size=2)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            async with trio.open_nursery() as n:
                result: list[BaseException] = []

                async def call() -> None:
                    with pytest.raises(PoolTimeoutError) as info:
                        await pool.execute("sleep_idem", 0.3, timeout=1.0)
                    result.append(info.value)

                t0 = trio.current_time()
                n.start_soon(call)
                pid = (await chaos.stop_worker(pool, worker=(await busy_worker(pool)).slot)).pid
            elapsed = trio.current_time() - t0
            assert 0.9 <= elapsed < 3.0
            (err,) = result
            assert err.category == "timeout_error" and err.may_have_run
            await wait_gone([pid], zombies_too=True)  # killed (SIGKILL ends a stopped process) and reaped
            await wait_full(pool)
            assert pid not in pool.worker_pids()
            assert await pool.execute("echo", 1) == 1


async def test_sigstop_mid_call_with_an_attempt_timeout_is_retried_elsewhere(chaos: Chaos) -> None:
    config = attrs.evolve(CONFIG, size=2, attempt_timeout=0.5)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            async with trio.open_nursery() as n:
                results: list[object] = []

                async def call() -> None:
                    results.append(await pool.execute("sleep_idem", 0.2, timeout=10))

                n.start_soon(call)
                pid = (await chaos.stop_worker(pool, worker=(await busy_worker(pool)).slot)).pid
            assert results == [0.2]
            assert pool.statistics().retries == 1
            await wait_gone([pid], zombies_too=True)
            await wait_full(pool)


async def test_sigstop_idle_worker_is_caught_by_the_heartbeat_and_calls_keep_working(chaos: Chaos) -> None:
    config = attrs.evolve(CONFIG, size=2, heartbeat_interval=0.2, heartbeat_timeout=0.3)
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            # The checkout takes the idle worker that went idle last, so the calls below keep to
            # the other one: stop the first, which stays idle for the heartbeat to find. (A call
            # written to a stopped worker before its ping would wait for its own deadline.)
            first = pool.worker_pids()[0]
            slot = next(w.slot for w in pool.statistics().workers if w.pid == first)
            pid = (await chaos.stop_worker(pool, worker=slot)).pid
            t0 = trio.current_time()
            # Calls go on meanwhile; one routed to the stopped worker once its ping is out is
            # failed by the heartbeat kill and retried (echo is idempotent).
            for i in range(30):
                assert await pool.execute("echo", i, timeout=10) == i
                await trio.sleep(0.05)
            await wait_gone([pid], timeout=5, zombies_too=True)
            assert trio.current_time() - t0 < 5
            await wait_full(pool)
            assert pool.statistics().calls_failed == 0


# ---------------------------------------------------------------------------------------------
# The crash-phase table: where a call can fail, and what the caller and the worker get
# ---------------------------------------------------------------------------------------------


@attrs.frozen
class Phase:
    """One row of the crash-phase table."""

    phase: str  # where the failure happens
    provoked: str  # how the test makes it happen
    command: str
    args: Any
    outcome: str  # the class the caller gets, or "result"
    category: str | None
    caller_fault: bool | None
    may_have_run: bool | None
    attempts: int  # attempts the pool made (1 = not retried)
    worker: str  # "same" (kept serving) or "replaced"
    ran: int | None = None  # times the side effect actually happened (log_effect rows)
    garbage_to_worker: bool = False
    timeout: float | None = None


GARBAGE = b"\xff\xff\xff\xffnot a frame"

PHASES = [
    pytest.param(
        Phase("host encodes the arguments", "`echo` with an `object()` argument", "echo",
              {"x": object()}, "CallerError", "communication_error", True, False, 1, "same"),
        id="host-encodes-args",
    ),
    pytest.param(
        Phase("host encodes the arguments", "`echo` with arguments over `max_frame_size`", "echo",
              "x" * 2000, "CallerError", "communication_error", True, False, 1, "same"),
        id="host-encodes-oversized-args",
    ),
    pytest.param(
        Phase("worker decodes the request", "garbage bytes on the worker's stdin, then a "
              "non-idempotent `log_effect` behind them", "log_effect", None,
              "WorkerConnectionError", "connection_error", False, True, 1, "replaced", ran=0,
              garbage_to_worker=True),
        id="worker-decodes-garbage",
    ),
    pytest.param(
        Phase("worker decodes the request", "garbage bytes on the worker's stdin, then an "
              "idempotent `echo` behind them", "echo", "behind garbage", "result", None, None,
              None, 2, "replaced", garbage_to_worker=True),
        id="worker-decodes-garbage-idempotent",
    ),
    pytest.param(
        Phase("worker decodes the request", "`echo` with a tuple dict key (msgpack: an array key)",
              "echo", {(1, 2): "x"}, "result", None, None, None, 1, "same"),
        id="worker-decodes-tuple-keys",
    ),
    pytest.param(
        Phase("inside the handler", "`raise_error`", "raise_error", "boom", "RemoteError",
              "python_error", False, True, 2, "same"),
        id="handler-raises",
    ),
    pytest.param(
        Phase("inside the handler", "`sleep` with a bad argument (a declared caller error)", "sleep",
              "not a number", "RemoteError", "python_error", True, True, 1, "same"),
        id="handler-raises-caller-error",
    ),
    pytest.param(
        Phase("inside the handler", "`raise_error` with a message over the frame limit",
              "raise_error", "y" * 900, "RemoteError", "python_error", False, True, 2, "same"),
        id="handler-raises-huge-message",
    ),
    pytest.param(
        Phase("inside the handler", "`crash` (the process exits)", "crash", 1,
              "WorkerConnectionError", "connection_error", False, True, 1, "replaced"),
        id="handler-exits",
    ),
    pytest.param(
        Phase("inside the handler", "`hang` with `timeout=0.5`", "hang", None, "PoolTimeoutError",
              "timeout_error", False, True, 1, "replaced", timeout=0.5),
        id="handler-hangs",
    ),
    pytest.param(
        Phase("worker encodes the result", "`unencodable_result` (returns an `object()`)",
              "unencodable_result", None, "CommunicationError", "communication_error", False, True,
              4, "same"),
        id="worker-encodes-unencodable",
    ),
    pytest.param(
        Phase("worker encodes the result", "`big_result` over `max_frame_size`", "big_result", 4096,
              "CommunicationError", "communication_error", False, True, 4, "same"),
        id="worker-encodes-oversized",
    ),
    pytest.param(
        Phase("host decodes the reply", "`garbage` (bytes that are not a frame)", "garbage", None,
              "CommunicationError", "communication_error", False, True, 1, "replaced"),
        id="host-decodes-garbage",
    ),
    pytest.param(
        Phase("host decodes the reply", "`oversized_frame` (a header over `max_frame_size`)",
              "oversized_frame", 1 << 20, "CommunicationError", "communication_error", False, True,
              1, "replaced"),
        id="host-decodes-oversized-frame",
    ),
    pytest.param(
        Phase("host decodes the reply", "`tuple_keys` (a result with a tuple dict key)",
              "tuple_keys", "v", "result", None, None, None, 1, "same"),
        id="host-decodes-tuple-keys",
    ),
]


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def render_table() -> str:
    """The crash-phase table as markdown (the README shows it)."""
    rows = [
        "| phase | provoked by | caller gets | category | caller_fault | may_have_run | attempts | worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for param in PHASES:
        (p,) = param.values
        outcome = "the result" if p.outcome == "result" else f"`{p.outcome}`"
        if p.ran == 0:
            outcome += " (it never ran, which the host cannot tell)"
        rows.append(
            f"| {p.phase} | {p.provoked} | {outcome} | {p.category or '-'} | "
            f"{_yes_no(p.caller_fault)} | {_yes_no(p.may_have_run)} | {p.attempts} | {p.worker} |"
        )
    return "\n".join(rows) + "\n"


DOCS_INTRO = """\
### What a failure costs, by where it happens

Each row is one case of `tests/test_chaos.py::test_crash_phase` (a pool of one worker,
`max_frame_size=1024`, the default error matrix with shorter delays), run against real worker processes.
*attempts* counts the pool's own retries and failover (with one worker, a failover runs on the
same worker); *worker* says whether the worker kept serving (same pid) or was killed and replaced.
A worker killed while it writes its reply leaves the host half a frame: that is reported as a lost
worker (`WorkerConnectionError`, retried if idempotent), not as a bad frame.

"""


@pytest.mark.parametrize("row", PHASES)
async def test_crash_phase(row: Phase, tmp_path: Path) -> None:
    config = attrs.evolve(CONFIG, size=1, max_frame_size=1024)
    args = row.args
    effects = tmp_path / "effects.log"
    if row.command == "log_effect":
        args = {"path": str(effects), "id": "x"}
    stopped: list[int] = []
    outcome: Any = None
    try:
        with trio.fail_after(30):
            async with open_pool(config) as pool:
                (before,) = pool.worker_pids()

                async def call() -> None:
                    nonlocal outcome
                    try:
                        outcome = await pool.execute(row.command, args, timeout=row.timeout)
                    except PoolError as exc:
                        outcome = exc

                if row.garbage_to_worker:
                    # Stopped, the worker cannot read before both the garbage and the request
                    # are in its pipe: the request is sent, behind bytes it cannot decode.
                    os.kill(before, signal.SIGSTOP)
                    stopped.append(before)
                    await wait_stopped(before)
                    pool._checkout.workers[0].proc.write(GARBAGE)
                    async with trio.open_nursery() as n:
                        n.start_soon(call)
                        await busy_worker(pool)
                        os.kill(before, signal.SIGCONT)
                else:
                    await call()

                stats = pool.statistics()
                assert stats.retries + stats.failovers + 1 == row.attempts
                if row.outcome == "result":
                    expected = {"echo": args, "tuple_keys": {(1, 2): args, "state": {(1, 2): args}}}
                    assert outcome == expected[row.command]
                else:
                    assert isinstance(outcome, PoolError), outcome
                    assert type(outcome).__name__ == row.outcome, outcome
                    assert str(outcome.category) == row.category
                    assert outcome.caller_fault is row.caller_fault
                    assert outcome.may_have_run is row.may_have_run
                    assert outcome.context.get("attempt", 1) == row.attempts
                if row.worker == "same":
                    assert pool.worker_pids() == [before] and alive(before)
                    assert pool.statistics().restarts == 0
                else:
                    await wait_gone([before], zombies_too=True)
                    await wait_full(pool)
                    assert pool.worker_pids() != [before]
                if row.ran is not None:
                    ran = effects.read_text().count("x") if effects.exists() else 0
                    assert ran == row.ran
                # whatever happened, the pool serves the next call
                assert await pool.execute("echo", "next") == "next"
    finally:
        release_stopped(stopped)


def test_readme_table_is_current() -> None:
    """The README's crash-phase table is this file's (print it with: python tests/test_chaos.py)."""
    assert render_table() in (HERE.parent / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Grandchildren: processes a handler started die with its worker
# ---------------------------------------------------------------------------------------------


async def test_grandchild_dies_when_the_deadline_kills_its_worker(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    child = 0
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            (worker,) = pool.worker_pids()
            try:
                with pytest.raises(PoolTimeoutError):
                    await pool.execute("spawn_child_and_hang", str(pid_file), timeout=1.5)
                child = int(pid_file.read_text())
                await wait_gone([worker, child], timeout=5)
                await wait_full(pool)
            finally:
                if child and alive(child):
                    kill_quietly([child])


HOST_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time, psutil, trio
    from pool import open_pool, PoolConfig

    MODE, PID_FILE = sys.argv[1], sys.argv[2]
    # Ctrl-C as in a terminal (a job a shell started in the background begins with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    async def main():
        config = PoolConfig(size=2, handlers=["bridge_worker.builtin", "handlers_extra"],
                            shutdown_grace=0.5)
        async with open_pool(config) as p:
            async with trio.open_nursery() as n:
                n.start_soon(p.execute, "spawn_child_and_hang", PID_FILE)
                n.start_soon(p.execute, "sleep", 60)
                while not os.path.exists(PID_FILE) or not open(PID_FILE).read():
                    await trio.sleep(0.01)
                child = int(open(PID_FILE).read())
                print(json.dumps({"workers": p.worker_pids(), "child": child}), flush=True)
                await trio.sleep(120)

    try:
        trio.run(main)
    except* KeyboardInterrupt:  # raised in the script's own nursery, which wraps it in a group
        print(json.dumps({"interrupted": True}), flush=True)
    # What is left of this process's children: nothing, not even a zombie.
    left = []
    for c in psutil.Process().children(recursive=True):
        try:
            left.append([c.pid, c.status()])
        except psutil.Error:
            pass
    print(json.dumps({"children": left}), flush=True)
    """
)


async def run_host(mode: str, tmp_path: Path, end: Callable[[subprocess.Popen[str]], None]) -> list[str]:
    """Run a pool in a host process whose worker is busy in a handler with a grandchild; end the
    host with ``end``; check that no worker and no grandchild survive it. Returns its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST_SCRIPT, mode, str(tmp_path / "child.pid")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        started = json.loads(line)
        pids = started["workers"] + [started["child"]]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        end(proc)
        with trio.fail_after(15):
            out = await trio.to_thread.run_sync(proc.stdout.read)
            await trio.to_thread.run_sync(proc.wait)
        t0 = time.monotonic()
        await wait_gone(pids, timeout=5)
        assert time.monotonic() - t0 < 1.0  # none alive 1 s after the host is gone
        return out.splitlines()
    finally:
        proc.kill()
        proc.wait()
        kill_quietly([p for p in pids if alive(p)])


async def test_grandchild_and_workers_die_when_the_host_is_sigkilled(tmp_path: Path) -> None:
    out = await run_host("kill", tmp_path, lambda proc: proc.kill())
    assert out == []  # killed: it said nothing more


async def test_keyboard_interrupt_closes_the_pool_and_reaps_everything(tmp_path: Path) -> None:
    out = await run_host("sigint", tmp_path, lambda proc: proc.send_signal(signal.SIGINT))
    assert json.loads(out[0]) == {"interrupted": True}
    assert json.loads(out[-1]) == {"children": []}  # no worker, no grandchild, no zombie


# ---------------------------------------------------------------------------------------------
# Shutdown: aclose and cancellation leave nothing behind
# ---------------------------------------------------------------------------------------------


class RecordingLauncher(LocalLauncher):
    """A LocalLauncher that remembers every pid it spawned (and counts spawns)."""

    def __init__(self, config: PoolConfig) -> None:
        super().__init__(config.python, dict(config.env))
        self.pids: list[int] = []

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> Any:
        proc = super().launch(handlers, max_frame_size, max_session_state)
        self.pids.append(proc.pid)
        return proc


async def test_aclose_with_calls_and_sessions_in_flight_leaves_no_process() -> None:
    config = attrs.evolve(CONFIG, shutdown_grace=0.3)
    launcher = RecordingLauncher(config)
    outcomes: list[BaseException | object] = []
    with trio.fail_after(30):
        async with open_pool(config, launcher=launcher) as pool:

            async def call(*a: Any, session: str | None = None) -> None:
                try:
                    if session is None:
                        outcomes.append(await pool.execute(*a))
                    else:
                        outcomes.append(await pool.execute_in_session(session, *a))
                except PoolError as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(call, "hang")
                n.start_soon(call, "sleep", 30)
                for i in range(6):
                    n.start_soon(functools.partial(call, "sleep_idem", 0.2, session=f"s{i % 3}"))
                for i in range(20):
                    n.start_soon(call, "echo", i)
                await trio.sleep(0.1)
                t0 = trio.current_time()
                await pool.aclose()
                assert trio.current_time() - t0 < 3
        # Calls that finished within the grace got their results; the rest PoolClosedError.
        assert all(isinstance(o, PoolClosedError) or not isinstance(o, BaseException) for o in outcomes)
        assert sum(isinstance(o, PoolClosedError) for o in outcomes) >= 2  # hang and sleep 30
    assert not any(exists(p) for p in launcher.pids)
    assert my_workers() == []


async def test_cancelling_the_application_leaves_no_process() -> None:
    """Cancel the scope around a pool at many points: while workers start, while calls run."""
    spawned: list[int] = []
    with trio.fail_after(60):
        for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.3, 0.6):
            launcher = RecordingLauncher(CONFIG)
            with trio.move_on_after(delay):
                async with open_pool(CONFIG, launcher=launcher) as pool:
                    async with trio.open_nursery() as n:
                        n.start_soon(pool.execute, "hang")
                        n.start_soon(pool.execute_in_session, "s", "sleep_idem", 10)
                        for i in range(8):
                            n.start_soon(pool.execute, "echo", i)
                        await trio.sleep_forever()
            spawned += launcher.pids
            assert not any(exists(p) for p in launcher.pids), delay
    assert spawned and my_workers() == []


async def test_aclose_in_the_middle_of_a_sigkill_storm(chaos: Chaos) -> None:
    """Close the pool while workers are being killed and replaced and callers keep calling:
    close is prompt, every caller gets a result or PoolClosedError (or, idempotent, a connection
    error past its retry cap), nothing hangs, no process is left."""
    config = attrs.evolve(CONFIG, shutdown_grace=0.3)
    launcher = RecordingLauncher(config)
    unexpected: list[BaseException] = []
    closed = 0
    with trio.fail_after(60):
        async with open_pool(config, launcher=launcher) as pool:

            async def caller(c: int) -> None:
                nonlocal closed
                i = 0
                while True:
                    try:
                        if c % 2:
                            await pool.execute_in_session(f"s{c}", "append_once", {"id": i})
                        else:
                            await pool.execute("sleep_idem", 0.005)
                    except PoolClosedError:
                        closed += 1
                        return
                    except WorkerConnectionError as exc:
                        if "The pool is closing" in exc.message:
                            # Its worker died during the shutdown grace: reported as lost, with
                            # its signal, and not tried again (issue 10).
                            closed += 1
                            return
                        if exc.context.get("attempt", 1) <= CONNECTION_RETRY_CAP:
                            unexpected.append(exc)
                    except BaseException as exc:  # pragma: no cover - reported below
                        unexpected.append(exc)
                        raise
                    i += 1

            async with chaos.killing(pool, every=0.01) as kills:
                async with trio.open_nursery() as callers:
                    for c in range(12):
                        callers.start_soon(caller, c)
                    await trio.sleep(1.0)
                    t0 = trio.current_time()
                    await pool.aclose()
                    assert trio.current_time() - t0 < 3
                    # Callers between two attempts (in a retry's backoff) learn it on their next
                    # attempt: every caller ends by itself, promptly.
                    with trio.fail_after(2):
                        while closed < 12:
                            await trio.sleep(0.01)
    assert not unexpected, unexpected
    # A storm was on: a hundred ticks, of which those that found every worker restarting (or
    # came while the event loop was busy spawning) killed nothing. (The Killer helper this test
    # had made 10 to 15 kills here on a busy machine, and failed asking for 20.)
    assert closed == 12 and len(kills) >= 5
    assert not any(exists(p) for p in launcher.pids)
    assert my_workers() == []


async def test_a_call_waiting_to_retry_when_the_pool_closes_fails_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A call sleeping in its backoff when the pool closes gets PoolClosedError when it wakes (the
    timer that would enforce its deadline is gone), saying it may have run (its earlier attempts
    did), instead of waiting forever for a worker."""
    from fake_worker import FakeLauncher

    with trio.fail_after(100):
        async with trio.open_nursery() as outer:
            async with open_pool(PoolConfig(size=1), launcher=FakeLauncher(outer)) as pool:
                errors: list[PoolError] = []

                async def call() -> None:
                    with pytest.raises(PoolClosedError) as info:
                        await pool.execute("crash_idem", 1)  # every attempt kills its worker
                    errors.append(info.value)

                async with trio.open_nursery() as n:
                    n.start_soon(call)
                    await trio.sleep(0.5)  # attempts 1 and 2 failed; it backs off for 1 s
                    assert pool.statistics().retries == 2
                    t0 = trio.current_time()
                    await pool.aclose()
                (err,) = errors
                assert trio.current_time() - t0 < 1.0
                assert err.may_have_run
            outer.cancel_scope.cancel()


async def test_fast_failing_calls_still_let_other_tasks_run() -> None:
    """A call that fails at once (closed pool, unknown command, bad arguments) still yields to
    the scheduler, like any trio await: a caller that retries in a tight loop cannot starve the
    pool's tasks (and the test is bounded by iterations, not by a timeout it could starve too)."""
    ticker = Ticker()
    reached_the_end = False

    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            async with trio.open_nursery() as n:
                n.start_soon(ticker.run)
                for call in (
                    lambda: pool.execute("no_such_command"),
                    lambda: pool.execute("echo", object()),
                ):
                    before = ticker.ticks
                    for _ in range(200):
                        with pytest.raises(CallerError):
                            await call()
                    assert ticker.ticks - before >= 100
                await pool.aclose()  # the body goes on after an explicit aclose
                before = ticker.ticks
                for _ in range(200):
                    with pytest.raises(PoolClosedError):
                        await pool.execute("echo", 1)
                assert ticker.ticks - before >= 100
                reached_the_end = True
                n.cancel_scope.cancel()
    assert reached_the_end


# ---------------------------------------------------------------------------------------------
# Memory limits under load
# ---------------------------------------------------------------------------------------------


async def test_memory_soft_limit_recycles_under_concurrent_load() -> None:
    config = attrs.evolve(
        CONFIG, size=2, max_worker_memory=80 * 2**20, memory_check_interval=0.05
    )
    with trio.fail_after(60):
        async with open_pool(config) as pool:
            stop = False
            done = 0

            async def load(c: int) -> None:
                nonlocal done
                i = 0
                while not stop:
                    assert await pool.execute("echo", [c, i]) == [c, i]
                    assert await pool.execute_in_session(f"load-{c}", "append_once", {"id": i}) > 0
                    done += 1
                    i += 1

            async with trio.open_nursery() as n:
                for c in range(8):
                    n.start_soon(load, c)
                for _ in range(3):
                    before = set(pool.worker_pids())
                    assert await pool.execute("alloc", 120) == 120
                    with trio.fail_after(10):
                        while before <= set(pool.worker_pids()):  # the big one was recycled
                            await trio.sleep(0.01)
                stop = True
            await wait_full(pool)
            stats = pool.statistics()
            assert stats.calls_failed == 0 and stats.retries == 0  # recycling is graceful
            assert stats.restarts >= 3 and done > 100
            assert pool.health()["status"] == "healthy"
            for c in range(8):  # sessions moved with their state
                state = await pool.execute_in_session(f"load-{c}", "get_state")
                assert state["log"] == sorted(set(state["log"]))


# ---------------------------------------------------------------------------------------------
# Crash loop: the pool circuit
# ---------------------------------------------------------------------------------------------


async def test_crash_loop_opens_the_pool_circuit_then_recovers(tmp_path: Path) -> None:
    marker = tmp_path / "crash-loop"
    circuit = BreakerConfig(failure_threshold=3, success_threshold=1, timeout=1.0, half_open_requests=1)
    events: list[Any] = []
    config = attrs.evolve(
        CONFIG,
        size=2,
        handlers=["bridge_worker.builtin", "handlers_marker"],
        env={"CHAOS_MARKER": str(marker)},
        pool_circuit=circuit,
        event_callbacks=[events.append],
    )
    launcher = RecordingLauncher(config)
    with trio.fail_after(60):
        async with open_pool(config, launcher=launcher) as pool:
            assert await pool.execute("marker_ok") == "ok"
            marker.write_text("")
            t0 = trio.current_time()
            spawned = len(launcher.pids)
            kill_quietly(pool.worker_pids())
            with trio.fail_after(10):
                while pool.statistics().pool_circuit != "open":
                    await trio.sleep(0.01)
            assert pool.health()["status"] == "unhealthy"
            assert "crash loop on purpose" in pool.health()["last_start_error"]
            # Calls fail fast with the startup error while the circuit is open.
            for _ in range(5):
                t1 = time.monotonic()
                with pytest.raises(InitializationError) as info:
                    await pool.execute("marker_ok")
                assert time.monotonic() - t1 < 0.5  # no waiting for a worker start
                assert "handlers_marker" in str(info.value) and "crash loop on purpose" in str(info.value)
                assert info.value.retry_after is not None
                await trio.sleep(0.3)
            # No restart storm: the failures that opened it, at most one start in flight per other
            # slot, then one trial start per circuit timeout.
            await trio.sleep(2.0)
            window = trio.current_time() - t0
            starts = len(launcher.pids) - spawned
            bound = circuit.failure_threshold + config.size + int(window / circuit.timeout) + 1
            assert circuit.failure_threshold <= starts <= bound, (starts, bound, window)
            assert pool.statistics().failed_starts == starts
            assert not [e for e in events if e.kind == "worker_started" and e.time > t0]

            marker.unlink()
            t2 = trio.current_time()
            with trio.fail_after(circuit.timeout + 5.0):
                while True:
                    try:
                        assert await pool.execute("marker_ok") == "ok"
                        break
                    except InitializationError:
                        await trio.sleep(0.02)
            assert trio.current_time() - t2 < circuit.timeout + 5.0
            await wait_full(pool)
            assert pool.statistics().pool_circuit == "closed"
            assert pool.health()["status"] == "healthy"


async def test_closing_a_pool_whose_circuit_is_open_is_prompt(tmp_path: Path) -> None:
    marker = tmp_path / "crash-loop"
    config = attrs.evolve(
        CONFIG,
        size=2,
        handlers=["bridge_worker.builtin", "handlers_marker"],
        env={"CHAOS_MARKER": str(marker)},
        pool_circuit=BreakerConfig(failure_threshold=2, success_threshold=1, timeout=60.0, half_open_requests=1),
    )
    launcher = RecordingLauncher(config)
    with trio.fail_after(30):
        async with open_pool(config, launcher=launcher) as pool:
            marker.write_text("")
            kill_quietly(pool.worker_pids())
            while pool.statistics().pool_circuit != "open":
                await trio.sleep(0.01)
            await trio.sleep(0.5)  # every slot waits for the circuit now (60 s)
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 2.0
    assert not any(exists(p) for p in launcher.pids)


# ---------------------------------------------------------------------------------------------
# Leaks: file descriptors, threads, memory
# ---------------------------------------------------------------------------------------------


def own_threads() -> int:
    """Live threads, not counting trio's cache of idle worker threads."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("Trio thread"))


async def restart_workers(pool: Any, restarts: int) -> None:
    """SIGKILL ready workers until the pool has restarted ``restarts`` more of them."""
    target = pool.statistics().restarts + restarts
    rng = random.Random(3)
    with trio.fail_after(120):
        while pool.statistics().restarts < target:
            ready = [w.pid for w in pool.statistics().workers if w.state in SERVING]
            if ready and len(ready) + pool.statistics().restarts - (target - restarts) <= restarts * 2:
                kill_quietly([rng.choice(ready)])
            await trio.sleep(0.005)
    await wait_full(pool)


async def test_no_fd_or_thread_leak_over_200_restarts() -> None:
    me = psutil.Process()
    with trio.fail_after(150):
        async with open_pool(CONFIG) as pool:
            await restart_workers(pool, 8)  # warm up
            fds, threads = me.num_fds(), own_threads()
            async with trio.open_nursery() as n:

                async def load() -> None:
                    while True:
                        await survive_kills(lambda: pool.execute("echo", 1))

                for _ in range(4):
                    n.start_soon(load)
                await restart_workers(pool, 200)
                n.cancel_scope.cancel()
            await wait_full(pool)
            # Tolerance: none, once the last replacement is up. The pool spawns from the trio
            # thread and runs no thread of its own; trio's idle worker threads (left by other
            # tests' to_thread calls, gone after 10 s idle) are not counted.
            with trio.fail_after(5):
                while me.num_fds() != fds or own_threads() != threads:
                    await trio.sleep(0.05)
            assert pool.statistics().restarts >= 208
        assert me.num_fds() < fds  # and closing releases the workers' fds


async def test_host_memory_does_not_grow_with_calls_sessions_and_restarts() -> None:
    """20k calls, 2k sessions opened and closed, 50 restarts after a warm-up of a quarter of that:
    the host's RSS grows by less than 10 MB and its live Python objects by less than 5000 (one
    leaked object per call or session would be 22000)."""
    me = psutil.Process()

    async def workload(pool: Any, calls: int, sessions: int, restarts: int) -> None:
        async def caller(c: int) -> None:
            for i in range(calls // 16):
                await survive_kills(lambda: pool.execute("echo", {"c": c, "i": i}))

        async def session_user(c: int) -> None:
            for i in range(sessions // 16):
                sid = f"mem-{c}-{i}"
                await survive_kills(lambda: pool.execute_in_session(sid, "append_once", {"id": 1}))
                await survive_kills(lambda: pool.execute_in_session(sid, "append_once", {"id": 2}))
                await pool.close_session(sid)

        async with trio.open_nursery() as n:
            for c in range(16):
                n.start_soon(caller, c)
                n.start_soon(session_user, c)
            n.start_soon(restart_workers, pool, restarts)

    with trio.fail_after(120):
        async with open_pool(CONFIG) as pool:
            await workload(pool, 5000, 500, 12)
            gc.collect()
            rss, objects = me.memory_info().rss, len(gc.get_objects())
            await workload(pool, 20000, 2000, 50)
            gc.collect()
            grew_rss = me.memory_info().rss - rss
            grew_objects = len(gc.get_objects()) - objects
            assert grew_rss < 10 * 2**20, grew_rss
            assert grew_objects < 5000, grew_objects
            stats = pool.statistics()
            assert stats.sessions == 0 and stats.queued == 0
            assert stats.calls_ok >= 0.99 * (25000 + 2 * 2500)


# ---------------------------------------------------------------------------------------------
# Fuzzing the host's decoder with what a broken worker might send
# ---------------------------------------------------------------------------------------------

EVIL_COMMANDS = (
    CommandInfo("echo", True, (), False, False),
    CommandInfo("evil", False, (), False, False),
)

#: What the broken worker sends, as pieces rendered once it knows the id of the request it got:
#: ("raw", bytes) or ("reply", id offset, result) or ("error", id offset, type, ran, caller_error).
#: Offsets: 0 answers that request; negative ones are stale ids; a huge one an id nobody used.
#: (A worker that forges a reply for a request it has not been sent yet, guessing the next
#: sequential id, cannot be told apart from a correct one: not part of this model.)
Piece = tuple[Any, ...]


def render(pieces: list[Piece], request_id: int) -> bytes:
    out = []
    for piece in pieces:
        if piece[0] == "raw":
            out.append(piece[1])
        elif piece[0] == "reply":
            out.append(encode(Reply(request_id + piece[1], piece[2], None)))
        else:
            _, offset, remote_type, ran, caller = piece
            out.append(encode(ErrorReply(request_id + offset, remote_type, "m", "tb", ran, caller)))
    return b"".join(out)


class EvilLauncher:
    """In-process workers over memory channels (virtual time). The first one launched answers the
    ``evil`` command with the bytes under test, in chunks (then optionally closes its channel);
    every worker answers ``echo`` and pings properly."""

    def __init__(self, pieces: list[Piece], split_at: list[int], close_after: bool) -> None:
        self.pieces = pieces
        self.split_at = split_at
        self.close_after = close_after
        self.launched: list[EvilProcess] = []

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> "EvilProcess":
        proc = EvilProcess(self, evil=not self.launched)
        self.launched.append(proc)
        return proc

    def open(self, config: PoolConfig) -> None:
        pass

    def close(self) -> None:
        pass


class EvilProcess(ChannelProcess):
    def __init__(self, launcher: EvilLauncher, evil: bool) -> None:
        super().__init__()
        self.launcher = launcher
        self.evil = evil
        self.evil_request: Request | None = None
        self.sent = b""
        self.emit_bytes(encode(Hello(PROTOCOL_VERSION, self.pid, EVIL_COMMANDS)))

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.code is not None:
            raise BrokenPipeError("evil worker is gone")
        self._decoder.receive_data(data)
        for msg in self._decoder:
            if isinstance(msg, Request) and msg.command == "evil" and self.evil:
                self.evil_request = msg
                self.sent = render(self.launcher.pieces, msg.id)
                cuts = sorted({p % (len(self.sent) + 1) for p in self.launcher.split_at} | {0, len(self.sent)})
                for a, b in zip(cuts, cuts[1:]):
                    self.emit_bytes(self.sent[a:b])
                if self.launcher.close_after:
                    self.exit(1)
            elif isinstance(msg, Request):
                self.emit_bytes(encode(Reply(msg.id, msg.args, None)))
            elif isinstance(msg, Ping):
                self.emit_bytes(encode(Pong(msg.id, None)))
            elif isinstance(msg, Shutdown):
                self.exit(0)


def first_answer(data: bytes, request_id: int) -> Reply | ErrorReply | None:
    """The reply the host must hand to request ``request_id``: the first one for that id among the
    messages it accepts from a serving worker (replies, error replies, pongs) before anything
    else (a bad frame, an unexpected message) makes it kill the worker."""
    decoder = Decoder()
    decoder.receive_data(data)
    try:
        for msg in decoder:
            if isinstance(msg, (Reply, ErrorReply)):
                if msg.id == request_id:
                    return msg
            elif not isinstance(msg, Pong):
                return None
    except Exception:
        return None
    return None


def _frame(body: Any) -> bytes:
    import msgpack

    data = msgpack.packb(body)
    return len(data).to_bytes(4, "big") + data


offsets = st.sampled_from([0, 0, -1, -2, 10**6])
junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.text(max_size=5), st.binary(max_size=5))
raw = st.one_of(
    st.binary(max_size=40),  # anything
    st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: n.to_bytes(4, "big")),  # a header
    st.builds(lambda i: encode(Pong(i, None)), st.integers(0, 9)),
    st.just(encode(Hello(PROTOCOL_VERSION, 1, EVIL_COMMANDS))),
    st.just(encode(StartupFailed("m", "boom", "tb"))),
    st.just(encode(Ping(1))),
    st.lists(junk, max_size=7).map(_frame),  # well-framed bodies of any shape
    st.builds(lambda f, n: f[:n], st.lists(junk, max_size=7).map(_frame), st.integers(0, 12)),
).map(lambda b: ("raw", b))
worker_output = st.lists(
    st.one_of(
        raw,
        st.tuples(st.just("reply"), offsets, junk),
        st.tuples(st.just("error"), offsets, st.sampled_from(["RuntimeError", "EncodeError",
                  "SessionNotFound", "SessionStateTooLarge", "UnknownCommand"]), st.booleans(), st.booleans()),
    ),
    max_size=6,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=worker_output,
    split_at=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
    close_after=st.booleans(),
)
def test_fuzz_host_decoder_with_worker_output(pieces: list[Piece], split_at: list[int], close_after: bool) -> None:
    """Whatever a worker sends after its hello, only that worker's call is affected: it gets the
    reply the bytes hold for it, if any, else a communication, connection or timeout error; other
    callers get exactly their own results; nothing escapes the pool, nothing hangs."""

    async def main() -> None:
        with trio.fail_after(600):  # virtual seconds: a hang fails, fast
            launcher = EvilLauncher(pieces, split_at, close_after)
            config = PoolConfig(size=2, attempt_timeout=5.0, timeout=60.0, policy=FAST_POLICY)
            async with open_pool(config, launcher=launcher) as pool:
                evil = launcher.launched[0]
                (good,) = [w for w in pool._checkout.workers if w.pid != evil.pid]
                outcome: Any = None
                others: list[Any] = []

                async def evil_call() -> None:
                    nonlocal outcome
                    try:
                        outcome = await pool.execute("evil", None, timeout=20)
                    except PoolError as exc:
                        outcome = exc

                async def other_call(i: int) -> None:
                    others.append(await pool.execute("echo", i, timeout=60))

                async with trio.open_nursery() as n:
                    pool._checkout.idle.remove(good)  # so the first call goes to the evil worker
                    n.start_soon(evil_call)
                    for _ in range(100):
                        if evil.evil_request is not None:
                            break
                        await trio.sleep(0)
                    pool._checkout.idle.append(good)
                    for i in range(6):
                        n.start_soon(other_call, i)
                assert sorted(others) == list(range(6))
                assert evil.evil_request is not None
                answer = first_answer(evil.sent, evil.evil_request.id)
                event(f"answer: {type(answer).__name__}; outcome: {type(outcome).__name__}")
                if answer is None:
                    assert isinstance(
                        outcome, (CommunicationError, WorkerConnectionError, PoolTimeoutError)
                    ), outcome
                elif isinstance(answer, Reply):
                    assert not isinstance(outcome, BaseException) and outcome == answer.result
                elif answer.handler_ran:
                    assert isinstance(outcome, PoolError), outcome
                else:  # it did not run: the pool may run it again, on the good worker (echo)
                    assert isinstance(outcome, PoolError) or outcome is None, outcome
                assert await pool.execute("echo", "after") == "after"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


if __name__ == "__main__":
    sys.stdout.write(DOCS_INTRO + render_table())
