"""Launching worker processes: the small interface the pool needs, and the local subprocess.

The pool talks to a launched worker only through :class:`WorkerProcess` (bytes in, bytes out,
kill, wait), so a fake in-process worker (tests) or a remote one can stand in for a subprocess.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
from typing import Protocol

import psutil
import trio


class WorkerProcess(Protocol):
    """One launched worker, as the host sees it."""

    pid: int
    #: Bytes accepted by :meth:`write` so far.
    written: int

    def undelivered(self) -> int:
        """How many of the bytes written the worker has not read (still in the pipe or not yet
        written to it). Valid after the worker died, until :meth:`close`."""

    def write(self, data: bytes) -> None:
        """Queue a whole frame for the worker; never blocks. Raises OSError if the channel is
        broken. Bytes the pipe cannot take now are flushed by :meth:`run_writer`; between
        :meth:`hold` and :meth:`release` nothing is written yet."""

    def hold(self) -> None:
        """Keep what :meth:`write` gets until :meth:`release` (which never raises): the frames
        written while handling one read go out in one write."""

    def release(self) -> None:
        """Write what was held."""

    async def run_writer(self) -> None:
        """Flush what :meth:`write` could not write at once; runs for the worker's lifetime."""

    async def receive_some(self) -> bytes:
        """The next bytes from the worker's protocol channel; ``b""`` at end of stream."""

    async def receive_stderr(self) -> bytes:
        """The next bytes of the worker's stderr; ``b""`` at end of stream."""

    def kill(self) -> None:
        """SIGKILL the worker and its process group. Idempotent, never raises."""

    async def wait(self) -> int:
        """Wait for the worker to exit, kill what is left of its group, reap it, and return its
        exit code (negative: killed by that signal)."""

    def rss(self) -> int | None:
        """Resident memory in bytes, or None if it cannot be read."""

    def close(self) -> None:
        """Release the host's ends of the channel (after :meth:`wait`)."""


class Launcher(Protocol):
    """Starts workers. Called from the trio thread; must not block for long."""

    def launch(
        self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int
    ) -> WorkerProcess:
        ...


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Workers import handler modules with the host's sys.path, as multiprocessing's spawn does.
    path = [p if p else os.getcwd() for p in sys.path]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


class LocalLauncher:
    """Spawns ``python -m bridge_worker`` as a child process.

    Spawning happens in the calling (trio) thread on purpose: ``PR_SET_PDEATHSIG`` fires when the
    *thread* that forked the child exits, and trio's worker threads exit after ~10 s idle.
    """

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None) -> None:
        self.python = python
        self.env = _child_env(env or {})

    def launch(
        self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int
    ) -> "LocalProcess":
        return LocalProcess._spawn(
            [
                self.python,
                "-m",
                "bridge_worker",
                "--handlers",
                ",".join(handlers),
                "--max-frame-size",
                str(max_frame_size),
                "--max-session-state",
                str(max_session_state),
            ],
            self.env,
        )


class LocalProcess:
    """A worker subprocess with raw non-blocking pipe fds (no per-call stream wrappers)."""

    def __init__(self, popen: "subprocess.Popen[bytes]", to_child: int, from_child: int, err: int) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._to_child = to_child
        self._from_child = from_child
        self._err = err
        self._pidfd = os.pidfd_open(popen.pid)
        self._psutil: psutil.Process | None = None
        self._exit_code: int | None = None
        self.written = 0
        self._pending = bytearray()  # bytes not yet written: the pipe was full, or held
        self._holding = False
        self._writer_lot = trio.lowlevel.ParkingLot()

    @classmethod
    def _spawn(cls, argv: list[str], env: dict[str, str]) -> "LocalProcess":
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                env=env,
                process_group=0,  # the worker leads its own group, so killpg takes its children
                close_fds=True,
            )
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        return cls(popen, in_w, out_r, err_r)

    def undelivered(self) -> int:
        try:
            in_pipe = struct.unpack("i", fcntl.ioctl(self._to_child, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return len(self._pending)
        return int(in_pipe) + len(self._pending)

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self._pending or self._holding:
            self._pending += data
            return
        try:
            written = os.write(self._to_child, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            # Slow path only: a frame bigger than the pipe buffer, or a worker not reading.
            self._pending += data[written:]
            self._writer_lot.unpark_all()

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        self._holding = False
        if not self._pending:
            return
        try:
            n = os.write(self._to_child, self._pending)
        except OSError:
            # Full (the writer task goes on when it drains), or the worker is dying (its reader
            # sees the end of stream; the bytes left here count as undelivered).
            n = 0
        del self._pending[:n]
        if self._pending:
            self._writer_lot.unpark_all()

    async def run_writer(self) -> None:
        while True:
            while not self._pending:
                await self._writer_lot.park()
            await trio.lowlevel.wait_writable(self._to_child)
            try:
                n = os.write(self._to_child, self._pending)
            except BlockingIOError:
                continue
            del self._pending[:n]

    async def receive_some(self) -> bytes:
        # Wait first, then read: the pipe was drained by the previous read, so trying a read
        # first would fail with EAGAIN (a syscall and an exception) on nearly every call.
        while True:
            await trio.lowlevel.wait_readable(self._from_child)
            try:
                return os.read(self._from_child, 1 << 16)
            except BlockingIOError:
                continue

    async def receive_stderr(self) -> bytes:
        while True:
            try:
                return os.read(self._err, 1 << 16)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._err)

    def kill(self) -> None:
        if self._exit_code is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    async def wait(self) -> int:
        if self._exit_code is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            # The leader is a zombie now, so its pid still names the group: kill what a handler
            # left behind before reaping frees the pid.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                _, status = os.waitpid(self.pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = -signal.SIGKILL  # reaped elsewhere; nothing better to report
            self._exit_code = code
            self._popen.returncode = code  # so Popen's finalizer does not poll a freed pid
        return self._exit_code

    def rss(self) -> int | None:
        try:
            if self._psutil is None:
                self._psutil = psutil.Process(self.pid)
            return int(self._psutil.memory_info().rss)
        except (psutil.Error, OSError):
            return None

    def close(self) -> None:
        for fd in (self._to_child, self._from_child, self._err, self._pidfd):
            try:
                trio.lowlevel.notify_closing(fd)
            except (OSError, RuntimeError):
                pass
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        self._to_child = self._from_child = self._err = self._pidfd = -1
