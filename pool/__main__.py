"""``python -m pool demo``: a pool of the built-in workers doing real work through a recovery.

    python -m pool demo [--workers N] [--sessions N] [--seconds S] [--serve [--host H] [--port P]]

It opens a pool, runs sessions from several concurrent callers, SIGKILLs the worker that holds
one of them in the middle of a call, and tells what happened: the calls, the recovery, the
session state that survived, and the health report. Exit status 0 means everything checked out.
With ``--serve`` (the ``ops`` extra) the pool then stays up with its ops server (``pool.ops``),
the URLs printed and a call a few times a second so that the metrics move, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import time
from functools import partial
from typing import Any

import trio

from pool._config import PoolConfig
from pool._errors import PoolError
from pool._events import PoolEvent
from pool._pool import Pool, open_pool


def _say(text: str = "") -> None:
    print(text, flush=True)


class _Demo:
    def __init__(
        self, workers: int, sessions: int, seconds: float, serve: tuple[str, int] | None = None
    ) -> None:
        self.workers = workers
        self.sessions = [f"user-{i}" for i in range(sessions)]
        self.seconds = seconds
        self.serve = serve  # (host, port) of the ops server, if asked for
        self.events: list[PoolEvent] = []
        self.echo_ok = 0
        self.failures: list[PoolError] = []
        self.problems: list[str] = []

    def record(self, event: Any) -> None:
        self.events.append(event)

    async def run(self) -> int:
        config = PoolConfig(
            size=self.workers,
            handlers=["bridge_worker.builtin", "bridge_worker.testing"],
            event_callbacks=(self.record,),
        )
        t0 = time.monotonic()
        async with open_pool(config) as pool:
            _say(f"1. A pool of {self.workers} workers is ready in {1000 * (time.monotonic() - t0):.0f} ms "
                 f"(pids {', '.join(map(str, pool.worker_pids()))}).")
            await self.warm_sessions(pool)
            await self.kill_in_the_middle(pool)
            await self.check_sessions(pool)
            await self.caller_mistake(pool)
            self.report(pool)
            if self.serve is not None:
                await self.serve_ops(pool, *self.serve)
        return self.status()

    def status(self) -> int:
        return 1 if self.problems else 0

    async def serve_ops(self, pool: Pool, host: str, port: int) -> None:
        """Keep the pool up with its ops server until Ctrl-C, with a light load."""
        from pool.ops import serve_ops

        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_ops, pool, host=host, port=port))
            base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            _say("7. The pool stays up with its ops server; Ctrl-C to stop:")
            for path, what in (
                ("/metrics", "Prometheus metrics"),
                ("/health", "readiness: health() as JSON, 503 when unhealthy"),
                ("/health/live", "liveness"),
                ("/recovery", "the recovery report"),
            ):
                _say(f"     {base}{path}    {what}")
            i = 0
            while True:  # a few calls a second, so that the counters move
                i += 1
                try:
                    await pool.execute_in_session(self.sessions[i % len(self.sessions)], "echo", i)
                except PoolError as exc:
                    _say(f"   a call failed: {exc}")
                await trio.sleep(0.25)

    async def warm_sessions(self, pool: Pool) -> None:
        async with trio.open_nursery() as nursery:
            for sid in self.sessions:
                nursery.start_soon(self.count_to, pool, sid, 3)
        holders = {sid: self.holder(pool, sid) for sid in self.sessions}
        _say(f"2. {len(self.sessions)} callers each ran 3 `counter` calls in their own session; every "
             "session stays on its worker:")
        for sid, pid in holders.items():
            _say(f"     {sid} -> worker pid {pid}, counter = 3")

    async def count_to(self, pool: Pool, sid: str, n: int) -> None:
        for expected in range(1, n + 1):
            got = await pool.execute_in_session(sid, "counter")
            if got != expected:
                self.problems.append(f"{sid}: counter gave {got}, expected {expected}")

    async def kill_in_the_middle(self, pool: Pool) -> None:
        victim_session = self.sessions[0]
        victim_pid = self.holder(pool, victim_session)
        assert victim_pid is not None, "the session was placed on a worker in step 2"
        stop = trio.current_time() + self.seconds
        _say(f"3. Now {len(self.sessions)} callers send `echo` calls for {self.seconds:.0f} s, while "
             f"{victim_session} runs a 1 s `sleep` (idempotent) on worker pid {victim_pid}.")
        long_call: dict[str, Any] = {}

        async def echo_load(sid: str) -> None:
            i = 0
            while trio.current_time() < stop:
                i += 1
                args = {"session": sid, "i": i, "payload": [1, 2, 3]}
                try:
                    if await pool.execute_in_session(sid, "echo", args) != args:
                        self.problems.append(f"{sid}: echo returned something else")
                    self.echo_ok += 1
                except PoolError as exc:
                    self.failures.append(exc)

        async def long_sleep() -> None:
            started = trio.current_time()
            try:
                long_call["result"] = await pool.execute_in_session(victim_session, "sleep", 1.0)
            except PoolError as exc:
                long_call["error"] = exc
            long_call["seconds"] = trio.current_time() - started

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_sleep)
            for sid in self.sessions[1:]:
                nursery.start_soon(echo_load, sid)
            await trio.sleep(0.3)
            killed_at = time.monotonic()
            os.kill(victim_pid, signal.SIGKILL)
            _say(f"   SIGKILL to worker pid {victim_pid} 0.3 s into that call.")
            while victim_pid in pool.worker_pids() or pool.statistics().alive < self.workers:
                await trio.sleep(0.001)
            replaced_ms = 1000 * (time.monotonic() - killed_at)
        if "error" in long_call:
            self.problems.append(f"the killed call failed: {long_call['error']}")
            _say(f"   The killed call failed: {long_call['error']}")
        else:
            retried = [e for e in self.events if e.kind == "call_retried" and e.session_id == victim_session]
            how = retried[0].data if retried else {}
            _say(f"   The caller of that `sleep` saw no error: it got {long_call['result']} after "
                 f"{long_call['seconds']:.2f} s. The pool classified the death as "
                 f"{how.get('category', '?')} ({how.get('strategy', '?')}), and since `sleep` is "
                 "idempotent it ran it again at once on a healthy worker.")
        _say(f"   A replacement worker was ready {replaced_ms:.0f} ms after the kill; the other callers "
             f"made {self.echo_ok} echo calls meanwhile, {len(self.failures)} failed.")
        for exc in self.failures:
            self.problems.append(f"an echo call failed: {exc}")

    async def check_sessions(self, pool: Pool) -> None:
        _say("4. Session state survived: one more `counter` call in each session:")
        for sid in self.sessions:
            got = await pool.execute_in_session(sid, "counter")
            note = ""
            if sid == self.sessions[0]:
                note = f" (moved with its committed state to worker pid {self.holder(pool, sid)})"
            _say(f"     {sid}: counter = {got}{note}")
            if got != 4:
                self.problems.append(f"{sid}: counter is {got} after recovery, expected 4")

    async def caller_mistake(self, pool: Pool) -> None:
        try:
            await pool.execute("sleep", "a while")
            self.problems.append("a bad argument was accepted")
        except PoolError as exc:
            _say("5. A caller mistake goes straight back, never retried or counted against a circuit:")
            _say(f"     {type(exc).__name__}: {exc} (caller_fault={exc.caller_fault})")

    def report(self, pool: Pool) -> None:
        stats = pool.statistics()
        health = pool.health()
        _say(f"6. Totals: {stats.calls_ok} calls ok, {stats.calls_failed} failed, {stats.retries} retried, "
             f"{stats.failovers} failed over, {stats.restarts} worker restart(s); recoveries "
             f"{stats.recoveries.succeeded} of {stats.recoveries.initiated} succeeded "
             f"(by category {stats.recoveries.by_category}).")
        _say(f"   Health: {health['status']}")
        _say("   " + json.dumps(health, indent=2).replace("\n", "\n   "))
        if health["status"] != "healthy":
            self.problems.append(f"health is {health['status']} at the end")
        if self.problems:
            _say("PROBLEMS:\n  " + "\n  ".join(self.problems))
        else:
            _say("All checks passed: no lost work, sessions intact, pool back to full health.")

    @staticmethod
    def holder(pool: Pool, session_id: str) -> int | None:
        # The demo peeks inside (no public API says where a session is: it is the pool's business).
        session = pool._sessions.get(session_id)
        pid = getattr(session.holder, "pid", None) if session is not None else None
        return pid if isinstance(pid, int) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pool", description="trio worker pool tools")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the demo pool (the default)")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--sessions", type=int, default=6)
    demo.add_argument("--seconds", type=float, default=2.0)
    demo.add_argument(
        "--serve", action="store_true", help="then keep the pool up with its ops server (the ops extra) until Ctrl-C"
    )
    demo.add_argument("--host", default="127.0.0.1", help="the ops server's address (with --serve)")
    demo.add_argument("--port", type=int, default=0, help="the ops server's port (with --serve; 0: any free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="  [log] %(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    serve = None
    if args.serve:
        try:
            importlib.import_module("pool.ops")
        except ImportError as exc:
            print(f"--serve: {exc}", file=sys.stderr)
            return 2
        serve = (args.host, args.port)
    runner = _Demo(args.workers, args.sessions, args.seconds, serve)
    try:
        return trio.run(runner.run)
    except KeyboardInterrupt:  # how --serve ends: the pool closed on the way out
        return runner.status()
    except BaseExceptionGroup as group:  # (the same, from inside the ops server's nursery)
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
        return runner.status()


if __name__ == "__main__":
    sys.exit(main())
