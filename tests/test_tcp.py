"""Workers over TCP: the handshake (pure), rogue peers, workers started elsewhere, what changes
when the channel is not a local pipe (may have run, heartbeats both ways, reported RSS), TLS.

The handshake's own checks are plain synchronous tests. The pool's heartbeat rule for workers that
beat on their own runs on the fake worker in virtual time; everything else runs real processes
over loopback, each test bounded by ``trio.fail_after`` and killing what it started by pid.
"""

from __future__ import annotations

import functools
import os
import signal
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest
import trio
import trio.testing

from bridge_worker import _auth
from bridge_worker._auth import (
    ANY_SLOT,
    CHALLENGE_SIZE,
    AuthError,
    Params,
    Status,
    answer,
    challenge,
    check_answer,
    check_proof,
    prove,
    token_key,
)
from bridge_worker._tcp import EXIT_CONNECT_FAILED, EXIT_NO_SLOT
from bridge_worker.protocol import NEED_DATA, Decoder, Hello, Pong, Request, encode
from conftest import ALL_HANDLERS, TOKEN, alive, kill_quietly, wait_gone
from fake_worker import FakeLauncher, FakeProcess
from pool import HealthCheckError, InitializationError, PoolConfig, ResourceError, WorkerConnectionError, open_pool
from pool.launchers import TcpLauncher

KEY = token_key(TOKEN)
PARAMS = Params(1 << 20, 1 << 16, 0.25, 1.5)
CONFIG = PoolConfig(size=2, handlers=ALL_HANDLERS, start_timeout=20.0)


# ---------------------------------------------------------------------------------------------
# The handshake, sans IO
# ---------------------------------------------------------------------------------------------


def handshake(worker_key: bytes = KEY, pool_key: bytes = KEY, slot: bytes = ANY_SLOT) -> tuple[int, Params]:
    pool_nonce, hello = challenge()
    _, worker_nonce, proof = prove(worker_key, hello, slot)
    got_nonce, got_slot = check_proof(pool_key, pool_nonce, proof)
    assert (got_nonce, got_slot) == (worker_nonce, slot)
    reply = answer(pool_key, pool_nonce, worker_nonce, slot, Status.ACCEPTED, PARAMS)
    return check_answer(worker_key, pool_nonce, worker_nonce, slot, reply)


def test_both_sides_prove_the_token_and_the_worker_gets_the_pools_parameters() -> None:
    assert handshake(slot=b"ab" * 16) == (Status.ACCEPTED, PARAMS)
    assert len(challenge()[0]) == 32 and challenge()[0] != challenge()[0]  # fresh 32-byte nonces


def test_a_wrong_token_fails_on_the_side_that_checks_it() -> None:
    other = token_key("another-token-0123456789")
    with pytest.raises(AuthError, match="does not hold the token"):
        handshake(worker_key=other)  # the pool refuses the worker's proof
    pool_nonce, hello = challenge()
    _, worker_nonce, _ = prove(KEY, hello, ANY_SLOT)
    forged = answer(other, pool_nonce, worker_nonce, ANY_SLOT, Status.ACCEPTED, PARAMS)
    with pytest.raises(AuthError, match="does not hold the token"):  # the worker refuses a pool
        check_answer(KEY, pool_nonce, worker_nonce, ANY_SLOT, forged)


@pytest.mark.parametrize("position", [0, 7, 8, 39, 40, 71, 72, 103])
def test_any_changed_byte_of_a_proof_is_refused(position: int) -> None:
    pool_nonce, hello = challenge()
    _, _, proof = prove(KEY, hello, b"x" * 32)
    tampered = bytearray(proof)
    tampered[position] ^= 0x01
    with pytest.raises(AuthError):
        check_proof(KEY, pool_nonce, bytes(tampered))


@pytest.mark.parametrize("position", [0, 1, 24, 25, 56])
def test_any_changed_byte_of_an_answer_is_refused(position: int) -> None:
    pool_nonce, hello = challenge()
    _, worker_nonce, _ = prove(KEY, hello, ANY_SLOT)
    tampered = bytearray(answer(KEY, pool_nonce, worker_nonce, ANY_SLOT, Status.ACCEPTED, PARAMS))
    tampered[position] ^= 0x01
    with pytest.raises(AuthError):
        check_answer(KEY, pool_nonce, worker_nonce, ANY_SLOT, bytes(tampered))


def test_a_proof_is_good_for_one_challenge_only() -> None:
    _, first = challenge()
    _, _, proof = prove(KEY, first, ANY_SLOT)
    second_nonce, _ = challenge()
    with pytest.raises(AuthError):  # replayed into a new connection
        check_proof(KEY, second_nonce, proof)


def test_a_mac_is_bound_to_its_direction() -> None:
    """Reflection: the pool's MAC over the very same nonces and slot is not a worker's proof,
    and the pool's own nonce sent back as the worker's is refused."""
    pool_nonce, hello = challenge()
    _, worker_nonce, _ = prove(KEY, hello, ANY_SLOT)
    pool_mac = answer(KEY, pool_nonce, worker_nonce, ANY_SLOT, Status.ACCEPTED, PARAMS)[-32:]
    reflected = _auth.MAGIC + worker_nonce + ANY_SLOT + pool_mac
    with pytest.raises(AuthError, match="wrong MAC"):
        check_proof(KEY, pool_nonce, reflected)
    echoed = _auth.MAGIC + pool_nonce + ANY_SLOT + _auth._mac(KEY, b"worker->pool", pool_nonce, pool_nonce, ANY_SLOT)
    with pytest.raises(AuthError, match="own nonce"):
        check_proof(KEY, pool_nonce, echoed)


@pytest.mark.parametrize(
    "message",
    [b"", b"GET / HTTP/1.1\r\n\r\n", struct.pack(">I", 2**31) + bytes(100), bytes(_auth.PROOF_SIZE), b"x" * 10_000],
    ids=["nothing", "http", "oversized-frame-header", "zeros", "too-long"],
)
def test_garbage_is_not_a_proof(message: bytes) -> None:
    with pytest.raises(AuthError):
        check_proof(KEY, challenge()[0], message)
    with pytest.raises(AuthError):
        prove(KEY, message[:CHALLENGE_SIZE], ANY_SLOT)


@pytest.mark.parametrize(
    "token, error",
    [("short", ValueError), ("x" * 15, ValueError), ("tab\tinside-0123456789", ValueError),
     (b"\x00" * 32, ValueError), (b"caf\xc3\xa9-0123456789abcdef", ValueError), (1234, TypeError)],
)
def test_a_token_is_a_printable_secret_of_16_characters_or_more(token: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        token_key(token)
    with pytest.raises(error):
        TcpLauncher(token)
    assert token_key("é" * 16) == ("é" * 16).encode()  # a str may be any printable text


# ---------------------------------------------------------------------------------------------
# Heartbeats of workers that beat on their own: the pool's rule, in virtual time
# ---------------------------------------------------------------------------------------------


class BeatingProcess(FakeProcess):
    """A fake worker whose channel is like TCP: it sends a heartbeat (with its RSS) every
    ``beat`` seconds, busy or not, until ``silent`` (a partition, a SIGSTOP)."""

    beats = True
    local = False
    host = "192.0.2.7"

    def __init__(self, launcher: BeatingLauncher) -> None:
        super().__init__(launcher)
        self.silent = False
        self.rss_report: int | None = 50 << 20
        launcher.nursery.start_soon(self._beat, launcher.beat, launcher.start_delay)

    async def _beat(self, beat: float, start_delay: float) -> None:
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            await trio.sleep(start_delay + beat)  # after its hello
            while True:
                if not self.silent:
                    self._emit(Pong(0, self.rss_report))
                await trio.sleep(beat)


class BeatingLauncher(FakeLauncher):
    beat = 0.5  # what beat_timing() gives for heartbeat_interval = heartbeat_timeout = 1

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> FakeProcess:
        proc = BeatingProcess(self)
        self.launched.append(proc)
        return proc


BEATING = PoolConfig(size=1, heartbeat_interval=1.0, heartbeat_timeout=1.0, timeout=1000.0)


async def beating_pool_call(config: PoolConfig, act: Any) -> tuple[BaseException, float]:
    """Open a pool of one beating fake worker, start a long non-idempotent call, run ``act(proc)``
    at t0, and return the call's error and how long after t0 it came."""
    outcome: list[tuple[BaseException, float]] = []
    with trio.fail_after(100):  # virtual seconds
        await _beating_pool_call(config, act, outcome)
    return outcome[0]


async def _beating_pool_call(config: PoolConfig, act: Any, outcome: list[tuple[BaseException, float]]) -> None:
    async with trio.open_nursery() as nursery:
        launcher = BeatingLauncher(nursery)
        async with open_pool(config, launcher=launcher) as pool:
            t0 = 0.0

            async def call() -> None:
                try:
                    await pool.execute("nsleep", 100.0)
                except Exception as exc:
                    outcome.append((exc, trio.current_time() - t0))
                else:
                    raise AssertionError("the call succeeded")

            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                await trio.sleep(10.0)  # busy for 10 s: its beats keep it alive
                assert not outcome and pool.statistics().restarts == 0
                t0 = trio.current_time()
                act(launcher.launched[0])
        nursery.cancel_scope.cancel()


async def test_a_busy_worker_that_goes_silent_is_killed_within_interval_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def partition(proc: BeatingProcess) -> None:
        proc.silent = True
        proc.answer_pings = False

    error, after = await beating_pool_call(BEATING, partition)
    assert isinstance(error, HealthCheckError) and error.may_have_run
    # Found within heartbeat_interval + heartbeat_timeout of its last byte, so of the partition.
    assert 0 < after <= BEATING.heartbeat_interval + BEATING.heartbeat_timeout


async def test_a_remote_workers_reported_memory_over_the_hard_limit_kills_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def grow(proc: BeatingProcess) -> None:
        proc.rss_report = 300 << 20

    config = attrs.evolve(BEATING, hard_worker_memory=200 << 20)
    error, after = await beating_pool_call(config, grow)
    assert isinstance(error, ResourceError) and "hard limit" in str(error)
    assert 0 < after <= 0.5 + config.memory_check_interval  # its next beat, then the next check


# ---------------------------------------------------------------------------------------------
# Real workers over loopback
# ---------------------------------------------------------------------------------------------


def start_worker(address: tuple[str, int], token: str = TOKEN, *extra: str) -> subprocess.Popen[bytes]:
    """A worker started by something other than the pool (this test), dialling the pool."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    env["BRIDGE_WORKER_TOKEN"] = token
    host, port = address
    argv = [sys.executable, "-m", "bridge_worker", "--connect", f"{host}:{port}", "--handlers", ",".join(ALL_HANDLERS), *extra]
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def concurrently(pool: Any, command: str, args: Any, n: int) -> list[Any]:
    """``n`` calls at once (so that every worker of a small pool gets some)."""
    results: list[Any] = []

    async def one() -> None:
        results.append(await pool.execute(command, args))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return results


async def exit_code(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    with trio.fail_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.02)
    return proc.returncode


async def test_workers_started_elsewhere_take_free_slots_and_stop_with_the_pool() -> None:
    launcher = TcpLauncher(TOKEN, local_workers=1)
    config = attrs.evolve(CONFIG, heartbeat_interval=0.4, heartbeat_timeout=0.4)
    started: list[subprocess.Popen[bytes]] = []
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def start_when_a_slot_waits() -> None:
                    while launcher.free_slots < 1:
                        await trio.sleep(0.01)
                    started.append(start_worker(launcher.address))

                nursery.start_soon(start_when_a_slot_waits)
                async with open_pool(config, launcher=launcher) as pool:
                    (external,) = started
                    assert external.pid in pool.worker_pids()  # on this machine (loopback)
                    hosts = {w["pid"]: w["host"] for w in pool.health()["workers"].values()}
                    assert hosts[external.pid] == "127.0.0.1"
                    pids = set(await concurrently(pool, "pid", None, 16))
                    assert external.pid in pids and len(pids) == 2
                    # The token is never on a command line, and handlers do not see it.
                    (spawned,) = [p for p in pool.worker_pids() if p != external.pid]
                    assert TOKEN not in " ".join(psutil.Process(spawned).cmdline())
                    assert set(await concurrently(pool, "env_var", "BRIDGE_WORKER_TOKEN", 16)) == {None}
                    # RSS of a worker this host does not measure comes in its heartbeats.
                    with trio.fail_after(5):
                        while (rss := {w.pid: w.rss for w in pool.statistics().workers}[external.pid]) is None:
                            await trio.sleep(0.05)
                    assert abs(rss - psutil.Process(external.pid).memory_info().rss) < 0.5 * rss

                    rejected = launcher.rejected
                    wrong = start_worker(launcher.address, "a-wrong-token-0123456789")
                    surplus = start_worker(launcher.address)
                    assert await exit_code(wrong) == EXIT_CONNECT_FAILED
                    assert await exit_code(surplus) == EXIT_NO_SLOT  # every slot is taken
                    assert b"no free slot" in (surplus.stderr.read() if surplus.stderr else b"")
                    assert launcher.rejected == rejected + 2
                    assert pool.statistics().restarts == 0 and pool.health()["status"] == "healthy"
                # Closing the pool stopped it (the pool asked, and then closed its connection).
                assert await exit_code(external, 5.0) == 0
    finally:
        for proc in started:
            kill_quietly([proc.pid])
            proc.wait()


async def rogue(address: tuple[str, int], payload: bytes, *, read_challenge: bool = True) -> bytes:
    """Connect, (read the pool's challenge,) send ``payload``, and return what the pool sent
    until it closed the connection."""
    sock = trio.socket.socket()
    await sock.connect(address)
    got = b""
    try:
        if read_challenge:
            while len(got) < CHALLENGE_SIZE:
                chunk = await sock.recv(CHALLENGE_SIZE)
                if not chunk:
                    break
                got += chunk
        if payload:
            await sock.send(payload)
        while True:
            chunk = await sock.recv(1 << 16)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got
    finally:
        sock.close()


async def test_rogue_peers_are_dropped_without_touching_any_worker_slot_or_circuit() -> None:
    launcher = TcpLauncher(TOKEN, handshake_timeout=0.5, max_handshakes=8)
    with trio.fail_after(60):
        async with open_pool(CONFIG, launcher=launcher) as pool:
            address = launcher.address
            pool_nonce_seen: list[bytes] = []

            def wrong_answer() -> bytes:
                _, _, proof = prove(KEY, challenge()[1], ANY_SLOT)  # for another challenge
                return proof

            cases = [
                b"",  # reads the challenge, then says nothing
                os.urandom(4096),
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10,
                struct.pack(">I", 2**31) + b"\x00" * 200,  # a frame header over any limit
                wrong_answer(),
                prove(token_key("another-token-0123456789"), challenge()[1], ANY_SLOT)[2],
            ]
            calls_ok = 0
            done = False

            async def caller() -> None:
                nonlocal calls_ok
                while not done:  # (cancelling a call would kill its worker)
                    assert await pool.execute("echo", calls_ok) == calls_ok
                    calls_ok += 1
                    await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                for payload in cases:
                    got = await rogue(address, payload)
                    assert len(got) == CHALLENGE_SIZE  # the challenge, then nothing more
                    pool_nonce_seen.append(got[8:])
                t0 = trio.current_time()
                assert len(await rogue(address, b"", read_challenge=False)) == CHALLENGE_SIZE  # silent
                assert 0.4 < trio.current_time() - t0 < 3.0  # dropped after handshake_timeout
                # A flood of silent connections: past max_handshakes they are closed at once.
                async with trio.open_nursery() as flood:
                    for _ in range(40):
                        flood.start_soon(functools.partial(rogue, address, b"", read_challenge=False))
                done = True
            assert len(set(pool_nonce_seen)) == len(cases)
            assert launcher.rejected == len(cases) + 1 + 40
            stats = pool.statistics()
            assert calls_ok > 10 and stats.calls_failed == 0
            assert stats.restarts == 0 and stats.failed_starts == 0 and stats.alive == 2
            assert stats.pool_circuit == "closed" and set(stats.circuits.values()) <= {"closed"}
            assert pool.health()["status"] == "healthy"


async def wait_stopped(pid: int) -> None:
    with trio.fail_after(5):
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            await trio.sleep(0.001)


@pytest.mark.parametrize("channel", ["pipes", "tcp"])
async def test_a_request_a_dead_worker_never_read_may_have_run_over_tcp_only(channel: str, tmp_path: Path) -> None:
    """A non-idempotent request written to a stopped worker, which is then SIGKILLed: over a pipe
    the host sees it unread (FIONREAD) and runs it again safely; over TCP nothing proves that, so
    the caller hears it may or may not have run."""
    effects = tmp_path / "effects"
    config = attrs.evolve(CONFIG, size=1)
    launcher = TcpLauncher(TOKEN) if channel == "tcp" else None
    with trio.fail_after(30):
        async with open_pool(config, launcher=launcher) as pool:
            (pid,) = pool.worker_pids()
            try:
                os.kill(pid, signal.SIGSTOP)
                await wait_stopped(pid)
                outcome: list[Any] = []

                async def call() -> None:
                    try:
                        outcome.append(await pool.execute("log_effect", {"path": str(effects), "id": "x"}))
                    except WorkerConnectionError as exc:
                        outcome.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    with trio.fail_after(5):
                        while not pool.statistics().workers[0].busy:
                            await trio.sleep(0.001)
                    os.kill(pid, signal.SIGKILL)
            finally:
                kill_quietly([pid])
    (result,) = outcome
    if channel == "pipes":
        assert result == "x" and effects.read_text() == "x\n"
    else:
        assert isinstance(result, WorkerConnectionError) and result.may_have_run
        assert "may or may not have run" in str(result)
        assert not effects.exists()  # it did not run, but the pool could not know


async def test_a_stopped_busy_tcp_worker_is_found_by_heartbeats_and_its_call_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP (a partition: no end of stream) of a worker in the middle of a 1 s call, with a
    30 s deadline: the heartbeat finds it within heartbeat_interval + heartbeat_timeout (exactly
    so in virtual time above; here with some slack for a loaded machine), kills it, and the call
    runs again elsewhere."""
    exits: list[tuple[int, str]] = []

    def on_event(event: Any) -> None:
        if event.kind == "worker_exited":
            exits.append((event.pid, event.data["reason"]))

    config = attrs.evolve(CONFIG, heartbeat_interval=0.2, heartbeat_timeout=0.3, event_callbacks=[on_event])
    stopped: list[int] = []
    try:
        with trio.fail_after(30):
            async with open_pool(config, launcher=TcpLauncher(TOKEN)) as pool:
                result: list[float] = []

                async def call() -> None:
                    result.append(await pool.execute("sleep_idem", 1.0, timeout=30))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    with trio.fail_after(5):
                        while not (busy := [w.pid for w in pool.statistics().workers if w.busy]):
                            await trio.sleep(0.005)
                    os.kill(busy[0], signal.SIGSTOP)
                    stopped.append(busy[0])
                    t0 = time.time()
                assert result == [1.0]
                assert exits == [(busy[0], "health_check_failed")]
                (found,) = [r for r in caplog.records if "sent nothing" in r.getMessage()]
                assert found.created - t0 < 0.5 + 0.5
                assert pool.statistics().retries == 1 and pool.statistics().calls_failed == 0
                await wait_gone(stopped, zombies_too=True)
    finally:
        kill_quietly(p for p in stopped if alive(p))


class FakePool:
    """The pool's side of the handshake, by hand: to see what a worker does when its pool goes
    quiet or away."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.listener = trio.socket.socket()

    async def accept(self) -> tuple[trio.SocketStream, Decoder]:
        conn, _ = await self.listener.accept()
        stream = trio.SocketStream(conn)
        nonce, message = challenge()
        await stream.send_all(message)
        proof = b""
        while len(proof) < _auth.PROOF_SIZE:
            proof += await stream.receive_some(_auth.PROOF_SIZE - len(proof))
        worker_nonce, slot = check_proof(KEY, nonce, proof)
        await stream.send_all(answer(KEY, nonce, worker_nonce, slot, Status.ACCEPTED, self.params))
        decoder = Decoder()
        while True:  # until its hello
            msg = decoder.next_message()
            if isinstance(msg, Hello):
                return stream, decoder
            assert msg is NEED_DATA
            decoder.receive_data(await stream.receive_some(1 << 16))


@pytest.mark.parametrize("how", ["pool-silent", "connection-closed-while-busy"])
async def test_a_worker_exits_on_its_own_when_it_cannot_reach_its_pool(how: str) -> None:
    pool = FakePool(Params(1 << 20, 1 << 16, 0.05, 0.6))
    await pool.listener.bind(("127.0.0.1", 0))
    pool.listener.listen()
    worker = start_worker(pool.listener.getsockname()[:2])
    try:
        with trio.fail_after(20):
            stream, decoder = await pool.accept()
            t0 = time.monotonic()
            if how == "pool-silent":
                beats = 0
                with trio.move_on_after(10):
                    while data := await stream.receive_some(1 << 16):  # it beats; the pool says nothing
                        decoder.receive_data(data)
                        beats += sum(1 for m in decoder if isinstance(m, Pong))
                assert beats >= 5
                code = await exit_code(worker)
                # `silence` after its hello (which it sent a moment before t0), and a little more.
                assert 0.5 <= time.monotonic() - t0 < 0.6 + 1.0
                assert b"nothing from the pool" in (worker.stderr.read() if worker.stderr else b"")
            else:
                await stream.send_all(encode(Request(1, "hang", None, None, None)))
                await trio.sleep(0.2)  # in the handler now: the main thread reads nothing
                await stream.aclose()
                code = await exit_code(worker)
                assert time.monotonic() - t0 < 0.2 + 1.0
                assert b"the pool closed the connection" in (worker.stderr.read() if worker.stderr else b"")
            assert code == -signal.SIGKILL  # it ended its whole family, itself included
    finally:
        kill_quietly([worker.pid])
        worker.wait()
        pool.listener.close()


async def test_tls_carries_the_channel_and_a_plaintext_peer_is_dropped(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme", reason="the TLS test needs trustme (in the test extra)")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    launcher = TcpLauncher(TOKEN, ssl_context=server, tls_ca=str(ca_file), handshake_timeout=1.0)
    with trio.fail_after(60):
        async with open_pool(CONFIG, launcher=launcher) as pool:
            assert await pool.execute("echo", {"x": 1}) == {"x": 1}
            big = b"y" * (3 << 20)  # bigger than any buffer on the way, both ways
            assert await pool.execute("echo", big) == big
            assert [await pool.execute_in_session("s", "counter") for _ in range(3)] == [1, 2, 3]
            pids = pool.worker_pids()
            # A peer holding the token but speaking plain TCP never gets past TLS.
            got = await rogue(launcher.address, prove(KEY, _auth.MAGIC + bytes(32), ANY_SLOT)[2], read_challenge=False)
            assert _auth.MAGIC not in got
            assert launcher.rejected == 1
            assert pool.statistics().restarts == 0
    await wait_gone(pids, zombies_too=True)
    assert not any(alive(p) for p in pids)


def test_ray_launcher_imports_without_ray_and_names_the_extra_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from pool.launchers import RayLauncher

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(RuntimeError, match=r"\[ray\]"):
        RayLauncher(TOKEN)


async def test_a_tcp_worker_whose_handlers_do_not_import_fails_open_pool_with_the_import_error() -> None:
    config = PoolConfig(size=2, handlers=["no_such_module_here"], start_timeout=20.0)
    launcher = TcpLauncher(TOKEN)
    with trio.fail_after(30):
        with pytest.raises(InitializationError) as info:
            async with open_pool(config, launcher=launcher):
                raise AssertionError("the pool opened")  # pragma: no cover
    assert "no_such_module_here" in str(info.value) and "ModuleNotFoundError" in str(info.value)
    assert launcher.rejected == 0
