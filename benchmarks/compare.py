"""Compare the pool's echo between checkouts of this repository, interleaved, in one run.

    python -m benchmarks.compare CHECKOUT [CHECKOUT ...] [--workers 2] [--callers 16]
                                 [--seconds 2] [--rounds 6]

Each CHECKOUT is a directory holding a version of this repository (for an earlier commit:
``git worktree add /tmp/old <commit>``). Every round runs each checkout once, in turn, in a fresh
interpreter whose ``pool`` and ``bridge_worker`` come from that checkout (and whose workers do
too); each run opens a pool of ``--workers`` workers, warms it up, and has ``--callers`` tasks
call ``echo`` for ``--seconds``. Printed per checkout: the median calls/s and host CPU per call
(``getrusage`` of the host process: all its threads), and both as ratios to the first checkout,
medians of per-round ratios. Workers are not put in cgroups, so that versions which judge each
other's cgroup directories differently do not meet. Nothing here asserts a speed.

How a hot-path change is checked against the commit before it ("no loss of speed"): on these
2-core machines a single run swings by tens of percent, two checkouts run side by side do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Run in the child interpreter: one checkout's echo, printed as "calls_per_s host_us_per_call".
_CHILD = r"""
import resource, sys, time
import trio
from pool import PoolConfig, open_pool

W, C, S = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
PAYLOAD = {"a": 1, "b": "hello", "c": [1, 2, 3]}


def launcher():
    try:
        from pool._process import LocalLauncher
        return LocalLauncher(cgroup=False)
    except (ImportError, TypeError):  # a version without cgroups
        return None


async def main():
    async with open_pool(PoolConfig(size=W), launcher=launcher()) as pool:
        for _ in range(2000):
            await pool.execute("echo", PAYLOAD)
        done = 0
        stop = False

        async def caller():
            nonlocal done
            while not stop:
                await pool.execute("echo", PAYLOAD)
                done += 1

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(C):
                nursery.start_soon(caller)
            await trio.sleep(S)
            stop = True
        elapsed = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        print(f"{done / elapsed:.1f} {1e6 * cpu / done:.3f}")


trio.run(main)
"""


def run_one(checkout: Path, workers: int, callers: int, seconds: float) -> tuple[float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(workers), str(callers), str(seconds)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60 + 10 * seconds,
    )
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: the echo run failed:\n{out.stderr[-2000:]}")
    rate, cpu = out.stdout.split()
    return float(rate), float(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    for checkout in args.checkouts:
        if not (checkout / "pool" / "__init__.py").is_file():
            parser.error(f"{checkout} is not a checkout of this repository (no pool/__init__.py)")
    rates: dict[Path, list[float]] = {c: [] for c in args.checkouts}
    cpus: dict[Path, list[float]] = {c: [] for c in args.checkouts}
    for r in range(args.rounds):
        for checkout in args.checkouts:
            rate, cpu = run_one(checkout, args.workers, args.callers, args.seconds)
            rates[checkout].append(rate)
            cpus[checkout].append(cpu)
            print(f"round {r + 1}/{args.rounds} {checkout}: {rate:,.0f} calls/s, host {cpu:.1f} us/call", file=sys.stderr)
    base = args.checkouts[0]
    print(f"echo, {args.workers} workers x {args.callers} callers, {args.seconds:g} s, {args.rounds} interleaved rounds")
    print(f"{'checkout':40s} {'calls/s':>9s} {'host us/call':>13s} {'calls/s vs first':>17s} {'host CPU vs first':>18s}")
    for checkout in args.checkouts:
        rate_ratio = statistics.median(a / b for a, b in zip(rates[checkout], rates[base]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpus[checkout], cpus[base]))
        print(
            f"{str(checkout):40s} {statistics.median(rates[checkout]):9,.0f} "
            f"{statistics.median(cpus[checkout]):13.1f} {rate_ratio:16.2f}x {cpu_ratio:17.2f}x"
        )


if __name__ == "__main__":
    main()
