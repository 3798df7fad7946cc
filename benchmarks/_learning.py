"""The learning section: what the retry budget and adaptive attempt timeouts change.

Budget: a SIGKILL storm (one worker every ``KILL_EVERY`` seconds) under 16 callers of a short
idempotent call, and a poison input that ends its worker on every third call, each once without a
retry budget and once with the default (0.2): retries per call, successful calls per second, p99
latency. Adaptive timeouts: every 30th attempt in a worker hangs
(for a minute), under 8 callers with a 2 s deadline, once with no attempt limit (the hung call
waits out its deadline) and once with ``attempt_timeout="adaptive"`` (killed at its command's
limit and run again).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from typing import Any

import trio

from pool import PoolConfig, PoolError, open_pool

HANDLERS = ["bridge_worker.builtin", "benchmarks._shape_work"]
KILL_EVERY = 0.05


def _p99(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else max(latencies)


async def _window(
    config: PoolConfig, command: str, args: Any, callers: int, seconds: float, kill_every: float | None
) -> dict[str, Any]:
    ok = failed = kills = 0
    latencies: list[float] = []
    async with open_pool(config) as pool:
        for _ in range(50):  # warm up (adaptive limits need their samples)
            try:
                await pool.execute(command, args)
            except PoolError:
                pass
        stats0 = pool.statistics()
        stop = trio.current_time() + seconds

        async def caller() -> None:
            nonlocal ok, failed
            while trio.current_time() < stop:
                t0 = time.perf_counter()
                try:
                    await pool.execute(command, args)
                except PoolError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                ok += 1

        async def killer() -> None:
            nonlocal kills
            rng = random.Random(7)
            while kill_every is not None:
                await trio.sleep(kill_every)
                ready = [w.pid for w in pool.statistics().workers if w.state in ("idle", "busy")]
                if ready:
                    try:
                        os.kill(rng.choice(ready), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            async with trio.open_nursery() as calls:
                for _ in range(callers):
                    calls.start_soon(caller)
            nursery.cancel_scope.cancel()
        elapsed = time.perf_counter() - t0
        stats = pool.statistics()
        retries = stats.retries + stats.failovers - stats0.retries - stats0.failovers
        refused = pool.recovery_report()["budget"]
    return {
        "ok_per_s": ok / elapsed,
        "failed": failed,
        "retries_per_call": retries / max(ok + failed, 1),
        "p99_ms": None if not latencies else 1000 * (_p99(latencies) or 0.0),
        "kills": kills,
        "budget_refused": None if refused is None else refused["refused"],
    }


def run(seconds: float) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        storm = {}
        poison = {}
        for name, budget in (("no budget", None), ("retry_budget=0.2", 0.2)):
            config = PoolConfig(size=2, handlers=HANDLERS, retry_budget=budget)
            storm[name] = await _window(config, "sleep", 0.001, 16, seconds, kill_every=KILL_EVERY)
            poison[name] = await _window(config, "sometimes_crash", 3, 16, seconds, kill_every=None)
        hangs = {}
        args = {"seconds": 0.002, "every": 30}
        for name, limit in (("a 2 s deadline only", None), ('attempt_timeout="adaptive"', "adaptive")):
            config = PoolConfig(size=2, handlers=HANDLERS, timeout=2.0, attempt_timeout=limit)
            hangs[name] = await _window(config, "sometimes_hang", args, 8, seconds, kill_every=None)
        return {"storm": storm, "poison": poison, "hangs": hangs}

    return trio.run(main)


def text(res: dict[str, Any]) -> str:
    def row(name: str, r: dict[str, Any]) -> str:
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f} ms"
        extra = f", budget refused {r['budget_refused']}" if r.get("budget_refused") else ""
        return (
            f"    {name:<28} {r['ok_per_s']:>9,.0f} ok/s, {r['failed']} failed, "
            f"{r['retries_per_call']:.3f} retries per call, p99 {p99}{extra}"
        )

    out = ["9. Recovery that learns (2 workers)"]
    kills = next(iter(res["storm"].values()))["kills"]
    out.append(f"  a SIGKILL every {KILL_EVERY * 1000:.0f} ms ({kills} kills), 16 callers of sleep(1 ms):")
    out += [row(name, r) for name, r in res["storm"].items()]
    out.append("  every 3rd call in a worker ends it (a poison input), 16 callers:")
    out += [row(name, r) for name, r in res["poison"].items()]
    out.append("  every 30th attempt hangs, 8 callers, a 2 s deadline:")
    out += [row(name, r) for name, r in res["hangs"].items()]
    return "\n".join(out)
