"""Turning raw measurements into medians, per-round ratios, readable tables and an optional plot.

Every ratio here is the "pool advantage": > 1 means the pool did better (more calls per second,
or less time), computed per round and then the median taken, because on a noisy machine two
peers measured back to back in one round share the same noise, while rounds do not.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from benchmarks._common import FLOOR, POOL, EchoSample, latency_summary, median

Row = list[str]


# ---------------------------------------------------------------------------- aggregation


def _index(samples: Iterable[EchoSample]) -> dict[tuple[str, int, int, int], EchoSample]:
    return {(s.peer, s.workers, s.callers, s.round_no): s for s in samples}


def _rounds(samples: Sequence[EchoSample]) -> list[int]:
    return sorted({s.round_no for s in samples})


def per_round_ratio(
    samples: Sequence[EchoSample],
    peer: str,
    workers: int,
    callers: int,
    value: Callable[[EchoSample], float | None],
    better_high: bool,
) -> float | None:
    """Median over rounds of the pool's advantage over ``peer`` in ``value``."""
    idx = _index(samples)
    ratios = []
    for r in _rounds(samples):
        a, b = idx.get((POOL, workers, callers, r)), idx.get((peer, workers, callers, r))
        if a is None or b is None:
            continue
        va, vb = value(a), value(b)
        if not va or not vb:
            continue
        ratios.append(va / vb if better_high else vb / va)
    return median(ratios)


def _host_us(s: EchoSample) -> float | None:
    return s.host_cpu_s / s.calls * 1e6 if s.calls else None


def _worker_us(s: EchoSample) -> float | None:
    return s.worker_cpu_s / s.calls * 1e6 if s.calls and s.worker_cpu_s is not None else None


def _p(q: str) -> Callable[[EchoSample], float | None]:
    def get(s: EchoSample) -> float | None:
        return latency_summary(s.latencies_ns)[q] if s.latencies_ns else None

    return get


def aggregate_echo(
    samples: Sequence[EchoSample], peers: Sequence[str], workers_list: Sequence[int], callers_list: Sequence[int]
) -> dict[str, Any]:
    """Medians per (peer, workers, callers), the pool's per-round advantage over each peer, and
    the pool's overhead over the floor."""
    rows = []
    for w in workers_list:
        for c in callers_list:
            for peer in peers:
                mine = [s for s in samples if s.peer == peer and s.workers == w and s.callers == c]
                if not mine:
                    continue
                row: dict[str, Any] = {
                    "peer": peer,
                    "workers": w,
                    "callers": c,
                    "rounds": len(mine),
                    "rate": median(s.rate for s in mine),
                    "host_cpu_us_per_call": median(_host_us(s) for s in mine),
                    "worker_cpu_us_per_call": median(_worker_us(s) for s in mine),
                }
                if c == 1:
                    row["latency_p50_us"] = median(_p("p50")(s) for s in mine)
                    row["latency_p99_us"] = median(_p("p99")(s) for s in mine)
                if peer != POOL:
                    row["pool_advantage_rate"] = per_round_ratio(samples, peer, w, c, lambda s: s.rate, True)
                    row["pool_advantage_host_cpu"] = per_round_ratio(samples, peer, w, c, _host_us, False)
                    if c == 1:
                        row["pool_advantage_p50"] = per_round_ratio(samples, peer, w, c, _p("p50"), False)
                        row["pool_advantage_p99"] = per_round_ratio(samples, peer, w, c, _p("p99"), False)
                rows.append(row)
    overhead = []
    idx = _index(samples)
    for w in workers_list:
        for c in callers_list:
            wall, host, worker = [], [], []
            for r in _rounds(samples):
                p, f = idx.get((POOL, w, c, r)), idx.get((FLOOR, w, c, r))
                if p is None or f is None or not p.calls or not f.calls:
                    continue
                wall.append(1e6 / p.rate - 1e6 / f.rate)
                hp, hf = _host_us(p), _host_us(f)
                if hp is not None and hf is not None:
                    host.append(hp - hf)
                wp, wf = _worker_us(p), _worker_us(f)
                if wp is not None and wf is not None:
                    worker.append(wp - wf)
            if wall:
                overhead.append(
                    {
                        "workers": w,
                        "callers": c,
                        "wall_us_per_call": median(wall),
                        "host_cpu_us_per_call": median(host),
                        "worker_cpu_us_per_call": median(worker),
                    }
                )
    return {"rows": rows, "overhead_vs_floor": overhead}


def aggregate_startup(times: dict[str, dict[int, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    pool_times = times.get(POOL, {})
    for peer, by_n in times.items():
        for n, ts in sorted(by_n.items()):
            row: dict[str, Any] = {"peer": peer, "workers": n, "seconds": median(ts), "all": ts}
            if peer != POOL and pool_times.get(n):
                pairs = list(zip(pool_times[n], ts))
                row["pool_advantage"] = median(b / a for a, b in pairs if a > 0)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- text tables


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ", left: bool = False) -> str:
    """Numbers right-aligned (the first column, and all of them if ``left``, left-aligned)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = []
    for i, r in enumerate([list(headers)] + [list(r) for r in rows]):
        cells = [
            str(c).ljust(widths[j]) if j == 0 or left else str(c).rjust(widths[j]) for j, c in enumerate(r)
        ]
        lines.append(indent + "  ".join(cells).rstrip())
        if i == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def num(v: float | None, fmt: str = ",.0f", missing: str = "-") -> str:
    return missing if v is None else format(v, fmt)


def ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def echo_tables(agg: dict[str, Any], peers: Sequence[str], workers_list: Sequence[int], callers_list: Sequence[int]) -> str:
    rows_by = {(r["peer"], r["workers"], r["callers"]): r for r in agg["rows"]}
    others = [p for p in peers if p != POOL]
    out = []

    def grid(title: str, key: str, fmt: str, adv_key: str, callers: Sequence[int]) -> None:
        headers = ["workers x callers"] + list(peers) + [f"vs {p}" for p in others]
        body = []
        for w in workers_list:
            for c in callers:
                line = [f"{w} x {c}"]
                line += [num(rows_by.get((p, w, c), {}).get(key), fmt) for p in peers]
                line += [ratio(rows_by.get((p, w, c), {}).get(adv_key)) for p in others]
                body.append(line)
        out.append(title)
        out.append(table(headers, body))

    grid("1a. Echo throughput, calls/s (higher is better)", "rate", ",.0f", "pool_advantage_rate", callers_list)
    if 1 in callers_list:
        for label, q in (("1b", "p50"), ("1c", "p99")):
            grid(
                f"{label}. Sequential latency {q}, us (1 caller; lower is better)",
                f"latency_{q}_us",
                ",.1f",
                f"pool_advantage_{q}",
                [1],
            )
    grid(
        "1d. Host CPU per call, us (all host threads; lower is better)",
        "host_cpu_us_per_call",
        ",.1f",
        "pool_advantage_host_cpu",
        callers_list,
    )
    return "\n\n".join(out)


def overhead_table(agg: dict[str, Any]) -> str:
    rows_by = {(r["peer"], r["workers"], r["callers"]): r for r in agg["rows"]}
    body = []
    for o in agg["overhead_vs_floor"]:
        w, c = o["workers"], o["callers"]
        p, f = rows_by.get((POOL, w, c), {}), rows_by.get((FLOOR, w, c), {})
        body.append(
            [
                f"{w} x {c}",
                num(1e6 / p["rate"] if p.get("rate") else None, ".1f"),
                num(1e6 / f["rate"] if f.get("rate") else None, ".1f"),
                num(o["wall_us_per_call"], "+.1f"),
                f"{num(p.get('host_cpu_us_per_call'), '.1f')} / {num(f.get('host_cpu_us_per_call'), '.1f')}",
                f"{num(p.get('worker_cpu_us_per_call'), '.1f')} / {num(f.get('worker_cpu_us_per_call'), '.1f')}",
            ]
        )
    return "6. Pool overhead over the floor, per call (medians of per-round differences)\n" + table(
        ["workers x callers", "pool us", "floor us", "overhead us", "host CPU pool/floor", "worker CPU pool/floor"],
        body,
    ) + (
        "\n  (us = 1e6 / calls per second, i.e. 1/pool_rate - 1/floor_rate; CPU in us per call;"
        "\n   worker CPU is summed over all workers)"
    )


def startup_table(rows: list[dict[str, Any]], peers: Sequence[str], sizes: Sequence[int]) -> str:
    by = {(r["peer"], r["workers"]): r for r in rows}
    others = [p for p in peers if p != POOL]
    body = []
    for n in sizes:
        line = [str(n)] + [seconds(by.get((p, n), {}).get("seconds")) for p in peers]
        line += [ratio(by.get((p, n), {}).get("pool_advantage")) for p in others]
        body.append(line)
    return (
        "2. Startup: time until all workers are ready (pool: open_pool returns; peers: every "
        "worker answered one call)\n"
        + table(["workers"] + list(peers) + [f"vs {p}" for p in others], body)
    )


# ---------------------------------------------------------------------------- plot


def plot(
    path: str,
    samples: Sequence[EchoSample],
    peers: Sequence[str],
    workers_list: Sequence[int],
    callers_list: Sequence[int],
) -> str:
    """Latency distributions (1 caller) and throughput vs callers; returns a note for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install -e '.[bench]'); {path} not written"
    fig, axes = plt.subplots(1, 1 + len(workers_list), figsize=(6 * (1 + len(workers_list)), 4.5))
    ax = axes[0]
    w0 = workers_list[0]
    for peer in peers:
        lat = sorted(
            v / 1000
            for s in samples
            if s.peer == peer and s.workers == w0 and s.callers == 1 and s.latencies_ns
            for v in s.latencies_ns
        )
        if lat:
            n = len(lat)
            ax.plot(lat, [(i + 1) / n for i in range(n)], label=peer)
    ax.set_xscale("log")
    ax.set_xlabel("latency, us (log)")
    ax.set_ylabel("fraction of calls")
    ax.set_title(f"sequential echo latency CDF ({w0} workers, 1 caller)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    for ax, w in zip(axes[1:], workers_list):
        for peer in peers:
            ys = [median(s.rate for s in samples if s.peer == peer and s.workers == w and s.callers == c) for c in callers_list]
            if any(y is not None for y in ys):
                ax.plot(callers_list, [y if y is not None else float("nan") for y in ys], marker="o", label=peer)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(callers_list), [str(c) for c in callers_list])
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel("calls/s (median over rounds)")
        ax.set_title(f"echo throughput, {w} workers")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
