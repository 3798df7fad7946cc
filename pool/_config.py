"""PoolConfig: every knob of a pool, frozen and validated; change it with ``attrs.evolve``."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Mapping

import attrs
from attrs.validators import ge, gt, instance_of, optional

from bridge_worker.protocol import DEFAULT_MAX_FRAME_SIZE
from pool._breaker import BreakerConfig
from pool._matrix import DEFAULT_POLICY, MatrixPolicy


def _handlers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    modules = tuple(value)
    for m in modules:
        if not isinstance(m, str) or not m or any(c in m for c in ", "):
            raise ValueError(f"handlers must be module paths like 'myapp.commands', got {m!r}")
    if not modules:
        raise ValueError("handlers must name at least one module, e.g. ['bridge_worker.builtin']")
    return modules


def _callbacks(value: Iterable[Callable[[Any], None]]) -> tuple[Callable[[Any], None], ...]:
    callbacks = tuple(value)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"event_callbacks must be callables, got {callback!r}")
    return callbacks


_ONE_HOUR: float | None = 3600.0


@attrs.frozen
class PoolConfig:
    """How a pool runs. Every field has a documented default (see the README's table).

    Times are in seconds, sizes in bytes.
    """

    #: Number of worker processes.
    size: int = attrs.field(default=4, validator=[instance_of(int), ge(1)])
    #: Modules each worker imports to register its commands (with the host's ``sys.path``).
    handlers: tuple[str, ...] = attrs.field(default=("bridge_worker.builtin",), converter=_handlers)
    #: A call's whole deadline (queueing, retries and backoff included) unless the call gives one.
    timeout: float = attrs.field(default=60.0, validator=gt(0))
    #: Optional limit for one attempt: a hung attempt is killed and retried inside the deadline.
    attempt_timeout: float | None = attrs.field(default=None, validator=optional(gt(0)))
    #: How long a worker may take from spawn to hello (handler imports and start hooks included).
    start_timeout: float = attrs.field(default=30.0, validator=gt(0))
    #: Callers allowed to wait for a worker; past it a call fails fast with PoolSaturatedError.
    max_queue: int = attrs.field(default=10_000, validator=ge(0))
    #: On close, how long running calls get to finish before their workers are killed.
    shutdown_grace: float = attrs.field(default=5.0, validator=ge(0))
    #: An idle worker is pinged after this long without traffic ...
    heartbeat_interval: float = attrs.field(default=5.0, validator=gt(0))
    #: ... and killed if it does not answer within this.
    heartbeat_timeout: float = attrs.field(default=5.0, validator=gt(0))
    #: RSS soft limit: a worker over it is recycled after its current call. None: no limit.
    max_worker_memory: int | None = attrs.field(default=None, validator=optional(gt(0)))
    #: RSS hard limit: a worker over it is killed at once (its call fails with a resource error).
    hard_worker_memory: int | None = attrs.field(default=None, validator=optional(gt(0)))
    #: How often worker memory is sampled when a limit is set.
    memory_check_interval: float = attrs.field(default=0.5, validator=gt(0))
    #: A worker is recycled after this many calls. None: never.
    max_calls_per_worker: int | None = attrs.field(default=None, validator=optional(ge(1)))
    #: Calls in flight per worker for commands declared ``pipelined`` (short, idempotent, no
    #: session): when every worker is busy, such a call is written behind the ones a worker is
    #: running instead of waiting in the queue, so one wake-up of the host reads several replies.
    #: 1 turns pipelining off.
    pipeline_depth: int = attrs.field(default=4, validator=[instance_of(int), ge(1)])
    #: Largest frame either side may send.
    max_frame_size: int = attrs.field(default=DEFAULT_MAX_FRAME_SIZE, validator=ge(1024))
    #: Lines of each worker's stderr kept for error messages (all of it also goes to logging).
    stderr_tail_lines: int = attrs.field(default=40, validator=ge(1))
    #: The pool circuit counts worker starts: ``failure_threshold`` consecutive failed starts (exit
    #: before hello, or no hello within ``start_timeout``) open it; while it is open and no worker
    #: is up, calls fail fast with the startup error instead of a restart storm; after ``timeout``
    #: one trial start runs, and a worker that says hello closes it.
    pool_circuit: BreakerConfig = attrs.field(
        default=BreakerConfig(failure_threshold=5, success_threshold=1, timeout=10.0, half_open_requests=1)
    )
    #: After a failed start, a slot waits this long before its next start, doubling with each
    #: failure in a row up to ``max_restart_delay`` (below the pool circuit, which stops starts
    #: altogether once ``pool_circuit.failure_threshold`` starts in a row have failed).
    restart_delay: float = attrs.field(default=0.05, validator=ge(0))
    max_restart_delay: float = attrs.field(default=2.0, validator=ge(0))
    #: The per-command circuits (the seed's defaults).
    command_circuit: BreakerConfig = attrs.field(default=BreakerConfig())
    #: The error matrix: categories, severities, strategies, retry caps and delays.
    policy: MatrixPolicy = attrs.field(default=DEFAULT_POLICY)
    #: Live sessions allowed at once; past it a new session's first call fails (ResourceError).
    max_sessions: int = attrs.field(default=10_000, validator=ge(1))
    #: Largest committed session state (msgpack-encoded); a call that would commit more fails
    #: with ResourceError and commits nothing.
    max_session_state: int = attrs.field(default=1 << 20, validator=ge(16))
    #: A session idle this long is forgotten (as by close_session). None: never.
    session_ttl: float | None = attrs.field(default=_ONE_HOUR, validator=optional(gt(0.0)))
    #: A worker whose calls fail this many times in a row (not caller mistakes) is recycled.
    recycle_after_failures: int = attrs.field(default=5, validator=ge(1))
    #: Per-command fallbacks, ``fallback(args, error) -> value``: when a call of that command
    #: finally fails (not by the caller's fault) or its circuit is open, the caller gets the
    #: fallback's value instead (graceful degradation, counted in statistics and events).
    fallbacks: Mapping[str, Callable[[Any, Any], Any]] = attrs.field(factory=dict)
    #: Python interpreter for workers.
    python: str = attrs.field(default=sys.executable)
    #: Extra environment variables for workers.
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Synchronous callbacks ``callback(event)`` for pool events; they must not block.
    event_callbacks: tuple[Callable[[Any], None], ...] = attrs.field(default=(), converter=_callbacks)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PoolConfig":
        """Build a config from plain values (e.g. parsed JSON/TOML); unknown keys are an error."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PoolConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def beat_timing(config: PoolConfig) -> tuple[float, float]:
    """``(beat, silence)`` for workers that send heartbeats on their own (over TCP, where a
    partition gives no end of stream): such a worker sends one every ``beat`` seconds, busy or
    not, carrying its RSS (so at least as often as memory is checked, when a limit is set); the
    pool ends a worker it has heard nothing from for ``silence`` = heartbeat_interval +
    heartbeat_timeout, and the worker gives up on a pool it has heard nothing from as long."""
    beat = min(config.heartbeat_interval, config.heartbeat_timeout) / 2
    if config.max_worker_memory is not None or config.hard_worker_memory is not None:
        beat = min(beat, config.memory_check_interval)
    return beat, config.heartbeat_interval + config.heartbeat_timeout
