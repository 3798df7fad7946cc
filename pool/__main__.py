"""``python -m pool demo``: a pool of the built-in workers doing real work through a recovery.

    python -m pool demo [--workers N] [--callers N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import trio

from pool._config import PoolConfig
from pool._errors import PoolError
from pool._matrix import PoolErrorHandler
from pool._pool import Pool, open_pool


def _say(text: str) -> None:
    print(text, flush=True)


async def _demo(workers: int, callers: int, seconds: float) -> int:
    config = PoolConfig(size=workers, handlers=["bridge_worker.builtin", "bridge_worker.testing"])
    t0 = time.monotonic()
    async with open_pool(config) as pool:
        _say(f"pool of {workers} workers ready in {1000 * (time.monotonic() - t0):.0f} ms; pids {pool.worker_pids()}")
        ok = 0
        failures: list[PoolError] = []
        stop = trio.current_time() + seconds

        async def caller(n: int) -> None:
            nonlocal ok
            i = 0
            while trio.current_time() < stop:
                i += 1
                args = {"caller": n, "i": i, "payload": [1, 2, 3]}
                try:
                    result = await pool.execute("echo", args)
                    assert result == args, "echo returned something else"
                    ok += 1
                except PoolError as exc:
                    failures.append(exc)

        async def victim() -> None:
            try:
                await pool.execute("sleep", 1.0)
                _say("  the long call finished (it was not hit)")
            except PoolError as exc:
                _say("  the caller of the long call got a classified error, and only that caller:")
                for line in PoolErrorHandler.format_for_logging(exc).strip().splitlines()[:6]:
                    _say(f"    {line}")
                _say(f"    may_have_run={exc.may_have_run} caller_fault={exc.caller_fault}")

        async with trio.open_nursery() as nursery:
            for n in range(callers):
                nursery.start_soon(caller, n)
            nursery.start_soon(victim)
            await trio.sleep(seconds / 3)
            busy = _busy_pid(pool)
            _say(f"{callers} callers running echo; killing worker pid {busy} (SIGKILL) in the middle of a call")
            killed_at = time.monotonic()
            os.kill(busy, signal.SIGKILL)
            while busy in pool.worker_pids() or pool.statistics().alive < workers:
                await trio.sleep(0.001)
            _say(f"  replacement ready {1000 * (time.monotonic() - killed_at):.0f} ms after the kill; pids {pool.worker_pids()}")
        stats = pool.statistics()
        _say(f"calls: {ok} echo calls answered correctly, {len(failures)} failed; restarts {stats.restarts}")
        _say(f"statistics: {stats}")
        return 0 if ok > 0 and stats.alive == workers else 1


def _busy_pid(pool: Pool) -> int:
    # The worker running the long `sleep` call: the most interesting one to kill.
    for w in pool._workers:
        if w.current is not None and w.current.command == "sleep":
            return w.pid
    return pool.worker_pids()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pool", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the demo pool (the default)")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--callers", type=int, default=8)
    demo.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        return trio.run(
            _demo,
            getattr(args, "workers", 4),
            getattr(args, "callers", 8),
            getattr(args, "seconds", 3.0),
        )
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
