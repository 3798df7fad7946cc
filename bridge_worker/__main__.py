"""``python -m bridge_worker --handlers MODULE[,MODULE]``: run one pool worker on stdin/stdout;
with ``--connect HOST:PORT`` (and the token in BRIDGE_WORKER_TOKEN), dial the pool over TCP."""

import sys

from bridge_worker._loop import main

main(sys.argv[1:])
