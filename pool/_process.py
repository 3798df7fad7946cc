"""Launching worker processes: the small interface the pool needs, and the local subprocess.

The pool talks to a launched worker only through :class:`WorkerProcess` (bytes in, bytes out,
kill, wait), so a fake in-process worker (tests) or a remote one can stand in for a subprocess.

A local worker's end is found from its pidfd as well as from its pipe, so a process that it left
holding the pipe (a forked child, a daemon) cannot hide its death. Everything a local worker
starts ends with it: each worker gets a cgroup v2 directory of its own where this process may make
one (``cgroup.kill`` ends all of it, whatever it did with sessions and process groups); elsewhere
the worker is a child subreaper and the host kills its process tree (see ``bridge_worker._family``).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Mapping, Protocol

import psutil
import trio

from bridge_worker._family import descendants
from pool._config import PoolConfig


class WorkerProcess(Protocol):
    """One launched worker, as the host sees it."""

    #: Its process id on its own host (0 while not known: a remote worker that has not said hello).
    pid: int
    #: Where it runs: "localhost", or the address its connection came from.
    host: str
    #: Its process runs on this machine, so ``pid`` means something here (worker_pids() lists it).
    local: bool
    #: It sends heartbeats on its own and its channel gives no end of stream when it is cut off
    #: (TCP): the monitor ends it after ``heartbeat_interval + heartbeat_timeout`` of silence,
    #: busy or not, and pings it at every check so that it hears from its pool too.
    beats: bool
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
        """The next bytes from the worker's protocol channel; ``b""`` at end of stream, and once
        the worker has exited and what it wrote has been read."""

    async def receive_stderr(self) -> bytes:
        """The next bytes of the worker's stderr; ``b""`` at end of stream."""

    def kill(self) -> None:
        """SIGKILL the worker and everything it started. Idempotent, never raises."""

    async def wait(self) -> int:
        """Wait for the worker to exit, kill everything it started, reap it, and return its
        exit code (negative: killed by that signal)."""

    def rss(self) -> int | None:
        """Memory in bytes of the worker and every process it started (what the memory limits
        compare), or None if it cannot be read."""

    def close(self) -> None:
        """Release the host's ends of the channel (after :meth:`wait`)."""


class Launcher(Protocol):
    """Starts workers. Called from the trio thread; must not block for long."""

    def open(self, config: PoolConfig) -> None:
        """Called once, in the pool's trio run, before the first launch."""

    def launch(
        self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int
    ) -> WorkerProcess:
        ...

    def close(self) -> None:
        """Release what the launcher holds, once every worker it launched is reaped."""


def host_pythonpath() -> str:
    """This process's sys.path as a PYTHONPATH: workers import handler modules with the host's
    sys.path, as multiprocessing's spawn does."""
    path = [p if p else os.getcwd() for p in sys.path]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(path)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = host_pythonpath()
    env.update(extra)
    return env


_POOL_CGROUP_PREFIX = "trio-worker-pool."


def _own_cgroup_dir() -> str | None:
    """This process's cgroup v2 directory, or None where there is none (cgroup v1 only)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mount = next((line.split()[4] for line in f if " - cgroup2 " in line), None)
    except OSError:
        return None
    if path is None or mount is None:
        return None
    return os.path.join(mount, path.lstrip("/"))


def _remove_cgroup(path: str) -> bool:
    """Remove a worker's (empty) cgroup directory; False if it still holds processes."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class _Cgroups:
    """One cgroup v2 directory per launcher, one child directory per worker."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._ids = itertools.count(1)

    @classmethod
    def make(cls) -> _Cgroups | None:
        """The launcher's directory, or None where this process may not make one."""
        own = _own_cgroup_dir()
        if own is None:
            return None
        namespace = _pid_namespace()
        _remove_stale(own, namespace)
        # pid first, as earlier versions name theirs (they read the pid from there); then the
        # pid namespace, which says where that pid means something.
        root = os.path.join(own, f"{_POOL_CGROUP_PREFIX}{os.getpid()}.{next(_launcher_ids)}.{namespace}")
        try:
            os.mkdir(root)
        except OSError:
            return None
        return cls(root)

    def for_worker(self) -> str | None:
        path = os.path.join(self.root, f"w{next(self._ids)}")
        try:
            os.mkdir(path)
        except OSError:
            return None
        return path

    def close(self) -> None:
        for name in os.listdir(self.root) if os.path.isdir(self.root) else ():
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                _kill_cgroup(path)
                _remove_cgroup(path)
        _remove_cgroup(self.root)


_launcher_ids = itertools.count(1)


#: Linux's PID_MAX_LIMIT: no pid is this high (a name with a higher one is not a pool's).
_PID_LIMIT = 1 << 22


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 where it cannot be read): a pid means
    something only in its own namespace, and the cgroup mount may be shared across several."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _remove_stale(own: str, namespace: int) -> None:
    """Remove what pools of processes that are gone left (a host killed by SIGKILL cannot clean
    up its directories; its workers killed their own processes). A directory is named after its
    host's pid namespace and pid: only those of this namespace can be judged here (another
    namespace's pids are not ours to look up, and a pool there may well be alive)."""
    try:
        names = os.listdir(own)
    except OSError:
        return
    for name in names:
        if not name.startswith(_POOL_CGROUP_PREFIX):
            continue
        parts = name[len(_POOL_CGROUP_PREFIX) :].split(".")  # pid.launcher.namespace
        try:
            pid, _, ns = (int(part) for part in parts)
        except ValueError:
            continue  # an earlier version's name: its host's namespace is not known
        if ns != namespace or not 0 < pid < _PID_LIMIT or psutil.pid_exists(pid):
            continue
        root = os.path.join(own, name)
        try:
            workers = [os.path.join(root, w) for w in os.listdir(root) if os.path.isdir(os.path.join(root, w))]
        except OSError:
            workers = []
        for worker in workers:
            _kill_cgroup(worker)
        # A killed process leaves its cgroup within milliseconds; a rare, bounded wait (this
        # runs once per launcher), so that the directories go now rather than at the next pool.
        give_up = time.monotonic() + 1.0
        while any(_cgroup_pids(w) for w in workers) and time.monotonic() < give_up:
            time.sleep(0.005)
        for worker in workers:
            _remove_cgroup(worker)
        _remove_cgroup(root)


def _kill_cgroup(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass


def _cgroup_pids(path: str) -> list[int]:
    """The processes in a cgroup (none if it cannot be read)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _cgroup_populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return any(line.strip() == "populated 1" for line in f)
    except OSError:
        return False


class LocalLauncher:
    """Spawns ``python -m bridge_worker`` as a child process.

    Spawning happens in the calling (trio) thread on purpose: ``PR_SET_PDEATHSIG`` fires when the
    *thread* that forked the child exits, and trio's worker threads exit after ~10 s idle.

    ``cgroup``: put each worker in a cgroup v2 directory of its own (so that ``cgroup.kill`` ends
    everything it started): None (the default) where this process may make one, True to require
    it (launching fails otherwise), False never.
    """

    def __init__(
        self, python: str = sys.executable, env: dict[str, str] | None = None, *, cgroup: bool | None = None
    ) -> None:
        self.python = python
        self.env = _child_env(env or {})
        self._want_cgroup = cgroup
        self._cgroups: _Cgroups | None = None  # made at the first launch

    def _worker_cgroup(self) -> str | None:
        if self._cgroups is None and self._want_cgroup is not False:
            self._cgroups = _Cgroups.make()
            if self._cgroups is None:
                if self._want_cgroup:
                    raise OSError("LocalLauncher(cgroup=True): this process cannot make a cgroup v2 directory")
                self._want_cgroup = False  # not here: do not try again for each worker
        return self._cgroups.for_worker() if self._cgroups is not None else None

    def open(self, config: PoolConfig) -> None:
        """Nothing to do: a LocalLauncher takes what it needs in its constructor."""

    def launch(
        self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int
    ) -> "LocalProcess":
        return self.spawn(
            [
                "--handlers",
                ",".join(handlers),
                "--max-frame-size",
                str(max_frame_size),
                "--max-session-state",
                str(max_session_state),
            ]
        )

    def spawn(self, args: list[str], env: Mapping[str, str] | None = None) -> "LocalProcess":
        """Start ``python -m bridge_worker ARGS`` with ``env`` added to its environment, in a
        cgroup of its own where that is possible (also for the TCP launcher's local workers)."""
        argv = [self.python, "-m", "bridge_worker", *args]
        cgroup = self._worker_cgroup()
        if cgroup is not None:
            argv += ["--cgroup", cgroup]
        try:
            return LocalProcess._spawn(argv, {**self.env, **env} if env else self.env, cgroup)
        except BaseException:
            if cgroup is not None:
                _remove_cgroup(cgroup)
            raise

    def close(self) -> None:
        if self._cgroups is not None:
            self._cgroups.close()
            self._cgroups = None


class FrameWriter:
    """The writing half of a worker's channel over a non-blocking fd (a pipe, a socket): whole
    frames written from the trio thread with one ``os.write`` and never a wait; what the fd cannot
    take at once is flushed by :meth:`run_writer`. The :class:`WorkerProcess` methods ``write``,
    ``hold``, ``release``, ``run_writer`` and the ``written`` count."""

    def __init__(self, fd: int) -> None:
        self._out = fd
        self.written = 0
        self._pending = bytearray()  # bytes not yet written: the fd was full, or held
        self._holding = False
        self._writer_lot = trio.lowlevel.ParkingLot()

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self._pending or self._holding:
            self._pending += data
            return
        try:
            written = os.write(self._out, data)
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
            n = os.write(self._out, self._pending)
        except OSError:
            # Full (the writer task goes on when it drains), or the worker is dying (its reader
            # sees the end of stream; the bytes left here count as undelivered).
            n = 0
        del self._pending[:n]
        if self._pending:
            self._writer_lot.unpark_all()

    async def run_writer(self) -> None:
        while True:
            if not self._pending:
                await self._writer_lot.park()
                continue
            try:
                n = os.write(self._out, self._pending)
            except BlockingIOError:
                n = 0
            del self._pending[:n]
            if self._pending:  # the fd is full: write the rest as it drains
                await trio.lowlevel.wait_writable(self._out)


class LocalProcess(FrameWriter):
    """A worker subprocess with raw non-blocking pipe fds (no per-call stream wrappers)."""

    host = "localhost"
    local = True
    beats = False

    def __init__(
        self,
        popen: "subprocess.Popen[bytes]",
        to_child: int,
        from_child: int,
        err: int,
        cgroup: str | None,
    ) -> None:
        super().__init__(to_child)
        self.pid = popen.pid
        self._popen = popen
        self._from_child = from_child
        self._err = err
        self._cgroup = cgroup
        self._pidfd = os.pidfd_open(popen.pid)
        # Readable when the pipe is, or when the worker has exited (its pidfd): one wait for both.
        self._readable = select.epoll()
        self._readable.register(from_child, select.EPOLLIN)
        self._readable.register(self._pidfd, select.EPOLLIN)
        self._psutil: psutil.Process | None = None
        self._cgroup_memory = True  # memory.current may be readable (until it is not)
        self._exit_code: int | None = None

    @classmethod
    def _spawn(cls, argv: list[str], env: dict[str, str], cgroup: str | None) -> "LocalProcess":
        fds: list[int] = []
        try:
            for _ in range(3):
                fds.extend(os.pipe2(os.O_CLOEXEC))
            in_r, in_w, out_r, out_w, err_r, err_w = fds
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
            for fd in fds:
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        try:
            return cls(popen, in_w, out_r, err_r, cgroup)
        except BaseException:  # out of fds for the pidfd or the epoll: do not leave it running
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise

    def undelivered(self) -> int:
        try:
            in_pipe = struct.unpack("i", fcntl.ioctl(self._out, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return len(self._pending)
        return int(in_pipe) + len(self._pending)

    async def receive_some(self) -> bytes:
        # Wait first, then read: the pipe was drained by the previous read, so trying a read
        # first would fail with EAGAIN (a syscall and an exception) on nearly every call.
        while True:
            await trio.lowlevel.wait_readable(self._readable.fileno())
            try:
                return os.read(self._from_child, 1 << 16)
            except BlockingIOError:
                # Nothing to read, yet ready: the worker has exited while something it left
                # behind holds the pipe open. What it wrote has been read: that is the end.
                if self._exited():
                    return b""

    def _exited(self) -> bool:
        return any(fd == self._pidfd for fd, _ in self._readable.poll(0))

    async def receive_stderr(self) -> bytes:
        while True:
            try:
                return os.read(self._err, 1 << 16)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._err)

    def kill(self) -> None:
        if self._exit_code is not None:
            return
        self._kill_family()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def _kill_family(self) -> None:
        """SIGKILL everything the worker started: its cgroup, or its process tree and group."""
        if self._cgroup is not None:
            _kill_cgroup(self._cgroup)
        else:
            # The worker is a child subreaper: while it lives, its tree holds every descendant.
            for pid in descendants(self.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    async def wait(self) -> int:
        if self._exit_code is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            # The leader is a zombie now, so its pid still names its group: end what a handler
            # left behind before reaping frees the pid.
            self._kill_family()
            try:
                _, status = os.waitpid(self.pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = -signal.SIGKILL  # reaped elsewhere; nothing better to report
            self._exit_code = code
            self._popen.returncode = code  # so Popen's finalizer does not poll a freed pid
            if self._cgroup is not None:
                # cgroup.kill is delivered at once, but the processes take a moment to go.
                with trio.move_on_after(1.0):
                    while _cgroup_populated(self._cgroup):
                        await trio.sleep(0.005)
                if _remove_cgroup(self._cgroup):
                    self._cgroup = None
        return self._exit_code

    def rss(self) -> int | None:
        """The worker's cgroup's ``memory.current`` where the memory controller is on for it
        (exact: shared pages counted once); else the RSS of every process in its cgroup, or
        of its process tree (it is a subreaper: its tree holds every descendant). Summed RSS
        counts pages a forked child shares with the worker twice: it errs on the high side."""
        cgroup = self._cgroup
        if cgroup is not None and self._cgroup_memory:
            try:
                with open(os.path.join(cgroup, "memory.current")) as f:
                    return int(f.read())
            except (OSError, ValueError):
                self._cgroup_memory = False  # no memory controller here: not again
        try:
            if self._psutil is None:
                self._psutil = psutil.Process(self.pid)
            total = int(self._psutil.memory_info().rss)
        except (psutil.Error, OSError):
            return None
        for pid in _cgroup_pids(cgroup) if cgroup is not None else descendants(self.pid):
            if pid == self.pid:
                continue
            try:
                total += int(psutil.Process(pid).memory_info().rss)
            except (psutil.Error, OSError):
                pass  # it ended meanwhile
        return total

    def close(self) -> None:
        if self._pidfd < 0:
            return
        for fd in (self._out, self._from_child, self._err, self._pidfd, self._readable.fileno()):
            if fd < 0:
                continue
            try:
                trio.lowlevel.notify_closing(fd)
            except (OSError, RuntimeError):
                pass
        for fd in (self._out, self._from_child, self._err, self._pidfd):
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        self._readable.close()
        self._out = self._from_child = self._err = self._pidfd = -1
