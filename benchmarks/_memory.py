"""Host memory over many calls, measured in a fresh interpreter.

``python -m benchmarks._memory N [N ...]`` opens a 2-worker pool, runs echo calls with 16 callers
and prints one JSON object: the host's RSS (MiB) after imports, after the pool opened, and after
each cumulative call count N. It runs in its own process so the benchmark driver's own memory
(results, latency samples, other peers' libraries) does not blur the figure.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import trio

from benchmarks._common import PAYLOAD
from pool import PoolConfig, open_pool

CALLERS = 16


def _rss_mib() -> float:
    gc.collect()  # report what is held, not garbage awaiting collection
    return float(psutil.Process().memory_info().rss) / 2**20


async def _main(marks: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_mib": {"imported": _rss_mib()}}
    async with open_pool(PoolConfig(size=2)) as pool:
        out["rss_mib"]["opened"] = _rss_mib()
        done = 0
        for mark in sorted(marks):
            remaining = mark - done
            share, extra = divmod(remaining, CALLERS)

            async def caller(n: int) -> None:
                for _ in range(n):
                    await pool.execute("echo", PAYLOAD)

            async with trio.open_nursery() as nursery:
                for i in range(CALLERS):
                    nursery.start_soon(caller, share + (1 if i < extra else 0))
            done = mark
            out["rss_mib"][f"after_{mark}_calls"] = _rss_mib()
        stats = pool.statistics()
        out["calls_ok"] = stats.calls_ok
        out["calls_failed"] = stats.calls_failed
    return out


def measure(marks: list[int]) -> dict[str, Any]:
    """Run this module in a child interpreter and return its JSON result."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._memory", *map(str, marks)],
        capture_output=True,
        cwd=root,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"host memory run failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


if __name__ == "__main__":
    print(json.dumps(trio.run(_main, [int(a) for a in sys.argv[1:]])))
