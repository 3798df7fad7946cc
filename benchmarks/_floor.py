"""The floor: the leanest trio + msgpack round trip over pipes we know how to write.

N ``python -c`` children each run a tight read-frame / echo / write-frame loop. The host keeps as
many calls in flight per child as the pool keeps per worker (``depth``, the pool's pipeline depth
for a pipelined command like echo): a child with one caller is driven send-then-wait by that
caller's task; a child with several has their requests written behind each other on its pipe and
one reader task that hands each reply to its caller. Frames are a 4-byte big-endian length plus a
msgpack body ``[id, args]``; the host checks the id, as any real protocol must. There is no
checkout, queue, deadline, error handling or supervision: the pool's cost per call above this is
its overhead.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable

import msgpack
import outcome
import trio

# The child: plain blocking reads on stdin, writes on stdout; the replies to the requests one read
# brought go out in one write (as the pool's workers do for pipelined commands). EOF on stdin
# (the host closed the pipe or died) ends it, so a floor child never outlives the benchmark.
CHILD_CODE = r"""
import os, msgpack
pack, unpackb, read, write = msgpack.Packer().pack, msgpack.unpackb, os.read, os.write
buf = b""
while True:
    chunk = read(0, 65536)
    if not chunk:
        raise SystemExit(0)
    buf += chunk
    out = []
    start, size = 0, len(buf)
    while size - start >= 4:
        end = start + 4 + int.from_bytes(buf[start:start + 4], "big")
        if end > size:
            break
        rid, args = unpackb(buf[start + 4:end])
        body = pack([rid, args])
        out.append(len(body).to_bytes(4, "big") + body)
        start = end
    buf = buf[start:]
    if out:
        write(1, b"".join(out))
"""


class FloorChild:
    """One floor child process and the host's non-blocking ends of its pipes."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.wfd = self.popen.stdin.fileno()
        self.rfd = self.popen.stdout.fileno()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)
        self.buf = b""
        self.next_id = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def call(self, args: Any) -> Any:
        """One round trip. Small frames always fit the pipe buffer, so the write never blocks
        with one call in flight."""
        self.next_id += 1
        rid = self.next_id
        body = msgpack.packb([rid, args])
        os.write(self.wfd, len(body).to_bytes(4, "big") + body)
        buf = self.buf
        rfd = self.rfd
        while True:
            if len(buf) >= 4:
                end = int.from_bytes(buf[:4], "big") + 4
                if len(buf) >= end:
                    break
            try:
                chunk = os.read(rfd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(rfd)
                continue
            if not chunk:
                raise EOFError("floor child closed its pipe")
            buf += chunk
        reply_id, result = msgpack.unpackb(buf[4:end])
        self.buf = buf[end:]
        if reply_id != rid:
            raise RuntimeError(f"floor: reply {reply_id} for request {rid}")
        return result

    def close(self) -> None:
        """Close stdin (the child exits on EOF), then make sure it is gone and reaped."""
        for f in (self.popen.stdin, self.popen.stdout):
            try:
                if f is not None:
                    fd = f.fileno()
                    try:
                        trio.lowlevel.notify_closing(fd)
                    except RuntimeError:
                        pass  # not inside trio.run
                    f.close()
            except (OSError, ValueError):
                pass
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class PipelinedChild:
    """Several callers' calls in flight on one floor child, as the pool pipelines a worker.

    Only one task may wait for an fd to become readable, so one reader task (``read_replies``)
    reads every reply and wakes the caller it belongs to; the child answers in the order the
    requests were written, so a FIFO of parked callers says whose each reply is. A caller writes
    its own request and parks until the reader reschedules it.
    """

    def __init__(self, child: FloorChild) -> None:
        self.child = child
        # (request id, its caller) per request written, in the order written. The caller is None
        # once it was cancelled: its reply still comes and must be dropped.
        self.waiters: collections.deque[tuple[int, trio.lowlevel.Task | None]] = collections.deque()
        # Frames the pipe did not take yet. While there are some, one caller (the flusher) writes
        # them as the pipe drains and every other caller appends its frame behind them, so frames
        # stay whole and in the order of ``waiters``.
        self.unwritten = bytearray()
        self.flusher: trio.lowlevel.Task | None = None
        # The flusher's own reply when it comes before the flusher is done: the flusher waits for
        # the pipe, not for a reschedule, so the reader leaves its reply here.
        self.early: outcome.Outcome[Any] | None = None

    async def call(self, args: Any) -> Any:
        """One round trip: write the request (small frames almost always fit the pipe at once),
        then park until the reader hands over the reply."""
        child = self.child
        child.next_id += 1
        rid = child.next_id
        body = msgpack.packb([rid, args])
        frame = len(body).to_bytes(4, "big") + body
        task = trio.lowlevel.current_task()
        self.waiters.append((rid, task))
        if self.unwritten:
            self.unwritten += frame
        else:
            try:
                n = os.write(child.wfd, frame)
            except BlockingIOError:
                n = 0
            if n < len(frame):
                self.unwritten += frame[n:]
                reply = await self._flush(task)
                if reply is not None:
                    return reply.unwrap()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._forget(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def _flush(self, task: trio.lowlevel.Task) -> outcome.Outcome[Any] | None:
        """Write ``unwritten`` (our frame's rest, then any appended behind it) as the pipe drains;
        return our reply if it already came. A cancelled flusher stays the flusher, so the reader
        keeps its reply instead of waking a task that no longer waits (only the end of the run
        cancels, and it cancels every caller)."""
        self.flusher = task
        wfd = self.child.wfd
        while self.unwritten:
            await trio.lowlevel.wait_writable(wfd)
            try:
                n = os.write(wfd, self.unwritten)
            except BlockingIOError:
                continue
            del self.unwritten[:n]
        self.flusher = None
        reply, self.early = self.early, None
        return reply

    def _forget(self, task: trio.lowlevel.Task) -> None:
        """A parked caller was cancelled: its reply will still come and must wake no one."""
        for i, (rid, waiter) in enumerate(self.waiters):
            if waiter is task:
                self.waiters[i] = (rid, None)
                return

    async def read_replies(self) -> None:
        """Until cancelled: read what the child wrote and give every whole reply in it to its
        caller, oldest first."""
        child = self.child
        rfd = child.rfd
        waiters = self.waiters
        unpackb = msgpack.unpackb
        reschedule = trio.lowlevel.reschedule
        while True:
            await trio.lowlevel.wait_readable(rfd)
            try:
                chunk = os.read(rfd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("floor child closed its pipe")
            buf = child.buf + chunk
            size = len(buf)
            start = 0
            while size - start >= 4:
                end = start + 4 + int.from_bytes(buf[start : start + 4], "big")
                if end > size:
                    break
                reply_id, result = unpackb(buf[start + 4 : end])
                start = end
                rid, task = waiters.popleft()
                if reply_id != rid:
                    raise RuntimeError(f"floor: reply {reply_id} for request {rid}")
                if task is None:
                    continue
                if task is self.flusher:
                    self.early = outcome.Value(result)
                else:
                    reschedule(task, outcome.Value(result))
            child.buf = buf[start:]


class Floor:
    """N floor children, spawned on entry and reaped on exit (also on error). ``depth``: calls
    in flight per child when callers outnumber children (the pool's pipeline depth)."""

    def __init__(self, workers: int, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.workers = workers
        self.depth = depth
        self.children: list[FloorChild] = []

    def __enter__(self) -> "Floor":
        try:
            for _ in range(self.workers):
                self.children.append(FloorChild())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self.children:
            c.close()

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    async def each_once(self, args: Any) -> None:
        """Every child answers one call (startup: ready means answered)."""
        async with trio.open_nursery() as n:
            for c in self.children:
                n.start_soon(c.call, args)

    async def run(
        self, callers: int, stop: float, args: Any, on_latency: Callable[[int], None] | None
    ) -> int:
        """Calls until ``stop`` (trio clock) with min(callers, workers * depth) callers, dealt
        round-robin over the children (in flight per child differs by at most 1, as the pool
        spreads its calls); returns the number of calls done. A child with one caller is driven
        send-then-wait by it, the leanest; one with more gets a reader task for the run."""
        k = min(callers, self.workers * self.depth)
        counts = [0] * k

        async def loop(i: int, call: Callable[[Any], Awaitable[Any]]) -> None:
            n = 0
            clock = trio.current_time
            if on_latency is None:
                while clock() < stop:
                    await call(args)
                    n += 1
            else:
                perf = time.perf_counter_ns
                while clock() < stop:
                    t0 = perf()
                    await call(args)
                    on_latency(perf() - t0)
                    n += 1
            counts[i] = n

        calls: list[Callable[[Any], Awaitable[Any]]] = []
        pipelined: list[PipelinedChild] = []
        for c, child in enumerate(self.children):
            if k > self.workers + c:  # caller c + workers exists: this child has several
                pipelined.append(PipelinedChild(child))
                calls.append(pipelined[-1].call)
            else:
                calls.append(child.call)
        async with trio.open_nursery() as readers:
            for p in pipelined:
                readers.start_soon(p.read_replies)
            async with trio.open_nursery() as nursery:
                for i in range(k):
                    nursery.start_soon(loop, i, calls[i % self.workers])
            # Every caller has its last reply: nothing is in flight, the readers can go.
            readers.cancel_scope.cancel()
        return sum(counts)
