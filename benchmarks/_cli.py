"""The benchmark driver behind ``python -m benchmarks`` (see ``benchmarks/__main__.py``)."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, TypeVar

from benchmarks import _channels, _chaos, _cpu, _drivers, _elastic, _learning, _memory, _ops, _report, _shapes
from benchmarks._common import (
    FLOOR,
    MP_POOL,
    PAYLOAD,
    PEER_LEGEND,
    POOL,
    PPE,
    TRIO_PARALLEL,
    EchoSample,
    descendants,
    kill_and_forget,
)

USAGE = "The pool beside ProcessPoolExecutor, multiprocessing.Pool, trio-parallel and a raw floor."
SECTIONS = (
    "echo", "startup", "recovery", "kill", "orphans", "memory", "cpu", "shapes", "learning", "elastic", "channels", "ops"
)
PPE_SPAWN = "PPE(spawn)"
T = TypeVar("T")


@dataclass
class Mode:
    """How much to measure; the three presets trade time for confidence."""

    name: str
    rounds: int
    seconds: float  # one echo window
    warmup: int  # calls before measuring
    workers: tuple[int, ...]
    callers: tuple[int, ...]
    startup_sizes: tuple[int, ...]
    startup_rounds: int
    recovery_reps: int
    under_fire_seconds: float
    kill_cap: float  # how long a peer's lost call is waited for
    orphan_cap: float  # how long orphans are watched before the benchmark kills them
    memory_marks: tuple[int, ...]
    cpu_files: int  # source files the CPU section compiles per round
    shape_items: int  # items the shapes section maps and streams per round


MODES = {
    "quick": Mode("quick", 1, 0.15, 50, (2, 4), (1, 16, 64), (1, 4), 1, 2, 0.5, 1.0, 3.0, (10_000,), 60, 5_000),
    "medium": Mode(
        "medium", 3, 1.0, 200, (2, 4), (1, 16, 64), (1, 4, 8), 3, 5, 2.0, 3.0, 10.0, (10_000,), 300, 50_000
    ),
    "full": Mode(
        "full", 5, 2.0, 500, (2, 4), (1, 16, 64), (1, 4, 8), 5, 10, 5.0, 3.0, 10.0, (10_000, 200_000), 600, 200_000
    ),
}


class _LogCounter(logging.Handler):
    """Counts the pool's log records instead of printing them: the chaos sections make the pool
    log every killed worker, which would bury the tables. The counts go into the JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def guarded(notes: list[str], what: str, fn: Callable[[], T]) -> T | None:
    """Run one measurement; a failure becomes a note (and a None) instead of ending the run."""
    try:
        return fn()
    except Exception as exc:  # reported, never hidden
        notes.append(f"{what} failed: {type(exc).__name__}: {exc}")
        progress(notes[-1])
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _rotated(items: list[str], r: int) -> list[str]:
    # Each round starts with a different peer, so no peer always runs first (cold) or last.
    k = r % len(items)
    return items[k:] + items[:k]


# ---------------------------------------------------------------------------- sections


def run_echo(mode: Mode, peers: list[str], notes: list[str]) -> tuple[list[EchoSample], dict[str, Any]]:
    samples: list[EchoSample] = []
    memory: dict[str, Any] = {}
    for r in range(mode.rounds):
        for w in mode.workers:
            for peer in _rotated(peers, r):
                progress(f"echo: round {r + 1}/{mode.rounds}, {w} workers, {peer}")
                got = guarded(
                    notes,
                    f"echo {peer} ({w} workers, round {r + 1})",
                    lambda: _drivers.ECHO[peer](w, list(mode.callers), mode.seconds, mode.warmup),
                )
                if got is None:
                    continue
                found, mem = got
                for s in found:
                    s.round_no = r
                samples.extend(found)
                if mem is not None and w == mode.workers[0] and peer not in memory:
                    memory[peer] = mem
    return samples, memory


def run_startup(mode: Mode, peers: list[str], notes: list[str]) -> dict[str, dict[int, list[float]]]:
    funcs: dict[str, Callable[[int], float]] = {p: _drivers.STARTUP[p] for p in peers if p in _drivers.STARTUP}
    if multiprocessing.get_context(_drivers.MP_CONTEXT).get_start_method() != "spawn":
        funcs[PPE_SPAWN] = _drivers.ppe_spawn_startup
    names = list(funcs)
    times: dict[str, dict[int, list[float]]] = {p: {} for p in names}
    for r in range(mode.startup_rounds):
        for n in mode.startup_sizes:
            for peer in _rotated(names, r):
                progress(f"startup: round {r + 1}/{mode.startup_rounds}, {n} workers, {peer}")
                t = guarded(notes, f"startup {peer} ({n} workers)", lambda: funcs[peer](n))
                if t is not None:
                    times[peer].setdefault(n, []).append(t)
    return times


# ---------------------------------------------------------------------------- report text


def _fmt_outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items(), key=lambda kv: (kv[0] != "ok", kv[0])))


def recovery_text(rec: dict[str, Any]) -> str:
    s = _report.seconds
    out = ["3. Pool recovery (2 workers unless said)"]
    rep = rec["replacement_s"]
    out.append(
        f"  SIGKILL of an idle worker -> replacement ready: median {s(rec['replacement_median_s'])} "
        f"(min {s(min(rep))}, max {s(max(rep))}, {len(rep)} kills)"
    )
    for i, c in enumerate(rec["inflight"]):
        out.append(
            f"  1 worker, sleep(0.2) killed 50 ms in, try {i + 1}: {c['outcome']} "
            f"{s(c['kill_to_outcome_s'])} after the kill; call took {s(c['total_s'])} "
            f"({c['added_s'] * 1000:+.0f} ms vs 0.2 s)"
        )
    uf = rec["under_fire"]
    calm, kill = uf["calm"], uf["killing"]
    adv = kill["ok_per_s"] / calm["ok_per_s"] if calm["ok_per_s"] else None
    out.append(
        f"  echo, {uf['workers']} workers x {uf['callers']} callers, {uf['seconds']:g} s: "
        f"calm {calm['ok_per_s']:,.0f} ok/s; a worker SIGKILLed every {uf['interval'] * 1000:.0f} ms: "
        f"{kill['ok_per_s']:,.0f} ok/s ({_report.ratio(adv)} of calm)"
    )
    out.append(
        f"    outcomes under kills: {_fmt_outcomes(kill['outcomes'])}; kills {kill['kills']}, "
        f"restarts {kill['restarts']}, "
        + "".join(f"{k} {kill[k]}, " for k in ("retries", "failovers") if k in kill)
        + f"pool circuit {kill['pool_circuit']}; "
        f"all workers ready {s(uf['recovered_s'])} after the end"
    )
    return "\n".join(out)


def kill_text(kill: dict[str, Any], cap: float) -> str:
    out = [
        f"4a. One worker SIGKILLed while 2 workers each run a {_chaos.KILL_CALL_SECONDS:g} s call "
        f"(waited up to {cap:g} s per outcome)"
    ]
    body = []
    for peer, res in kill.items():
        if "error" in res:
            body.append([peer, f"measurement failed: {res['error']}", "", ""])
            continue
        calls = "; ".join(
            f"{c['outcome']}" + ("" if c["after_kill_s"] is None else f" +{_report.seconds(c['after_kill_s'])}")
            for c in res["calls"]
        )
        body.append([peer, calls, res["next_call"], res.get("notes", "")])
    out.append(_report.table(["peer", "the two running calls (time after kill)", "next call", "notes"], body, left=True))
    return "\n".join(out)


def orphans_text(orph: dict[str, Any]) -> str:
    out = ["4b. Parent SIGKILLed: how long its worker processes live on (2 workers + helpers)"]
    body = []
    for peer, res in orph.items():
        if "error" in res:
            body.append([peer, "-", f"measurement failed: {res['error']}"])
            continue
        if res["outlived_s"] is None:
            gone = f">{res['cap_s']:g} s (still alive: killed by the benchmark)"
        else:
            gone = _report.seconds(res["outlived_s"])
        body.append([peer, str(res["processes"]), gone])
    out.append(_report.table(["peer", "processes", "outlived the parent by"], body, left=True))
    return "\n".join(out)


def memory_text(worker_mem: dict[str, Any], host: dict[str, Any] | None) -> str:
    out = ["5. Memory"]
    body = [
        [peer, f"{m['rss_mib']:.1f}", f"{m['uss_mib']:.1f}"]
        for peer, m in worker_mem.items()
    ]
    if body:
        out.append("  idle worker after warm-up (median over its workers), MiB:")
        out.append(_report.table(["peer", "RSS", "USS"], body, indent="    "))
        out.append("    (USS: memory only that process holds; forked workers share most pages, so compare USS)")
    if host:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in host["rss_mib"].items())
        out.append(f"  pool host RSS, MiB (fresh interpreter, 2 workers, 16 callers): {parts}")
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=USAGE)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI smoke run, well under a minute")
    size.add_argument("--full", action="store_true", help="everything, longer windows, 200k-call memory")
    parser.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    parser.add_argument("--seconds", type=float, help="override the mode's echo window length")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument(
        "--mp-context",
        choices=multiprocessing.get_all_start_methods(),
        help="start method for ProcessPoolExecutor and multiprocessing.Pool (default: the platform's)",
    )
    parser.add_argument(
        "--json", default=str(Path(__file__).resolve().parent / "results.json"), help="results file (default: %(default)s)"
    )
    parser.add_argument("--plot", help="write latency and throughput plots to this PNG (needs matplotlib)")
    parser.add_argument(
        "--floor-depth",
        type=int,
        help=f"calls in flight per floor child (default: the pool's pipeline depth, {_drivers.PIPELINE_DEPTH}; "
        "1 gives the send-then-wait floor with one call per worker)",
    )
    args = parser.parse_args(argv)
    if args.floor_depth is not None and args.floor_depth < 1:
        parser.error(f"--floor-depth must be at least 1, got {args.floor_depth}")

    mode = MODES["quick" if args.quick else "full" if args.full else "medium"]
    if args.rounds:
        mode.rounds = mode.startup_rounds = args.rounds
    if args.seconds:
        mode.seconds = args.seconds
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    _drivers.MP_CONTEXT = args.mp_context
    start_method = multiprocessing.get_context(args.mp_context).get_start_method()

    log_counter = _LogCounter()
    pool_logger = logging.getLogger("pool")
    pool_logger.addHandler(log_counter)
    pool_logger.propagate = False

    notes: list[str] = [f"{p}: skipped, {why}" for p, why in _drivers.MISSING.items()]
    peers = [p for p in (POOL, FLOOR, PPE, MP_POOL, TRIO_PARALLEL) if p not in _drivers.MISSING]
    kill_peers = [p for p in peers if p != FLOOR]
    _drivers.FLOOR_DEPTH = args.floor_depth or _drivers.PIPELINE_DEPTH
    floor_text = PEER_LEGEND[FLOOR].format(depth=_drivers.FLOOR_DEPTH)
    if _drivers.FLOOR_DEPTH != _drivers.PIPELINE_DEPTH:
        floor_text = (
            f"raw trio + msgpack over pipes, up to {_drivers.FLOOR_DEPTH} call(s) in flight per child "
            f"(--floor-depth; the pool: up to {_drivers.PIPELINE_DEPTH}), no pool logic"
        )
    legend = {**PEER_LEGEND, FLOOR: floor_text}
    before = set(descendants())
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "mode": mode.__dict__,
            "python": sys.version,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mp_start_method": start_method,
            "payload": PAYLOAD,
            "versions": {d: _version(d) for d in ("trio", "msgpack", "trio-parallel", "trio-worker-pool", "psutil")},
            "peers": {p: legend[p] for p in peers},
        }
    }
    text: list[str] = []
    samples: list[EchoSample] = []
    echo_agg: dict[str, Any] | None = None
    worker_mem: dict[str, Any] = {}
    try:
        if "echo" in sections:
            samples, worker_mem = run_echo(mode, peers, notes)
            echo_agg = _report.aggregate_echo(samples, peers, mode.workers, mode.callers)
            results["echo"] = {"aggregate": echo_agg, "samples": [s.summary() for s in samples]}
            results["memory_idle_worker"] = worker_mem
            text.append(_report.echo_tables(echo_agg, peers, mode.workers, mode.callers))
        if "startup" in sections:
            times = run_startup(mode, peers, notes)
            rows = _report.aggregate_startup(times)
            results["startup"] = rows
            text.append(_report.startup_table(rows, list(times), mode.startup_sizes))
        if "recovery" in sections:
            progress("recovery: pool")
            rec = guarded(notes, "recovery", lambda: _chaos.pool_recovery(mode.recovery_reps, mode.under_fire_seconds))
            if rec is not None:
                results["recovery"] = rec
                text.append(recovery_text(rec))
        if "kill" in sections:
            progress("kill: one worker SIGKILLed, every peer")
            kill = _chaos.kill_costs(mode.kill_cap)
            results["kill"] = kill
            text.append(kill_text(kill, mode.kill_cap))
        if "orphans" in sections:
            progress(f"orphans: parents SIGKILLed, watching their workers up to {mode.orphan_cap:g} s")
            orph = guarded(notes, "orphans", lambda: _chaos.orphans(mode.orphan_cap, kill_peers, args.mp_context))
            if orph is not None:
                results["orphans"] = orph
                text.append(orphans_text(orph))
        host_mem = None
        if "memory" in sections:
            progress(f"memory: pool host RSS after {', '.join(f'{m:,}' for m in mode.memory_marks)} calls")
            host_mem = guarded(notes, "host memory", lambda: _memory.measure(list(mode.memory_marks)))
            results["memory_host"] = host_mem
        if worker_mem or host_mem:
            text.append(memory_text(worker_mem, host_mem))
        if echo_agg is not None and FLOOR in peers:
            text.append(_report.overhead_table(echo_agg))
        if "cpu" in sections:
            progress(f"cpu: {mode.cpu_files} source files compiled by the pool and ProcessPoolExecutor")
            cpu = guarded(
                notes,
                "cpu",
                lambda: _cpu.run(2, mode.cpu_files, mode.rounds, _drivers.mp_context()),
            )
            if cpu is not None:
                results["cpu"] = cpu
                text.append(_cpu.text(cpu))
                if not cpu["identical"]:
                    notes.append("cpu: the pool's results differ from ProcessPoolExecutor's")
        if "shapes" in sections:
            progress(f"shapes: map of {mode.shape_items:,} items beside mp.Pool.imap and PPE.map; a stream")
            shapes = guarded(notes, "shapes", lambda: _shapes.run(mode.shape_items, mode.rounds, _drivers.mp_context()))
            if shapes is not None:
                results["shapes"] = shapes
                text.append(_shapes.text(shapes))
                if not shapes["identical"]:
                    notes.append("shapes: the peers' results differ")
        if "learning" in sections:
            progress("learning: a kill storm with and without the retry budget; hung attempts, adaptive")
            learned = guarded(notes, "learning", lambda: _learning.run(max(1.0, mode.under_fire_seconds)))
            if learned is not None:
                results["learning"] = learned
                text.append(_learning.text(learned))
        if "elastic" in sections:
            progress("elastic: a rolling restart under load, scaling from 1 to 8 workers")
            elastic = guarded(notes, "elastic", lambda: _elastic.run(mode.recovery_reps))
            if elastic is not None:
                results["elastic"] = elastic
                text.append(_elastic.text(elastic))
                if elastic["rolling_restart"]["failed"]:
                    notes.append("elastic: calls failed during a rolling restart (there should be none)")
        if "channels" in sections:
            chan = _channels.run_channels(
                mode.rounds, mode.workers, mode.callers, mode.seconds, mode.warmup, notes, progress
            )
            results["channels"] = chan
            text.append(_channels.channels_text(chan))
        if "ops" in sections:
            progress("ops: echo with metrics off, on, and with tracing; the recording alone; a scrape")
            ops = guarded(notes, "ops", lambda: _ops.run(mode.rounds, mode.seconds, mode.warmup))
            if ops is not None:
                results["ops"] = ops
                text.append(_ops.text(ops))
        if args.plot:
            if samples:
                notes.append(_report.plot(args.plot, samples, peers, mode.workers, mode.callers))
            else:
                notes.append("--plot: no echo samples (section not run), nothing plotted")
    finally:
        # Anything a peer left behind (there should be nothing): kill it by pid, and say so.
        leftovers = [p for p in descendants() if p not in before]
        stray = [p for p in leftovers if "resource_tracker" not in " ".join(_cmdline(p.pid))]
        if stray:
            notes.append(f"killed {len(stray)} leftover process(es): {[p.pid for p in stray]}")
            kill_and_forget(stray)

    elapsed = time.perf_counter() - t_start
    results["notes"] = notes
    results["pool_log_records"] = dict(log_counter.counts)
    results["meta"]["elapsed_s"] = elapsed

    print(
        f"python -m benchmarks ({mode.name}): {mode.rounds} round(s), {mode.seconds:g} s echo windows, "
        f"peers interleaved; CPython {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"multiprocessing start method {start_method}; took {elapsed:.0f} s"
    )
    print("peers:")
    for p in peers:
        print(f"  {p:<14} {legend[p]}")
    print(f"payload {PAYLOAD}; figures are medians over rounds; 'vs X' = pool advantage over X, median of")
    print("per-round ratios (>1: the pool is better). Compare figures only within one run.\n")
    print("\n\n".join(text))
    if log_counter.counts:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(log_counter.counts.items()))
        print(f"\npool log records during the run (not shown; chaos sections cause them): {counts}")
    if notes:
        print("\nnotes:")
        for n in notes:
            print(f"  - {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nresults written to {args.json}")
    return 0


def _cmdline(pid: int) -> list[str]:
    try:
        import psutil

        return psutil.Process(pid).cmdline()
    except Exception:
        return []
