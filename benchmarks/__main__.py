"""``python -m benchmarks``: the pool beside its peers, every figure measured in the same run.

    python -m benchmarks [--quick | --full] [--rounds N] [--seconds S] [--json FILE] [--plot FILE.png]
                         [--only echo,startup,recovery,kill,orphans,memory,cpu,shapes,learning,elastic,channels]
                         [--mp-context METHOD]

Peers: ProcessPoolExecutor, multiprocessing.Pool, trio-parallel (skipped with a note if missing),
and a floor (raw trio + msgpack over pipes, see ``_floor``). Sections:

1. echo of a small dict, 2 and 4 workers, 1/16/64 callers: calls/s, sequential latency, host CPU;
2. startup of 1/4/8 workers;
3. pool recovery: SIGKILL to replacement, a call killed mid-flight, throughput under kills;
4. one SIGKILLed worker, every peer: what happens to the calls; and orphans of a SIGKILLed parent;
5. memory: idle worker RSS/USS per peer, pool host RSS after 10k (and 200k, --full) calls;
6. the pool's per-call overhead over the floor;
7. CPU-bound work: the pool and ProcessPoolExecutor compiling the same files;
8. shapes: map beside multiprocessing.Pool.imap and ProcessPoolExecutor.map, and a stream;
9. recovery that learns: the retry budget in a kill storm and on a poison input, adaptive timeouts;
10. elastic pools: calls/s during a rolling restart against calm, time to scale from 1 to 8 workers;
11. channels: the pool's echo over pipes and over TCP loopback, and Ray's actor calls as a peer
    (Ray only in a loopback-only network namespace: see ``_channels``).

Measurements are interleaved: each round runs every peer once (rotating the order), and tables
report the median over rounds and the median of per-round ratios. ``--quick`` is a CI smoke run
(well under a minute): it checks that everything runs, its figures mean little. Nothing here
asserts a speed. Every process started is cleaned up (workers of killed parents by pid).
"""

# Everything lives in _cli, imported only when run as a program: spawn-based peers (trio-parallel,
# ProcessPoolExecutor with spawn) re-import the main module in every worker they start, and their
# workers should not pay for importing trio, the pool and the drivers.
if __name__ == "__main__":
    import sys

    from benchmarks._cli import main

    sys.exit(main())
