"""PoolConfig: every knob of a pool, frozen and validated; change it with ``attrs.evolve``."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Literal, Mapping

import attrs
from attrs.validators import ge, gt, instance_of, lt, optional

from bridge_worker.protocol import DEFAULT_MAX_FRAME_SIZE
from pool._breaker import BreakerConfig
from pool._learning import AdaptiveConfig, LearningConfig
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


def _at_least_size(instance: Any, attribute: Any, value: int | None) -> None:
    # (attrs runs validators once every field is set, so ``size`` is there.)
    if value is not None and value < instance.size:
        raise ValueError(
            f"max_size ({value}) must be at least size ({instance.size}): the autoscaler keeps "
            "the pool between size (the fewest workers) and max_size (the most)"
        )


_ONE_HOUR: float | None = 3600.0
# Finagle's default: a burst of failures costs at most a fifth more calls, and steady failures
# of one in five calls are still all retried.
_TWENTY_PERCENT: float | None = 0.2


def _attempt_timeout(_: Any, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if value is None or value == "adaptive":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"attempt_timeout must be seconds above 0, \"adaptive\" or None, got {value!r}")


@attrs.frozen
class PoolConfig:
    """How a pool runs. Every field has a documented default (see the README's table).

    Times are in seconds, sizes in bytes.
    """

    #: Number of worker processes at first, and the fewest the autoscaler shrinks to.
    size: int = attrs.field(default=4, validator=[instance_of(int), ge(1)])
    #: The most workers the autoscaler grows the pool to; None (or ``size``): no autoscaling, the
    #: pool keeps its size unless ``resize`` changes it. See ``pool._elastic`` for the rule.
    max_size: int | None = attrs.field(
        default=None, validator=optional([instance_of(int), ge(1), _at_least_size])
    )
    #: The autoscaler grows the pool while the oldest call waiting for a worker has waited
    #: longer than this; two changes of size are at least this far apart.
    scale_up_after: float = attrs.field(default=0.05, validator=gt(0))
    #: The autoscaler shrinks the pool by one worker once a worker has been idle this long (and
    #: the pool has not grown for as long).
    scale_down_after: float = attrs.field(default=30.0, validator=gt(0))
    #: Modules each worker imports to register its commands (with the host's ``sys.path``).
    handlers: tuple[str, ...] = attrs.field(default=("bridge_worker.builtin",), converter=_handlers)
    #: A call's whole deadline (queueing, retries and backoff included) unless the call gives one.
    timeout: float = attrs.field(default=60.0, validator=gt(0))
    #: Optional limit for one attempt: a hung attempt is killed and retried inside the deadline.
    #: ``"adaptive"``: each command's limit follows its observed latency (``adaptive_timeouts``).
    attempt_timeout: float | Literal["adaptive"] | None = attrs.field(default=None, validator=_attempt_timeout)
    #: The rule of ``attempt_timeout="adaptive"`` (a percentile of recent successful attempts
    #: times a factor, between a floor and a ceiling; no limit until enough samples).
    adaptive_timeouts: AdaptiveConfig = attrs.field(factory=AdaptiveConfig)
    #: Retries (failovers included) at most this fraction of the calls started over the last
    #: ``retry_budget_window`` seconds, plus ``retry_budget_floor`` a second; None: no budget.
    retry_budget: float | None = attrs.field(default=_TWENTY_PERCENT, validator=optional(ge(0.0)))
    retry_budget_floor: float = attrs.field(default=1.0, validator=ge(0.0))
    retry_budget_window: float = attrs.field(default=10.0, validator=gt(0))
    #: Escalation levels and strategy choice (see ``pool._learning``).
    learning: LearningConfig = attrs.field(factory=LearningConfig)
    #: A sqlite3 file that keeps the learned levels, scores and history across restarts of the
    #: application. None: in memory only.
    recovery_store: str | None = attrs.field(default=None, validator=optional(instance_of(str)))
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
    #: A worker is recycled (after its call) once it has served about this long. None: never.
    max_worker_age: float | None = attrs.field(default=None, validator=optional(gt(0)))
    #: Each worker's age limit is ``max_worker_age`` less a random part of up to this fraction
    #: of it, drawn when it starts, so workers started together are not recycled together.
    worker_age_jitter: float = attrs.field(default=0.1, validator=[ge(0), lt(1)])
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
    #: Record what the metrics (``pool.ops``) need at the moment of a call: call durations and
    #: outcomes per command, queue waits, worker start times. False saves that cost per call
    #: (well under a microsecond; see the README's Operations), and ``/metrics`` then leaves
    #: those families out; the pool's counters are exported either way.
    metrics: bool = attrs.field(default=True, validator=instance_of(bool))

    @property
    def autoscaling(self) -> bool:
        """Whether the autoscaler runs: ``max_size`` is above ``size``."""
        return self.max_size is not None and self.max_size > self.size

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
