"""Call shapes with real workers: ``map`` and ``imap`` in chunks, and streams from generator
handlers (order, errors with their item's index, kills mid-chunk and mid-stream, backpressure,
early exits, sessions, deadlines)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import attrs
import pytest
import trio

from bridge_worker import command
from conftest import ALL_HANDLERS, kill_quietly
from pool import (
    DEFAULT_POLICY,
    CallerError,
    PoolConfig,
    PoolTimeoutError,
    RemoteError,
    Strategy,
    WorkerConnectionError,
    open_pool,
)
from bridge_worker.protocol import STREAM_WINDOW

FAST_POLICY = attrs.evolve(
    DEFAULT_POLICY,
    delays={**DEFAULT_POLICY.delays, Strategy.BACKOFF_RETRY: (0.01,), Strategy.IMMEDIATE_RETRY: (0.0,)},
)
CONFIG = PoolConfig(size=2, handlers=[*ALL_HANDLERS, "handlers_shapes"], policy=FAST_POLICY)


async def wait_for_file(path: Path, predicate: Any = bool, timeout: float = 10.0) -> str:
    with trio.fail_after(timeout):
        while True:
            text = path.read_text() if path.exists() else ""
            if text and predicate(text):
                return text
            await trio.sleep(0.01)


# ---------------------------------------------------------------- map


@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 1000])
@pytest.mark.parametrize("chunksize", [None, 1, 64])
async def test_map_returns_every_result_in_input_order(n: int, chunksize: int | None) -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            assert await pool.map("square", range(n), chunksize=chunksize) == [i * i for i in range(n)]


async def test_map_takes_an_iterable_without_a_length() -> None:
    def numbers() -> Iterator[int]:
        yield from range(100)

    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            assert await pool.map("square", numbers()) == [i * i for i in range(100)]


async def test_a_caller_error_in_an_item_fails_the_map_with_its_index() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            items = list(range(50))
            items[37] = -5
            with pytest.raises(RemoteError) as info:
                await pool.map("square", items, chunksize=8)
            err = info.value
            assert err.caller_fault and err.context["index"] == 37
            assert "item 37 of the map" in err.message and "no negatives: -5" in err.message
            assert pool.statistics().retries == 0 and pool.statistics().failovers == 0
            assert await pool.map("square", [3]) == [9]  # the pool serves on


async def test_a_handler_failure_in_an_item_fails_over_then_names_the_item() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            with pytest.raises(RemoteError) as info:
                await pool.map("boom_at", ["a", "b", "boom", "c"], chunksize=2)
            assert info.value.context["index"] == 2 and not info.value.caller_fault
            assert pool.statistics().failovers == 1  # its chunk ran once more, elsewhere


async def test_arguments_that_cannot_be_sent_fail_the_map_as_a_caller_error() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            with pytest.raises(CallerError) as info:
                await pool.map("echo", [1, 2, object(), 4], chunksize=2)
            assert info.value.context["first_index"] == 2


async def test_map_checks_its_arguments() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            for bad in (0, -3, 1.5, "8"):
                with pytest.raises(CallerError, match="chunksize"):
                    await pool.map("square", [1], chunksize=bad)  # type: ignore[arg-type]
            with pytest.raises(CallerError, match="stream"):
                await pool.map("tokens", [1])
            with pytest.raises(CallerError, match="unknown command"):
                await pool.map("nope", [1])


async def test_an_idempotent_chunk_is_run_again_when_its_worker_is_killed() -> None:
    with trio.fail_after(60):
        async with open_pool(CONFIG) as pool:
            async with trio.open_nursery() as n:

                async def kill_one() -> None:
                    while pool.statistics().busy == 0:
                        await trio.sleep(0.005)
                    await trio.sleep(0.05)
                    busy = [w.pid for w in pool.statistics().workers if w.busy]
                    kill_quietly(busy[:1])

                n.start_soon(kill_one)
                results = await pool.map("pid_item", range(60), chunksize=10)
            assert [r[1] for r in results] == list(range(60))
            assert pool.statistics().retries >= 1


async def test_a_non_idempotent_chunk_is_not_run_again_when_its_worker_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "effects"
    with trio.fail_after(60):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            items = [[str(log), i, 0.02] for i in range(40)]
            async with trio.open_nursery() as n:

                async def kill_mid_chunk() -> None:
                    text = await wait_for_file(log, lambda t: t.count("\n") >= 3)
                    assert text
                    kill_quietly(pool.worker_pids())

                n.start_soon(kill_mid_chunk)
                with pytest.raises(WorkerConnectionError) as info:
                    await pool.map("note_item", items, chunksize=10)
            err = info.value
            assert err.may_have_run and "not idempotent" in err.message
            # Two chunks were in flight (one queued behind the other): either may have been hit.
            assert err.context["first_index"] in (0, 10), err.context
            lines = log.read_text().split()
            assert len(lines) == len(set(lines))  # nothing ran twice


async def test_the_timeout_covers_the_whole_map() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            t0 = trio.current_time()
            with pytest.raises(PoolTimeoutError):
                await pool.map("slow_item", [0.2] * 20, chunksize=2, timeout=0.5)
            assert trio.current_time() - t0 < 2.0
            with trio.fail_after(10):
                while pool.statistics().alive < 2:
                    await trio.sleep(0.01)
            assert await pool.map("square", [2]) == [4]


async def test_imap_yields_in_order_and_takes_its_input_lazily() -> None:
    consumed = 0

    def numbers() -> Iterator[int]:
        nonlocal consumed
        for i in range(10_000):
            consumed = i + 1
            yield i

    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            got = []
            async with pool.imap("square", numbers(), chunksize=10) as results:
                async for r in results:
                    got.append(r)
                    if len(got) == 25:
                        await trio.sleep(0.2)  # a slow consumer: the chunks wait for it
                        ahead = consumed - len(got)
                        break
            assert got == [i * i for i in range(25)]
            # At most the chunks in flight (2 per worker) and the one being consumed.
            assert ahead <= (2 * 2 + 1) * 10, ahead
            assert await pool.map("square", [5]) == [25]  # leaving early left the pool serving


# ---------------------------------------------------------------- streams


async def test_a_stream_delivers_every_item_in_order() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            async with pool.open_stream("tokens", 100) as items:
                assert [t async for t in items] == [f"tok{i}" for i in range(100)]
            async with pool.open_stream("tokens", 0) as items:
                assert [t async for t in items] == []
            assert pool.statistics().calls_ok == 2


async def test_a_slow_consumer_holds_the_generator_back(tmp_path: Path) -> None:
    path = tmp_path / "produced"
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            async with pool.open_stream("produce", {"path": str(path), "n": 1000}) as items:
                async for first in items:
                    break
                await trio.sleep(0.3)  # the generator runs ahead only as far as its window
                produced = int(path.read_text())
                assert first == 0 and produced <= STREAM_WINDOW + 1, produced


async def test_leaving_a_stream_early_closes_its_generator_and_keeps_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "produced"
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            pids = pool.worker_pids()
            got = []
            async with pool.open_stream("produce", {"path": str(path), "n": 1000}) as items:
                async for item in items:
                    got.append(item)
                    if len(got) == 3:
                        break
            end = await wait_for_file(Path(str(path) + ".end"))
            assert end.startswith("closed after")
            assert got == [0, 1, 2]
            assert await pool.execute("echo", 1) == 1
            assert pool.worker_pids() == pids and pool.statistics().restarts == 0


async def test_cancelling_a_streams_consumer_closes_the_generator(tmp_path: Path) -> None:
    path = tmp_path / "produced"
    with trio.fail_after(30):
        async with open_pool(attrs.evolve(CONFIG, size=1)) as pool:
            pids = pool.worker_pids()
            with trio.move_on_after(0.3):
                async with pool.open_stream("produce", {"path": str(path), "n": 10**6, "pause": 0.01}) as items:
                    async for _ in items:
                        pass
            assert (await wait_for_file(Path(str(path) + ".end"))).startswith("closed after")
            assert await pool.execute("echo", 2) == 2
            assert pool.worker_pids() == pids


async def test_a_handler_that_raises_delivers_its_items_then_the_error() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            got = []
            with pytest.raises(RemoteError) as info:
                async with pool.open_stream("fail_after", 5) as items:
                    async for item in items:
                        got.append(item)
            assert got == [0, 1, 2, 3, 4]
            assert "failed after 5 items" in info.value.message
            assert info.value.context["items_delivered"] == 5
            assert "not restarted" in info.value.message


async def test_a_worker_lost_mid_stream_says_how_many_items_arrived_and_repeats_none() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            got: list[Any] = []
            with pytest.raises(WorkerConnectionError) as info:
                async with pool.open_stream("stall_after", 4) as items:
                    async for item in items:
                        got.append(item)
                        if len(got) == 4:
                            os.kill(got[0], signal.SIGKILL)  # its first item is its pid
            assert len(got) == 4  # nothing repeated: the stream was not restarted
            assert info.value.context["items_delivered"] == 4
            assert pool.statistics().retries == 0


async def test_a_streams_deadline_bounds_it() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            got: list[Any] = []
            with pytest.raises(PoolTimeoutError) as info:
                async with pool.open_stream("stall_after", 2, timeout=0.5) as items:
                    async for item in items:
                        got.append(item)
            assert len(got) == 2 and info.value.context["items_delivered"] == 2


async def test_a_session_stream_commits_its_state_only_when_it_ends_normally() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            async with pool.open_stream("count_session", 3, session_id="s") as items:
                assert [i async for i in items] == [1, 2, 3]
            with pytest.raises(RemoteError):
                async with pool.open_stream("count_session", -2, session_id="s") as items:
                    assert [i async for i in items] == [4, 5]
            async with pool.open_stream("count_session", 1, session_id="s") as items:
                assert [i async for i in items] == [4]  # the failed stream committed nothing
            # Leaving early commits nothing either (more items than the window: the generator
            # waits for credit, and finds the cancel).
            async with pool.open_stream("count_session", 10 * STREAM_WINDOW, session_id="s") as items:
                async for _ in items:
                    break
            async with pool.open_stream("count_session", 1, session_id="s") as items:
                assert [i async for i in items] == [5]


async def test_streams_and_calls_check_which_kind_of_command_they_get() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            with pytest.raises(CallerError, match="open_stream"):
                await pool.execute("tokens", 3)
            with pytest.raises(CallerError, match="not a stream"):
                async with pool.open_stream("echo", 3) as items:
                    async for _ in items:
                        pass


def test_a_stream_command_must_be_a_generator_and_cannot_be_pipelined() -> None:
    with pytest.raises(TypeError, match="generator"):
        command("not_a_generator", stream=True)(lambda args, ctx: [1, 2])
    with pytest.raises(ValueError, match="pipelined"):
        command("both", stream=True, pipelined=True, idempotent=True)
