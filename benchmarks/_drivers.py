"""Echo throughput/latency and startup drivers, one per peer, all with the same shape.

``ECHO[peer](workers, callers_list, seconds, warmup)`` opens the peer once with ``workers``
workers, warms it up, measures its idle worker memory, then runs one window of ``seconds`` per
entry of ``callers_list`` (latencies are recorded only in the 1-caller window, where a call's
latency is well defined). ``STARTUP[peer](n)`` returns the seconds until n workers are ready.
Every driver closes what it opened, also on error. Peers whose library is missing are absent
from the dicts (see ``MISSING``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import multiprocessing.pool
import threading
import time
from typing import Any, Awaitable, Callable, Sequence

import trio

from benchmarks import _peers
from benchmarks._common import (
    FLOOR,
    MP_POOL,
    PAYLOAD,
    POOL,
    PPE,
    TRIO_PARALLEL,
    EchoSample,
    cpu_delta,
    cpu_seconds,
    memory_of,
)
from benchmarks._floor import Floor
from pool import PoolConfig, open_pool
from pool._process import Launcher

try:
    import trio_parallel as trio_parallel  # type: ignore[import-untyped]  # re-exported for _chaos
except ImportError:  # an optional peer: skipped with a note
    trio_parallel = None

#: Peers that cannot run here, with the reason (printed in the report).
MISSING: dict[str, str] = {}
if trio_parallel is None:
    MISSING[TRIO_PARALLEL] = "not installed (pip install -e '.[bench]')"

EchoResult = tuple[list[EchoSample], "dict[str, float] | None"]

# The start method ProcessPoolExecutor and multiprocessing.Pool use: the platform default (what
# their users get), unless --mp-context says otherwise. Set by __main__.
MP_CONTEXT: str | None = None


def mp_context(method: str | None = None) -> Any:
    return multiprocessing.get_context(method or MP_CONTEXT)


# ---------------------------------------------------------------------------- trio windows


async def _trio_window(
    peer: str,
    workers: int,
    callers: int,
    seconds: float,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    pids: Sequence[int],
) -> EchoSample:
    """``callers`` trio tasks each call ``await fn(*args)`` back to back until the deadline."""
    latencies: list[int] | None = [] if callers == 1 else None
    counts = [0] * callers

    async def caller(i: int) -> None:
        n = 0
        clock = trio.current_time
        if latencies is None:
            while clock() < stop:
                await fn(*args)
                n += 1
        else:
            perf = time.perf_counter_ns
            record = latencies.append
            while clock() < stop:
                t0 = perf()
                await fn(*args)
                record(perf() - t0)
                n += 1
        counts[i] = n

    cpu0 = cpu_seconds(pids)
    h0 = time.process_time()
    t0 = time.perf_counter()
    stop = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for i in range(callers):
            nursery.start_soon(caller, i)
    elapsed = time.perf_counter() - t0
    host = time.process_time() - h0
    worker = cpu_delta(cpu0, cpu_seconds(pids))
    return EchoSample(peer, workers, callers, sum(counts), elapsed, host, worker, latencies)


# ---------------------------------------------------------------------------- pool


async def _pool_echo(
    workers: int,
    callers_list: Sequence[int],
    seconds: float,
    warmup: int,
    launcher: Launcher | None = None,
    peer: str = POOL,
) -> EchoResult:
    async with open_pool(PoolConfig(size=workers), launcher=launcher) as pool:
        for _ in range(warmup):
            await pool.execute("echo", PAYLOAD)
        pids = pool.worker_pids()
        mem = memory_of(pids)
        samples = []
        for callers in callers_list:
            samples.append(
                await _trio_window(peer, workers, callers, seconds, pool.execute, ("echo", PAYLOAD), pids)
            )
        return samples, mem


def pool_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    return trio.run(_pool_echo, workers, callers_list, seconds, warmup)


async def _pool_startup(n: int) -> float:
    t0 = time.perf_counter()
    async with open_pool(PoolConfig(size=n)) as pool:
        elapsed = time.perf_counter() - t0
        assert pool.statistics().alive == n
    return elapsed


def pool_startup(n: int) -> float:
    return trio.run(_pool_startup, n)


# ---------------------------------------------------------------------------- floor

#: The pool's calls in flight per worker for echo (a pipelined command) when callers outnumber
#: workers: ``_pool_echo`` opens the pool with the default config, so its default pipeline depth.
#: The floor keeps as many in flight per child, so "vs floor" compares like with like.
PIPELINE_DEPTH = PoolConfig().pipeline_depth
#: Calls in flight per floor child; ``--floor-depth`` changes it (1: the one-call floor).
FLOOR_DEPTH = PIPELINE_DEPTH


async def _floor_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    with Floor(workers, FLOOR_DEPTH) as floor:
        for _ in range(max(1, warmup // workers)):
            await floor.each_once(PAYLOAD)
        pids = floor.pids()
        mem = memory_of(pids)
        samples = []
        for callers in callers_list:
            latencies: list[int] | None = [] if callers == 1 else None
            cpu0 = cpu_seconds(pids)
            h0 = time.process_time()
            t0 = time.perf_counter()
            calls = await floor.run(
                callers,
                trio.current_time() + seconds,
                PAYLOAD,
                None if latencies is None else latencies.append,
            )
            elapsed = time.perf_counter() - t0
            host = time.process_time() - h0
            worker = cpu_delta(cpu0, cpu_seconds(pids))
            samples.append(EchoSample(FLOOR, workers, callers, calls, elapsed, host, worker, latencies))
        return samples, mem


def floor_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    return trio.run(_floor_echo, workers, callers_list, seconds, warmup)


async def _floor_startup(n: int) -> float:
    t0 = time.perf_counter()
    with Floor(n) as floor:
        await floor.each_once(PAYLOAD)
        return time.perf_counter() - t0


def floor_startup(n: int) -> float:
    return trio.run(_floor_startup, n)


# ---------------------------------------------------------------------------- executor-style peers


def _sync_window(
    peer: str,
    workers: int,
    callers: int,
    seconds: float,
    submit: Callable[[Callable[[bool], None]], None],
    call: Callable[[], Any],
    pids: Sequence[int],
) -> EchoSample:
    """Drive a futures-style pool from this thread: with 1 caller, ``call()`` back to back
    (timing each); otherwise keep ``callers`` calls in flight with ``submit(on_done)``, which
    starts one call whose completion (on the peer's own thread) calls ``on_done(ok)``."""
    latencies: list[int] | None = None
    cpu0 = cpu_seconds(pids)
    h0 = time.process_time()
    t0 = time.perf_counter()
    stop = t0 + seconds
    if callers == 1:
        latencies = []
        perf = time.perf_counter_ns
        clock = time.perf_counter
        calls = 0
        while clock() < stop:
            s = perf()
            call()
            latencies.append(perf() - s)
            calls += 1
    else:
        inflight = threading.Semaphore(callers)
        lock = threading.Lock()
        done = [0]

        def on_done(ok: bool) -> None:
            if ok:
                with lock:
                    done[0] += 1
            inflight.release()

        clock = time.perf_counter
        while clock() < stop:
            inflight.acquire()
            submit(on_done)
        for _ in range(callers):  # wait for the calls still in flight
            inflight.acquire()
        calls = done[0]
    elapsed = time.perf_counter() - t0
    host = time.process_time() - h0
    worker = cpu_delta(cpu0, cpu_seconds(pids))
    return EchoSample(peer, workers, callers, calls, elapsed, host, worker, latencies)


def ppe_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=mp_context()) as ex:
        list(ex.map(_peers.echo, [PAYLOAD] * warmup))
        # The executor's own process table: it has no public way to list its workers.
        pids = list(ex._processes)
        mem = memory_of(pids)

        def submit(on_done: Callable[[bool], None]) -> None:
            ex.submit(_peers.echo, PAYLOAD).add_done_callback(
                lambda f: on_done(not f.cancelled() and f.exception() is None)
            )

        def call() -> Any:
            return ex.submit(_peers.echo, PAYLOAD).result()

        samples = [_sync_window(PPE, workers, c, seconds, submit, call, pids) for c in callers_list]
        return samples, mem


def mp_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    with mp_context().Pool(workers) as mp_pool:
        try:
            mp_pool.map(_peers.echo, [PAYLOAD] * warmup)
            pids = [p.pid for p in mp_pool._pool]  # no public list of its workers
            mem = memory_of(pids)

            def submit(on_done: Callable[[bool], None]) -> None:
                mp_pool.apply_async(
                    _peers.echo,
                    (PAYLOAD,),
                    callback=lambda _: on_done(True),
                    error_callback=lambda _: on_done(False),
                )

            def call() -> Any:
                return mp_pool.apply_async(_peers.echo, (PAYLOAD,)).get()

            samples = [_sync_window(MP_POOL, workers, c, seconds, submit, call, pids) for c in callers_list]
            return samples, mem
        finally:
            # Pool.__exit__ terminates; join so no worker is left when we return.
            mp_pool.terminate()
            mp_pool.join()


def _barrier_startup(
    make: Callable[[Any], Any], submit_all: Callable[[Any, int], set[int]], n: int, method: str | None
) -> float:
    """Time until n workers have each answered one call: each call waits on a barrier that
    only opens when all n workers are inside it (created before the clock starts)."""
    barrier = mp_context(method).Barrier(n)
    t0 = time.perf_counter()
    executor = make(barrier)
    try:
        pids = submit_all(executor, n)
        elapsed = time.perf_counter() - t0
        if len(pids) != n:
            raise RuntimeError(f"startup: {len(pids)} distinct workers answered, expected {n}")
        return elapsed
    finally:
        if isinstance(executor, multiprocessing.pool.Pool):
            executor.terminate()
            executor.join()
        else:
            executor.shutdown(wait=True)


def ppe_startup(n: int, method: str | None = None) -> float:
    return _barrier_startup(
        lambda b: concurrent.futures.ProcessPoolExecutor(
            n, mp_context=mp_context(method), initializer=_peers.set_barrier, initargs=(b,)
        ),
        lambda ex, k: {f.result() for f in [ex.submit(_peers.barrier_pid, 30.0) for _ in range(k)]},
        n,
        method,
    )


def ppe_spawn_startup(n: int) -> float:
    """ProcessPoolExecutor with fresh interpreters, as the pool and trio-parallel start theirs
    (the platform default on Linux before 3.14 forks instead, which is much cheaper)."""
    return ppe_startup(n, "spawn")


def mp_startup(n: int) -> float:
    return _barrier_startup(
        lambda b: mp_context().Pool(n, initializer=_peers.set_barrier, initargs=(b,)),
        lambda p, k: {r.get(60) for r in [p.apply_async(_peers.barrier_pid, (30.0,)) for _ in range(k)]},
        n,
        None,
    )


# ---------------------------------------------------------------------------- trio-parallel


async def _tp_spread(run: Callable[..., Awaitable[Any]], n: int, calls_each: int) -> set[int]:
    """n concurrent tasks on a cold context: each takes (and spawns) its own worker, so the
    returned pids are every worker the context has."""
    pids: set[int] = set()

    async def task() -> None:
        for _ in range(calls_each):
            pids.add(await run(_peers.getpid))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(task)
    return pids


async def _tp_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    async with trio_parallel.open_worker_context() as ctx:
        limiter = trio.CapacityLimiter(workers)
        run = functools.partial(ctx.run_sync, limiter=limiter)
        pids = sorted(await _tp_spread(run, workers, max(1, warmup // workers)))
        mem = memory_of(pids)
        samples = []
        for callers in callers_list:
            samples.append(
                await _trio_window(TRIO_PARALLEL, workers, callers, seconds, run, (_peers.echo, PAYLOAD), pids)
            )
        return samples, mem


def tp_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> EchoResult:
    return trio.run(_tp_echo, workers, callers_list, seconds, warmup)


async def _tp_startup(n: int) -> float:
    t0 = time.perf_counter()
    async with trio_parallel.open_worker_context() as ctx:
        pids = await _tp_spread(functools.partial(ctx.run_sync, limiter=trio.CapacityLimiter(n)), n, 1)
        elapsed = time.perf_counter() - t0
    if len(pids) != n:
        raise RuntimeError(f"startup: {len(pids)} distinct trio-parallel workers answered, expected {n}")
    return elapsed


def tp_startup(n: int) -> float:
    return trio.run(_tp_startup, n)


# ---------------------------------------------------------------------------- registries

ECHO: dict[str, Callable[[int, Sequence[int], float, int], EchoResult]] = {
    POOL: pool_echo,
    FLOOR: floor_echo,
    PPE: ppe_echo,
    MP_POOL: mp_echo,
}
STARTUP: dict[str, Callable[[int], float]] = {
    POOL: pool_startup,
    FLOOR: floor_startup,
    PPE: ppe_startup,
    MP_POOL: mp_startup,
}
if trio_parallel is not None:
    ECHO[TRIO_PARALLEL] = tp_echo
    STARTUP[TRIO_PARALLEL] = tp_startup
