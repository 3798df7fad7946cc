"""myapp's commands: they run in the pool's workers (stdlib and msgpack only, no trio)."""

from typing import Any

from bridge_worker import Context, command


@command("predict", idempotent=True, caller_errors=(KeyError, TypeError))
def predict(args: Any, ctx: Context) -> str:
    return "greeting" if "hi" in args["text"] else "other"
