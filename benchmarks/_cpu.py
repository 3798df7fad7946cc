"""The CPU-bound section: the pool and ProcessPoolExecutor parse and compile the same real source
files (the standard library's), one file per call, and must return identical results.

Each round runs both peers on the same list (in alternating order), each already started and warmed
up (startup is measured elsewhere), with as many calls in flight as keep every worker busy: the
pool gets two callers per worker, the executor every file submitted at once. The ratio is the
executor's time over the pool's: above 1 the pool is faster.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks._cpu_work import compile_source
from pool import PoolConfig, open_pool

HANDLERS = ["bridge_worker.builtin", "benchmarks._cpu_work"]


def source_files(count: int) -> list[str]:
    """The first ``count`` files of the standard library (sorted, so every run takes the same),
    skipping tests and anything over 100 KB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts or path.stat().st_size > 100_000:
            continue
        try:
            compile_source(str(path))  # only files this interpreter compiles (no py2 leftovers)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        found.append(str(path))
        if len(found) == count:
            break
    return found


async def _pool_run(pool: Any, paths: list[str], callers: int) -> tuple[float, list[Any]]:
    results: list[Any] = [None] * len(paths)
    todo = iter(range(len(paths)))

    async def caller() -> None:
        for i in todo:
            results[i] = await pool.execute("compile_file", paths[i])

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return time.perf_counter() - t0, results


def _ppe_run(ex: concurrent.futures.ProcessPoolExecutor, paths: list[str]) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    results = list(ex.map(compile_source, paths))
    return time.perf_counter() - t0, results


def run(workers: int, files: int, rounds: int, mp_context: Any) -> dict[str, Any]:
    """Both peers over the same ``files`` source files, ``rounds`` times, alternating which goes
    first. Returns the times, the median ratio and whether every result was identical."""
    paths = source_files(files)
    pool_times: list[float] = []
    ppe_times: list[float] = []
    identical = True

    async def pool_rounds(ex: concurrent.futures.ProcessPoolExecutor) -> None:
        nonlocal identical
        config = PoolConfig(size=workers, handlers=HANDLERS)
        async with open_pool(config) as pool:
            for _ in range(workers * 2):  # warm up: every worker imported the module
                await pool.execute("compile_file", paths[0])
            for r in range(rounds):
                order = ["pool", "ppe"] if r % 2 == 0 else ["ppe", "pool"]
                got: dict[str, list[Any]] = {}
                for peer in order:
                    if peer == "pool":
                        t, got["pool"] = await _pool_run(pool, paths, 2 * workers)
                        pool_times.append(t)
                    else:
                        t, got["ppe"] = await trio.to_thread.run_sync(_ppe_run, ex, paths)
                        ppe_times.append(t)
                identical = identical and got["pool"] == got["ppe"]

    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=mp_context) as ex:
        list(ex.map(compile_source, [paths[0]] * (workers * 2)))  # warm up
        trio.run(pool_rounds, ex)
    ratios = [ppe / p for ppe, p in zip(ppe_times, pool_times)]
    return {
        "workers": workers,
        "files": len(paths),
        "bytes": sum(Path(p).stat().st_size for p in paths),
        "pool_s": pool_times,
        "ppe_s": ppe_times,
        "ratio_median": statistics.median(ratios),
        "identical": identical,
    }


def text(res: dict[str, Any]) -> str:
    pool_s, ppe_s = statistics.median(res["pool_s"]), statistics.median(res["ppe_s"])
    same = "identical" if res["identical"] else "DIFFERENT: a bug"
    return "\n".join(
        [
            f"7. CPU-bound: parse and compile {res['files']} standard-library files "
            f"({res['bytes'] / 1e6:.1f} MB of source), one file per call, {res['workers']} workers",
            f"  pool {pool_s:.2f} s, ProcessPoolExecutor {ppe_s:.2f} s (medians of {len(res['pool_s'])} "
            f"rounds); pool advantage {res['ratio_median']:.2f}x (median of per-round ratios); "
            f"results {same}",
        ]
    )
