"""Chaos runner: a pool under load while a killer SIGKILLs a random worker every few milliseconds.

    python -m benchmarks.chaos [--workers 4] [--callers 16] [--duration 30] [--kill-every 0.05]
                               [--seed 1] [--json FILE] [--channel pipes|tcp]

Half of the callers run sessions (an idempotent command that appends to the session's committed
log, and now and then a non-idempotent side effect); the others run plain calls (idempotent
``echo`` and the non-idempotent side effect, a line appended to a file). The pool runs with its
default configuration and error policy.

With ``--channel tcp`` the workers connect over TCP loopback (TcpLauncher) and the killer does
what a network does too: besides SIGKILL it closes a worker's connection from outside the pool
(a shutdown of the socket, as a reset by a middlebox would) and SIGSTOPs a worker (a partition:
no end of stream, found by the heartbeats, set to 0.2 + 0.3 s here); meanwhile a rogue peer
hammers the listening port with garbage and wrong answers, and every such connection must be
dropped (``rejected``) without touching a worker, a slot or a circuit.

Printed: calls ok / failed by category; kills; time from a kill to its replacement being ready
(p50/p99); latency of the calls that hit a dead worker; what was checked after the run (session
logs, side-effect lines); orphans (any worker process alive after the pool closed); a verdict.

Exit status 1 when anything was lost: an idempotent call that failed although fewer disruptions hit
it than its retry cap allows, a session whose committed log is not exactly its successful calls, a
side effect that happened twice (or that a successful call did not leave), an orphan, or a
failure the pool has no business raising here.

This module is also the workers' handlers module (the commands below): at import it needs only the
standard library and ``bridge_worker``; trio and the pool are imported by :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import attrs

from bridge_worker import Context, command

# ------------------------------------------------------------------ commands (run in the workers)


@command("chaos_append", idempotent=True)
def chaos_append(args: Any, ctx: Context) -> int:
    """Appends ``args`` to the session's log unless it is already the last entry (so a re-run is
    harmless); returns the log's length."""
    log: list[Any] = ctx.session.setdefault("log", [])
    if not log or log[-1] != args:
        log.append(args)
    return len(log)


@command("chaos_log", idempotent=True)
def chaos_log(args: Any, ctx: Context) -> list[Any]:
    return list(ctx.session.get("log", []))


@command("chaos_effect", idempotent=False)
def chaos_effect(args: Any, ctx: Context) -> str:
    """A side effect: appends the line ``args["id"]`` to the file ``args["path"]``."""
    with open(args["path"], "a") as f:
        f.write(f"{args['id']}\n")
    return str(args["id"])


# ------------------------------------------------------------------ the runner (host side)


def _close_connection_of(pid: int) -> bool:
    """Shut down, from outside the pool, this process's TCP connection to worker ``pid`` (as a
    reset on the way would): found by its ports, shut through a duplicate of its fd."""
    import psutil

    try:
        theirs = {c.laddr for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr}
        ours = [c for c in psutil.Process().net_connections(kind="tcp") if c.raddr in theirs]
    except psutil.Error:
        return False
    for conn in ours:
        with socket.socket(fileno=os.dup(conn.fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    return bool(ours)


#: connection_error is retried after attempts 1..3 in the default policy: a call may fail only if
#: at least this many of its attempts were killed.
RETRY_CAP = 3


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


class _CallRecord:
    __slots__ = ("start", "retries", "kind")

    def __init__(self, start: float, kind: str) -> None:
        self.start = start
        self.retries = 0
        self.kind = kind


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.effects_path = os.path.join(tempfile.mkdtemp(prefix="pool-chaos-"), "effects.log")
        self.kills: list[tuple[int, int, float]] = []  # (pid, slot, time)
        self.starts: list[tuple[int, float]] = []  # (slot, time) of workers ready
        self.spawned: set[int] = set()
        self.current: dict[Any, _CallRecord] = {}  # caller task -> its call in progress
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.hit_latency: list[float] = []  # calls retried after their worker died, that succeeded
        self.lost_latency: list[float] = []  # calls that failed because their worker died
        self.problems: list[str] = []
        self.effect_ids: dict[str, bool | None] = {}  # id -> True ok, False failed maybe-ran, None failed not-ran
        self.sessions: dict[str, list[int]] = {}
        self.pool: Any = None
        self.actions: Counter[str] = Counter()  # what the killer did: kill, close, stop
        self.stopped: list[int] = []
        self.rogues = 0
        self.launcher: Any = None

    # -- events: runs in the task that caused them (a caller's, for call events)

    def on_event(self, event: Any) -> None:
        import trio

        if event.kind == "worker_started":
            self.starts.append((event.data["slot"], event.time))
            if event.pid is not None:
                self.spawned.add(event.pid)
        elif event.kind == "call_retried":
            record = self.current.get(trio.lowlevel.current_task())
            if record is not None and event.data.get("category") == "connection_error":
                record.retries += 1

    # -- the load

    async def _run_call(self, kind: str, fn: Any, idempotent: bool) -> tuple[bool, Any]:
        import trio

        from pool import HealthCheckError, PoolError, WorkerConnectionError

        task = trio.lowlevel.current_task()
        record = self.current[task] = _CallRecord(trio.current_time(), kind)
        try:
            result = await fn()
        except PoolError as exc:
            end = trio.current_time()
            self.failed[f"{exc.category} ({kind})"] += 1
            self.lost_latency.append(end - record.start)
            # A worker lost (killed, or its connection closed), or found stopped by the heartbeats.
            expected = (WorkerConnectionError, HealthCheckError) if self.args.channel == "tcp" else WorkerConnectionError
            if not isinstance(exc, expected):
                self.problems.append(f"unexpected {type(exc).__name__} from {kind}: {exc}")
            elif idempotent:
                kills = sum(1 for _, _, t in self.kills if record.start <= t <= end)
                attempt = int(exc.context.get("attempt", 1))
                if attempt <= RETRY_CAP or kills <= RETRY_CAP:
                    self.problems.append(
                        f"idempotent {kind} failed at attempt {attempt} with {kills} kills "
                        f"during it (retry cap {RETRY_CAP}): {exc}"
                    )
            return False, exc
        finally:
            del self.current[task]
        self.ok[kind] += 1
        if record.retries:
            self.hit_latency.append(trio.current_time() - record.start)
        return True, result

    async def _effect(self, pool: Any, caller: int, i: int, session: str | None) -> None:
        call_id = f"{caller}-{i}"
        args = {"path": self.effects_path, "id": call_id}
        if session is None:
            fn = lambda: pool.execute("chaos_effect", args)  # noqa: E731
        else:
            fn = lambda: pool.execute_in_session(session, "chaos_effect", args)  # noqa: E731
        done, result = await self._run_call("effect", fn, idempotent=False)
        if done:
            self.effect_ids[call_id] = True
            if result != call_id:
                self.problems.append(f"effect {call_id} returned {result!r}")
        else:
            maybe = bool(result.may_have_run)
            self.effect_ids[call_id] = False if maybe else None
            if maybe and "may or may not have run" not in str(result):
                self.problems.append(f"effect {call_id} failed without saying it may have run: {result}")

    async def session_caller(self, pool: Any, caller: int, stop: float) -> None:
        import trio

        sid = f"chaos-{caller}"
        log = self.sessions[sid] = []
        i = 0
        while trio.current_time() < stop:
            done, n = await self._run_call(
                "session append", lambda: pool.execute_in_session(sid, "chaos_append", i), True
            )
            if done:
                log.append(i)
                if n != len(log):
                    self.problems.append(f"session {sid}: log length {n}, expected {len(log)}")
            if i % 8 == 7:
                await self._effect(pool, caller, i, sid)
            i += 1

    async def plain_caller(self, pool: Any, caller: int, stop: float) -> None:
        import trio

        i = 0
        while trio.current_time() < stop:
            payload = [caller, i]
            done, result = await self._run_call("echo", lambda: pool.execute("echo", payload), True)
            if done and result != payload:
                self.problems.append(f"echo {payload} returned {result!r}")
            if i % 4 == 3:
                await self._effect(pool, caller, i, None)
            i += 1

    async def killer(self, pool: Any) -> None:
        import trio

        while True:
            await trio.sleep(self.args.kill_every)
            ready = [w for w in pool.statistics().workers if w.state in ("idle", "busy") and w.pid not in self.stopped]
            if ready:
                victim = self.rng.choice(ready)
                action = "kill"
                if self.args.channel == "tcp":
                    r = self.rng.random()
                    action = "stop" if r < 0.1 else "close" if r < 0.4 else "kill"
                try:
                    if action == "close":
                        if not _close_connection_of(victim.pid):
                            continue
                    else:
                        os.kill(victim.pid, signal.SIGSTOP if action == "stop" else signal.SIGKILL)
                except ProcessLookupError:
                    continue
                if action == "stop":
                    self.stopped.append(victim.pid)
                self.actions[action] += 1
                self.kills.append((victim.pid, victim.slot, trio.current_time()))

    async def rogue(self, address: tuple[str, int]) -> None:
        """A peer that is no worker, hammering the listening port: garbage, a frame header over
        any limit, a proof for another challenge, silence."""
        import trio

        from bridge_worker._auth import ANY_SLOT, challenge, prove, token_key

        wrong = prove(token_key("not-the-token-0123456789"), challenge()[1], ANY_SLOT)[2]
        payloads = [os.urandom(512), b"\xff\xff\xff\xff" + bytes(100), wrong, b"GET / HTTP/1.1\r\n\r\n"]
        while True:
            sock = trio.socket.socket()
            try:
                await sock.connect(address)
                await sock.send(self.rng.choice(payloads))
                self.rogues += 1
                with trio.move_on_after(0.5):  # (the pool drops a silent one after its handshake timeout)
                    while await sock.recv(1 << 16):
                        pass
            except OSError:
                pass
            finally:
                sock.close()
            await trio.sleep(0.01)

    async def run(self) -> None:
        import trio

        from pool import PoolConfig, open_pool
        from pool.launchers import TcpLauncher

        config = PoolConfig(
            size=self.args.workers,
            handlers=["bridge_worker.builtin", "benchmarks.chaos"],
            event_callbacks=[self.on_event],
        )
        if self.args.channel == "tcp":
            # A stopped worker is found within heartbeat_interval + heartbeat_timeout.
            config = attrs.evolve(config, heartbeat_interval=0.2, heartbeat_timeout=0.3)
            self.launcher = TcpLauncher(secrets.token_hex(32))
        async with open_pool(config, launcher=self.launcher) as pool:
            self.pool = pool
            self.spawned.update(pool.worker_pids())
            stop = trio.current_time() + self.args.duration
            async with trio.open_nursery() as n:
                n.start_soon(self.killer, pool)
                if self.launcher is not None:
                    n.start_soon(self.rogue, self.launcher.address)
                async with trio.open_nursery() as callers:
                    for c in range(self.args.callers):
                        if c % 2 == 0:
                            callers.start_soon(self.session_caller, pool, c, stop)
                        else:
                            callers.start_soon(self.plain_caller, pool, c, stop)
                n.cancel_scope.cancel()
            with trio.fail_after(30):
                while pool.statistics().alive < config.size:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)  # the rogue's last connections are being dropped
            if self.launcher is not None and self.launcher.rejected < self.rogues:
                self.problems.append(f"{self.rogues} rogue connections, only {self.launcher.rejected} dropped")
            for pid in self.stopped:  # the heartbeats found them: killed and replaced
                if pid in pool.worker_pids():
                    self.problems.append(f"worker {pid}, stopped, is still in the pool")
            for sid, log in self.sessions.items():
                got = await pool.execute_in_session(sid, "chaos_log")
                if got != log:
                    self.problems.append(f"session {sid}: committed log {got[-5:]}... is not its "
                                         f"{len(log)} successful calls ...{log[-5:]}")
            self.stats = pool.statistics()
            self.spawned.update(pool.worker_pids())
        self.spawned.update(pid for pid, _, _ in self.kills)
        for pid in self.stopped:  # never leave a stopped process behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- after the run

    def replacement_times(self) -> list[float]:
        """For each kill, seconds until the next worker in its slot was ready."""
        by_slot: dict[int, list[float]] = {}
        for slot, t in self.starts:
            by_slot.setdefault(slot, []).append(t)
        times = []
        for _, slot, t in self.kills:
            later = [s for s in by_slot.get(slot, []) if s > t]
            if later:
                times.append(min(later) - t)
        return times

    def check_effects(self) -> tuple[int, int, int]:
        try:
            with open(self.effects_path) as f:
                lines = Counter(f.read().split())
        except FileNotFoundError:
            lines = Counter()
        duplicates = sum(1 for v in lines.values() if v > 1)
        if duplicates:
            self.problems.append(f"{duplicates} side effects happened more than once")
        for call_id, state in self.effect_ids.items():
            if state is True and lines[call_id] != 1:
                self.problems.append(f"effect {call_id} succeeded but left {lines[call_id]} lines")
            elif state is None and lines[call_id]:
                self.problems.append(f"effect {call_id} did not run, the pool said, but it did")
        unknown = set(lines) - set(self.effect_ids)
        if unknown:
            self.problems.append(f"{len(unknown)} side effects from calls nobody made")
        maybe_ran = sum(1 for s in self.effect_ids.values() if s is False)
        return sum(lines.values()), duplicates, maybe_ran

    def orphans(self) -> list[int]:
        import psutil

        left = []
        # Every worker seen, and whatever else still descends from this process.
        for child in psutil.Process().children(recursive=True):
            self.spawned.add(child.pid)
        for pid in sorted(self.spawned):
            try:
                proc = psutil.Process(pid)
                if "bridge_worker" in " ".join(proc.cmdline()) or proc.status() == psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.Error:
                pass
        return left

    def report(self) -> dict[str, Any]:
        a = self.args
        replace = self.replacement_times()
        effects, duplicates, maybe_ran = self.check_effects()
        orphans = self.orphans()
        if orphans:
            self.problems.append(f"orphan worker processes after close: {orphans}")
        ok_total = sum(self.ok.values())
        failed_total = sum(self.failed.values())
        s = self.stats
        what = "a SIGKILL" if a.channel == "pipes" else "a SIGKILL, closed connection or SIGSTOP"
        print(f"chaos: {a.workers} workers over {a.channel}, {a.callers} callers, {a.duration:g} s, "
              f"{what} every {a.kill_every:g} s (seed {a.seed})")
        print(f"calls ok:       {ok_total}  " + ", ".join(f"{k} {v}" for k, v in sorted(self.ok.items())))
        print(f"calls failed:   {failed_total}  "
              + (", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "-"))
        print(f"pool counters:  retries {s.retries}, restarts {s.restarts}, failed starts "
              f"{s.failed_starts}, pool circuit {s.pool_circuit}")
        if a.channel == "tcp":
            print("disruptions:    " + ", ".join(f"{k} {v}" for k, v in sorted(self.actions.items()))
                  + f"; rogue connections {self.rogues}, dropped {self.launcher.rejected}")
        print(f"kills:          {len(self.kills)}; kill -> replacement ready: p50 "
              f"{_ms(_pct(replace, 0.5))}, p99 {_ms(_pct(replace, 0.99))}, max "
              f"{_ms(max(replace) if replace else None)} ({len(replace)} measured)")
        print(f"hit calls:      {len(self.hit_latency)} succeeded after their worker was killed "
              f"(retried): latency p50 {_ms(_pct(self.hit_latency, 0.5))}, p99 "
              f"{_ms(_pct(self.hit_latency, 0.99))}, max "
              f"{_ms(max(self.hit_latency) if self.hit_latency else None)}")
        print(f"                {len(self.lost_latency)} failed (not retried or past the cap): "
              f"latency p50 {_ms(_pct(self.lost_latency, 0.5))}, p99 "
              f"{_ms(_pct(self.lost_latency, 0.99))}")
        print(f"sessions:       {len(self.sessions)} committed logs checked against their "
              f"successful calls")
        print(f"side effects:   {effects} lines for {len(self.effect_ids)} calls; duplicates "
              f"{duplicates}; failed with 'may or may not have run': {maybe_ran}")
        print(f"orphans:        {len(orphans)} worker processes alive after close")
        for problem in self.problems[:20]:
            print(f"  LOST: {problem}")
        if len(self.problems) > 20:
            print(f"  ... and {len(self.problems) - 20} more")
        if self.problems:
            verdict = f"FAIL: {len(self.problems)} problems (work lost, duplicated or orphaned)"
        else:
            verdict = (f"OK: {len(self.kills)} kills, nothing lost, no duplicate side effect, "
                       "every session intact, no orphan")
        print(f"verdict:        {verdict}")
        return {
            "channel": a.channel, "actions": dict(self.actions), "rogues": self.rogues,
            "rejected": None if self.launcher is None else self.launcher.rejected,
            "workers": a.workers, "callers": a.callers, "duration": a.duration,
            "kill_every": a.kill_every, "seed": a.seed,
            "ok": dict(self.ok), "failed": dict(self.failed), "kills": len(self.kills),
            "replacement_p50": _pct(replace, 0.5), "replacement_p99": _pct(replace, 0.99),
            "hit_calls": len(self.hit_latency), "hit_p50": _pct(self.hit_latency, 0.5),
            "hit_p99": _pct(self.hit_latency, 0.99), "failed_p50": _pct(self.lost_latency, 0.5),
            "failed_p99": _pct(self.lost_latency, 0.99), "effects": effects,
            "duplicates": duplicates, "maybe_ran": maybe_ran, "orphans": orphans,
            "problems": self.problems, "verdict": verdict,
        }


def main(argv: list[str] | None = None) -> int:
    import trio

    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=0.05, help="seconds between SIGKILLs")
    parser.add_argument("--seed", type=int, default=1, help="which workers the killer picks")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--channel", choices=("pipes", "tcp"), default="pipes",
                        help="the workers' channel: local pipes, or TCP loopback (more kinds of chaos)")
    parser.add_argument("--verbose", action="store_true", help="show the pool's warnings (one per kill)")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("pool").setLevel(logging.ERROR)
    chaos = Chaos(args)
    t0 = time.monotonic()
    trio.run(chaos.run)
    figures = chaos.report()
    figures["wall_seconds"] = time.monotonic() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    try:
        os.remove(chaos.effects_path)
        os.rmdir(os.path.dirname(chaos.effects_path))
    except OSError:
        pass
    return 1 if chaos.problems else 0


if __name__ == "__main__":
    sys.exit(main())
