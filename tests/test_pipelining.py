"""Pipelining: calls of commands declared ``pipelined`` are written behind the calls a busy worker
is running (up to ``PoolConfig.pipeline_depth``), everything else waits for a free worker. On the
fake worker (which answers pipelined requests one after the other, as a real one does) and trio's
autojump_clock, at exact virtual times; the last tests use real workers."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from bridge_worker import command
from bridge_worker.protocol import NEED_DATA, Decoder, Hello, Reply, Request, encode
from conftest import ALL_HANDLERS, wait_gone
from fake_worker import FakeLauncher, fake_launcher
from pool import PoolConfig, PoolTimeoutError, open_pool

ONE = PoolConfig(size=1, pipeline_depth=3)


class Recorder:
    """Runs calls in the background and records when each one ended and how."""

    def __init__(self, pool: Any, nursery: trio.Nursery) -> None:
        self.pool = pool
        self.nursery = nursery
        self.t0 = trio.current_time()
        self.ended: dict[str, tuple[float, Any]] = {}

    def start(self, name: str, command: str, args: Any, session: str | None = None, **kw: Any) -> None:
        async def run() -> None:
            try:
                if session is None:
                    result: Any = await self.pool.execute(command, args, **kw)
                else:
                    result = await self.pool.execute_in_session(session, command, args, **kw)
            except Exception as exc:  # recorded, and checked by the test
                result = exc
            self.ended[name] = (round(trio.current_time() - self.t0, 6), result)

        self.nursery.start_soon(run)

    def order(self) -> list[str]:
        return sorted(self.ended, key=lambda name: self.ended[name][0])


async def settle() -> None:
    """Let every started call get as far as it can (written, or queued) before going on."""
    await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def fake_pool(config: PoolConfig) -> AsyncIterator[tuple[FakeLauncher, Any]]:
    """A pool of fake workers, the whole test bounded in (virtual) time."""
    with trio.fail_after(100):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            yield launcher, pool


@asynccontextmanager
async def recording(pool: Any) -> AsyncIterator[Recorder]:
    """Calls started on the recorder run in the background; the block ends when all have."""
    async with trio.open_nursery() as nursery:
        yield Recorder(pool, nursery)


def written(launcher: FakeLauncher, index: int = 0) -> list[Any]:
    """The args of each request the fake worker got, in order."""
    return [r.args for r in launcher.launched[index].requests]


async def test_pipelined_calls_are_written_behind_a_busy_worker_and_answered_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(ONE) as (launcher, pool):
        async with recording(pool) as rec:
            for i, seconds in enumerate([1.0, 1.5, 2.0, 0.5]):
                rec.start(f"c{i}", "psleep", seconds)
                await settle()
            await trio.sleep(0.1)
            # Three in flight (the depth); the fourth waits in the queue, unwritten.
            assert written(launcher) == [1.0, 1.5, 2.0]
            assert pool.statistics().queued == 1
        assert rec.ended == {
            "c0": (1.0, 1.0),
            "c1": (2.5, 1.5),
            "c2": (4.5, 2.0),
            "c3": (5.0, 0.5),  # written when c0 ended, answered after c2
        }
        assert written(launcher) == [1.0, 1.5, 2.0, 0.5]


async def test_a_command_not_declared_pipelined_waits_for_a_free_worker(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(ONE) as (launcher, pool):
        async with recording(pool) as rec:
            rec.start("p", "psleep", 1.0)
            await trio.sleep(0.1)
            rec.start("s", "sleep", 1.0)  # idempotent, not pipelined
            await trio.sleep(0.1)
            assert written(launcher) == [1.0]
        assert rec.ended == {"p": (1.0, 1.0), "s": (2.0, 1.0)}
        async with recording(pool) as rec:
            rec.start("s", "sleep", 1.0)
            await trio.sleep(0.1)
            rec.start("p", "psleep", 1.0)  # nothing is pipelined behind a call that is not
            await trio.sleep(0.1)
            assert written(launcher)[2:] == [1.0]
        assert rec.ended == {"s": (1.0, 1.0), "p": (2.0, 1.0)}


async def test_depth_one_turns_pipelining_off(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(attrs.evolve(ONE, pipeline_depth=1)) as (launcher, pool):
        async with recording(pool) as rec:
            rec.start("a", "psleep", 1.0)
            await settle()
            rec.start("b", "psleep", 1.0)
            await trio.sleep(0.5)
            assert written(launcher) == [1.0]
        assert rec.ended == {"a": (1.0, 1.0), "b": (2.0, 1.0)}


async def test_the_queue_keeps_its_order_around_a_call_that_cannot_be_pipelined(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = attrs.evolve(ONE, pipeline_depth=2)
    async with fake_pool(config) as (launcher, pool):
        async with recording(pool) as rec:
            for name, cmd in [("a", "psleep"), ("b", "psleep"), ("c", "sleep"), ("d", "psleep")]:
                rec.start(name, cmd, 1.0)
                await settle()
            await trio.sleep(1.5)
            # a ended, but d may not pass c: the pipeline drains, c runs alone, then d.
            assert written(launcher) == [1.0, 1.0]
        assert rec.order() == ["a", "b", "c", "d"]
        assert rec.ended["d"] == (4.0, 1.0)


async def test_a_session_call_waiting_for_its_worker_stops_the_pipeline_and_goes_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(ONE) as (launcher, pool):
        async with recording(pool) as rec:
            rec.start("a", "psleep", 1.0)
            await trio.sleep(0.1)
            rec.start("s", "psleep", 1.0, session="s1")  # a session call is never pipelined
            await trio.sleep(0.1)
            rec.start("b", "psleep", 1.0)  # would fit the pipeline, but s was first
            await trio.sleep(0.1)
            assert written(launcher) == [1.0]
        assert rec.order() == ["a", "s", "b"]
        assert rec.ended["b"] == (3.0, 1.0)


async def test_a_timed_out_call_fails_alone_and_its_neighbours_are_run_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(ONE) as (launcher, pool):
        async with recording(pool) as rec:
            rec.start("slow", "psleep", 10.0, timeout=2.0)
            await settle()
            rec.start("b", "psleep", 0.5)
            await settle()
            rec.start("c", "psleep", 0.5)
        (_, slow) = rec.ended["slow"]
        assert isinstance(slow, PoolTimeoutError) and rec.ended["slow"][0] == 2.0
        assert launcher.launched[0].code == -9
        # b and c were on the killed worker: lost with it, run again at once on the
        # replacement (up after its 0.01 s start), one after the other (in either order).
        assert sorted([rec.ended["b"], rec.ended["c"]]) == [(2.51, 0.5), (3.01, 0.5)]
        assert written(launcher, 1) == [0.5, 0.5]
        stats = pool.statistics()
        assert stats.retries == 2 and stats.calls_failed == 1 and stats.restarts == 1


async def test_cancelling_a_pipelined_call_leaves_its_worker_and_neighbours_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(ONE) as (launcher, pool):
        async with recording(pool) as rec:
            rec.start("a", "psleep", 1.0)
            await settle()
            with trio.move_on_after(0.5):
                await pool.execute("psleep", 1.0)  # b: cancelled in flight
            rec.start("c", "psleep", 1.0)
        # The worker still ran b (its reply was dropped): c ends after it.
        assert rec.ended == {"a": (1.0, 1.0), "c": (3.0, 1.0)}
        assert len(launcher.launched) == 1 and launcher.launched[0].code is None
        # Alone in flight, a cancelled call still kills its worker (the default).
        with trio.move_on_after(0.5):
            await pool.execute("psleep", 1.0)
        assert launcher.launched[0].code == -9


async def test_a_cancelled_call_left_to_finish_is_still_bounded_by_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(ONE) as (launcher, pool):
        async with recording(pool) as rec:
            rec.start("first", "psleep", 1.0)
            await settle()
            with trio.move_on_after(0.5):
                await pool.execute("psleep", 50.0, timeout=5.0)  # cancelled, left to finish
        # Nothing waits for it any more, yet at its deadline (5 s after it started) the worker
        # is killed rather than kept busy for 50 s.
        await trio.sleep_until(rec.t0 + 4.9)
        assert launcher.launched[0].code is None
        await trio.sleep_until(rec.t0 + 5.1)
        assert launcher.launched[0].code == -9
        assert await pool.execute("psleep", 1.0) == 1.0


async def test_no_pipelining_while_a_worker_restarts(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = attrs.evolve(ONE, size=2)
    async with fake_pool(config) as (launcher, pool):
        launcher.start_delay = 5.0  # replacements take 5 s to say hello
        launcher.launched[1].kill()
        await trio.sleep(0.1)
        async with recording(pool) as rec:
            for name in "abc":
                rec.start(name, "psleep", 1.0)
                await settle()
            # One worker up of two: the calls take turns on it instead of piling up there.
            assert written(launcher) == [1.0]
        assert rec.order() == ["a", "b", "c"] and rec.ended["c"][0] == 3.0
        await trio.sleep(5)
        assert pool.statistics().alive == 2
        async with recording(pool) as rec:
            for name in "abc":
                rec.start(name, "psleep", 1.0)
                await settle()
            assert sorted(w.in_flight for w in pool.statistics().workers) == [1, 2]  # both up: pipelined


async def test_a_worker_due_for_recycling_takes_no_more_calls(autojump_clock: trio.abc.Clock) -> None:
    config = attrs.evolve(ONE, max_calls_per_worker=2)
    async with fake_pool(config) as (launcher, pool):
        async with recording(pool) as rec:
            for name in "abc":
                rec.start(name, "psleep", 1.0)
                await settle()
            # Room for three in its pipeline, but two more calls are all it may take.
            assert written(launcher) == [1.0, 1.0]
        # c ran on the replacement (up 0.01 s after the first worker's two calls ended).
        assert rec.ended == {"a": (1.0, 1.0), "b": (2.0, 1.0), "c": (3.01, 1.0)}
        assert written(launcher, 1) == [1.0]


def test_only_an_idempotent_command_can_be_pipelined() -> None:
    with pytest.raises(ValueError, match="pipelined=True needs idempotent=True"):
        command("test_pipelining_not_idempotent", pipelined=True)


# --------------------------------------------------------------------------- real workers


async def test_killing_workers_under_pipelined_load_loses_no_call() -> None:
    """16 callers of echo on 2 real workers (4 calls in flight each) while workers with several
    calls in flight are SIGKILLed: every call returns its own argument (pipelined calls are
    idempotent, so the ones lost with a worker run again) and none fails."""
    config = PoolConfig(size=2, handlers=ALL_HANDLERS)
    most_in_flight = 0
    kills = 0
    with trio.fail_after(60):
        async with open_pool(config) as pool:
            done = 0
            stop = trio.Event()

            async def caller(c: int) -> None:
                nonlocal done, most_in_flight
                i = 0
                while not stop.is_set():
                    assert await pool.execute("echo", [c, i]) == [c, i]
                    most_in_flight = max([most_in_flight] + [w.in_flight for w in pool.statistics().workers])
                    i += 1
                done += i

            async with trio.open_nursery() as n:
                for c in range(16):
                    n.start_soon(caller, c)
                while kills < 3:
                    await trio.sleep(0.02)
                    if pool.statistics().alive == 2:
                        pids = [w.pid for w in pool.statistics().workers if w.in_flight > 1]
                        if pids:
                            os.kill(pids[0], signal.SIGKILL)
                            kills += 1
                            while pids[0] in pool.worker_pids():  # until it is buried
                                await trio.sleep(0.005)
                await trio.sleep(0.1)
                stop.set()
            stats = pool.statistics()
            pids = pool.worker_pids()
        assert most_in_flight == 4
        assert stats.restarts == 3 and stats.calls_failed == 0 and stats.calls_ok == done
        await wait_gone(pids, zombies_too=True)  # closed: every worker gone and reaped


def test_a_worker_answers_pipelined_requests_read_together_in_one_write() -> None:
    """The worker side, driven over its pipes: replies of pipelined requests read in one go wait
    for each other and go out in one write; any other request first flushes what is held."""
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    argv = [sys.executable, "-m", "bridge_worker", "--handlers", "bridge_worker.builtin,handlers_extra"]
    # Its own process group, as the pool starts it: a worker ends its group when it exits.
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, process_group=0
    )
    assert proc.stdin is not None and proc.stdout is not None
    to_worker, from_worker = proc.stdin.fileno(), proc.stdout.fileno()
    decoder = Decoder()

    def request(id: int, command: str, args: Any) -> bytes:
        return encode(Request(id, command, args, None, None))

    def read_once() -> list[Any]:
        """What one read returns, decoded (waits up to 10 s for something to read)."""
        assert select.select([from_worker], [], [], 10)[0], "the worker did not answer"
        decoder.receive_data(os.read(from_worker, 1 << 16))
        got = []
        while (msg := decoder.next_message()) is not NEED_DATA:
            got.append(msg)
        return got

    try:
        assert type(read_once()[0]) is Hello
        # echo answers at once, but its reply waits for the pipelined psleep read with it.
        os.write(to_worker, request(1, "echo", "a") + request(2, "psleep", 0.2))
        assert read_once() == [Reply(1, "a", None), Reply(2, 0.2, None)]
        # sleep is not pipelined: the held psleep reply goes out before it runs.
        os.write(to_worker, request(3, "psleep", 0.0) + request(4, "sleep", 0.2))
        assert read_once() == [Reply(3, 0.0, None)]
        assert read_once() == [Reply(4, 0.2, None)]
    finally:
        proc.stdin.close()  # end of stream: the worker exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
