"""A handlers module whose import fails while the file named by $CHAOS_MARKER exists: a pool opens
fine, then every restart fails (a crash loop), until the file is removed."""

from __future__ import annotations

import os

from bridge_worker import Context, command

_marker = os.environ.get("CHAOS_MARKER")
if _marker and os.path.exists(_marker):
    raise RuntimeError(f"crash loop on purpose: marker file {_marker} exists")


@command("marker_ok", idempotent=True)
def marker_ok(args: object, ctx: Context) -> str:
    return "ok"
