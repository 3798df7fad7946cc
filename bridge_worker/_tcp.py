"""A worker that dials its pool over TCP (``--connect HOST:PORT``) instead of using pipes.

After the mutual HMAC challenge (``bridge_worker._auth``, optionally inside TLS) the worker
serves the same frames as over pipes, with the same request loop: plain TCP reads and writes the
socket's fd directly; with TLS one relay thread moves plaintext between the TLS connection and a
socketpair that the request loop reads and writes.

What changes when the channel is not a local pipe:

- No PR_SET_PDEATHSIG across machines, and a partition gives no end of stream. So a watchdog
  thread sends a heartbeat every ``Params.beat`` seconds whether the main thread is idle or busy
  in a handler (a ``Pong`` with id 0 and this process's RSS: the pool cannot measure a remote
  process), and exits with everything this worker started when the pool closes the connection or
  has sent nothing for ``Params.silence`` seconds (the kernel's count of the time since data last
  arrived, so a busy main thread that reads nothing does not matter). TCP_USER_TIMEOUT makes the
  kernel give up on a pool that stops acknowledging within the same bound.
- The token comes from the environment (BRIDGE_WORKER_TOKEN), never the command line where ps
  shows it; it is removed from this process's environment before any handler runs.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, NoReturn

from bridge_worker._auth import (
    ANSWER_SIZE,
    ANY_SLOT,
    CHALLENGE_SIZE,
    SLOT_ENV,
    SLOT_SIZE,
    TOKEN_ENV,
    AuthError,
    Params,
    Status,
    check_answer,
    prove,
    token_key,
)
from bridge_worker._family import kill_family, lead_own_group
from bridge_worker._loop import (
    Options,
    _Server,
    die_with_parent_process,
    forget_in_child,
    quiet_stdio,
    resident_memory,
)
from bridge_worker.protocol import Pong, encode

if TYPE_CHECKING:
    import ssl

#: Exit code of a worker that could not connect to or authenticate with its pool.
EXIT_CONNECT_FAILED = 5
#: Exit code of a worker the pool authenticated but had no slot for.
EXIT_NO_SLOT = 6

#: How long connecting and the handshake may take.
HANDSHAKE_TIMEOUT = 10.0
# tcp_info.tcpi_last_data_recv (ms since data last arrived): a stable part of Linux's ABI.
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52


class _TcpServer(_Server):
    """The request loop, with whole frames written under a lock: the watchdog thread writes
    heartbeats on the same channel."""

    def __init__(self, fd: int, params: Params) -> None:
        super().__init__(fd, fd, params.max_frame_size, params.max_session_state)
        self.write_lock = threading.Lock()

    def write(self, frame: bytes) -> None:
        with self.write_lock:
            super().write(frame)


def _fail(code: int, message: str) -> NoReturn:
    sys.stderr.write(f"bridge_worker: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def connect(opts: Options) -> tuple[_Server, Callable[[], None]]:
    """Dial the pool, authenticate, and return the request loop over the connection and what
    to call once the worker has said hello (the heartbeats start then: the pool does not watch a
    starting worker's silence, its start timeout does)."""
    assert opts.connect is not None
    host, port = opts.connect
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        _fail(EXIT_CONNECT_FAILED, f"--connect needs the pool's token in the environment variable {TOKEN_ENV}")
    try:
        key = token_key(token)
    except ValueError as exc:
        _fail(EXIT_CONNECT_FAILED, f"{TOKEN_ENV}: {exc}")
    slot = os.environ.pop(SLOT_ENV, "").encode("ascii", "replace") or ANY_SLOT
    if len(slot) != SLOT_SIZE:
        _fail(EXIT_CONNECT_FAILED, f"{SLOT_ENV} must be {SLOT_SIZE} characters")
    quiet_stdio()
    lead_own_group()
    if opts.die_with_parent:
        die_with_parent_process()
    try:
        raw = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        channel: socket.socket = raw
        if opts.tls_ca is not None:
            import ssl  # only TLS workers pay for importing it

            context = ssl.create_default_context(cafile=opts.tls_ca)
            channel = context.wrap_socket(raw, server_hostname=opts.tls_name or host)
        params = _authenticate(channel, key, slot)
    except (OSError, AuthError) as exc:
        _fail(EXIT_CONNECT_FAILED, f"cannot connect to the pool at {host}:{port}: {exc}")
    # With TLS, `channel` took over the socket (and its fd): options and the watchdog use it.
    channel.settimeout(None)
    channel.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        channel.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(params.silence * 1000)))
    forget_in_child(channel.fileno(), channel.fileno())
    if opts.tls_ca is not None:
        inner, outer = socket.socketpair()
        forget_in_child(inner.fileno(), outer.fileno())
        threading.Thread(target=_relay, args=(channel, outer), name="tls-relay", daemon=True).start()
        fd = inner.fileno()
        _keep.append(inner)
    else:
        fd = channel.fileno()
    _keep.append(channel)  # the sockets live as long as the process: their fds are the channel
    server = _TcpServer(fd, params)

    def serving() -> None:
        threading.Thread(target=_watch, args=(channel, server, params), name="pool-watchdog", daemon=True).start()

    return server, serving


_keep: list[socket.socket] = []


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AuthError("the pool closed the connection during the handshake")
        data += chunk
    return data


def _authenticate(sock: socket.socket, key: bytes, slot: bytes) -> Params:
    pool_nonce, nonce, proof = prove(key, _recv_exact(sock, CHALLENGE_SIZE), slot)
    sock.sendall(proof)
    status, params = check_answer(key, pool_nonce, nonce, slot, _recv_exact(sock, ANSWER_SIZE))
    if status != Status.ACCEPTED:
        _fail(EXIT_NO_SLOT, "the pool accepted the token but has no free slot for this worker")
    return params


def _ms_since_pool_spoke(sock: socket.socket) -> int | None:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _LAST_DATA_RECV_OFFSET + _LAST_DATA_RECV.size:
        return None
    return int(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0])


def _give_up(why: str) -> NoReturn:
    sys.stderr.write(f"bridge_worker: {why}: exiting\n")
    sys.stderr.flush()
    kill_family()


def _watch(sock: socket.socket, server: _TcpServer, params: Params) -> None:
    """Heartbeats to the pool, and the end of this worker when the pool is gone (see the
    module docstring). Runs beside the main thread, which may be busy in a handler."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)  # POLLHUP and POLLERR are always reported
    beat_ms = max(1, round(params.beat * 1000))
    silence_ms = params.silence * 1000
    started = time.monotonic()
    while True:
        try:
            server.write(encode(Pong(0, resident_memory())))  # encode(): the server's Encoder is not thread-safe
        except OSError as exc:
            _give_up(f"cannot write to the pool ({exc})")
        since_data = _ms_since_pool_spoke(sock)
        if since_data is not None:
            # The pool pings a worker only once it has said hello: count from then at most.
            quiet = min(since_data, (time.monotonic() - started) * 1000)
            if quiet > silence_ms:
                _give_up(f"nothing from the pool for {quiet / 1000:.1f}s")
        if poller.poll(beat_ms):
            _give_up("the pool closed the connection")


#: The relay keeps at most this much in each direction before it stops reading that side.
_RELAY_BUFFER = 1 << 20


def _relay(tls: ssl.SSLSocket, pair: socket.socket) -> None:
    """Move plaintext between the TLS connection and the request loop's socketpair, both ways,
    in this one thread (an SSL object must not be used by two threads at once). Returns (and
    closes the pair, so the request loop sees the end) when either side ends."""
    import ssl

    tls.setblocking(False)
    pair.setblocking(False)
    to_tls = bytearray()
    to_pair = bytearray()
    try:
        while True:
            read_tls = len(to_pair) < _RELAY_BUFFER
            read_pair = len(to_tls) < _RELAY_BUFFER
            if not (read_tls and tls.pending()):
                readers = ([tls] if read_tls else []) + ([pair] if read_pair else [])
                writers = ([tls] if to_tls else []) + ([pair] if to_pair else [])
                select.select(readers, writers, [])
            if read_tls:
                try:
                    data = tls.recv(1 << 16)
                    if not data:
                        return
                    to_pair += data
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if read_pair:
                try:
                    data = pair.recv(1 << 16)
                    if not data:
                        return
                    to_tls += data
                except BlockingIOError:
                    pass
            if to_tls:
                try:
                    # After a "want" error, the same first bytes are offered again, as OpenSSL needs.
                    del to_tls[: tls.send(to_tls[: 1 << 14])]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if to_pair:
                try:
                    del to_pair[: pair.send(to_pair)]
                except BlockingIOError:
                    pass
    except OSError:
        return
    finally:
        pair.close()
