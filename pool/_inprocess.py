"""In-process workers: WorkerProcess implementations that live in the host process and speak the
real protocol over memory channels, so the host can be run on trio's clock without processes."""

from __future__ import annotations

import math

import trio

from bridge_worker.protocol import Decoder


class ChannelProcess:
    """The plumbing every in-process fake worker shares: a memory channel for the worker's
    output, an exit code, and the rest of the WorkerProcess interface. Subclasses decide what
    the worker does with what it is sent (``write``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.written = 0
        self._send, self._recv = trio.open_memory_channel[bytes](math.inf)
        self._decoder = Decoder()
        self._exited = trio.Event()

    def emit_bytes(self, data: bytes) -> None:
        if self.code is None and data:
            self._send.send_nowait(data)

    def exit(self, code: int) -> None:
        if self.code is not None:
            return
        self.code = code
        self._send.close()
        self._exited.set()

    def undelivered(self) -> int:
        return 0  # a fake reads every frame as it is written

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def hold(self) -> None:
        pass  # a fake takes every frame as it is written

    def release(self) -> None:
        pass

    async def run_writer(self) -> None:
        await trio.sleep_forever()

    async def receive_some(self) -> bytes:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return b""

    async def receive_stderr(self) -> bytes:
        await self._exited.wait()
        return b""

    def kill(self) -> None:
        self.exit(-9)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.code is not None
        return self.code

    def rss(self) -> int | None:
        return None

    def close(self) -> None:
        pass
