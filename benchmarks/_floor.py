"""The floor: the leanest trio + msgpack round trip over pipes we know how to write.

N ``python -c`` children each run a tight read-frame / echo / write-frame loop; the trio host runs
one task per child that writes a request and reads its reply, with one call in flight per worker
(as the pool has). Frames are a 4-byte big-endian length plus a msgpack body ``[id, args]``; the
host checks the id, as any real protocol must. There is no checkout, queue, deadline, error
handling or supervision: the pool's cost per call above this is its overhead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Callable

import msgpack
import trio

# The child: plain blocking reads on stdin, writes on stdout. EOF on stdin (the host closed the
# pipe or died) ends it, so a floor child never outlives the benchmark.
CHILD_CODE = r"""
import os, msgpack
packb, unpackb, read, write = msgpack.packb, msgpack.unpackb, os.read, os.write
buf = b""
while True:
    while len(buf) < 4:
        chunk = read(0, 65536)
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    end = int.from_bytes(buf[:4], "big") + 4
    while len(buf) < end:
        chunk = read(0, 65536)
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    rid, args = unpackb(buf[4:end])
    buf = buf[end:]
    out = packb([rid, args])
    write(1, len(out).to_bytes(4, "big") + out)
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


class Floor:
    """N floor children, spawned on entry and reaped on exit (also on error)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
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
        """Calls until ``stop`` (trio clock) with min(callers, workers) children busy, one call
        in flight each, as the pool has; returns the number of calls done."""
        counts = [0] * self.workers

        async def loop(i: int, child: FloorChild) -> None:
            n = 0
            call = child.call
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

        async with trio.open_nursery() as nursery:
            for i, child in enumerate(self.children[: min(callers, self.workers)]):
                nursery.start_soon(loop, i, child)
        return sum(counts)
