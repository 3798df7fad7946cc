"""The shapes section: ``pool.map`` beside multiprocessing.Pool.imap and ProcessPoolExecutor.map
on the same inputs, and a stream's items against the same items fetched one call each.

map: the echo payload, ``items`` of them, chunksize 64 for every peer, 2 workers each, every peer
started and warmed up first; a round runs the three in a rotating order and checks their results
are identical. Streams: ``items`` tokens from one generator (``open_stream``), against one
``execute`` per token from one caller.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from typing import Any

import trio

from benchmarks import _peers
from benchmarks._common import PAYLOAD
from pool import PoolConfig, open_pool

HANDLERS = ["bridge_worker.builtin", "benchmarks._shape_work"]
CHUNKSIZE = 64
WORKERS = 2


def run(items: int, rounds: int, mp_context: Any) -> dict[str, Any]:
    inputs = [dict(PAYLOAD, i=i) for i in range(items)]
    times: dict[str, list[float]] = {"pool": [], "mp.Pool.imap": [], "PPE.map": []}
    stream_rates: list[float] = []
    call_rates: list[float] = []
    identical = True

    async def main(ex: concurrent.futures.ProcessPoolExecutor, mp_pool: Any) -> None:
        nonlocal identical
        async with open_pool(PoolConfig(size=WORKERS, handlers=HANDLERS)) as pool:
            await pool.map("echo", inputs[:1000], chunksize=CHUNKSIZE)  # warm up
            for r in range(rounds):
                got: dict[str, list[Any]] = {}
                order = list(times)
                order = order[r % 3 :] + order[: r % 3]
                for peer in order:
                    t0 = time.perf_counter()
                    if peer == "pool":
                        got[peer] = await pool.map("echo", inputs, chunksize=CHUNKSIZE)
                    elif peer == "mp.Pool.imap":
                        got[peer] = await trio.to_thread.run_sync(
                            lambda: list(mp_pool.imap(_peers.echo, inputs, chunksize=CHUNKSIZE))
                        )
                    else:
                        got[peer] = await trio.to_thread.run_sync(
                            lambda: list(ex.map(_peers.echo, inputs, chunksize=CHUNKSIZE))
                        )
                    times[peer].append(time.perf_counter() - t0)
                identical = identical and got["pool"] == got["mp.Pool.imap"] == got["PPE.map"] == inputs
                t0 = time.perf_counter()
                async with pool.open_stream("tokens", items) as stream:
                    streamed = [t async for t in stream]
                stream_rates.append(items / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                called = [await pool.execute("token", i) for i in range(items // 10)]
                call_rates.append(items // 10 / (time.perf_counter() - t0))
                identical = identical and streamed[: items // 10] == called

    with concurrent.futures.ProcessPoolExecutor(max_workers=WORKERS, mp_context=mp_context) as ex:
        list(ex.map(_peers.echo, inputs[:1000], chunksize=CHUNKSIZE))
        with mp_context.Pool(WORKERS) as mp_pool:
            try:
                list(mp_pool.imap(_peers.echo, inputs[:1000], chunksize=CHUNKSIZE))
                trio.run(main, ex, mp_pool)
            finally:
                mp_pool.terminate()
                mp_pool.join()
    per_round = {
        peer: [times["pool"][r] and t / times["pool"][r] for r, t in enumerate(times[peer])] for peer in times
    }
    return {
        "items": items,
        "chunksize": CHUNKSIZE,
        "workers": WORKERS,
        "seconds": times,
        "vs_pool": {peer: statistics.median(ratios) for peer, ratios in per_round.items() if peer != "pool"},
        "stream_items_per_s": stream_rates,
        "one_call_each_items_per_s": call_rates,
        "identical": identical,
    }


def text(res: dict[str, Any]) -> str:
    med = {peer: statistics.median(ts) for peer, ts in res["seconds"].items()}
    rate = {peer: res["items"] / t for peer, t in med.items()}
    stream = statistics.median(res["stream_items_per_s"])
    calls = statistics.median(res["one_call_each_items_per_s"])
    same = "identical" if res["identical"] else "DIFFERENT: a bug"
    return "\n".join(
        [
            f"8. Call shapes, {res['workers']} workers: map of {res['items']:,} echo payloads, "
            f"chunksize {res['chunksize']} for every peer (medians of {len(res['seconds']['pool'])} rounds)",
            "  "
            + ", ".join(f"{peer} {rate[peer]:,.0f} items/s" for peer in res["seconds"])
            + f"; results {same}",
            "  pool advantage: "
            + ", ".join(f"{ratio:.2f}x {peer}" for peer, ratio in res["vs_pool"].items())
            + " (median of per-round ratios)",
            f"  a stream of {res['items']:,} tokens: {stream:,.0f} items/s; the same tokens one execute "
            f"each (1 caller): {calls:,.0f} items/s ({stream / calls:.1f}x)",
        ]
    )
