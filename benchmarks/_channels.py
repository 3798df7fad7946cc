"""Section "channels": the pool's echo over local pipes and over TCP loopback (TcpLauncher), in
the same run, interleaved over rounds, and Ray's own actor calls as a peer.

Ray runs only where the only network interface is loopback (a fresh ``unshare -n`` namespace, as
``.ci/run`` makes): Ray probes other addresses, and this machine may send traffic to loopback
only. Elsewhere, or without the ``ray`` extra, its column is skipped with a note. Nothing here
asserts a speed.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Sequence

import trio

from benchmarks import _drivers, _report
from benchmarks._common import PAYLOAD, EchoSample, latency_summary, median, memory_of
from pool.launchers import TcpLauncher

PIPES = "pool/pipes"
TCP = "pool/tcp"
RAY = "Ray actors"
LEGEND = {
    PIPES: "open_pool + execute('echo') over local pipes (the default launcher)",
    TCP: "the same over TCP loopback: TcpLauncher, HMAC-authenticated, workers connect back",
    RAY: "Ray's own actor calls: ray.get(actor.echo.remote(x)), one actor per worker, callers in threads",
}


def ray_missing() -> str | None:
    """Why Ray cannot run here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "not installed (pip install -e '.[ray]')"
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        return "runs only in a network namespace with only loopback up (as .ci/run does: see tests/test_ray.py)"
    return None


def _pool(peer: str) -> Callable[[int, Sequence[int], float, int], _drivers.EchoResult]:
    def run(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> _drivers.EchoResult:
        launcher = TcpLauncher(secrets.token_hex(32)) if peer == TCP else None
        return trio.run(_drivers._pool_echo, workers, callers_list, seconds, warmup, launcher, peer)

    return run


class EchoActor:
    """The Ray peer's actor (an echo, like the pool's)."""

    def echo(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()


def _ray_echo(workers: int, callers_list: Sequence[int], seconds: float, warmup: int) -> _drivers.EchoResult:
    import ray

    actor_class = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(EchoActor)
    actors = [actor_class.remote() for _ in range(workers)]
    try:
        pids = ray.get([a.pid.remote() for a in actors])
        for i in range(warmup):
            ray.get(actors[i % workers].echo.remote(PAYLOAD))
        mem = memory_of(pids)
        next_actor = itertools.cycle(actors).__next__

        def call() -> Any:
            return ray.get(next_actor().echo.remote(PAYLOAD))

        def submit(on_done: Callable[[bool], None]) -> None:
            next_actor().echo.remote(PAYLOAD).future().add_done_callback(lambda f: on_done(f.exception() is None))

        samples = [_drivers._sync_window(RAY, workers, c, seconds, submit, call, pids) for c in callers_list]
        return samples, mem
    finally:
        for actor in actors:
            ray.kill(actor)


def raw_round_trips(n: int = 20_000) -> dict[str, float]:
    """The kernel's floor under both channels: microseconds per round trip of a 40-byte message
    between two processes (os.write, then os.read the echo) over a pipe pair and over TCP
    loopback (TCP_NODELAY), without any pool or codec."""
    out: dict[str, float] = {}
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    out["pipes"] = _ping_pong(r2, w1, r1, w2, n)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as a, listener.accept()[0] as b:
            for sock in (a, b):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out["tcp"] = _ping_pong(a.fileno(), a.fileno(), b.fileno(), b.fileno(), n)
    return out


def _ping_pong(read_fd: int, write_fd: int, child_read: int, child_write: int, n: int) -> float:
    message = b"x" * 40
    pid = os.fork()
    if pid == 0:  # the echoing child: nothing but reads and writes, then it leaves
        try:
            for _ in range(n + 100):
                os.write(child_write, os.read(child_read, 1 << 16))
        finally:
            os._exit(0)
    try:
        for _ in range(100):
            os.write(write_fd, message)
            os.read(read_fd, 1 << 16)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(write_fd, message)
            os.read(read_fd, 1 << 16)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        os.waitpid(pid, 0)


def run_channels(
    rounds: int, workers_list: Sequence[int], callers_list: Sequence[int], seconds: float, warmup: int,
    notes: list[str], progress: Callable[[str], None],
) -> dict[str, Any]:
    peers = [PIPES, TCP]
    echo = {PIPES: _pool(PIPES), TCP: _pool(TCP)}
    why = ray_missing()
    ray_temp: str | None = None  # set when this run started Ray (and so ends it)
    if why is None:
        import ray

        if not ray.is_initialized():
            ray_temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths
            ray.init(
                address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                _node_ip_address="127.0.0.1", object_store_memory=80 * 1024 * 1024,
                _temp_dir=ray_temp, log_to_driver=False,
            )
        peers.append(RAY)
        echo[RAY] = _ray_echo
    else:
        notes.append(f"channels: {RAY} skipped, {why}")
    samples: list[EchoSample] = []
    try:
        for r in range(rounds):
            for w in workers_list:
                for k in range(len(peers)):
                    peer = peers[(r + k) % len(peers)]  # each round starts with another peer
                    progress(f"channels: round {r + 1}/{rounds}, {w} workers, {peer}")
                    got = _guarded(notes, f"channels {peer} ({w} workers)", lambda: echo[peer](w, callers_list, seconds, warmup))
                    if got is not None:
                        for s in got[0]:
                            s.round_no = r
                        samples.extend(got[0])
    finally:
        if ray_temp is not None:
            import ray

            ray.shutdown()
            shutil.rmtree(ray_temp, ignore_errors=True)
    progress("channels: raw round trips over a pipe pair and over TCP loopback")
    return {
        "peers": {p: LEGEND[p] for p in peers},
        "rows": _aggregate(samples, peers, workers_list, callers_list),
        "raw_round_trip_us": raw_round_trips(),
    }


def _guarded(notes: list[str], what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # reported, never hidden
        notes.append(f"{what} failed: {type(exc).__name__}: {exc}")
        return None


def _aggregate(samples: list[EchoSample], peers: list[str], workers_list: Sequence[int], callers_list: Sequence[int]) -> list[dict[str, Any]]:
    by = {(s.peer, s.workers, s.callers, s.round_no): s for s in samples}
    rounds = sorted({s.round_no for s in samples})
    rows = []
    for w in workers_list:
        for c in callers_list:
            row: dict[str, Any] = {"workers": w, "callers": c}
            for peer in peers:
                mine = [s for s in samples if s.peer == peer and s.workers == w and s.callers == c]
                row[peer] = median(s.rate for s in mine)
                if c == 1:
                    row[f"{peer} p50_us"] = median(latency_summary(s.latencies_ns)["p50"] for s in mine if s.latencies_ns)
            for other, key in ((PIPES, "tcp/pipes"), (RAY, "tcp/ray")):
                ratios = [
                    by[(TCP, w, c, r)].rate / by[(other, w, c, r)].rate
                    for r in rounds
                    if (TCP, w, c, r) in by and (other, w, c, r) in by and by[(other, w, c, r)].rate
                ]
                row[key] = median(ratios)
            rows.append(row)
    return rows


def channels_text(result: dict[str, Any]) -> str:
    peers = list(result["peers"])
    out = ["11. Channels: the pool over local pipes and over TCP loopback, and Ray's own actor calls"]
    out += [f"  {p:<11} {text}" for p, text in result["peers"].items()]
    rows = result["rows"]
    headers = ["workers x callers", *(f"{p} calls/s" for p in peers), "tcp / pipes"] + (["tcp / Ray"] if RAY in peers else [])
    body = []
    for r in rows:
        line = [f"{r['workers']} x {r['callers']}", *(_report.num(r[p]) for p in peers), _report.ratio(r["tcp/pipes"])]
        if RAY in peers:
            line.append(_report.ratio(r["tcp/ray"]))
        body.append(line)
    out.append(_report.table(headers, body))
    lat = [r for r in rows if r["callers"] == 1]
    if lat:
        out.append("  sequential latency p50, us (1 caller):")
        out.append(_report.table(["workers", *peers], [
            [str(r["workers"]), *(_report.num(r.get(f"{p} p50_us"), ",.1f") for p in peers)] for r in lat
        ], indent="    "))
    raw = result["raw_round_trip_us"]
    out.append(
        f"  the kernel's floor, one 40-byte round trip between two processes without any pool: pipes "
        f"{raw['pipes']:.1f} us, TCP loopback {raw['tcp']:.1f} us ({raw['pipes'] / raw['tcp']:.2f}x)"
    )
    out.append("  (ratios: medians of per-round ratios of calls/s; > 1: TCP did more)")
    return "\n".join(out)
