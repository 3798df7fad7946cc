"""A handlers module that registers a command and then fails to import: a worker process that
imports it is gone with what it registered, and an in-process worker must be too."""

from __future__ import annotations

from typing import Any

from bridge_worker import Context, command


@command("kit_half_registered")
def kit_half_registered(args: Any, ctx: Context) -> None:
    return None


raise RuntimeError("handlers_kit_broken fails on purpose, after registering a command")
