"""A fake in-process worker over memory channels, for testing the host's timing logic on
trio's autojump_clock. It speaks the real protocol (bytes in, bytes out) but runs hand-written
commands as trio tasks in virtual time, with knobs the host's tests need (start delays, failed
starts, unanswered pings, flaky crashes, the requests it got). Applications, and the contract
suite, use the testing kit's in-process worker instead (``pool.testing``), which runs the real
handler functions."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from bridge_worker.protocol import (
    PROTOCOL_VERSION,
    CloseSession,
    CommandInfo,
    ErrorReply,
    Hello,
    Message,
    Ping,
    Pong,
    RemoteKind,
    Reply,
    Request,
    Shutdown,
    decode_session_state,
    encode,
    encode_session_state,
)
from pool._inprocess import ChannelProcess

COMMANDS = (
    CommandInfo("echo", True, (), False, False),
    CommandInfo("sleep", True, (), False, False),
    CommandInfo("hang", False, (), False, False),
    CommandInfo("crash", False, (), False, False),
    CommandInfo("raise_error", True, (), False, False),
    CommandInfo("crash_idem", True, (), False, False),
    # Pipelined: a real worker runs its requests one after the other, and so does this one.
    CommandInfo("psleep", True, (), False, True),
    # hangs like "hang", but declared finish_on_cancel (a cancelled call is left to finish)
    CommandInfo("hang_finish", False, (), True, False),
    # sleeps like "sleep", but not idempotent (never run twice by the pool)
    CommandInfo("nsleep", False, (), False, False),
    # answers a RuntimeError after ``args`` seconds
    CommandInfo("raise_later", True, (), False, False),
    # answers a RuntimeError with a short message at once, whatever its arguments
    CommandInfo("raise_short", True, (), False, False),
    # crashes its worker (exit code 1) while launcher.flaky_failures > 0 (counting it down),
    # then echoes its arguments
    CommandInfo("flaky", True, (), False, False),
    # as bridge_worker.testing's: increments ctx.session["n"] and returns it
    CommandInfo("counter", False, (), False, False),
    # answers after ``args`` seconds, or never while launcher.hang_next > 0 (counting it down)
    CommandInfo("sometimes_hang", True, (), False, False),
)


class FakeLauncher:
    """Launches FakeProcess workers. Tweak the attributes to change how new workers behave."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.start_delay = 0.01  # virtual seconds from spawn to hello
        self.fail_start = False  # exit with code 1 before hello
        self.answer_pings = True
        self.flaky_failures = 0  # how many more "flaky" requests crash their worker
        self.hang_next = 0  # how many more "sometimes_hang" requests never answer
        self.memory: int | None = None  # what new workers report as their rss (None: unknown)
        self.launched: list[FakeProcess] = []

    def launch(
        self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int
    ) -> FakeProcess:
        proc = FakeProcess(self)
        self.launched.append(proc)
        return proc

    def open(self, config: Any) -> None:
        pass

    def close(self) -> None:
        pass


@asynccontextmanager
async def fake_launcher() -> AsyncIterator[FakeLauncher]:
    """A FakeLauncher whose fake workers' tasks end when the block does."""
    async with trio.open_nursery() as nursery:
        yield FakeLauncher(nursery)
        nursery.cancel_scope.cancel()


class FakeProcess(ChannelProcess):
    def __init__(self, launcher: FakeLauncher) -> None:
        super().__init__()
        self.launcher = launcher
        self.answer_pings = launcher.answer_pings
        self._scopes: list[trio.CancelScope] = []  # the fake's running tasks, cancelled on exit
        self.requests: list[Request] = []
        self._serial_until = 0.0  # when the last pipelined request queued here will be done
        self.sessions: dict[str, bytes] = {}  # committed state of the sessions held here
        self.memory = launcher.memory  # its rss, as the host reads it; change it to grow or shrink
        launcher.nursery.start_soon(self._boot, launcher.fail_start, launcher.start_delay)

    async def _boot(self, fail: bool, delay: float) -> None:
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            await trio.sleep(delay)
            if fail:
                self.exit(1)
                return
            self._emit(Hello(PROTOCOL_VERSION, self.pid, COMMANDS))

    def _emit(self, message: Message) -> None:
        self.emit_bytes(encode(message))

    def rss(self) -> int | None:
        return self.memory

    def exit(self, code: int) -> None:
        super().exit(code)
        for scope in self._scopes:
            scope.cancel()

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.code is not None:
            raise BrokenPipeError("fake worker is dead")
        self._decoder.receive_data(data)
        for msg in self._decoder:
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Request):
            self.requests.append(msg)
            if msg.command == "echo":
                self._emit(Reply(msg.id, msg.args, None))
            elif msg.command == "sleep":
                self.launcher.nursery.start_soon(self._sleep, msg, float(msg.args))
            elif msg.command == "psleep":
                self._serial_until = max(self._serial_until, trio.current_time()) + float(msg.args)
                self.launcher.nursery.start_soon(
                    self._sleep, msg, self._serial_until - trio.current_time()
                )
            elif msg.command in ("crash", "crash_idem"):
                self.exit(int(msg.args))
            elif msg.command == "raise_error":
                self._emit(ErrorReply(msg.id, "RuntimeError", str(msg.args), "", True, False))
            elif msg.command == "sometimes_hang":
                if self.launcher.hang_next > 0:
                    self.launcher.hang_next -= 1
                else:
                    self.launcher.nursery.start_soon(self._sleep, msg, float(msg.args))
            elif msg.command == "counter":
                self._counter(msg)
            elif msg.command == "nsleep":
                self.launcher.nursery.start_soon(self._sleep, msg, float(msg.args))
            elif msg.command == "raise_later":
                self.launcher.nursery.start_soon(self._raise_later, msg, float(msg.args))
            elif msg.command == "raise_short":
                self._emit(ErrorReply(msg.id, "RuntimeError", "failed", "", True, False))
            elif msg.command == "flaky":
                if self.launcher.flaky_failures > 0:
                    self.launcher.flaky_failures -= 1
                    self.exit(1)
                else:
                    self._emit(Reply(msg.id, msg.args, None))
            # "hang", "hang_finish": never answer
        elif isinstance(msg, Ping):
            if self.answer_pings:
                self._emit(Pong(msg.id, None))
        elif isinstance(msg, Shutdown):
            self.exit(0)
        elif isinstance(msg, CloseSession):
            self.sessions.pop(msg.session_id, None)

    def _counter(self, req: Request) -> None:
        """The real worker's session handling, for one command."""
        sid = req.session_id
        if sid is None:
            state: Any = {}
        else:
            if req.session_state is not None:
                self.sessions[sid] = req.session_state
            if sid not in self.sessions:
                self._emit(ErrorReply(req.id, RemoteKind.SESSION_NOT_FOUND, sid, "", False, False))
                return
            state = decode_session_state(self.sessions[sid])
        state["n"] = state.get("n", 0) + 1
        packed = encode_session_state(state) if sid is not None else None
        if sid is not None and packed is not None:
            self.sessions[sid] = packed
        self._emit(Reply(req.id, state["n"], packed))

    async def _sleep(self, req: Request, seconds: float) -> None:
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            if self.code is not None:
                return
            await trio.sleep(seconds)
            self._emit(Reply(req.id, req.args, None))

    async def _raise_later(self, req: Request, seconds: float) -> None:
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            if self.code is not None:
                return
            await trio.sleep(seconds)
            self._emit(ErrorReply(req.id, "RuntimeError", f"raised after {seconds}s", "", True, False))
