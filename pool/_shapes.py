"""Call shapes beyond one call: ``map`` over many inputs in chunks, and streams of items.

**map.** The inputs go to workers in chunks: one ``Batch`` frame runs the command on each item of
a chunk in one loop in the worker, and its results come back in one Reply. A chunk is one call as
far as the rest of the pool is concerned (its circuit, retries and failover, pipelining, the
deadline: the map's whole timeout), run by :meth:`RecoveryOrchestrator.run`. A bounded number of
chunks are in flight at once (two per serving worker), taken lazily from the input, so a long
iterable is never held whole; results are delivered in input order. A chunk whose item raised a
caller error fails the map with that item's index; a worker lost mid-chunk re-runs the chunk only
if the command is idempotent (the matrix's rule for any call); a configured fallback is applied to
each item of a chunk that failed for good.

**Streams.** A stream command's generator runs in its worker and sends each item it yields; the
worker runs at most ``STREAM_WINDOW`` items ahead of the consumer and waits for credit, which the
host gives as the consumer takes items. Leaving the ``open_stream`` block early (or being cancelled)
sends a cancel: the worker closes the generator (its ``finally`` runs) and stays usable; the
stream's deadline still bounds it. A stream is retried as any call until its first item has
arrived, never after (that would repeat items): a failure after items says how many were
delivered. A session stream commits its state when the generator ends normally.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from itertools import islice
from typing import Any, AsyncIterator, Iterable, Iterator

import trio

from bridge_worker.protocol import CommandInfo, ErrorReply, Reply
from pool._breaker import CircuitBreaker
from pool._call import Call, StreamBuffer
from pool._checkout import Checkout
from pool._errors import PoolError
from pool._recovery import Action, RecoveryOrchestrator, decide
from pool._sessions import Session
from pool._worker import Worker, WorkerCall

#: Items per chunk when the input has no length to size chunks from.
DEFAULT_CHUNKSIZE = 32


def chunk_size(length: int | None, workers: int) -> int:
    """multiprocessing.Pool.map's rule: about four chunks per worker."""
    if length is None:
        return DEFAULT_CHUNKSIZE
    size, extra = divmod(length, max(workers, 1) * 4)
    return max(1, size + (1 if extra else 0))


class Shapes:
    """``map``, ``imap`` and ``open_stream`` over the orchestrator and the checkout."""

    def __init__(self, recovery: RecoveryOrchestrator, checkout: Checkout) -> None:
        self._recovery = recovery
        self._checkout = checkout

    # ------------------------------------------------------------------ map

    async def map(self, command: Any, items: Iterable[Any], chunksize: Any, timeout: Any) -> list[Any]:
        results: list[Any] = []
        async with self._chunks(command, items, chunksize, timeout) as chunks:
            async for chunk in chunks:
                results.extend(chunk)
        return results

    @asynccontextmanager
    async def imap(
        self, command: Any, items: Iterable[Any], chunksize: Any, timeout: Any
    ) -> AsyncIterator[AsyncIterator[Any]]:
        async with self._chunks(command, items, chunksize, timeout) as chunks:
            yield _Flattened(chunks)

    @asynccontextmanager
    async def _chunks(
        self, command: Any, items: Iterable[Any], chunksize: Any, timeout: Any
    ) -> AsyncIterator[_Chunks]:
        try:
            info, _, deadline = self._recovery.check(command, timeout)
            if info.stream:
                raise self._recovery.bad_call(f"{command!r} is a stream command: it cannot be mapped", command)
            if chunksize is not None and (type(chunksize) is not int or chunksize < 1):
                raise self._recovery.bad_call(
                    f"chunksize must be a positive int (or None: sized from the input), got {chunksize!r}",
                    command,
                )
        except PoolError:
            await trio.lowlevel.checkpoint()
            raise
        serving = sum(1 for w in self._checkout.workers if w.serving) or 1
        size = chunksize if chunksize is not None else chunk_size(_length(items), serving)
        chunks = _Chunks(self._recovery, info, _chunked(iter(items), size), deadline, 2 * serving)
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chunks.run)
            try:
                yield chunks
            except BaseException as exc:
                body_error = exc  # raised below, as itself: not wrapped by this nursery
            finally:
                nursery.cancel_scope.cancel()  # the consumer is done: nothing more to run
        if body_error is not None:
            raise body_error
        chunks.raise_failure()

    # ------------------------------------------------------------------ streams

    @asynccontextmanager
    async def open_stream(
        self, command: Any, args: Any, session_id: str | None, timeout: Any
    ) -> AsyncIterator[AsyncIterator[Any]]:
        recovery = self._recovery
        try:
            info, frame, req_id, now, deadline = recovery.request(command, args, session_id, timeout)
            if not info.stream:
                raise recovery.bad_call(
                    f"{command!r} is not a stream command (declare it with "
                    "@command(..., stream=True)); call it with execute",
                    command,
                )
        except PoolError:
            await trio.lowlevel.checkpoint()
            raise
        async with recovery.admitted(info, session_id, now, deadline) as (breaker, session):
            stream = _Stream(self._checkout, recovery, breaker)
            await stream.start(info, args, frame, req_id, session, deadline)
            try:
                yield stream
            finally:
                stream.close()


class _Chunks:
    """The chunks of one map, run at most ``in_flight`` at a time, handed out in input order."""

    def __init__(
        self,
        recovery: RecoveryOrchestrator,
        info: CommandInfo,
        source: Iterator[tuple[int, list[Any]]],
        deadline: float,
        in_flight: int,
    ) -> None:
        self._recovery = recovery
        # A chunk whose map is given up (another chunk failed, the consumer left) is left to
        # finish on its worker, its reply dropped, rather than killing the worker under it.
        self._info = info._replace(finish_on_cancel=True)
        self._source = source
        self._deadline = deadline
        self._in_flight = in_flight
        self._done: dict[int, list[Any]] = {}  # results of chunks not handed out yet
        self._started = 0  # chunks taken from the input
        self._taken = 0  # chunks handed to the consumer
        self._exhausted = False
        self._running = 0
        self._failure: PoolError | None = None
        self._changed = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        """Keep up to ``in_flight`` chunks running until the input ends or one fails."""
        async with trio.open_nursery() as nursery:
            while self._failure is None:
                while self._failure is None and self._started - self._taken >= self._in_flight:
                    await self._changed.park()  # bounded: results wait for the consumer
                if self._failure is not None:
                    break
                try:
                    start, chunk = next(self._source)
                except StopIteration:
                    break
                index = self._started
                self._started += 1
                self._running += 1
                nursery.start_soon(self._run_one, index, start, chunk, nursery.cancel_scope)
        self._exhausted = True
        self._changed.unpark_all()

    async def _run_one(self, index: int, start: int, chunk: list[Any], scope: trio.CancelScope) -> None:
        recovery = self._recovery
        try:
            frame, req_id = recovery.batch_request(self._info, chunk, start)
            # (A chunk starts now: its circuit, its duration and its queue wait count from here,
            # not from the map's start.)
            results = await recovery.run(
                self._info, chunk, frame, req_id, None, trio.current_time(), self._deadline, batch=True
            )
            self._done[index] = results
        except PoolError as exc:
            position = exc.context.pop("position", None)
            if position is not None:
                exc.context["index"] = start + position
                exc.message = f"item {start + position} of the map: {exc.message}"
            else:
                exc.context["first_index"] = start
            if self._failure is None:
                self._failure = exc
            scope.cancel()  # the map has failed: the other chunks need not run
        finally:
            self._running -= 1
            self._changed.unpark_all()

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> list[Any]:
        while True:
            if self._failure is not None:
                raise self._failure
            results = self._done.pop(self._taken, None)
            if results is not None:
                self._taken += 1
                self._changed.unpark_all()
                return results
            if self._exhausted and self._running == 0 and self._taken >= self._started:
                raise StopAsyncIteration
            await self._changed.park()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class _Flattened:
    """``imap``'s results, one at a time, from the map's chunks."""

    def __init__(self, chunks: _Chunks) -> None:
        self._chunks = chunks
        self._current: Iterator[Any] = iter(())

    def __aiter__(self) -> _Flattened:
        return self

    async def __anext__(self) -> Any:
        while True:
            for result in self._current:
                return result
            self._current = iter(await self._chunks.__anext__())


class _Stream:
    """What ``async with pool.open_stream(...) as items`` gives: ``async for item in items``."""

    def __init__(self, checkout: Checkout, recovery: RecoveryOrchestrator, breaker: CircuitBreaker) -> None:
        self._checkout = checkout
        self._recovery = recovery
        self._breaker = breaker
        self._call: WorkerCall | None = None
        self._error: PoolError | None = None  # how it ended before its first item
        self._ended = False

    async def start(
        self, info: CommandInfo, args: Any, frame: bytes, req_id: int, session: Session | None, deadline: float
    ) -> None:
        """Start the stream, retrying as for any call until its first item (or its end)."""
        checkout = self._checkout
        recovery = self._recovery
        attempt = 1
        failed_over = False
        avoid: Worker | None = None
        while True:
            call: WorkerCall = Call(info, args, frame, req_id, attempt, deadline, session, avoid, checkout.abort)
            call.stream = StreamBuffer()
            self._call = call
            try:
                checkout.start(call)
                more, got = await checkout.next_item(call)
                if more:  # keep the first item for the consumer
                    call.stream.items.appendleft(got)
                    call.stream.taken -= 1
                    return
                if type(got) is Reply:
                    self._ended = True  # an empty stream
                    recovery.stream_done(call, self._breaker, None)
                    return
                assert type(got) is ErrorReply
                err = recovery.reply_error(call, got)
            except PoolError as exc:
                err = exc
            except BaseException:
                checkout.cancel_stream(call)
                self._ended = True
                recovery.stream_done(call, self._breaker, None, finished=False)
                raise
            action, delay = decide(recovery.handler, err, attempt, attempt, info.idempotent, failed_over, True)
            if action is Action.GIVE_UP or trio.current_time() + delay >= deadline or checkout.closing:
                self._error = err
                return
            if action is Action.FAILOVER:
                failed_over = True
                avoid = call.worker
                if session is not None:
                    session.move_off()
            if delay > 0:
                await trio.sleep(delay)
            attempt += 1

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        assert call is not None and call.stream is not None
        if self._ended:
            raise StopAsyncIteration
        err = self._error
        if err is None:
            try:
                more, got = await self._checkout.next_item(call)
                if more:
                    return got
                if type(got) is Reply:
                    self._ended = True
                    self._recovery.stream_done(call, self._breaker, None)
                    raise StopAsyncIteration
                err = self._recovery.reply_error(call, got)
            except PoolError as exc:
                err = exc
        self._ended = True
        taken = call.stream.taken
        err.context["items_delivered"] = taken
        if taken:
            err.message += (
                f" The stream had delivered {taken} item(s); it is not restarted, since that "
                "would repeat them."
            )
        self._recovery.stream_done(call, self._breaker, err)
        raise err

    def close(self) -> None:
        """The block ends: a stream still running tells its worker to stop its generator."""
        if not self._ended and self._call is not None:
            self._ended = True
            self._checkout.cancel_stream(self._call)
            self._recovery.stream_done(self._call, self._breaker, None, finished=False)


def _chunked(items: Iterator[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """``(index of its first item, chunk)`` for each chunk of ``size`` items (the last shorter)."""
    start = 0
    while True:
        chunk = list(islice(items, size))  # at C speed: this runs for every item of a map
        if not chunk:
            return
        yield start, chunk
        start += len(chunk)


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
