"""``python -m benchmarks._orphan_child PEER [START_METHOD]``: start PEER with 2 workers, make sure every worker
has answered a call, print ``{"pids": [...]}`` (every descendant process) and wait to be killed.

The benchmark SIGKILLs this process and watches how long the printed processes live on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import sys
import time

import psutil
import trio

from benchmarks import _peers
from benchmarks._common import MP_POOL, PAYLOAD, POOL, PPE, TRIO_PARALLEL

WORKERS = 2


def _report() -> None:
    # All descendants, not just workers: helper processes (a resource tracker) count as leftovers too.
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    sys.stdout.write(json.dumps({"pids": pids}) + "\n")
    sys.stdout.flush()


def _hold_forever() -> None:
    while True:
        time.sleep(3600)


async def _pool() -> None:
    from pool import PoolConfig, open_pool

    async with open_pool(PoolConfig(size=WORKERS)) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(pool.execute, "echo", PAYLOAD)
        _report()
        await trio.sleep_forever()


async def _trio_parallel() -> None:
    import trio_parallel  # type: ignore[import-untyped]

    from benchmarks._drivers import _tp_spread

    async with trio_parallel.open_worker_context() as ctx:
        await _tp_spread(functools.partial(ctx.run_sync, limiter=trio.CapacityLimiter(WORKERS)), WORKERS, 1)
        _report()
        await trio.sleep_forever()


def main(peer: str, method: str | None) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context(method)  # the same start method as the rest of the run
    if peer == POOL:
        trio.run(_pool)
    elif peer == TRIO_PARALLEL:
        trio.run(_trio_parallel)
    elif peer == PPE:
        with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx) as ex:
            list(ex.map(_peers.getpid, range(50)))
            _report()
            _hold_forever()
    elif peer == MP_POOL:
        with ctx.Pool(WORKERS) as mp_pool:
            mp_pool.map(_peers.getpid, range(50))
            _report()
            _hold_forever()
    else:
        sys.exit(f"unknown peer {peer!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
