"""``python -m bridge_worker --handlers MODULE[,MODULE]``: run one pool worker on stdin/stdout."""

import sys

from bridge_worker._loop import main

main(sys.argv[1:])
