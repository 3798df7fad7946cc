"""The ops section: what the operator surface costs a call.

* Echo calls per second and host CPU per call, with ``PoolConfig(metrics=False)``, with metrics
  recorded (the default), and, when opentelemetry-sdk is installed, with tracing on as well (an
  SDK tracer provider that records every span and exports none: the pool's spans and the SDK's
  own cost, without an exporter's). The pools are open side by side (two each of off and on, see
  ``_measure``) and measured in interleaved windows, each round starting with a different kind;
  ratios and differences are medians of per-round ones.
* The recording alone, without I/O: ``PoolMetrics.call_ok`` and a queue wait, in a tight loop.
* One scrape: the collector read and rendered as Prometheus text (needs the ``ops`` extra).
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import trio

from benchmarks._common import PAYLOAD
from benchmarks._report import table
from pool import Pool, PoolConfig, open_pool
from pool._metrics import PoolMetrics

WORKERS = 2
CALLERS = (1, 16)
OFF, ON, TRACED = "metrics off", "metrics on", "metrics on + tracing"


async def _window(pool: Pool, callers: int, seconds: float) -> tuple[float, float]:
    """Calls per second and host CPU seconds per call of ``callers`` echo loops for ``seconds``."""
    done = 0
    stop = trio.current_time() + seconds

    async def caller() -> None:
        nonlocal done
        while trio.current_time() < stop:
            await pool.execute("echo", PAYLOAD)
            done += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return done / elapsed, cpu / max(done, 1)


def _sdk_provider() -> Any:
    """An OpenTelemetry SDK tracer provider that records spans and exports none, or None."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    return TracerProvider()


async def _measure(rounds: int, seconds: float, warmup: int) -> dict[str, Any]:
    samples: dict[str, dict[int, list[tuple[float, float]]]] = {}
    async with AsyncExitStack() as stack:
        # Two pools of each of "off" and "on", opened off, on, on, off: an A/A run here showed the
        # pool opened second some 0.4 us a call dearer than the first (placement, caches), a
        # bias as large as what is measured; in this order it falls on both sides alike, and each
        # round's figure of a kind is the mean of its two pools'.
        pairs: dict[str, list[Pool]] = {OFF: [], ON: []}
        for name in (OFF, ON, ON, OFF):
            config = PoolConfig(size=WORKERS, metrics=name == ON)
            pairs[name].append(await stack.enter_async_context(open_pool(config)))
        pools: dict[str, list[Pool]] = dict(pairs)
        provider = _sdk_provider()
        if provider is not None:
            # A pool decides on tracing when it opens (pool._tracing): set the provider for that
            # moment only, as set_tracer_provider would for good, so nothing else here traces.
            import opentelemetry.trace as trace

            saved = trace._TRACER_PROVIDER
            trace._TRACER_PROVIDER = provider
            try:
                pools[TRACED] = [await stack.enter_async_context(open_pool(PoolConfig(size=WORKERS)))]
            finally:
                trace._TRACER_PROVIDER = saved
        for kind in pools.values():
            for pool in kind:
                for _ in range(warmup):
                    await pool.execute("echo", PAYLOAD)
        names = list(pools)
        for r in range(rounds):
            for callers in CALLERS:
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    got = [await _window(pool, callers, seconds) for pool in pools[name]]
                    samples.setdefault(name, {}).setdefault(callers, []).append(
                        (statistics.mean(rate for rate, _ in got), statistics.mean(cpu for _, cpu in got))
                    )
    rows = []
    for callers in CALLERS:
        row: dict[str, Any] = {"callers": callers}
        off = samples[OFF][callers]
        for name in names:
            got = samples[name][callers]
            row[name] = {
                "rate": statistics.median(rate for rate, _ in got),
                "host_cpu_us": statistics.median(cpu * 1e6 for _, cpu in got),
                "ratio_to_off": statistics.median(a[0] / b[0] for a, b in zip(got, off)),
                "extra_cpu_us": statistics.median((a[1] - b[1]) * 1e6 for a, b in zip(got, off)),
                "rounds": [{"rate": rate, "host_cpu_us": cpu * 1e6} for rate, cpu in got],
            }
        rows.append(row)
    return {"workers": WORKERS, "rounds": rounds, "seconds": seconds, "pools": names, "rows": rows}


def _recording_alone(n: int = 200_000) -> dict[str, float]:
    """Nanoseconds per call of what the hot path records, in a tight loop (best of 5)."""
    metrics = PoolMetrics(time.perf_counter)
    waits = metrics.queue_wait
    best_ok = best_wait = best_empty = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            pass
        best_empty = min(best_empty, time.perf_counter() - t0)
        started = time.perf_counter()
        t0 = time.perf_counter()
        for _ in range(n):
            metrics.call_ok("echo", 0.00003)  # its duration, from the reply's read time
            waits.counts[0] += 1  # a call that found a worker at once
        best_ok = min(best_ok, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            queued_at = time.perf_counter()  # read when it is queued
            waits.observe(started - queued_at)  # its wait, when a reply frees a worker
        best_wait = min(best_wait, time.perf_counter() - t0)
    return {
        "call_ns": (best_ok - best_empty) / n * 1e9,
        "queued_wait_ns": (best_wait - best_empty) / n * 1e9,
    }


async def _scrape_cost(repeat: int = 20) -> dict[str, Any] | None:
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from pool.ops import PoolCollector
    except ImportError:
        return None
    async with open_pool(PoolConfig(size=WORKERS, handlers=["bridge_worker.builtin", "bridge_worker.testing"])) as pool:
        for command in ("echo", "ping", "sleep", "counter", "raise_error"):
            try:
                await pool.execute(command, 0)
            except Exception:
                pass
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PoolCollector(pool))
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            body = generate_latest(registry)
            times.append(time.perf_counter() - t0)
        return {"ms": statistics.median(times) * 1e3, "bytes": len(body), "commands": len(pool._recovery.commands)}


def run(rounds: int, seconds: float, warmup: int) -> dict[str, Any]:
    return {
        "echo": trio.run(_measure, rounds, seconds, warmup),
        "recording": _recording_alone(),
        "scrape": trio.run(_scrape_cost),
        "python": sys.version.split()[0],
    }


def text(res: dict[str, Any]) -> str:
    echo = res["echo"]
    traced = TRACED in echo["pools"]
    out = [
        f"12. Operations: what metrics (and tracing) cost per call ({echo['workers']} workers, echo, "
        f"{echo['rounds']} round(s) of {echo['seconds']:g} s windows, pools interleaved; medians)"
    ]
    headers = ["callers", "off calls/s", "on calls/s", "on/off", "host CPU us/call off", "on", "on - off"]
    if traced:
        headers += ["traced calls/s", "traced/off", "traced - off"]
    body = []
    for row in echo["rows"]:
        on, off = row[ON], row[OFF]
        cells = [
            str(row["callers"]),
            f"{off['rate']:,.0f}",
            f"{on['rate']:,.0f}",
            f"{on['ratio_to_off']:.3f}x",
            f"{off['host_cpu_us']:.2f}",
            f"{on['host_cpu_us']:.2f}",
            f"{on['extra_cpu_us']:+.2f}",
        ]
        if traced:
            cells += [f"{row[TRACED]['rate']:,.0f}", f"{row[TRACED]['ratio_to_off']:.3f}x", f"{row[TRACED]['extra_cpu_us']:+.2f}"]
        body.append(cells)
    out.append(table(headers, body))
    out.append(
        "  (off: PoolConfig(metrics=False); on: the default; traced: on, with an OpenTelemetry SDK "
        "provider that records every span and exports none)"
        if traced
        else "  (off: PoolConfig(metrics=False); on: the default; tracing not measured: opentelemetry-sdk is not installed)"
    )
    rec = res["recording"]
    out.append(
        f"  the recording alone, no I/O: {rec['call_ns'] / 1000:.2f} us per call that found a worker at once "
        f"(its outcome, its duration, its queue wait of 0), +{rec['queued_wait_ns'] / 1000:.2f} us for a call "
        "that waited in the queue"
    )
    scrape = res["scrape"]
    if scrape is not None:
        out.append(
            f"  one scrape of /metrics (read the pool, render the text): {scrape['ms']:.2f} ms of the pool's "
            f"loop, {scrape['bytes']:,} bytes with {scrape['commands']} commands"
        )
    else:
        out.append("  one scrape of /metrics: skipped (the ops extra is not installed)")
    return "\n".join(out)
