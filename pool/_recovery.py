"""RecoveryOrchestrator: decides what happens after a failed attempt, and keeps the metrics.

The matrix (``PoolErrorHandler`` with the pool's policy) classifies; this module applies the pool's
own rules on top: caller mistakes and refusals are never retried, a call that may have run is
re-run only if its command is idempotent, failover happens once, and backoff delays pace only
systemic failures (from a call's second consecutive failure, or while a circuit is not closed).
"""

from __future__ import annotations

import enum
from collections import Counter

import attrs

from pool._errors import CircuitOpenError, PoolClosedError, PoolError, PoolSaturatedError, Strategy
from pool._matrix import PoolErrorHandler

_RETRYING = (Strategy.IMMEDIATE_RETRY, Strategy.BACKOFF_RETRY)
_REFUSALS = (PoolClosedError, PoolSaturatedError, CircuitOpenError)


class Action(enum.Enum):
    RETRY = "retry"
    FAILOVER = "failover"
    GIVE_UP = "give_up"


@attrs.frozen
class RecoveryStatistics:
    """Recoveries: a failed attempt the pool acted on (retry or failover), and how they ended."""

    initiated: int
    succeeded: int
    failed: int
    by_category: dict[str, int]
    by_strategy: dict[str, int]


class RecoveryOrchestrator:
    """Turns a classified failure into an action and a delay."""

    def __init__(self, handler: PoolErrorHandler) -> None:
        self.handler = handler
        self.initiated = 0
        self.succeeded = 0
        self.failed = 0
        self.by_category: Counter[str] = Counter()
        self.by_strategy: Counter[str] = Counter()

    def decide(
        self,
        err: PoolError,
        attempt: int,
        consecutive: int,
        idempotent: bool,
        failed_over: bool,
        circuits_closed: bool,
    ) -> tuple[Action, float]:
        """What to do after attempt number ``attempt`` failed with ``err``.

        ``consecutive`` counts this call's failures in a row (1 for its first); ``failed_over``
        says the call already used its one failover.
        """
        if err.caller_fault or isinstance(err, _REFUSALS):
            return Action.GIVE_UP, 0.0
        if err.may_have_run and not idempotent:
            return Action.GIVE_UP, 0.0
        strategy = err.recovery_strategy
        if strategy in _RETRYING and self.handler.should_retry(err, attempt):
            # One dead worker is not an outage: its call goes again at once. Delays pace repeated
            # failures of the same call, or any failure while a circuit says the trouble is wider.
            n = consecutive - 1 if circuits_closed else consecutive
            delay = self.handler.get_retry_delay(err, n) if n >= 1 else 0.0
            return Action.RETRY, delay
        if strategy is Strategy.FAILOVER and not failed_over and self.handler.should_retry(err, attempt):
            return Action.FAILOVER, 0.0
        return Action.GIVE_UP, 0.0

    def initiate(self, err: PoolError) -> None:
        self.initiated += 1
        self.by_category[str(err.category)] += 1
        self.by_strategy[str(err.recovery_strategy)] += 1

    def finish(self, succeeded: bool) -> None:
        if succeeded:
            self.succeeded += 1
        else:
            self.failed += 1

    def statistics(self) -> RecoveryStatistics:
        return RecoveryStatistics(
            initiated=self.initiated,
            succeeded=self.succeeded,
            failed=self.failed,
            by_category=dict(self.by_category),
            by_strategy=dict(self.by_strategy),
        )


def not_rerun_note(err: PoolError) -> None:
    """Say plainly, on an error the pool did not retry because its command is not idempotent,
    that the command may or may not have run."""
    err.message += (
        " The command is not idempotent, so the pool did not run it again: it may or may not "
        "have run. Check its effects before calling it again."
    )
