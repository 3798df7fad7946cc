"""The operator surface: Prometheus metrics, readiness and liveness probes and the recovery report
over HTTP (the ``ops`` extra: prometheus-client and hypercorn).

::

    port = await nursery.start(serve_ops, pool)      # hypercorn's trio worker, on 127.0.0.1:<any>
    app = ops_app(pool)                              # the same endpoints, as a plain ASGI app

    GET /metrics       Prometheus text; every name starts with trio_worker_pool_
    GET /health        pool.health() as JSON: 200 healthy or degraded, 503 unhealthy (readiness)
    GET /health/live   200 while the pool's trio loop answers within a second (liveness)
    GET /recovery      pool.recovery_report() as JSON

The metrics are read from the pool when they are scraped (:class:`PoolCollector`): its counters,
workers and circuits as they are then, and the histograms and per-command outcomes the pool
records as calls happen (``pool._metrics``, which needs no prometheus-client). A pool is not
thread-safe, so every endpoint reads it on the pool's own trio loop: directly when the server runs
in the pool's trio run (as ``serve_ops`` does), else through ``trio.from_thread`` with the pool's
trio token (a trio server on another thread); that hop is what ``/health/live`` times.

Only this module imports prometheus-client and hypercorn: ``import pool`` works without them.
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from importlib import metadata
from typing import Any, Awaitable, Callable, Final, Iterator, Mapping

import trio

try:
    import hypercorn.trio
    from hypercorn.config import Config as HypercornConfig
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"pool.ops needs the 'ops' extra ({exc.name} is missing): "
        "pip install 'trio-worker-pool[ops]' (prometheus-client, hypercorn)"
    ) from exc

from bridge_worker.protocol import PROTOCOL_VERSION
from pool._breaker import CircuitState
from pool._metrics import OUTCOMES, Histogram
from pool._pool import Pool, _only_exception
from pool._supervisor import RESTART_REASONS
from pool._worker import WorkerState

__all__ = ["serve_ops", "ops_app", "PoolCollector"]

logger = logging.getLogger("pool.ops")

PREFIX: Final = "trio_worker_pool_"
#: ``circuit_state``'s values.
CIRCUIT_VALUES: Final[Mapping[CircuitState, int]] = {
    CircuitState.CLOSED: 0,
    CircuitState.HALF_OPEN: 1,
    CircuitState.OPEN: 2,
}
#: ``health``'s values.
HEALTH_VALUES: Final[Mapping[str, int]] = {"healthy": 0, "degraded": 1, "unhealthy": 2}
#: How long the pool's trio loop may take to answer ``/health/live``.
LIVENESS_TIMEOUT: Final = 1.0

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _version() -> str:
    try:
        return metadata.version("trio-worker-pool")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------


class PoolCollector:
    """A prometheus-client collector that reads a pool when scraped. Register it with a registry
    of your own to export a pool's metrics beside your application's
    (``REGISTRY.register(PoolCollector(pool))``); call it on the pool's trio loop."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._version = _version()

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        stats = pool.statistics()
        yield InfoMetricFamily(
            PREFIX[:-1], "The library and its wire protocol.", {"version": self._version, "protocol": str(PROTOCOL_VERSION)}
        )
        health = GaugeMetricFamily(PREFIX + "health", "pool.health(): 0 healthy, 1 degraded, 2 unhealthy.")
        health.add_metric([], HEALTH_VALUES[pool.health()["status"]])
        yield health
        yield _gauge("size", "Workers the pool runs now (PoolConfig.size unless resized).", stats.size)
        workers = GaugeMetricFamily(PREFIX + "workers", "Worker processes by state.", labels=["state"])
        for worker_state in WorkerState:
            workers.add_metric([worker_state.value], sum(1 for w in stats.workers if w.state == worker_state.value))
        yield workers
        yield _gauge("queued_calls", "Calls waiting for a worker or for their session's turn.", stats.queued)
        yield _gauge("sessions", "Live sessions.", stats.sessions)
        circuits = GaugeMetricFamily(
            PREFIX + "circuit_state",
            "Circuit breakers: 0 closed, 1 half-open, 2 open ('pool': worker starts; 'command:NAME': calls).",
            labels=["circuit"],
        )
        circuits.add_metric(["pool"], CIRCUIT_VALUES[CircuitState(stats.pool_circuit)])
        for name, state in sorted(stats.circuits.items()):
            circuits.add_metric([f"command:{name}"], CIRCUIT_VALUES[CircuitState(state)])
        yield circuits
        memory = GaugeMetricFamily(
            PREFIX + "worker_resident_memory_bytes",
            "Memory of each worker and what it started, by slot (what the memory limits compare).",
            labels=["worker"],
        )
        for w in stats.workers:
            if w.rss is not None:
                memory.add_metric([str(w.slot)], w.rss)
        yield memory
        yield _counter("retries", "Attempts run again after a failure (failovers not included).", stats.retries)
        yield _counter("failovers", "Attempts run on another worker after a failure.", stats.failovers)
        yield _counter("fallbacks", "Calls answered by their command's fallback (graceful degradation).", stats.fallbacks)
        recoveries = CounterMetricFamily(
            PREFIX + "recoveries", "Calls that needed recovery, by how they ended.", labels=["outcome"]
        )
        rec = stats.recoveries
        for outcome, n in (("succeeded", rec.succeeded), ("failed", rec.failed), ("cancelled", rec.cancelled)):
            recoveries.add_metric([outcome], n)
        yield recoveries
        restarts = CounterMetricFamily(
            PREFIX + "worker_restarts", "Workers replaced, by why they had to be.", labels=["reason"]
        )
        for reason in sorted(set(RESTART_REASONS) | set(stats.restarts_by_reason)):
            restarts.add_metric([reason], stats.restarts_by_reason.get(reason, 0))
        yield restarts
        yield _counter(
            "worker_start_failures", "Workers that exited or timed out before saying hello.", stats.failed_starts
        )
        recorded = pool._metrics
        if recorded is None:  # PoolConfig(metrics=False): nothing recorded per call
            return
        calls = CounterMetricFamily(
            PREFIX + "calls",
            "Calls by command and outcome: ok, error (the matrix gave up), caller_error, rejected "
            "(refused or dropped: open circuit, full queue, no worker in time, pool down or closed), cancelled.",
            labels=["command", "outcome"],
        )
        failures = CounterMetricFamily(
            PREFIX + "call_failures",
            "Calls that failed, by command and reason: the error's category, or its OUTSIDE_MATRIX row.",
            labels=["command", "reason"],
        )
        durations = HistogramMetricFamily(
            PREFIX + "call_duration_seconds",
            "Calls from start to outcome (queueing and retries included; streams not timed).",
            labels=["command"],
        )
        commands = sorted(set(pool._recovery.commands) | set(recorded.commands))
        for name in commands:
            m = recorded.command(name)
            for outcome in OUTCOMES:
                calls.add_metric([name, outcome], m.calls(outcome))
            for reason, n in sorted(m.failures.items()):
                failures.add_metric([name, reason], n)
            durations.add_metric([name], _buckets(m.duration), m.duration.sum)
        yield calls
        yield failures
        yield durations
        yield _histogram("queue_wait_seconds", "Each attempt's wait for a worker (0: one was free).", recorded.queue_wait)
        yield _histogram(
            "worker_start_duration_seconds", "Worker starts, spawn to hello (imports and start hooks).", recorded.worker_start
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    # The ``le`` label as prometheus-client writes it: the float's repr, +Inf for the last.
    return [("+Inf" if bound == math.inf else repr(bound), n) for bound, n in h.cumulative()]


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(PREFIX + name, doc, buckets=_buckets(h), sum_value=h.sum)


# ---------------------------------------------------------------------------------------------
# The ASGI app
# ---------------------------------------------------------------------------------------------


class _Unresponsive(Exception):
    """The pool's trio loop did not answer in time, or its run has ended."""


class _PoolLoop:
    """Runs a function on the pool's trio loop: at once from a task of the pool's own run, else
    through ``trio.from_thread`` (a server on another thread, in another trio run)."""

    def __init__(self, pool: Pool) -> None:
        self._token = pool._trio_token

    async def run(self, fn: Callable[[], Any], timeout: float = math.inf) -> Any:
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError(
                "ops_app must be served from a trio server (hypercorn's trio worker, as serve_ops "
                "does): the pool lives in a trio run, and is not thread-safe"
            ) from None
        if here is self._token:
            return fn()
        hop = partial(trio.from_thread.run_sync, fn, trio_token=self._token)
        with trio.move_on_after(timeout):
            try:
                return await trio.to_thread.run_sync(hop, abandon_on_cancel=True)
            except trio.RunFinishedError:
                raise _Unresponsive("the pool's trio run has ended") from None
        raise _Unresponsive(f"the pool's trio loop did not answer within {timeout:g}s")


def ops_app(pool: Pool) -> ASGIApp:
    """The operator endpoints as an ASGI application, for an application's own server. Serve it
    from a trio server (hypercorn's trio worker): in the pool's own trio run, or in another on its
    own thread (each request then hops to the pool's loop). ``serve_ops`` serves it for you."""
    if not isinstance(pool, Pool):
        raise TypeError(f"ops_app needs a Pool (from open_pool), got {pool!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool))
    loop = _PoolLoop(pool)

    async def metrics() -> tuple[int, bytes, bytes]:
        body: bytes = await loop.run(partial(generate_latest, registry))
        return 200, CONTENT_TYPE_LATEST.encode(), body

    async def health() -> tuple[int, bytes, bytes]:
        report: dict[str, Any] = await loop.run(pool.health)
        return (503 if report["status"] == "unhealthy" else 200), *_json(report)

    async def live() -> tuple[int, bytes, bytes]:
        try:
            closing: bool = await loop.run(lambda: pool._closing, timeout=LIVENESS_TIMEOUT)
        except _Unresponsive as exc:
            return 503, *_json({"status": "unresponsive", "detail": str(exc)})
        if closing:
            return 503, *_json({"status": "closed", "detail": "the pool is closed"})
        return 200, *_json({"status": "alive"})

    async def recovery() -> tuple[int, bytes, bytes]:
        report: dict[str, Any] = await loop.run(pool.recovery_report)
        return 200, *_json(report)

    routes: dict[str, Callable[[], Awaitable[tuple[int, bytes, bytes]]]] = {
        "/metrics": metrics,
        "/health": health,
        "/health/live": live,
        "/recovery": recovery,
    }
    index = ("endpoints: GET " + ", GET ".join(routes) + "\n").encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # (a websocket: refused by the server when the app returns)
        method = scope["method"]
        head = method == "HEAD"
        handler = routes.get(scope["path"])
        if handler is None:
            await _respond(send, 404, b"text/plain; charset=utf-8", b"not found; " + index, head)
            return
        if method not in ("GET", "HEAD"):
            body = f"{method} is not allowed here: use GET (or HEAD)\n".encode()
            await _respond(send, 405, b"text/plain; charset=utf-8", body, head, [(b"allow", b"GET, HEAD")])
            return
        try:
            status, content_type, body = await handler()
        except _Unresponsive as exc:
            status, content_type, body = 503, b"text/plain; charset=utf-8", f"{exc}\n".encode()
        except Exception as exc:
            logger.exception("ops endpoint %s failed", scope["path"])
            status, content_type, body = 500, b"text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode()
        await _respond(send, status, content_type, body, head)

    return app


def _json(obj: Any) -> tuple[bytes, bytes]:
    return b"application/json", json.dumps(_finite(obj), default=str).encode() + b"\n"


def _finite(obj: Any) -> Any:
    """``obj`` with infinite and NaN floats as None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


async def _respond(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    head: bool,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up or tear down: the pool is the application's."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


async def serve_ops(
    pool: Pool,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :func:`ops_app` over HTTP/1.1 with hypercorn's trio worker, in the pool's trio run,
    until cancelled: ``port = await nursery.start(serve_ops, pool)`` gives the bound port
    (``port=0``: any free one). Cancelling the nursery closes the listener and every connection.

    It listens on loopback by default: the endpoints have no authentication, so expose them
    beyond the machine only behind something that has (a scraper on the same host, a proxy).
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"serve_ops: host must be an address to listen on, such as '127.0.0.1', got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_ops: port must be a whole number from 0 (any free port) to 65535, got {port!r}")
    app = ops_app(pool)
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logger  # hypercorn's own messages go to the pool.ops logger
    bound: int | None = None
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))  # type: ignore[arg-type]
            # hypercorn reports what it bound as "http://HOST:PORT" ("http://[HOST]:PORT" for IPv6).
            bound = int(binds[0].rpartition(":")[2])
            logger.info("ops endpoints on http://%s:%d (/metrics, /health, /health/live, /recovery)", host, bound)
            task_status.started(bound)
    except BaseExceptionGroup as group:
        # A bind that failed comes out of hypercorn's nurseries wrapped: say it as one error,
        # with what to do.
        failed = _only_exception(group)
        if bound is not None or not isinstance(failed, OSError):
            raise
        raise OSError(
            failed.errno, f"serve_ops cannot listen on {host}:{port}: {failed.strerror}; choose another port, or port=0"
        ) from failed
