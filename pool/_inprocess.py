"""In-process workers: WorkerProcess implementations that live in the host process and speak the
real protocol over memory channels, so a pool can run on trio's clock without processes.

:class:`ChannelProcess` is the plumbing they share (the test suite's protocol-level fakes build on
it too). :class:`InProcessWorker` is a worker as an application's tests want it: it imports its
handlers modules into the host process and runs their real handler functions through the
worker's own :class:`~bridge_worker._requests.RequestHandler`, so sessions behave as in a worker
process (committed state, rollback when a handler raises, ``session_not_found`` when it does not
hold the session). Handlers run on the trio thread, so they must not block: the chaos commands
that would (``sleep``, ``hang``, ``crash``, ``garbage``, ``alloc``) run as virtual-time stand-ins,
and :attr:`InProcessLauncher.simulate` puts a stand-in in place of any command.

Every in-process worker has a pid above Linux's PID_MAX_LIMIT, which no process can have: a signal
sent to one by mistake reaches nobody. :func:`in_process_worker` finds the worker behind such a
pid, and :meth:`ChannelProcess.send_signal` does to it what the signal would do to a process.
"""

from __future__ import annotations

import importlib
import itertools
import math
import signal
import weakref
from typing import Any, Awaitable, Callable, Final, Mapping

import trio

from bridge_worker import Command, Context, registry, start_hooks
from bridge_worker._loop import (
    EXIT_PROTOCOL_ERROR,
    EXIT_STARTUP_FAILED,
    hook_step,
    startup_failure,
)
from bridge_worker._requests import RequestHandler, command_table
from bridge_worker.protocol import (
    PROTOCOL_VERSION,
    STREAM_WINDOW,
    Batch,
    CloseSession,
    Decoder,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Request,
    Shutdown,
    StreamCancel,
    StreamCredit,
    encode,
)
from pool._config import PoolConfig

#: Linux's PID_MAX_LIMIT is 2**22 (``/proc/sys/kernel/pid_max`` cannot go higher), so no process
#: ever has one of these pids.
FIRST_FAKE_PID: Final = 1 << 23
_fake_pids = itertools.count(FIRST_FAKE_PID)
_by_pid: weakref.WeakValueDictionary[int, ChannelProcess] = weakref.WeakValueDictionary()


def in_process_worker(pid: int) -> ChannelProcess | None:
    """The in-process worker with this pid, if one exists (None for a real process's pid)."""
    return _by_pid.get(pid)


class ChannelProcess:
    """The plumbing every in-process worker shares: a memory channel for the worker's output, an
    exit code, stopping (as SIGSTOP does) and the rest of the WorkerProcess interface. Subclasses
    decide what the worker does with what it is sent (``write``)."""

    host = "localhost"
    local = True  # its pid is listed by worker_pids(), and signals to it reach it (send_signal)
    beats = False  # it answers pings: no heartbeats of its own

    def __init__(self) -> None:
        self.pid = next(_fake_pids)
        _by_pid[self.pid] = self
        #: The exit code once it has exited (negative: the signal that ended it), else None.
        self.code: int | None = None
        #: Stopped (SIGSTOP): nothing comes out of it until :meth:`resume`.
        self.stopped = False
        self.written = 0
        self._send, self._recv = trio.open_memory_channel[bytes](math.inf)
        self._held: list[bytes] = []  # what it wrote while stopped
        self._decoder = Decoder()
        self._exited = trio.Event()

    def emit_bytes(self, data: bytes) -> None:
        if self.code is None and data:
            if self.stopped:
                self._held.append(data)
            else:
                self._send.send_nowait(data)

    def exit(self, code: int) -> None:
        if self.code is not None:
            return
        self.code = code
        self._held.clear()
        self._send.close()
        self._exited.set()

    def stop(self) -> None:
        self.stopped = True

    def resume(self) -> None:
        self.stopped = False
        for data in self._held:
            self._send.send_nowait(data)
        self._held.clear()

    def send_signal(self, signum: int) -> None:
        """What ``os.kill(pid, signum)`` does to a worker process: SIGSTOP stops it, SIGCONT
        resumes it, SIGINT is ignored (workers leave Ctrl-C to the host), any other ends it."""
        if signum == signal.SIGSTOP:
            self.stop()
        elif signum == signal.SIGCONT:
            self.resume()
        elif signum != signal.SIGINT:
            self.exit(-signum)

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


#: A stand-in for a command's handler in an in-process worker: ``await stand_in(args, ctx)``, in
#: virtual time. Its return value is the call's result; an exception it raises is the handler's
#: exception; ``raise SystemExit(code)`` ends its worker, as ``os._exit`` would in a process.
Simulation = Callable[[Any, Context], Awaitable[Any]]


class InProcessLauncher:
    """Launches :class:`InProcessWorker`: workers in this process, on its trio clock, running the
    real handler functions of the pool's handlers modules (imported into this process).

    ``simulate`` maps a command's name to a :data:`Simulation` run instead of its handler (a slow,
    hanging or crashing handler); it is read at each call, so a test may change it while the pool
    runs. ``start_delay``: seconds from launch to hello (a worker process takes some 30 ms).
    """

    def __init__(self, simulate: Mapping[str, Simulation] | None = None, *, start_delay: float = 0.01) -> None:
        self.simulate: dict[str, Simulation] = dict(simulate or {})
        self.start_delay = start_delay
        #: Every worker launched, in order.
        self.workers: list[InProcessWorker] = []

    def open(self, config: PoolConfig) -> None:
        pass

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> InProcessWorker:
        worker = InProcessWorker(self, handlers, max_frame_size, max_session_state)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        pass


class InProcessWorker(ChannelProcess):
    """One in-process worker. It lives in the task the pool runs for its writer (:meth:`run_writer`):
    it starts there (imports, start hooks, hello), then serves one message at a time, as a worker
    process does, until it exits: by :meth:`kill`, a ``Shutdown``, a handler's ``SystemExit``,
    a bad frame or a failed start. Call :meth:`send_signal` to do what a signal would."""

    def __init__(
        self, launcher: InProcessLauncher, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int
    ) -> None:
        super().__init__()
        self._launcher = launcher
        self._handlers = handlers
        self._max_frame_size = max_frame_size
        self._max_session_state = max_session_state
        self._decoder = Decoder(max_frame_size)
        self._input = bytearray()  # written by the host, not read by the worker yet
        self._readable = trio.lowlevel.ParkingLot()
        self._life = trio.CancelScope()
        self._stderr = b""
        #: Bytes the ``alloc`` chaos command holds here; what :meth:`rss` reports.
        self.memory = 0

    # ------------------------------------------------------------------ the host's side

    def write(self, data: bytes) -> None:
        if self.code is not None:
            raise BrokenPipeError("in-process worker has exited")
        self.written += len(data)
        self._input += data
        self._readable.unpark_all()

    def undelivered(self) -> int:
        return len(self._input)

    def exit(self, code: int) -> None:
        super().exit(code)
        self._life.cancel()

    def resume(self) -> None:
        super().resume()
        self._readable.unpark_all()

    async def receive_stderr(self) -> bytes:
        await self._exited.wait()
        data, self._stderr = self._stderr, b""
        return data

    def rss(self) -> int | None:
        return self.memory

    # ------------------------------------------------------------------ the worker's side

    async def run_writer(self) -> None:
        with self._life:
            requests = await self._start()
            if requests is not None:
                await self._serve(requests)

    async def _start(self) -> RequestHandler | None:
        """Import, run the start hooks, say hello (as ``bridge_worker._loop.main`` does)."""
        await trio.sleep(self._launcher.start_delay)
        step = ""
        try:
            commands: dict[str, Command] = {}
            hooks: list[Callable[[], None]] = []
            for step in self._handlers:
                module_commands, module_hooks = _load(step)
                commands.update((c.name, c) for c in module_commands)
                hooks += [h for h in module_hooks if h not in hooks]
            for hook in hooks:
                step = hook_step(hook)
                hook()
        except (Exception, SystemExit) as exc:
            stderr, failure = startup_failure(step, exc)
            self._stderr = stderr.encode()
            self.emit_bytes(encode(failure))
            self.exit(EXIT_STARTUP_FAILED)
            return None
        self.emit_bytes(encode(Hello(PROTOCOL_VERSION, self.pid, command_table(commands.values()))))
        return RequestHandler(commands, self._max_frame_size, self._max_session_state)

    async def _serve(self, requests: RequestHandler) -> None:
        while True:
            try:
                msg = await self._next_message()
            except ProtocolError:
                self.exit(EXIT_PROTOCOL_ERROR)
                return
            if type(msg) is Request:
                command = requests.commands.get(msg.command)
                if command is not None and command.stream:
                    if not await self._run_stream(requests, msg, command):
                        return
                else:
                    await self._run(requests, msg)
            elif type(msg) is Batch:
                await self._run_batch(requests, msg)
            elif type(msg) is StreamCredit or type(msg) is StreamCancel:
                pass  # for a stream that has ended already
            elif type(msg) is Ping:
                self.emit_bytes(encode(Pong(msg.id, self.rss())))
            elif type(msg) is CloseSession:
                requests.sessions.pop(msg.session_id, None)
            elif type(msg) is Shutdown:
                self.exit(0)
                return
            else:
                self.exit(EXIT_PROTOCOL_ERROR)
                return

    async def _next_message(self) -> Message:
        """The next message from the host; reading takes all it has written (as a worker's read
        of its pipe does), so those bytes count as delivered. Waits while stopped."""
        while True:
            msg = self._message_now()
            if msg is not None:
                return msg
            await self._readable.park()

    def _message_now(self) -> Message | None:
        """The next message from the host if one is there (and this worker is not stopped)."""
        if self.stopped:
            return None
        decoder = self._decoder
        msg = next(decoder, None)  # None: no whole frame buffered (the host never ends it)
        if msg is None and self._input:
            decoder.receive_data(bytes(self._input))
            self._input.clear()
            msg = next(decoder, None)
        return msg

    async def _run_batch(self, requests: RequestHandler, batch: Batch) -> None:
        """A chunk of ``pool.map``: as in a worker process, with a command's stand-in (if it has
        one) run for each item."""
        command = requests.commands.get(batch.command)
        stand_in = self._stand_in(command) if command is not None and not command.stream else None
        try:
            if stand_in is None:
                frame = requests.run_batch(batch, command)
            else:
                assert command is not None
                results = []
                for index, item in enumerate(batch.items):
                    try:
                        results.append(await stand_in(item, Context({}, None, batch.id, batch.command)))
                    except Exception as exc:
                        frame = requests.batch_error_frame(batch.id, index, command, exc)
                        break
                else:
                    frame = requests.batch_reply(batch.id, results)
        except SystemExit as exc:
            self.exit(_exit_code(exc))
            return
        self.emit_bytes(frame)

    async def _run_stream(self, requests: RequestHandler, req: Request, command: Command) -> bool:
        """A stream command, as in a worker process: its generator runs no more than the credit
        the host gave ahead of the consumer, and a cancel closes it. (Its real generator always:
        :attr:`InProcessLauncher.simulate` has no stand-in for a stream.) False: the worker
        exited meanwhile."""
        try:
            opened = requests.open_stream(req, command)
        except SystemExit as exc:
            self.exit(_exit_code(exc))
            return False
        if isinstance(opened, bytes):
            self.emit_bytes(opened)
            return True
        started, gen = opened
        credit = STREAM_WINDOW
        try:
            while True:
                msg = self._message_now() if credit > 0 else await self._next_message()
                if msg is not None:
                    if type(msg) is StreamCredit:
                        if msg.id == req.id:
                            credit += msg.n
                    elif type(msg) is StreamCancel:
                        if msg.id == req.id:
                            gen.close()
                            self.emit_bytes(requests.encoder.reply(req.id, None, None))
                            return True
                    elif type(msg) is Ping:
                        self.emit_bytes(encode(Pong(msg.id, self.rss())))
                    elif type(msg) is CloseSession:
                        requests.sessions.pop(msg.session_id, None)
                    else:  # the host sends nothing else to a worker running a stream
                        self.exit(EXIT_PROTOCOL_ERROR)
                        return False
                    continue
                if self.stopped:  # as SIGSTOP stops a process's generator too
                    await self._readable.park()
                    continue
                await trio.lowlevel.checkpoint()  # each item lets the host (and the clock) run
                frame, ended = requests.stream_item(req, command, gen)
                if ended:
                    if frame is None:
                        break
                    self.emit_bytes(frame)
                    return True
                assert frame is not None
                self.emit_bytes(frame)
                credit -= 1
            self.emit_bytes(requests.finish(started, None))
            return True
        except ProtocolError:
            self.exit(EXIT_PROTOCOL_ERROR)
            return False
        except SystemExit as exc:
            self.exit(_exit_code(exc))
            return False
        finally:
            gen.close()

    async def _run(self, requests: RequestHandler, req: Request) -> None:
        command = requests.commands.get(req.command)
        stand_in = self._stand_in(command) if command is not None else None
        try:
            if stand_in is None:
                frame = requests.run(req)
            else:
                started = requests.start(req)
                if isinstance(started, bytes):
                    frame = started
                else:
                    _, command, ctx, _ = started
                    try:
                        result = await stand_in(req.args, ctx)
                    except Exception as exc:  # the handler's exception, as in a worker process
                        frame = requests.exception_frame(req.id, command, exc)
                    else:
                        frame = requests.finish(started, result)
        except SystemExit as exc:
            self.exit(_exit_code(exc))
            return
        self.emit_bytes(frame)

    def _stand_in(self, command: Command) -> Simulation | None:
        simulation = self._launcher.simulate.get(command.name)
        if simulation is not None:
            return simulation
        chaos = _CHAOS_STAND_INS.get(f"{_module_of(command.func)}.{getattr(command.func, '__qualname__', '')}")
        if chaos is None:
            return None
        return lambda args, ctx: chaos(self, args, ctx)


def _exit_code(exc: SystemExit) -> int:
    """The exit code a process ends with when ``exc`` leaves it, as Python's ``sys.exit``."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


# ---------------------------------------------------------------------------------------------
# Handlers modules in the host process
# ---------------------------------------------------------------------------------------------

#: What importing each handlers module registered (its commands' names and its start hooks), for
#: the modules an in-process worker imported first; the registry itself is one for the process.
_registered: dict[str, tuple[frozenset[str], tuple[Callable[[], None], ...]]] = {}


def _module_of(func: Callable[..., Any]) -> str | None:
    return getattr(func, "__module__", None)


def _load(module: str) -> tuple[list[Command], list[Callable[[], None]]]:
    """Import a handlers module and return its commands and start hooks: those registered while
    it was imported (its own imports' too, as in a worker process), and those it defines."""
    if module not in _registered:
        names_before, hooks_before = set(registry), len(start_hooks)
        try:
            importlib.import_module(module)
        except BaseException:
            # A worker process that fails here is gone with what it registered; so is this try,
            # and the next import (the next worker) starts as clean as a new process.
            for name in set(registry) - names_before:
                del registry[name]
            del start_hooks[hooks_before:]
            raise
        _registered[module] = (frozenset(set(registry) - names_before), tuple(start_hooks[hooks_before:]))
    names_then, hooks_then = _registered[module]
    commands = [c for c in registry.values() if c.name in names_then or _module_of(c.func) == module]
    hooks = list(hooks_then) + [h for h in start_hooks if _module_of(h) == module and h not in hooks_then]
    return commands, hooks


# ---------------------------------------------------------------------------------------------
# Virtual-time stand-ins for the handlers that would block the event loop or end the process
# ---------------------------------------------------------------------------------------------


async def _sleep(worker: InProcessWorker, args: Any, ctx: Context) -> float:
    seconds = float(args)  # the same checks as bridge_worker.builtin.sleep
    if seconds < 0:
        raise ValueError(f"sleep needs a non-negative number of seconds, got {args!r}")
    await trio.sleep(seconds)
    return seconds


async def _crash(worker: InProcessWorker, args: Any, ctx: Context) -> None:
    raise SystemExit(int(args) if args is not None else 1)


async def _hang(worker: InProcessWorker, args: Any, ctx: Context) -> None:
    await trio.sleep_forever()


async def _garbage(worker: InProcessWorker, args: Any, ctx: Context) -> None:
    worker.emit_bytes(b"\xff\xff\xff\xffthis is not a frame")


async def _alloc(worker: InProcessWorker, args: Any, ctx: Context) -> int:
    worker.memory += int(args) * 1024 * 1024
    return worker.memory // (1024 * 1024)


_CHAOS_STAND_INS: Final[Mapping[str, Callable[[InProcessWorker, Any, Context], Awaitable[Any]]]] = {
    "bridge_worker.builtin.sleep": _sleep,
    "bridge_worker.testing.crash": _crash,
    "bridge_worker.testing.hang": _hang,
    "bridge_worker.testing.garbage": _garbage,
    "bridge_worker.testing.alloc": _alloc,
}
