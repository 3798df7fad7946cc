"""A handlers module that cannot be imported: used to test startup failure reporting."""

import sys

sys.stderr.write("handlers_broken: about to fail on purpose\n")
import no_such_module_for_pool_tests  # noqa: E402,F401
