"""The elastic section: what a rolling restart costs in throughput, and how fast the pool grows.

* Rolling restart: 4 workers, 16 callers (half of them each in a session of its own) calling echo
  back to back. Each round measures a calm window, then the time ``restart_workers()`` takes with
  the same callers running; calls per second in each, the ratio (during / calm, per round, then
  the median), and every failed call counted by type (there should be none).
* Scaling from 1 to 8 workers: the autoscaler (``size=1, max_size=8, scale_up_after=0.05``) under
  16 callers of ``sleep(0.05)``, seconds from the first call until 8 workers serve, with its
  steps; and ``resize(8)`` from 1, seconds until it returns (every new worker serving).
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any

import trio

from benchmarks._common import PAYLOAD
from pool import Pool, PoolConfig, PoolEvent, open_pool

ROLL_WORKERS = 4
ROLL_CALLERS = 16


async def _rolls(rounds: int) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    failed: collections.Counter[str] = collections.Counter()
    done = 0
    stop = trio.Event()

    async with open_pool(PoolConfig(size=ROLL_WORKERS)) as pool:

        async def caller(i: int) -> None:
            nonlocal done
            session = f"s{i}" if i % 2 == 0 else None
            while not stop.is_set():
                try:
                    if session is None:
                        await pool.execute("echo", PAYLOAD)
                    else:
                        await pool.execute_in_session(session, "echo", PAYLOAD)
                    done += 1
                except Exception as exc:  # counted by type: a roll should fail none
                    failed[type(exc).__name__] += 1
                    await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for i in range(ROLL_CALLERS):
                nursery.start_soon(caller, i)
            await trio.sleep(0.3)  # warm up
            window = 0.5
            for _ in range(rounds):
                n0, t0 = done, time.perf_counter()
                await trio.sleep(window)
                calm = (done - n0) / (time.perf_counter() - t0)
                n0, t0 = done, time.perf_counter()
                await pool.restart_workers()
                roll_s = time.perf_counter() - t0
                rolling = (done - n0) / roll_s
                rows.append({"calm_per_s": calm, "rolling_per_s": rolling, "roll_s": roll_s, "ratio": rolling / calm})
                window = max(0.2, roll_s)  # the next calm window as long as a roll
            stop.set()
        stats = pool.statistics()
    return {
        "workers": ROLL_WORKERS,
        "callers": ROLL_CALLERS,
        "rounds": rows,
        "failed": dict(failed),
        "restarts": stats.restarts,
        "calls_failed": stats.calls_failed,
    }


def _serving(pool: Pool) -> int:
    return sum(1 for w in pool.statistics().workers if w.state in ("idle", "busy"))


async def _autoscale_1_to_8() -> dict[str, Any]:
    events: list[PoolEvent] = []
    config = PoolConfig(size=1, max_size=8, scale_up_after=0.05, scale_down_after=30.0, event_callbacks=[events.append])
    stop = trio.Event()
    async with open_pool(config) as pool:

        async def caller() -> None:
            while not stop.is_set():
                await pool.execute("sleep", 0.05)

        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            for _ in range(16):
                nursery.start_soon(caller)
            with trio.fail_after(30):
                while _serving(pool) < 8:
                    await trio.sleep(0.001)
            took = trio.current_time() - t0
            stop.set()
    steps = [(e.data["to"], e.time - t0) for e in events if e.kind == "pool_resized"]
    return {"seconds": took, "steps": steps}


async def _resize_1_to_8() -> float:
    async with open_pool(PoolConfig(size=1)) as pool:
        t0 = time.perf_counter()
        await pool.resize(8)
        return time.perf_counter() - t0


def run(rounds: int) -> dict[str, Any]:
    rolls = trio.run(_rolls, rounds)
    autoscale = [trio.run(_autoscale_1_to_8) for _ in range(rounds)]
    resize = [trio.run(_resize_1_to_8) for _ in range(rounds)]
    return {"rolling_restart": rolls, "autoscale_1_to_8": autoscale, "resize_1_to_8_s": resize}


def text(res: dict[str, Any]) -> str:
    rolls = res["rolling_restart"]
    rows = rolls["rounds"]
    med = {k: statistics.median(r[k] for r in rows) for k in ("calm_per_s", "rolling_per_s", "roll_s", "ratio")}
    failed = ", ".join(f"{k} {v}" for k, v in rolls["failed"].items()) or "none"
    auto = res["autoscale_1_to_8"]
    auto_s = statistics.median(a["seconds"] for a in auto)
    steps = ", ".join(f"{to} at {t * 1000:.0f} ms" for to, t in auto[-1]["steps"])
    resize_s = statistics.median(res["resize_1_to_8_s"])
    return "\n".join(
        [
            f"10. Elastic pools ({len(rows)} round(s); medians)",
            f"  rolling restart of {rolls['workers']} workers, {rolls['callers']} callers of echo (half in "
            f"sessions): calm {med['calm_per_s']:,.0f} calls/s, during the roll {med['rolling_per_s']:,.0f} "
            f"calls/s ({med['ratio']:.2f}x of calm); a roll took {med['roll_s'] * 1000:.0f} ms; failed calls: {failed}",
            f"  1 -> 8 workers: autoscaler (scale_up_after 0.05 s, 16 callers of sleep(0.05)) "
            f"{auto_s * 1000:.0f} ms (last run's steps: {steps}); resize(8) {resize_s * 1000:.0f} ms",
        ]
    )
