"""``python -m benchmarks``: echo throughput of the pool and ProcessPoolExecutor, in one run.

    python -m benchmarks [--quick] [--workers 2] [--callers 16] [--rounds 3] [--json FILE]

Each round measures every contender for the same time, interleaved, and the table reports the
median over rounds and the median of the per-round ratios (these machines are noisy: compare
only figures from one run). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import threading
import time
from typing import Any, Callable

import trio

from benchmarks._peers import echo
from pool import PoolConfig, open_pool

PAYLOAD = {"a": 1, "b": "hello", "c": [1, 2, 3]}


async def _pool_throughput(workers: int, callers: int, seconds: float) -> float:
    async with open_pool(PoolConfig(size=workers)) as pool:
        for _ in range(200):  # warm up
            await pool.execute("echo", PAYLOAD)
        done = 0
        stop = trio.current_time() + seconds

        async def caller() -> None:
            nonlocal done
            while trio.current_time() < stop:
                await pool.execute("echo", PAYLOAD)
                done += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for _ in range(callers):
                n.start_soon(caller)
        return done / (time.perf_counter() - t0)


def pool_throughput(workers: int, callers: int, seconds: float) -> float:
    return trio.run(_pool_throughput, workers, callers, seconds)


def ppe_throughput(workers: int, callers: int, seconds: float) -> float:
    """ProcessPoolExecutor driven as its users drive it: futures submitted from a thread,
    ``callers`` in flight (pipelined)."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as ex:
        list(ex.map(echo, [PAYLOAD] * 200))  # warm up, all workers spawned
        done = 0
        lock = threading.Lock()
        stop = time.perf_counter() + seconds
        finished = threading.Event()
        inflight = threading.Semaphore(callers)

        def on_done(_: "concurrent.futures.Future[Any]") -> None:
            nonlocal done
            with lock:
                done += 1
            inflight.release()

        t0 = time.perf_counter()
        while time.perf_counter() < stop:
            inflight.acquire()
            ex.submit(echo, PAYLOAD).add_done_callback(on_done)
        for _ in range(callers):
            inflight.acquire()
        finished.set()
        return done / (time.perf_counter() - t0)


CONTENDERS: dict[str, Callable[[int, int, float], float]] = {
    "pool": pool_throughput,
    "ProcessPoolExecutor": ppe_throughput,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="short rounds (for CI: checks it runs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    seconds = 0.3 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    results: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(rounds):
        for name, run in CONTENDERS.items():
            results[name].append(run(args.workers, args.callers, seconds))
    ratios = [p / e for p, e in zip(results["pool"], results["ProcessPoolExecutor"])]
    print(f"echo of {PAYLOAD}, {args.workers} workers, {args.callers} concurrent callers, "
          f"{rounds} round(s) of {seconds} s, interleaved")
    print(f"{'contender':<22}{'calls/s (median)':>18}")
    for name, values in results.items():
        print(f"{name:<22}{statistics.median(values):>18,.0f}")
    print(f"pool / ProcessPoolExecutor: {statistics.median(ratios):.2f}x (median of per-round ratios)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratios": ratios, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
