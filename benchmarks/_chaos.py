"""Chaos measurements: what a SIGKILL costs.

* pool recovery: SIGKILL to replacement ready; a call whose worker is killed mid-call; throughput
  while a worker is killed every 100 ms (outcomes counted by exception type, nothing assumed
  about retries);
* every peer, same scenario: two calls running on two workers, one worker SIGKILLed: what happens
  to each call and to the next call;
* orphans: each peer runs in a child Python process that is SIGKILLed; how long do its workers
  outlive it? Survivors are killed by pid (checked against their start time) afterwards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from benchmarks import _peers
from benchmarks._common import (
    MP_POOL,
    PAYLOAD,
    POOL,
    PPE,
    TRIO_PARALLEL,
    ProcId,
    descendants,
    kill_and_forget,
    median,
)
from benchmarks import _drivers
from benchmarks._drivers import mp_context
from pool import PoolConfig, open_pool

#: How long the calls that get a worker killed under them run (peers and pool alike).
KILL_CALL_SECONDS = 0.5
#: When, after the calls start, one worker is killed (both calls are running by then).
KILL_AFTER = 0.15


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _extra_stats(stats: Any) -> str:
    """Retry/failover counters, when this version of the pool has them (they are being added)."""
    parts = [f", {k} {getattr(stats, k)}" for k in ("retries", "failovers") if hasattr(stats, k)]
    return "".join(parts)


def _outcome(exc: BaseException | None) -> str:
    return "ok" if exc is None else type(exc).__name__


# ---------------------------------------------------------------------------- pool recovery


async def _wait_full(pool: Any, size: int, gone: int | None, cap: float) -> float:
    """Poll until ``gone`` is no longer listed and ``size`` workers are ready; seconds waited."""
    t0 = time.perf_counter()
    while True:
        if pool.statistics().alive == size and (gone is None or gone not in pool.worker_pids()):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > cap:
            raise TimeoutError(f"pool did not get back to {size} ready workers within {cap}s")
        await trio.sleep(0.001)


async def _replacement(reps: int, size: int) -> list[float]:
    """Seconds from SIGKILL of an idle worker to a replacement that has said hello."""
    times = []
    async with open_pool(PoolConfig(size=size)) as pool:
        for _ in range(reps):
            await _wait_full(pool, size, None, 30)
            await pool.execute("echo", PAYLOAD)
            # No checkpoint between listing and killing: the pool cannot have reaped the pid
            # (so it cannot have been reused) in between.
            victim = pool.worker_pids()[0]
            t0 = time.perf_counter()
            _kill(victim)
            await _wait_full(pool, size, victim, 30)
            times.append(time.perf_counter() - t0)
    return times


async def _inflight(reps: int, call_seconds: float, kill_after: float) -> list[dict[str, Any]]:
    """A 1-worker pool runs ``sleep(call_seconds)``; its worker is SIGKILLed ``kill_after`` s
    in. Records the call's outcome, the time from kill to outcome, and the call's total."""
    out = []
    async with open_pool(PoolConfig(size=1)) as pool:
        for _ in range(reps):
            await _wait_full(pool, 1, None, 30)
            rec: dict[str, Any] = {}

            async def call() -> None:
                t_start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    await pool.execute("sleep", call_seconds)
                except Exception as e:  # any outcome is data here
                    exc = e
                rec["outcome"] = _outcome(exc)
                rec["t_end"] = time.perf_counter()
                rec["total_s"] = rec["t_end"] - t_start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await trio.sleep(kill_after)
                victim = pool.worker_pids()[0]
                rec["t_kill"] = time.perf_counter()
                _kill(victim)
            out.append(
                {
                    "outcome": rec["outcome"],
                    "kill_to_outcome_s": rec["t_end"] - rec["t_kill"],
                    "total_s": rec["total_s"],
                    "added_s": rec["total_s"] - call_seconds,
                }
            )
    return out


async def _under_fire(size: int, callers: int, seconds: float, interval: float) -> dict[str, Any]:
    """Echo throughput with no kills, then with a random worker SIGKILLed every ``interval``."""
    async with open_pool(PoolConfig(size=size)) as pool:
        for _ in range(200):
            await pool.execute("echo", PAYLOAD)
        result: dict[str, Any] = {"workers": size, "callers": callers, "seconds": seconds, "interval": interval}
        for mode in ("calm", "killing"):
            await _wait_full(pool, size, None, 30)
            outcomes: collections.Counter[str] = collections.Counter()
            kills = 0
            restarts0 = pool.statistics().restarts
            base = {k: getattr(pool.statistics(), k) for k in ("retries", "failovers") if hasattr(pool.statistics(), k)}
            stop = trio.current_time() + seconds

            async def caller() -> None:
                while trio.current_time() < stop:
                    try:
                        await pool.execute("echo", PAYLOAD)
                        outcomes["ok"] += 1
                    except Exception as exc:  # counted by type: retries may change what comes out
                        outcomes[type(exc).__name__] += 1
                        await trio.sleep(0)  # a pool failing fast must not starve the killer

            async def killer() -> None:
                nonlocal kills
                while True:
                    await trio.sleep(interval)
                    if trio.current_time() >= stop:
                        return
                    pids = pool.worker_pids()
                    if pids:
                        _kill(random.choice(pids))
                        kills += 1

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(caller)
                if mode == "killing":
                    nursery.start_soon(killer)
            elapsed = time.perf_counter() - t0
            stats = pool.statistics()
            result[mode] = {
                **{k: getattr(stats, k) - base[k] for k in base},
                "elapsed_s": elapsed,
                "outcomes": dict(outcomes),
                "ok_per_s": outcomes["ok"] / elapsed,
                "kills": kills,
                "restarts": stats.restarts - restarts0,
                "pool_circuit": stats.pool_circuit,
            }
        result["recovered_s"] = await _wait_full(pool, size, None, 30)
        return result


def pool_recovery(reps: int, seconds: float) -> dict[str, Any]:
    replacement = trio.run(_replacement, reps, 2)
    inflight = trio.run(_inflight, max(1, reps // 2 + 1), 0.2, 0.05)
    under_fire = trio.run(_under_fire, 2, 16, seconds, 0.1)
    return {
        "replacement_s": replacement,
        "replacement_median_s": median(replacement),
        "inflight": inflight,
        "under_fire": under_fire,
    }


# ---------------------------------------------------------------------------- one worker killed, per peer


def _summarize_kill(t_kill: float, done: list[tuple[str, float | None]], nxt: str, notes: str) -> dict[str, Any]:
    calls = [{"outcome": o, "after_kill_s": None if t is None else t - t_kill} for o, t in done]
    return {"calls": calls, "next_call": nxt, "notes": notes}


async def _timed_outcome(
    done: list[tuple[str, float | None]], cap: float, start: Callable[[], Awaitable[Any]]
) -> None:
    """Run one call and record how it ended and when (or that it gave nothing within ``cap``)."""
    exc: BaseException | None = None
    try:
        with trio.fail_after(cap):
            await start()
    except trio.TooSlowError:
        done.append((f"no result after {cap:g} s", None))
        return
    except Exception as e:
        exc = e
    done.append((_outcome(exc), time.perf_counter()))


async def _pool_kill_cost(cap: float) -> dict[str, Any]:
    async with open_pool(PoolConfig(size=2)) as pool:
        for _ in range(20):
            await pool.execute("echo", PAYLOAD)
        done: list[tuple[str, float | None]] = []

        async def call() -> None:
            await _timed_outcome(done, cap, lambda: pool.execute("sleep", KILL_CALL_SECONDS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.sleep(KILL_AFTER)
            victim = pool.worker_pids()[0]
            t_kill = time.perf_counter()
            _kill(victim)
        try:
            with trio.fail_after(cap):
                await pool.execute("echo", PAYLOAD)
            nxt = "ok"
        except Exception as exc:
            nxt = _outcome(exc)
        await _wait_full(pool, 2, victim, 30)
        stats = pool.statistics()
        return _summarize_kill(
            t_kill,
            done,
            nxt,
            f"the dead worker is replaced (restarts {stats.restarts}{_extra_stats(stats)})",
        )


def _executor_kill_cost(
    start: Callable[[Callable[[str, float | None], None]], None],
    victim: int,
    next_call: Callable[[], Any],
    cap: float,
) -> dict[str, Any]:
    """Shared by PPE and mp.Pool: ``start(record)`` starts two sleep calls that report their
    outcome through ``record``; one worker is then killed and outcomes collected up to ``cap``."""
    done: list[tuple[str, float | None]] = []
    start(lambda outcome, t: done.append((outcome, t)))
    time.sleep(KILL_AFTER)
    t_kill = time.perf_counter()
    _kill(victim)
    deadline = time.perf_counter() + cap
    while len(done) < 2 and time.perf_counter() < deadline:
        time.sleep(0.005)
    done = list(done) + [(f"no result after {cap:g} s (hung)", None)] * (2 - len(done))
    try:
        next_call()
        nxt = "ok"
    except concurrent.futures.TimeoutError:
        nxt = f"no result after {cap:g} s (hung)"
    except Exception as exc:  # multiprocessing's TimeoutError is not the builtin in 3.11
        nxt = f"no result after {cap:g} s (hung)" if type(exc).__name__ == "TimeoutError" else _outcome(exc)
    return _summarize_kill(t_kill, done[:2], nxt, "")


def ppe_kill_cost(cap: float) -> dict[str, Any]:
    ex = concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=mp_context())
    try:
        list(ex.map(_peers.getpid, range(20)))
        pids = list(ex._processes)

        def start(record: Callable[[str, float | None], None]) -> None:
            for _ in range(2):
                ex.submit(_peers.sleep_pid, KILL_CALL_SECONDS).add_done_callback(
                    lambda f: record(_outcome(f.exception()), time.perf_counter())
                )

        res = _executor_kill_cost(start, pids[0], lambda: ex.submit(_peers.echo, PAYLOAD).result(cap), cap)
        res["notes"] = "the whole executor is broken: every later submit raises"
        return res
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def mp_kill_cost(cap: float) -> dict[str, Any]:
    mp_pool = mp_context().Pool(2)
    try:
        mp_pool.map(_peers.getpid, range(20))
        pids = [p.pid for p in mp_pool._pool]

        def start(record: Callable[[str, float | None], None]) -> None:
            for _ in range(2):
                mp_pool.apply_async(
                    _peers.sleep_pid,
                    (KILL_CALL_SECONDS,),
                    callback=lambda _: record("ok", time.perf_counter()),
                    error_callback=lambda e: record(_outcome(e), time.perf_counter()),
                )

        res = _executor_kill_cost(start, pids[0], lambda: mp_pool.apply_async(_peers.echo, (PAYLOAD,)).get(cap), cap)
        res["notes"] = "the killed worker is replaced, but its task is lost: its result never comes"
        return res
    finally:
        mp_pool.terminate()
        mp_pool.join()


async def _tp_kill_cost(cap: float) -> dict[str, Any]:
    from benchmarks._drivers import _tp_spread

    async with _drivers.trio_parallel.open_worker_context() as ctx:
        run = functools.partial(ctx.run_sync, limiter=trio.CapacityLimiter(2))
        pids = sorted(await _tp_spread(run, 2, 5))
        done: list[tuple[str, float | None]] = []

        async def call() -> None:
            await _timed_outcome(done, cap, lambda: run(_peers.sleep_pid, KILL_CALL_SECONDS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.sleep(KILL_AFTER)
            t_kill = time.perf_counter()
            _kill(pids[0])
        try:
            with trio.fail_after(cap):
                await run(_peers.echo, PAYLOAD)
            nxt = "ok"
        except Exception as exc:
            nxt = _outcome(exc)
    return _summarize_kill(t_kill, done, nxt, "a replacement worker is spawned on the next call")


def tp_kill_cost(cap: float) -> dict[str, Any]:
    return trio.run(_tp_kill_cost, cap)


def kill_costs(cap: float) -> dict[str, dict[str, Any]]:
    """Every peer, the same scenario; each guarded so one peer's failure is reported, not fatal."""
    peers: dict[str, Callable[[float], dict[str, Any]]] = {
        POOL: lambda c: trio.run(_pool_kill_cost, c),
        PPE: ppe_kill_cost,
        MP_POOL: mp_kill_cost,
    }
    if _drivers.trio_parallel is not None:
        peers[TRIO_PARALLEL] = tp_kill_cost
    out: dict[str, dict[str, Any]] = {}
    for name, fn in peers.items():
        before = set(descendants())
        try:
            out[name] = fn(cap)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            # Whatever a broken peer left behind (it should be nothing): kill it by pid.
            leftovers = [p for p in descendants() if p not in before and "resource_tracker" not in _cmdline(p)]
            if leftovers:
                out[name]["leftovers_killed"] = kill_and_forget(leftovers)
    return out


def _cmdline(p: ProcId) -> str:
    proc = p.process()
    try:
        return " ".join(proc.cmdline()) if proc is not None else ""
    except Exception:
        return ""


# ---------------------------------------------------------------------------- orphans


def orphans(cap: float, peers: list[str], mp_start_method: str | None) -> dict[str, dict[str, Any]]:
    """Run each peer in a child Python (``python -m benchmarks._orphan_child PEER``), learn its
    worker pids, SIGKILL the child, and time how long the workers outlive it (up to ``cap``).
    All peers run at once so the cap is paid once."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    children: dict[str, subprocess.Popen[bytes]] = {}
    workers: dict[str, list[ProcId]] = {}
    out: dict[str, dict[str, Any]] = {}
    try:
        for name in peers:
            children[name] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks._orphan_child", name]
                + ([mp_start_method] if mp_start_method else []),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=root,
                env=env,
            )
        # Read each child's one line of pids (bounded: a child that fails to start is reported).
        deadline = time.monotonic() + 60
        for name, child in children.items():
            assert child.stdout is not None
            line = b""
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                chunk = os.read(child.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
            try:
                pids = json.loads(line)["pids"]
            except (ValueError, KeyError):
                out[name] = {"error": f"child did not report its workers: {line[:200]!r}"}
                continue
            workers[name] = [p for p in (ProcId.of(pid) for pid in pids) if p is not None]
        # SIGKILL every parent at once, reap it, then watch its workers.
        t_kill: dict[str, float] = {}
        for name, child in children.items():
            if name in workers:
                t_kill[name] = time.perf_counter()
                child.kill()
        for child in children.values():
            child.kill()
            child.wait()
        gone_at: dict[str, float | None] = {name: None for name in workers}
        end = time.perf_counter() + cap
        while time.perf_counter() < end and any(v is None for v in gone_at.values()):
            for name, procs in workers.items():
                if gone_at[name] is None and not any(p.alive() for p in procs):
                    gone_at[name] = time.perf_counter()
            time.sleep(0.005)
        for name, procs in workers.items():
            survivors = [p for p in procs if p.alive()]
            killed = kill_and_forget(survivors)
            t = gone_at[name]
            out[name] = {
                "processes": len(procs),
                "outlived_s": None if t is None else t - t_kill[name],
                "survivors_killed": killed,
                "cap_s": cap,
            }
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        for procs in workers.values():
            kill_and_forget(procs)
    return out
