"""Workers over TCP: the pool listens, workers dial it and prove they hold the token.

:class:`TcpLauncher` binds a listening socket when it is made (so ``.address`` is known before
the pool opens, for workers started elsewhere), and once the pool opens it accepts connections in
a trio system task. Each connection must complete the mutual HMAC challenge
(``bridge_worker._auth``, inside TLS when the launcher has an SSL context) within
``handshake_timeout``, reading never more than the handshake's fixed sizes: a peer that sends
garbage, a wrong answer, too much or nothing is dropped and counted in ``rejected``, and no worker,
slot or circuit ever sees it. At most ``max_handshakes`` connections may be authenticating at once;
more are closed at once.

A slot's launch gives a :class:`TcpProcess` that waits for its worker's connection: a worker the
launcher spawned on this machine carries a one-time slot nonce (in its environment) that pairs it
with its slot; a worker started by anything else with the token takes a slot that waits for any
worker (``local_workers`` says how many slots the launcher fills itself; None: all of them). The
supervisor needs no change for this: :meth:`TcpProcess.receive_some` waits for the connection,
so the wait is part of the slot's start and bounded by ``start_timeout``.

Over TCP a request that was written may have run (there is no "still unread in the pipe" to
prove otherwise), a silent worker is found by heartbeats rather than by an end of stream
(``beats``), and a worker on another host is measured by what it reports.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
from typing import Any

import trio

from bridge_worker._auth import (
    ANY_SLOT,
    PROOF_SIZE,
    SLOT_ENV,
    TOKEN_ENV,
    AuthError,
    Params,
    Status,
    answer,
    challenge,
    check_proof,
    token_key,
)
from pool._config import PoolConfig, beat_timing
from pool._errors import EXIT_UNKNOWN
from pool._process import FrameWriter, LocalLauncher, LocalProcess

logger = logging.getLogger("pool.tcp")


class TcpLauncher:
    """Workers that connect to the pool over TCP (see the module docstring).

    ``token``: the shared secret, a printable str or bytes of at least 16 characters
    (``secrets.token_hex(32)``); workers read it from the environment variable
    ``BRIDGE_WORKER_TOKEN``. ``host``, ``port``: where to listen (loopback, any free port by
    default); ``.address`` is the bound ``(host, port)``. ``local_workers``: how many slots the
    launcher fills with workers it spawns on this machine (None: all); the others wait for workers
    started by anything else, e.g. ``BRIDGE_WORKER_TOKEN=... python -m bridge_worker --connect
    HOST:PORT --handlers MODULE`` on another host. ``ssl_context``: a server context to run every
    connection inside TLS (HMAC authenticates but does not encrypt); ``tls_ca``: the CA file the
    launcher's own workers verify the pool's certificate with.
    """

    def __init__(
        self,
        token: str | bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        local_workers: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        handshake_timeout: float = 5.0,
        max_handshakes: int = 64,
        cgroup: bool | None = None,
    ) -> None:
        self._key = token_key(token)
        if local_workers is not None and local_workers < 0:
            raise ValueError(f"local_workers must be None or >= 0, got {local_workers}")
        self._local_workers = local_workers
        self._ssl = ssl_context
        self._tls_ca = tls_ca
        self._handshake_timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        self._cgroup = cgroup
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._listener: socket.socket | None = sock
        #: The bound (host, port).
        self.address: tuple[str, int] = sock.getsockname()[:2]
        #: Connections dropped before they could reach a slot (failed or no handshake, no slot).
        self.rejected = 0
        self._pending: dict[bytes, TcpProcess] = {}  # slot nonce -> the slot's process
        self._free: collections.deque[TcpProcess] = collections.deque()  # slots for any worker
        self._spawned = 0  # live processes this launcher spawned (for local_workers)
        self._handshakes = 0
        self._local: LocalLauncher | None = None
        self._params: Params | None = None
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._deferred: list[tuple[Any, tuple[Any, ...]]] = []

    @property
    def free_slots(self) -> int:
        """Slots waiting for a worker started elsewhere (see ``local_workers``)."""
        return len(self._free)

    # ------------------------------------------------------------------ the Launcher interface

    def open(self, config: PoolConfig) -> None:
        if self._params is not None or self._listener is None:
            raise RuntimeError("a TcpLauncher serves one pool: make a new one for each")
        beat, silence = beat_timing(config)
        self._params = Params(config.max_frame_size, config.max_session_state, beat, silence)
        self._local = LocalLauncher(config.python, dict(config.env), cgroup=self._cgroup)
        # A system task: the launcher has no nursery of its own, and accepting must go on for
        # as long as the pool runs (close() cancels it).
        trio.lowlevel.spawn_system_task(self._serve, name=f"TcpLauncher({self.address})")

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> TcpProcess:
        if self._listener is None or self._local is None:
            raise OSError("the TcpLauncher is closed, or its pool has not opened it")
        if self._local_workers is not None and self._spawned >= self._local_workers:
            proc = TcpProcess(self, None)
            self._free.append(proc)
            return proc
        slot = secrets.token_hex(16)
        local = self._local.spawn(self._worker_args(handlers), self._worker_env(slot))
        self._spawned += 1
        proc = TcpProcess(self, local)
        self._expect(proc, slot)
        self._start_soon(proc.watch_early_exit)
        return proc

    def close(self) -> None:
        self._scope.cancel()
        if self._listener is not None:
            trio.lowlevel.notify_closing(self._listener)
            self._listener.close()
            self._listener = None
        for proc in list(self._pending.values()) + list(self._free):
            proc.kill()
        if self._local is not None:
            self._local.close()

    # ------------------------------------------------------------------ for subclasses (Ray)

    def _worker_args(self, handlers: tuple[str, ...]) -> list[str]:
        """The command line of a worker this launcher starts (after ``python -m bridge_worker``)."""
        host, port = self.address
        args = ["--handlers", ",".join(handlers), "--connect", f"[{host}]:{port}", "--die-with-parent"]
        if self._tls_ca is not None:
            args += ["--tls-ca", self._tls_ca]
        return args

    def _worker_env(self, slot: str) -> dict[str, str]:
        return {TOKEN_ENV: self._key.decode("utf-8"), SLOT_ENV: slot}

    def _expect(self, proc: TcpProcess, slot: str) -> None:
        """``proc`` waits for the worker that will present ``slot``."""
        self._pending[slot.encode("ascii")] = proc

    def _start_soon(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in the launcher's task (slots may launch before it has started)."""
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)
        else:
            self._deferred.append((fn, args))

    def _forget(self, proc: TcpProcess) -> None:
        """``proc`` no longer waits for a connection (it has one, or it is gone)."""
        for slot, waiting in list(self._pending.items()):
            if waiting is proc:
                del self._pending[slot]
        if proc in self._free:
            self._free.remove(proc)

    def _reaped(self, proc: TcpProcess) -> None:
        """A process this launcher spawned is gone (for ``local_workers``)."""
        if proc.spawned:
            self._spawned -= 1

    # ------------------------------------------------------------------ accepting

    async def _serve(self) -> None:
        """Accept connections and authenticate each in its own task, until close()."""
        assert self._listener is not None
        listener = trio.socket.from_stdlib_socket(self._listener)
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for fn, args in self._deferred:
                    nursery.start_soon(fn, *args)
                self._deferred.clear()
                while True:
                    try:
                        conn, peer = await listener.accept()
                    except OSError as exc:  # out of fds, say: keep serving the pool's workers
                        logger.warning("accepting a worker connection failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if self._handshakes >= self._max_handshakes:
                        self._reject(peer, "too many connections authenticating at once")
                        conn.close()
                        continue
                    self._handshakes += 1
                    nursery.start_soon(self._admit, conn, peer)

    def _reject(self, peer: Any, why: str) -> None:
        self.rejected += 1
        logger.warning("dropped a connection from %s: %s", _host_of(peer), why)

    async def _admit(self, conn: trio.socket.SocketType, peer: Any) -> None:
        """Authenticate one connection and hand it to its slot; drop it on any failure. Nothing
        here raises: this runs in the launcher's system task."""
        stream: trio.abc.Stream | None = None
        handed_over = False
        try:
            stream = trio.SocketStream(conn)  # (sets TCP_NODELAY: it may find the peer gone)
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_side=True)
            with trio.move_on_after(self._handshake_timeout):
                proc = await self._authenticate(stream, peer)
                if proc is not None:
                    handed_over = self._hand_over(proc, stream, conn, peer)
                return
            self._reject(peer, f"no handshake within {self._handshake_timeout}s")
        except (AuthError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._reject(peer, str(exc) or type(exc).__name__)
        except Exception:  # a bug here must cost one connection, never the trio run
            self.rejected += 1
            logger.exception("dropped a connection from %s", _host_of(peer))
        finally:
            self._handshakes -= 1
            if not handed_over:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                else:
                    conn.close()

    async def _authenticate(self, stream: trio.abc.Stream, peer: Any) -> TcpProcess | None:
        assert self._params is not None
        nonce, message = challenge()
        await stream.send_all(message)
        proof = await _receive_exact(stream, PROOF_SIZE)
        worker_nonce, slot = check_proof(self._key, nonce, proof)
        proc = self._claim(slot)
        status = Status.NO_SLOT if proc is None else Status.ACCEPTED
        try:
            await stream.send_all(answer(self._key, nonce, worker_nonce, slot, status, self._params))
        except BaseException:
            if proc is not None:
                proc.unclaim()
            raise
        if proc is None:
            self._reject(peer, "it holds the token, but no slot waits for a worker" + (
                "" if slot == ANY_SLOT else " with its slot nonce (a stale or unknown one)"
            ))
        return proc

    def _claim(self, slot: bytes) -> TcpProcess | None:
        """The slot's process waiting for this worker, taken off the waiting lists."""
        if slot == ANY_SLOT:
            return self._free.popleft() if self._free else None
        return self._pending.pop(slot, None)

    def _hand_over(self, proc: TcpProcess, stream: trio.abc.Stream, conn: trio.socket.SocketType, peer: Any) -> bool:
        """Give the authenticated connection to its slot's process; False if that is gone."""
        if proc.gone:
            return False
        if isinstance(stream, trio.SSLStream):
            # The request path reads and writes a plain fd: TLS ends in a socketpair, pumped by
            # two tasks here (TLS costs a hop; plain TCP does not).
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            proc.connected(ours, _host_of(peer))
            assert self._nursery is not None
            self._nursery.start_soon(_pump, stream, trio.socket.from_stdlib_socket(theirs))
            return True
        sock = socket.socket(fileno=conn.detach())
        sock.setblocking(False)
        proc.connected(sock, _host_of(peer))
        return True


def _host_of(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


async def _receive_exact(stream: trio.abc.Stream, n: int) -> bytes:
    """Exactly ``n`` bytes, never more (a peer not yet authenticated gets no bigger buffer)."""
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise AuthError("the peer closed the connection during the handshake")
        data += chunk
    return data


async def _pump(tls: trio.abc.Stream, pair: trio.socket.SocketType) -> None:
    """Move bytes between a TLS stream and the socketpair its worker's process reads, until
    either side ends; then close both (the other side sees the end)."""
    plain = trio.SocketStream(pair)

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(1 << 16)
                if not data:
                    return
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            done.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, tls, plain, nursery.cancel_scope)
            nursery.start_soon(copy, plain, tls, nursery.cancel_scope)
    except Exception:  # a bug here must cost one connection, never the trio run
        logger.exception("the TLS pump of a worker's connection failed")
    finally:
        await trio.aclose_forcefully(tls)
        await trio.aclose_forcefully(plain)


class TcpProcess(FrameWriter):
    """A worker whose channel is a TCP connection (see the module docstring): before its worker
    connects, :meth:`receive_some` waits for it; ``spawned`` workers are local processes that
    :meth:`kill` kills (with everything they started, through the local launcher's machinery),
    the others are ended by closing their connection (they exit when it closes)."""

    beats = True

    def __init__(self, launcher: TcpLauncher, process: LocalProcess | None) -> None:
        super().__init__(-1)  # no fd until the worker connects
        self._launcher = launcher
        self._process = process
        self.spawned = process is not None
        self.pid = process.pid if process is not None else 0
        self.host = "localhost" if process is not None else ""
        self.local = process is not None
        self._sock: socket.socket | None = None
        self._ready = trio.Event()  # connected, or never will be (killed, or exited first)
        self._ended = trio.Event()  # the connection ended (end of stream, or killed)
        self._killed = False
        self.gone = False  # killed or closed: a connection that authenticates now is refused

    def connected(self, sock: socket.socket, host: str) -> None:
        """The launcher authenticated this process's worker: ``sock`` is its channel."""
        self._sock = sock
        self._out = sock.fileno()
        self.host = host
        if not self.spawned:
            try:
                self.local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                self.local = False
        self._ready.set()
        if self._pending:
            self._writer_lot.unpark_all()

    def unclaim(self) -> None:
        """The authenticated connection meant for this process failed before the hand-over:
        wait for the next one (a worker that may take any slot), or for the process to exit."""
        if self.gone or self._sock is not None:
            return
        if not self.spawned:
            self._launcher._free.appendleft(self)

    async def watch_early_exit(self) -> None:
        """A spawned worker that exits before it connects (a bad token, an unreachable address)
        must not leave its slot waiting for the start timeout: its pidfd ends the wait."""
        assert self._process is not None
        try:
            pidfd = os.pidfd_open(self._process.pid)
        except OSError:
            return
        try:
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                await trio.lowlevel.wait_readable(pidfd)
                self._ready.set()
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)

    _watch_scope: trio.CancelScope | None = None

    def undelivered(self) -> int:
        # Bytes the socket took may have reached the worker and run: only what never left this
        # process is known not to have.
        return len(self._pending)

    async def run_writer(self) -> None:
        if self._sock is None:
            await self._ready.wait()
            if self._sock is None:
                await trio.sleep_forever()  # never connected: nothing will be written
        await super().run_writer()

    async def receive_some(self) -> bytes:
        sock = self._sock
        if sock is None:
            await self._ready.wait()
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            sock = self._sock
            if sock is None:
                self._ended.set()
                return b""
        fd = sock.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError:  # reset by the peer: an end of stream, as for a pipe
                data = b""
            if not data:
                self._ended.set()
            return data

    async def receive_stderr(self) -> bytes:
        if self._process is not None:
            return await self._process.receive_stderr()
        return b""  # a worker elsewhere keeps its stderr there

    def kill(self) -> None:
        if self._killed:
            return
        self._killed = self.gone = True
        self._launcher._forget(self)
        if self._watch_scope is not None:
            self._watch_scope.cancel()
        if self._process is not None:
            self._process.kill()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # a remote worker exits when this closes
            except OSError:
                pass
        self._ready.set()

    async def wait(self) -> int:
        if self._process is not None:
            return await self._process.wait()
        if not self._killed:  # killed: its connection is shut, there is nothing to wait for
            await self._ended.wait()
        return -signal.SIGKILL if self._killed else EXIT_UNKNOWN

    def rss(self) -> int | None:
        return self._process.rss() if self._process is not None else None

    def close(self) -> None:
        if self.gone and self._sock is None and self._process is None:
            return
        self.gone = True
        self._launcher._forget(self)
        if self._sock is not None:
            try:
                trio.lowlevel.notify_closing(self._sock)
            except (OSError, RuntimeError):
                pass
            self._sock.close()
            self._sock = None
            self._out = -1
        if self._process is not None:
            self._process.close()
            self._launcher._reaped(self)
            self._process = None
