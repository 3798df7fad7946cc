"""The operator surface over real HTTP (``pool.ops``): a real client (stdlib ``http.client`` in a
thread, or raw trio sockets) against the real server (hypercorn's trio worker) on loopback, and
real worker processes. Needs the ``ops`` extra; ``.ci/run`` installs it, so these run there."""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import queue
import socket
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

pytest.importorskip("prometheus_client", reason="the ops extra is not installed: pip install -e '.[ops]'")
pytest.importorskip("hypercorn", reason="the ops extra is not installed: pip install -e '.[ops]'")

import hypercorn.trio  # noqa: E402
from hypercorn.config import Config as HypercornConfig  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pool import BreakerConfig  # noqa: E402
from pool.ops import ops_app, serve_ops  # noqa: E402
from pool.testing import WorkerPools, fake_pool  # noqa: E402

HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing"]
PREFIX = "trio_worker_pool_"

Response = tuple[int, dict[str, str], bytes]


def fetch(port: int, path: str, method: str = "GET", body: bytes | None = None) -> Response:
    """One request with the standard library's client (blocking: run it in a thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def get(port: int, path: str, method: str = "GET", body: bytes | None = None) -> Response:
    return await trio.to_thread.run_sync(fetch, port, path, method, body)


async def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` over a raw trio socket and read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def families(body: bytes) -> dict[str, Any]:
    """The metric families of a /metrics body, by name, as prometheus-client's own parser reads
    them (it drops a counter's ``_total`` from the family name)."""
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` (KeyError if there is none)."""
    base = name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        base = base.removesuffix(suffix)
    family = fams[name] if name in fams else fams[base]
    for sample in family.samples:
        if sample.name == name and sample.labels == labels:
            return float(sample.value)
    raise KeyError(f"{name}{labels} not in {[(s.name, s.labels) for s in family.samples]}")


async def scrape(port: int) -> dict[str, Any]:
    status, headers, body = await get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return families(body)


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------

EXPECTED_TYPES = {
    PREFIX + "info": "gauge",  # an info metric, in the Prometheus text format
    PREFIX + "health": "gauge",
    PREFIX + "size": "gauge",
    PREFIX + "workers": "gauge",
    PREFIX + "queued_calls": "gauge",
    PREFIX + "sessions": "gauge",
    PREFIX + "circuit_state": "gauge",
    PREFIX + "worker_resident_memory_bytes": "gauge",
    PREFIX + "calls": "counter",
    PREFIX + "call_failures": "counter",
    PREFIX + "retries": "counter",
    PREFIX + "failovers": "counter",
    PREFIX + "fallbacks": "counter",
    PREFIX + "recoveries": "counter",
    PREFIX + "worker_restarts": "counter",
    PREFIX + "worker_start_failures": "counter",
    PREFIX + "call_duration_seconds": "histogram",
    PREFIX + "queue_wait_seconds": "histogram",
    PREFIX + "worker_start_duration_seconds": "histogram",
}
#: Every label the pool's metrics use: never a session id or a pid.
LABELS = {"command", "outcome", "reason", "state", "circuit", "worker", "le", "version", "protocol"}


async def test_metrics_are_named_and_typed_as_prometheus_wants(worker_pool: WorkerPools) -> None:
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as pool, trio.open_nursery() as nursery:
            port = await nursery.start(serve_ops, pool)
            await pool.execute("echo", 1)
            await pool.execute_in_session("user-42", "counter")
            fams = await scrape(port)
            assert {name: f.type for name, f in fams.items()} == EXPECTED_TYPES
            for family in fams.values():
                assert family.documentation, family.name
                for sample in family.samples:
                    assert sample.name.startswith(PREFIX)
                    assert set(sample.labels) <= LABELS, sample
                    assert "user-42" not in sample.labels.values()
                    if family.type == "counter":
                        assert sample.name.endswith(("_total", "_created")), sample.name
            slots = {str(w.slot) for w in pool.statistics().workers}
            pids = {str(p) for p in pool.worker_pids()}
            memory = {s.labels["worker"] for s in fams[PREFIX + "worker_resident_memory_bytes"].samples}
            assert memory == slots and not memory & pids
            assert value(fams, PREFIX + "info", version="0.1.0", protocol="5") == 1
            buckets = [s.labels["le"] for s in fams[PREFIX + "call_duration_seconds"].samples if s.name.endswith("_bucket")]
            assert buckets[:2] == ["1e-05", "2.5e-05"] and buckets[-1] == "+Inf"  # tens of microseconds
            nursery.cancel_scope.cancel()


async def test_counters_move_with_calls_and_restarts(worker_pool: WorkerPools) -> None:
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as pool, trio.open_nursery() as nursery:
            port = await nursery.start(serve_ops, pool)
            await pool.execute("echo", 0)
            before = await scrape(port)
            for i in range(10):
                await pool.execute("echo", i)
            with pytest.raises(Exception):
                await pool.execute("raise_error", "on purpose")
            victim = pool.worker_pids()[0]
            os.kill(victim, 9)
            while pool.statistics().restarts < 1 or pool.health()["status"] != "healthy":
                await trio.sleep(0.01)
            after = await scrape(port)

            def moved(name: str, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            assert moved(PREFIX + "calls_total", command="echo", outcome="ok") == 10
            assert moved(PREFIX + "call_duration_seconds_count", command="echo") == 10
            assert value(after, PREFIX + "calls_total", command="raise_error", outcome="error") == 1
            assert value(after, PREFIX + "call_failures_total", command="raise_error", reason="python_error") == 1
            assert moved(PREFIX + "failovers_total") == 1  # a handler's exception fails over once
            assert moved(PREFIX + "worker_restarts_total", reason="killed") == 1
            assert moved(PREFIX + "worker_restarts_total", reason="crash") == 0
            assert moved(PREFIX + "queue_wait_seconds_count") >= 12  # every attempt is counted
            assert moved(PREFIX + "worker_start_duration_seconds_count") == 1
            assert value(after, PREFIX + "workers", state="idle") == 2
            nursery.cancel_scope.cancel()


async def test_with_metrics_off_the_per_call_families_are_left_out(autojump_clock: trio.abc.Clock) -> None:
    # (In virtual time: no request here, the collector is read directly.)
    from prometheus_client import CollectorRegistry, generate_latest

    from pool.ops import PoolCollector

    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, metrics=False) as pool:
            await pool.execute("echo", 1)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(PoolCollector(pool))
            fams = families(generate_latest(registry))
            assert PREFIX + "calls" not in fams and PREFIX + "call_duration_seconds" not in fams
            assert value(fams, PREFIX + "retries_total") == 0 and PREFIX + "worker_restarts" in fams


# ---------------------------------------------------------------------------------------------
# /health, /health/live, /recovery
# ---------------------------------------------------------------------------------------------


async def test_health_goes_503_while_workers_cannot_start_and_back_liveness_staying_200(
    worker_pool: WorkerPools, tmp_path: Path
) -> None:
    marker = tmp_path / "crash-loop"
    circuit = BreakerConfig(failure_threshold=3, success_threshold=1, timeout=1.0, half_open_requests=1)
    config: dict[str, Any] = {"env": {"CHAOS_MARKER": str(marker)}, "pool_circuit": circuit}
    with trio.fail_after(60):
        async with worker_pool(["bridge_worker.builtin", "handlers_marker"], size=2, **config) as pool:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_ops, pool)
                status, headers, body = await get(port, "/health")
                assert (status, headers["content-type"]) == (200, "application/json")
                assert b'"status": "healthy"' in body
                marker.write_text("")  # every start fails from now on
                for pid in pool.worker_pids():
                    os.kill(pid, 9)
                while True:  # (unhealthy at once, with no worker up; then the circuit opens)
                    status, _, body = await get(port, "/health")
                    if b'"pool": {"state": "open"' in body:
                        break
                    assert (await get(port, "/health/live"))[0] == 200
                    await trio.sleep(0.02)
                assert status == 503 and b'"status": "unhealthy"' in body and b"crash loop on purpose" in body
                assert (await get(port, "/health/live"))[:1] == (200,)
                fams = await scrape(port)
                assert value(fams, PREFIX + "health") == 2
                assert value(fams, PREFIX + "circuit_state", circuit="pool") == 2
                assert value(fams, PREFIX + "worker_start_failures_total") >= 3
                marker.unlink()  # the cause goes away: the circuit's trial start succeeds
                while (await get(port, "/health"))[0] != 200:
                    assert (await get(port, "/health/live"))[0] == 200
                    await trio.sleep(0.05)
                assert await pool.execute("marker_ok") == "ok"
                nursery.cancel_scope.cancel()


async def test_recovery_is_the_pool_s_report_as_json(worker_pool: WorkerPools) -> None:
    import json

    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as pool, trio.open_nursery() as nursery:
            port = await nursery.start(serve_ops, pool)
            with pytest.raises(Exception):
                await pool.execute("raise_error", "on purpose")
            status, headers, body = await get(port, "/recovery")
            assert (status, headers["content-type"]) == (200, "application/json")
            report = json.loads(body)
            assert report == json.loads(json.dumps(pool.recovery_report()))
            assert report["strategies"]["failover"]["attempts"] == 1
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------------------------


async def test_bad_requests_are_answered_and_harm_nothing(worker_pool: WorkerPools) -> None:
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as pool, trio.open_nursery() as nursery:
            port = await nursery.start(serve_ops, pool)
            status, _, body = await get(port, "/nope")
            assert status == 404 and b"/metrics" in body and b"/health/live" in body
            status, headers, body = await get(port, "/metrics", "POST", b"x" * 100_000)
            assert status == 405 and headers["allow"] == "GET, HEAD" and b"POST" in body
            status, _, _ = await get(port, "/health/", "GET")
            assert status == 404  # paths are exact
            status, headers, body = await get(port, "/health", "HEAD")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 0
            assert (await get(port, "/health?verbose=1"))[0] == 200  # a query string is ignored
            garbage = await raw(port, b"\x16\x03\x01\x02\x00 this is not HTTP\r\n\r\n")
            assert garbage == b"" or garbage.startswith(b"HTTP/1.1 400")
            huge = await raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
            assert huge == b"" or huge.startswith(b"HTTP/1.1 4")
            assert await pool.execute("echo", 5) == 5
            assert (await get(port, "/health"))[0] == 200
            assert pool.statistics().restarts == 0
            nursery.cancel_scope.cancel()


async def test_a_slow_client_is_dropped_without_holding_anyone_up(worker_pool: WorkerPools) -> None:
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as pool, trio.open_nursery() as nursery:
            port = await nursery.start(serve_ops, pool)
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            async with slow:
                await slow.send_all(b"GET /heal")  # and nothing more
                for i in range(5):  # others are served meanwhile, and so are calls
                    assert (await get(port, "/health/live"))[0] == 200
                    assert await pool.execute("echo", i) == i
                t0 = trio.current_time()
                with trio.fail_after(15):  # hypercorn's keep-alive timeout (5 s) drops it
                    assert await slow.receive_some(65536) == b""
                assert trio.current_time() - t0 < 15
            assert (await get(port, "/health"))[0] == 200
            nursery.cancel_scope.cancel()


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_the_server_ends_with_its_nursery_leaving_no_thread_or_socket(
    worker_pool: WorkerPools, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pool.ops")
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as pool:
            threads = set(threading.enumerate())
            fds = _open_fds()
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_ops, pool)
                idle = await trio.open_tcp_stream("127.0.0.1", port)  # a connection left open
                reply = await raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 200")
                listening = [c for c in psutil.Process().net_connections("tcp") if c.laddr.port == port]
                assert listening  # (the check below can see the server's sockets)
                nursery.cancel_scope.cancel()
            assert await idle.receive_some(100) == b""  # the server closed it
            await idle.aclose()
            left = [c for c in psutil.Process().net_connections("tcp") if c.laddr.port == port]
            assert left == []
            assert _open_fds() == fds
            assert set(threading.enumerate()) == threads
            assert await pool.execute("echo", 1) == 1  # the pool is untouched
    problems = [r for r in caplog.records if r.name == "pool.ops" and r.levelno >= logging.WARNING]
    assert problems == []
    assert any(f":{port}" in r.getMessage() for r in caplog.records if r.name == "pool.ops")


# ---------------------------------------------------------------------------------------------
# ops_app on another thread, and where it cannot run
# ---------------------------------------------------------------------------------------------


def _serve_elsewhere(app: Any, ports: "queue.Queue[int]", stop: threading.Event) -> None:
    """A trio run of its own on this thread, serving ``app`` until ``stop`` is set."""

    async def main() -> None:
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = logging.getLogger("pool.ops")
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))
            ports.put(int(binds[0].rpartition(":")[2]))
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def test_liveness_fails_when_the_pool_s_loop_stops_answering(worker_pool: WorkerPools) -> None:
    # The server runs in another trio run, on another thread; the pool's own loop is blocked
    # (as by a handler of the application that never yields) for longer than a second.
    ports: queue.Queue[int] = queue.Queue()
    stop = threading.Event()
    with trio.fail_after(60):
        async with worker_pool(HANDLERS, size=1) as pool:
            server = threading.Thread(target=_serve_elsewhere, args=(ops_app(pool), ports, stop))
            server.start()
            try:
                port = await trio.to_thread.run_sync(partial(ports.get, timeout=20))
                assert (await get(port, "/health/live"))[0] == 200
                status, _, body = await get(port, "/health")  # read on the pool's loop
                assert status == 200 and b"healthy" in body
                assert PREFIX + "calls" in families((await get(port, "/metrics"))[2])
                answers: queue.Queue[Response] = queue.Queue()
                client = threading.Thread(target=lambda: answers.put(fetch(port, "/health/live")))
                client.start()
                time.sleep(3.0)  # the pool's trio loop does not answer for 3 s
                status, _, body = await trio.to_thread.run_sync(partial(answers.get, timeout=20))
                assert status == 503 and b"unresponsive" in body and b"1s" in body
                client.join()
                assert (await get(port, "/health/live"))[0] == 200  # it answers again
                await pool.aclose()
                status, _, body = await get(port, "/health/live")
                assert status == 503 and b"closed" in body
            finally:
                stop.set()
                await trio.to_thread.run_sync(server.join)


async def test_ops_app_outside_trio_says_what_it_needs() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    with trio.fail_after(30):
        async with fake_pool(HANDLERS, size=1) as pool:
            app = ops_app(pool)
            await trio.to_thread.run_sync(lambda: asyncio.run(app(scope, receive, send)))
    assert sent[0]["status"] == 500
    assert b"trio server" in sent[1]["body"] and b"not thread-safe" in sent[1]["body"]


async def test_it_listens_on_ipv6_loopback_too() -> None:
    def fetch6(port: int) -> int:
        conn = http.client.HTTPConnection("::1", port, timeout=10)
        try:
            conn.request("GET", "/health/live")
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with trio.fail_after(30):
        async with fake_pool(HANDLERS, size=1) as pool, trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_ops, pool, host="::1"))
            assert await trio.to_thread.run_sync(fetch6, port) == 200
            nursery.cancel_scope.cancel()


async def test_bad_arguments_say_what_is_wrong() -> None:
    with trio.fail_after(30):
        async with fake_pool(HANDLERS, size=1) as pool, trio.open_nursery() as nursery:
            for bad in (-1, 70000, "80", True):
                with pytest.raises(ValueError, match="port must be a whole number"):
                    await serve_ops(pool, port=bad)
            with pytest.raises(ValueError, match="host must be an address"):
                await serve_ops(pool, host="")
            with pytest.raises(TypeError, match="needs a Pool"):
                ops_app(object())  # type: ignore[arg-type]
            port = await nursery.start(serve_ops, pool)
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}.*port=0"):
                await nursery.start(partial(serve_ops, pool, port=port))
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# python -m pool demo --serve
# ---------------------------------------------------------------------------------------------


async def test_the_demo_serves_its_pool_until_ctrl_c() -> None:
    import json
    import signal
    import subprocess
    import sys

    from conftest import wait_gone

    argv = [sys.executable, "-m", "pool", "demo", "--serve", "--workers", "2", "--seconds", "0.3"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        with trio.fail_after(60):
            said: list[str] = []
            while not said or "/recovery" not in said[-1]:  # the last URL
                line = await trio.to_thread.run_sync(proc.stdout.readline)
                assert line, "".join(said) + proc.communicate()[1]
                said.append(line)
            text = "".join(said)
            assert "All checks passed" in text and "/metrics" in text and "/recovery" in text
            url = said[-1].split()[0]
            port = int(url.rpartition(":")[2].partition("/")[0])
            status, _, body = await get(port, "/health")
            assert status == 200
            pids = [w["pid"] for w in json.loads(body)["workers"].values()]
            before = value(await scrape(port), PREFIX + "calls_total", command="echo", outcome="ok")
            while value(await scrape(port), PREFIX + "calls_total", command="echo", outcome="ok") == before:
                await trio.sleep(0.05)  # it keeps calling, so the counters move
            proc.send_signal(signal.SIGINT)
            assert await trio.to_thread.run_sync(proc.wait) == 0
            await wait_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()


async def test_the_demo_without_serve_is_unchanged() -> None:
    import subprocess
    import sys

    with trio.fail_after(60):
        done = await trio.to_thread.run_sync(
            partial(
                subprocess.run,
                [sys.executable, "-m", "pool", "demo", "--workers", "2", "--seconds", "0.3"],
                capture_output=True,
                text=True,
                timeout=50,
            )
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("All checks passed: no lost work, sessions intact, pool back to full health.")
    assert "ops server" not in done.stdout
