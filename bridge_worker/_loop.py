"""The worker's blocking request loop: protect the channel, import handlers, hello, serve.

Runs in the worker process only. One request at a time; the host is in charge of everything else
(deadlines, retries, which sessions live here).
"""

from __future__ import annotations

import importlib
import os
import select
import signal
import sys
import threading
import traceback
from typing import Callable, NamedTuple, NoReturn

from bridge_worker import Command, registry, start_hooks
from bridge_worker._family import (
    become_subreaper,
    enter_cgroup,
    kill_descendants,
    kill_family,
)
from bridge_worker._requests import RequestHandler, command_table
from bridge_worker.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    EOF,
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
    StartupFailed,
    StreamCancel,
    StreamCredit,
)

#: Exit code of a worker whose handlers failed to import or whose start hook raised.
EXIT_STARTUP_FAILED = 3
#: Exit code of a worker that received a frame it could not decode.
EXIT_PROTOCOL_ERROR = 4

_PR_SET_PDEATHSIG = 1

_proto_out = -1


def protocol_out_fd() -> int:
    """The fd replies go out on (for the ``garbage`` chaos command only)."""
    return _proto_out


def _protect_channel() -> tuple[int, int]:
    """Move the protocol pipes off fds 0/1 and point fd 1 and sys.stdout at stderr.

    After this, a handler that prints, writes to fd 1 or spawns a child that inherits stdout
    cannot put a byte on the protocol channel.
    """
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    quiet_stdio()
    return proto_in, proto_out


def quiet_stdio() -> None:
    """Point fd 0 at /dev/null, and fd 1 and sys.stdout at stderr (which the host drains)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)
    sys.stdout = sys.stderr


def forget_in_child(proto_in: int, proto_out: int) -> None:
    """In a child that a handler forks (``os.fork``, multiprocessing's "fork" context), undo what
    makes a process the worker: the child's SIGTERM must not kill the worker's family, and the
    child must not hold the protocol channel (the host would not see the worker's end)."""

    def in_child() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in (proto_in, proto_out):
            try:
                os.close(fd)
            except OSError:
                pass

    os.register_at_fork(after_in_child=in_child)


def die_with_parent_process() -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the process that started this one exits, handled by
    killing this worker's family (the handler runs when the main thread gets to Python code)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: kill_family())
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        kill_family()


def _die_with_parent(proto_in: int) -> None:
    """Exit, with the whole process group, as soon as the host process is gone.

    Two independent signals, because the host may die by SIGKILL at any moment:
    PR_SET_PDEATHSIG delivers SIGTERM when the host dies (its handler runs when the main thread
    gets to Python code), and a watchdog thread sees the hang-up of the request pipe even while the
    main thread is busy in a handler.
    """
    die_with_parent_process()

    def watch() -> None:
        poller = select.poll()
        poller.register(proto_in, 0)  # POLLHUP and POLLERR are always reported
        while True:
            for _fd, events in poller.poll():
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    kill_family()

    threading.Thread(target=watch, name="host-watchdog", daemon=True).start()


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory() -> int | None:
    """This process's resident memory in bytes (what psutil reports as RSS), or None where
    /proc is not there. Sent in heartbeat answers: the host cannot measure a remote worker."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class _Server:
    def __init__(
        self, proto_in: int, proto_out: int, max_frame_size: int, max_session_state: int
    ) -> None:
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.decoder = Decoder(max_frame_size)
        self.requests = RequestHandler(registry, max_frame_size, max_session_state)
        self.encoder = self.requests.encoder
        # To see, between a stream's items, whether the host has sent something (a cancel).
        self._poll = select.poll()
        self._poll.register(proto_in, select.POLLIN)

    def send(self, message: Message) -> None:
        self.write(self.encoder.encode(message))

    def write(self, frame: bytes) -> None:
        n = os.write(self.proto_out, frame)
        if n < len(frame):  # a frame bigger than the pipe buffer
            view = memoryview(frame)[n:]
            while view:
                view = view[os.write(self.proto_out, view) :]

    def serve(self) -> bool:
        """Serve until told to stop (True) or until the host's end of the channel closed (False).

        Replies of pipelined commands (short by declaration) wait until the requests read with
        theirs are answered too, and go out in one write; any other reply goes at once."""
        decoder = self.decoder
        requests = self.requests
        run = requests.run_command
        commands = registry
        held: list[bytes] = []
        try:
            while True:
                batch = decoder.messages()
                if not batch:  # nothing whole buffered: send what is held, then read
                    if held:
                        self.flush(held)
                    if decoder.next_message() is EOF:  # else NEED_DATA (or it raises)
                        return False
                    decoder.receive_data(os.read(self.proto_in, 1 << 16))
                    continue
                for msg in batch:
                    if type(msg) is Request:
                        cmd = commands.get(msg.command)
                        if cmd is not None and cmd.pipelined and msg.session_id is None:
                            held.append(run(msg, cmd))
                            continue
                        if held:
                            self.flush(held)
                        if cmd is not None and cmd.stream:
                            if not self.run_stream(msg, cmd):
                                return False  # the host went away mid-stream
                            continue
                        self.write(run(msg, cmd))
                        continue
                    if type(msg) is Batch:
                        cmd = commands.get(msg.command)
                        if cmd is not None and cmd.pipelined:
                            held.append(requests.run_batch(msg, cmd))
                            continue
                        if held:
                            self.flush(held)
                        self.write(requests.run_batch(msg, cmd))
                        continue
                    if held:
                        self.flush(held)
                    if type(msg) is Ping:
                        self.send(Pong(msg.id, resident_memory()))
                    elif type(msg) is CloseSession:
                        requests.sessions.pop(msg.session_id, None)
                    elif type(msg) is StreamCredit or type(msg) is StreamCancel:
                        pass  # for a stream that has ended already
                    elif type(msg) is Shutdown:
                        return True
                    else:
                        raise ProtocolError(f"unexpected message from the host: {msg!r}")
        finally:
            if held:  # answers already made go out, whatever ends the loop
                try:
                    self.flush(held)
                except OSError:
                    pass

    def flush(self, frames: list[bytes]) -> None:
        self.write(frames[0] if len(frames) == 1 else b"".join(frames))
        frames.clear()

    def run_stream(self, req: Request, cmd: Command) -> bool:
        """Run a stream command: send each item its generator yields, no more than the credit
        the host gave ahead of its consumer, then a Reply (committing a session's state) or the
        error. Returns False if the host went away meanwhile."""
        requests = self.requests
        opened = requests.open_stream(req, cmd)
        if isinstance(opened, bytes):
            self.write(opened)
            return True
        started, gen = opened
        credit = STREAM_WINDOW
        try:
            while True:
                # (Whole messages already read were handled by the last _stream_control.)
                if credit <= 0 or self._readable():
                    got = self._stream_control(req.id, block=credit <= 0)
                    if got is None:
                        return False  # end of stream: the host is gone
                    if got < 0:  # the consumer left: close the generator, commit nothing
                        gen.close()
                        self.write(self.encoder.reply(req.id, None, None))
                        return True
                    credit += got
                    continue
                frame, ended = requests.stream_item(req, cmd, gen)
                if ended:
                    if frame is None:
                        break
                    self.write(frame)
                    return True
                assert frame is not None
                self.write(frame)
                credit -= 1
            self.write(requests.finish(started, None))
            return True
        finally:
            gen.close()  # (a no-op once it ended) its finally runs on every way out

    def _readable(self) -> bool:
        """Whether the host has sent something (a credit, a cancel) since the last read."""
        return bool(self._poll.poll(0))

    def _stream_control(self, stream_id: int, block: bool) -> int | None:
        """Read what the host sent during a stream: the credit it added, -1 for a cancel of this
        stream, None at end of stream. Waits for something when ``block``."""
        decoder = self.decoder
        credit = 0
        while True:
            for msg in decoder.messages():
                if type(msg) is StreamCredit:
                    if msg.id == stream_id:
                        credit += msg.n
                elif type(msg) is StreamCancel:
                    if msg.id == stream_id:
                        return -1
                elif type(msg) is Ping:
                    self.send(Pong(msg.id, resident_memory()))
                elif type(msg) is CloseSession:
                    self.requests.sessions.pop(msg.session_id, None)
                else:  # the host sends nothing else to a worker running a stream
                    raise ProtocolError(f"unexpected message from the host during a stream: {msg!r}")
            if credit or (not block and not self._readable()):
                return credit
            if decoder.next_message() is EOF:
                return None
            decoder.receive_data(os.read(self.proto_in, 1 << 16))


def hook_step(hook: Callable[[], None]) -> str:
    """The startup step a start hook is, as a failure names it."""
    return f"start hook {getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', hook)!s}"


def startup_failure(step: str, exc: BaseException) -> tuple[str, StartupFailed]:
    """What a worker whose start failed in ``step`` writes to its stderr, and tells the host."""
    tb = "".join(traceback.format_exception(exc))
    failure = StartupFailed(step, f"{type(exc).__name__}: {exc}", tb)
    return f"bridge_worker: startup failed in {step}:\n{tb}", failure


_USAGE = (
    "usage: python -m bridge_worker --handlers MODULE[,MODULE] "
    "[--max-frame-size BYTES] [--max-session-state BYTES] [--cgroup DIR]\n"
    "       python -m bridge_worker --handlers MODULE[,MODULE] --connect HOST:PORT "
    "[--die-with-parent] [--tls-ca FILE [--tls-name NAME]] [--cgroup DIR]\n"
    "       (with --connect, the token comes from the environment variable BRIDGE_WORKER_TOKEN)"
)


class Options(NamedTuple):
    """The command line. Over pipes the limits come from it; over TCP from the pool (which
    authenticates first) and ``--connect`` names the pool to dial."""

    modules: list[str]
    max_frame: int
    max_state: int
    cgroup: str | None
    connect: tuple[str, int] | None = None
    #: Exit with the process that started this one (PR_SET_PDEATHSIG): launchers that hold
    #: their worker say so; a worker started by hand or by a service manager does not.
    die_with_parent: bool = False
    #: TLS: the CA file that signed the pool's certificate, and the name to check in it.
    tls_ca: str | None = None
    tls_name: str | None = None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(text)
    return host.strip("[]"), int(port)


def _parse_args(argv: list[str]) -> Options:
    # Plain parsing: argparse costs start-up time in every worker.
    modules: list[str] = []
    max_frame = DEFAULT_MAX_FRAME_SIZE
    max_state = DEFAULT_MAX_FRAME_SIZE // 2
    cgroup: str | None = None
    connect: tuple[str, int] | None = None
    die_with_parent = False
    tls_ca: str | None = None
    tls_name: str | None = None
    it = iter(argv)
    try:
        for arg in it:
            if arg == "--handlers":
                modules = [m for m in next(it).split(",") if m]
            elif arg == "--max-frame-size":
                max_frame = int(next(it))
            elif arg == "--max-session-state":
                max_state = int(next(it))
            elif arg == "--cgroup":
                cgroup = next(it)
            elif arg == "--connect":
                connect = _address(next(it))
            elif arg == "--die-with-parent":
                die_with_parent = True
            elif arg == "--tls-ca":
                tls_ca = next(it)
            elif arg == "--tls-name":
                tls_name = next(it)
            else:
                sys.exit(f"{_USAGE}\nunknown argument {arg!r}")
    except (StopIteration, ValueError):
        sys.exit(f"{_USAGE}\nan option is missing its value or the value is not a number")
    if not modules:
        sys.exit(f"{_USAGE}\nno handler module given")
    if connect is None and (tls_ca is not None or die_with_parent):
        sys.exit(f"{_USAGE}\n--tls-ca and --die-with-parent go with --connect")
    return Options(modules, max_frame, max_state, cgroup, connect, die_with_parent, tls_ca, tls_name)


def main(argv: list[str]) -> None:
    global _proto_out
    opts = _parse_args(argv)
    # Before any handler code runs: whatever it starts stays in this worker's family.
    if opts.cgroup is None or not enter_cgroup(opts.cgroup):
        become_subreaper()
    # The host is in charge: Ctrl-C in a terminal reaches the whole foreground group, but only
    # the host decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serving: Callable[[], None] | None = None
    if opts.connect is None:
        proto_in, proto_out = _protect_channel()
        forget_in_child(proto_in, proto_out)
        _die_with_parent(proto_in)
        server = _Server(proto_in, proto_out, opts.max_frame, opts.max_state)
    else:
        # Only TCP workers pay for importing socket, ssl and hmac.
        from bridge_worker._tcp import connect

        server, serving = connect(opts)
    _proto_out = server.proto_out
    _run(server, opts.modules, serving)


def _run(server: _Server, modules: list[str], serving: Callable[[], None] | None) -> NoReturn:
    """Import the handlers, run the start hooks, say hello (then call ``serving``), serve until
    the end, and exit with everything this worker started."""
    step = ""
    try:
        for step in modules:
            importlib.import_module(step)
        step = "start hook"
        for hook in start_hooks:
            step = hook_step(hook)
            hook()
    except BaseException as exc:  # noqa: BLE001 - report any startup failure, then exit
        stderr, failure = startup_failure(step, exc)
        sys.stderr.write(stderr)
        sys.stderr.flush()
        try:
            server.send(failure)
        except OSError:
            pass
        os._exit(EXIT_STARTUP_FAILED)
    server.send(Hello(PROTOCOL_VERSION, os.getpid(), command_table(registry.values())))
    if serving is not None:
        serving()
    try:
        asked_to_stop = server.serve()
    except ProtocolError as exc:
        sys.stderr.write(f"bridge_worker: bad frame from the host, exiting: {exc}\n")
        sys.stderr.flush()
        os._exit(EXIT_PROTOCOL_ERROR)
    except OSError:
        kill_family()  # the channel broke: the host is gone
    sys.stderr.flush()
    if not asked_to_stop:
        # End of stream: the host is gone (or dropped us). Take the group with us; the watchdog
        # thread would too, but this thread may get here first.
        kill_family()
    kill_descendants()  # the host asked us to stop: nothing we started outlives us
    os._exit(0)
