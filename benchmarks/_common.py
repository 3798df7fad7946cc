"""Shared pieces of the benchmarks: the payload, result records, process bookkeeping (CPU,
memory, safe kill-by-pid) and small statistics helpers. Imports no peer library."""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import psutil

#: The echo payload of every throughput and latency measurement.
PAYLOAD: dict[str, Any] = {"a": 1, "b": "hello", "c": [1, 2, 3]}

#: Short peer names used in tables, and what they stand for.
POOL = "pool"
FLOOR = "floor"
PPE = "PPE"
MP_POOL = "mp.Pool"
TRIO_PARALLEL = "trio-parallel"
PEER_LEGEND = {
    POOL: "this library: pool.open_pool + execute('echo')",
    # {depth}: the pool's pipeline depth, filled in by _cli (this module does not import the pool)
    FLOOR: "raw trio + msgpack over pipes, the pool's calls in flight per worker (up to {depth} per child), no pool logic",
    PPE: "concurrent.futures.ProcessPoolExecutor, futures pipelined from a thread",
    MP_POOL: "multiprocessing.Pool, apply_async pipelined",
    TRIO_PARALLEL: "trio_parallel run_sync in N trio tasks, CapacityLimiter(workers)",
}


@dataclass
class EchoSample:
    """One measurement window of one peer at one (workers, callers) point."""

    peer: str
    workers: int
    callers: int
    calls: int
    seconds: float
    host_cpu_s: float  # process_time of the host over the window (all its threads)
    worker_cpu_s: float | None  # user+system CPU of the worker processes over the window
    latencies_ns: list[int] | None = field(default=None, repr=False)  # only with 1 caller
    round_no: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view: raw latencies are reduced to percentiles (they can be 100k)."""
        d = asdict(self)
        lat = d.pop("latencies_ns")
        d["rate"] = self.rate
        d["host_cpu_us_per_call"] = per_call_us(self.host_cpu_s, self.calls)
        d["worker_cpu_us_per_call"] = (
            None if self.worker_cpu_s is None else per_call_us(self.worker_cpu_s, self.calls)
        )
        if lat:
            d["latency_us"] = latency_summary(lat)
        return d


def per_call_us(seconds: float, calls: int) -> float | None:
    return seconds / calls * 1e6 if calls else None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(latencies_ns: Iterable[int]) -> dict[str, float]:
    values = sorted(v / 1000 for v in latencies_ns)
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "p99.9": percentile(values, 99.9),
        "max": values[-1] if values else float("nan"),
    }


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcId:
    """A pid plus its start time: a pid alone may be reused by an unrelated process after the
    one we mean has exited, and we must never signal a stranger."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> "ProcId | None":
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def process(self) -> psutil.Process | None:
        """The live (non-zombie) process, or None if it is gone."""
        try:
            p = psutil.Process(self.pid)
            if p.create_time() != self.create_time or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def kill(self) -> bool:
        """SIGKILL it if it is still the same process; True if a signal was sent."""
        if self.process() is None:
            return False
        try:
            os.kill(self.pid, signal.SIGKILL)
            return True
        except OSError:
            return False


def descendants(pid: int | None = None) -> list[ProcId]:
    """Every live descendant of ``pid`` (default: this process), as ProcIds."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            if k.status() != psutil.STATUS_ZOMBIE:
                out.append(ProcId(k.pid, k.create_time()))
        except psutil.Error:
            pass
    return out


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """user+system CPU seconds of each pid that can be read."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float | None:
    """CPU spent between two samples by the processes present in both."""
    common = before.keys() & after.keys()
    if not common:
        return None
    return sum(after[p] - before[p] for p in common)


def memory_of(pids: Iterable[int]) -> dict[str, float] | None:
    """Median RSS and USS (MiB) over the given worker pids; USS is what the process alone
    holds (forked workers share most pages with their parent, so their RSS misleads)."""
    rss, uss = [], []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss.append(info.rss / 2**20)
        uss.append(info.uss / 2**20)
    if not rss:
        return None
    return {"rss_mib": statistics.median(rss), "uss_mib": statistics.median(uss), "workers": len(rss)}


def kill_and_forget(procs: Iterable[ProcId], wait: float = 2.0) -> list[int]:
    """SIGKILL each still-living process, wait until they are gone; return the pids killed."""
    procs = list(procs)
    killed = [p.pid for p in procs if p.kill()]
    deadline = time.monotonic() + wait
    pending = [p for p in procs if p.alive()]
    while pending and time.monotonic() < deadline:
        time.sleep(0.01)
        pending = [p for p in pending if p.alive()]
    return killed
