"""Recovery that learns (seeds 002 and 003): escalation levels, strategy choice by measured success,
a retry budget, adaptive attempt timeouts, and the recovery history. Pure: every method takes ``now``.

**Signatures and levels.** A failure's signature is its command and category. Each signature has a
level, from 1 to 5, that says how far the pool goes to recover a call that failed with it:

====  =====================================  ========================================
level what the pool does                     strategies it chooses among
====  =====================================  ========================================
1     run it again at once                   ``retry`` (any worker), ``failover`` (another)
2     run it again after the matrix's delay  ``backoff_retry``, ``backoff_failover``
3     fail over and recycle the worker       ``recycle``
4     fail over and replace every worker     ``restart_all`` (a rolling restart: no dip)
5     open the command's circuit             ``circuit_open`` (the fallback serves, if any)
====  =====================================  ========================================

The matrix still decides what is allowed: a caller's mistake is never retried, a call that may have
run is run again only if its command is idempotent, the number of attempts is the matrix's, and a
failover happens once per call (a strategy that would fail over again is not a candidate; the
``failover`` strategies are the only candidates where the matrix says ``failover``). A signature
climbs one level after ``climb_after`` recoveries in a row failed at its level, and falls one level
after ``fall_after`` recoveries in a row succeeded, or after ``level_ttl`` seconds without a failed
recovery. Every change is returned to the caller, which makes it an event and a log line.

**Strategy choice.** Among a level's candidates, the one with the best success rate wins, counted
per (signature, strategy) and smoothed (``(succeeded + 1) / (attempts + 2)``, so an untried strategy
starts at one half), ties going to the one that recovered faster on average, then to the first
listed. Every ``explore_every``-th choice for a signature takes the candidate tried least instead, so
a strategy that once failed can earn its way back. Deterministic: no randomness, so tests script the
outcomes and assert the choices.

**Retry budget** (the Finagle and Envoy idea). Retries, failovers included, may be at most ``ratio``
of the calls started over a sliding window (at most ``window`` seconds), plus ``floor_per_s`` per
second of it: under a burst of failures the calls past the budget fail with their own error instead
of multiplying the load.

**Adaptive attempt timeouts.** A command's attempt limit follows its observed latency: ``factor``
times the ``percentile`` of its last ``samples`` successful attempts, kept between ``floor`` and
``ceiling``. Before ``warmup`` samples there is no attempt limit: only the call's deadline.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

import attrs

from pool._errors import Strategy

LEVELS = (1, 2, 3, 4, 5)
#: The strategies of each level, in the order ties are broken.
CANDIDATES: dict[int, tuple[str, ...]] = {
    1: ("retry", "failover"),
    2: ("backoff_retry", "backoff_failover"),
    3: ("recycle",),
    4: ("restart_all",),
    5: ("circuit_open",),
}
#: What each strategy does: (runs on another worker, waits the matrix's delay).
SHAPE: dict[str, tuple[bool, bool]] = {
    "retry": (False, False),
    "failover": (True, False),
    "backoff_retry": (False, True),
    "backoff_failover": (True, True),
    "recycle": (True, False),
    "restart_all": (True, False),
    "circuit_open": (False, False),
}


@attrs.frozen
class LearningConfig:
    """The knobs of recovery that learns (``PoolConfig.learning``); see the module docstring."""

    climb_after: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    fall_after: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    level_ttl: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    explore_every: int = attrs.field(default=10, validator=attrs.validators.ge(2))
    history: int = attrs.field(default=200, validator=attrs.validators.ge(1))
    #: The highest level the pool may reach (5: up to opening the command's circuit).
    max_level: int = attrs.field(default=5, validator=attrs.validators.in_(LEVELS))


@attrs.define
class _Signature:
    level: int = 1
    since: float = 0.0  # when it reached this level
    last_failure: float = -math.inf  # the last failed recovery
    failed_in_row: int = 0
    succeeded_in_row: int = 0
    choices: int = 0


@attrs.define
class _Score:
    attempts: int = 0
    succeeded: int = 0
    seconds: float = 0.0  # summed over the successes


@attrs.frozen
class LevelChange:
    """A signature moved to another level."""

    signature: str
    old: int
    new: int
    reason: str


class RecoveryLearner:
    """Levels, strategy scores and history of every signature seen."""

    def __init__(self, config: LearningConfig | None = None) -> None:
        self.config = config or LearningConfig()
        self._signatures: dict[str, _Signature] = {}
        self._scores: dict[tuple[str, str], _Score] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=self.config.history)

    @staticmethod
    def signature(command: str, category: str) -> str:
        return f"{command}:{category}"

    def level(self, signature: str, now: float) -> tuple[int, list[LevelChange]]:
        """The signature's level now (after any fall its quiet time earned)."""
        sig = self._signatures.get(signature)
        if sig is None:
            return 1, []
        changes: list[LevelChange] = []
        ttl = self.config.level_ttl
        while sig.level > 1 and now - max(sig.since, sig.last_failure) >= ttl:
            since = max(sig.since, sig.last_failure) + ttl
            changes.append(self._move(signature, sig, sig.level - 1, since, f"no failed recovery for {ttl:g}s"))
        return sig.level, changes

    def choose(
        self, signature: str, level: int, matrix: Strategy, failed_over: bool, now: float
    ) -> str | None:
        """The strategy for a recovery at ``level``, or None if the matrix allows none of the
        level's candidates (then the call gives up)."""
        candidates = [c for c in CANDIDATES[level] if self._allowed(c, matrix, failed_over)]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        sig = self._signatures.setdefault(signature, _Signature(since=now))
        sig.choices += 1
        if sig.choices % self.config.explore_every == 0:  # explore: the one tried least
            return min(candidates, key=lambda c: self._score(signature, c).attempts)
        return max(candidates, key=lambda c: self._rank(signature, c, candidates))

    @staticmethod
    def _allowed(candidate: str, matrix: Strategy, failed_over: bool) -> bool:
        if candidate == "circuit_open":
            return True
        other_worker = SHAPE[candidate][0]
        if other_worker and failed_over:
            return False  # one failover per call
        if matrix is Strategy.FAILOVER:
            return other_worker
        return True

    def _rank(self, signature: str, candidate: str, candidates: list[str]) -> tuple[float, float, int]:
        score = self._score(signature, candidate)
        rate = (score.succeeded + 1) / (score.attempts + 2)
        mean = score.seconds / score.succeeded if score.succeeded else math.inf
        return rate, -mean, -candidates.index(candidate)

    def _score(self, signature: str, strategy: str) -> _Score:
        return self._scores.setdefault((signature, strategy), _Score())

    def record(
        self,
        *,
        command: str,
        category: str,
        level: int,
        strategy: str,
        succeeded: bool,
        seconds: float,
        attempts: int,
        now: float,
    ) -> list[LevelChange]:
        """A call whose recovery started with ``strategy`` at ``level`` ended. Returns the level
        changes it caused."""
        signature = self.signature(command, category)
        score = self._score(signature, strategy)
        score.attempts += 1
        if succeeded:
            score.succeeded += 1
            score.seconds += seconds
        self.history.append(
            {
                "time": now,
                "command": command,
                "category": category,
                "level": level,
                "strategy": strategy,
                "outcome": "succeeded" if succeeded else "failed",
                "seconds": round(seconds, 6),
                "attempts": attempts,
            }
        )
        sig = self._signatures.setdefault(signature, _Signature(since=now))
        if sig.level != level:
            return []  # it moved meanwhile (another call's recovery): this one counts no more
        if succeeded:
            sig.failed_in_row = 0
            sig.succeeded_in_row += 1
            if sig.succeeded_in_row >= self.config.fall_after and sig.level > 1:
                return [self._move(signature, sig, sig.level - 1, now, f"{sig.succeeded_in_row} recoveries in a row succeeded")]
            return []
        sig.last_failure = now
        sig.succeeded_in_row = 0
        sig.failed_in_row += 1
        if sig.failed_in_row >= self.config.climb_after and sig.level < self.config.max_level:
            return [self._move(signature, sig, sig.level + 1, now, f"{sig.failed_in_row} recoveries in a row failed")]
        return []

    def _move(self, signature: str, sig: _Signature, new: int, now: float, reason: str) -> LevelChange:
        change = LevelChange(signature, sig.level, new, reason)
        sig.level = new
        sig.since = now
        sig.failed_in_row = sig.succeeded_in_row = 0
        return change

    def report(self, now: float) -> dict[str, Any]:
        """``{"levels": ..., "strategies": ..., "history": [...]}`` (see ``Pool.recovery_report``)."""
        levels = {}
        for signature in self._signatures:
            level, _ = self.level(signature, now)
            sig = self._signatures[signature]
            levels[signature] = {
                "level": level,
                "since": sig.since,
                "failed_in_row": sig.failed_in_row,
                "succeeded_in_row": sig.succeeded_in_row,
            }
        totals: dict[str, _Score] = {}
        for (_, strategy), score in self._scores.items():
            total = totals.setdefault(strategy, _Score())
            total.attempts += score.attempts
            total.succeeded += score.succeeded
            total.seconds += score.seconds
        strategies = {
            name: {
                "attempts": s.attempts,
                "succeeded": s.succeeded,
                "success_rate": s.succeeded / s.attempts if s.attempts else None,
                "mean_seconds": s.seconds / s.succeeded if s.succeeded else None,
            }
            for name, s in sorted(totals.items())
        }
        by_signature = {
            f"{signature}/{strategy}": {
                "attempts": s.attempts,
                "succeeded": s.succeeded,
                "success_rate": s.succeeded / s.attempts if s.attempts else None,
                "mean_seconds": s.seconds / s.succeeded if s.succeeded else None,
            }
            for (signature, strategy), s in sorted(self._scores.items())
        }
        return {"levels": levels, "strategies": strategies, "by_signature": by_signature, "history": list(self.history)}

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict[str, Any]:
        """What a recovery store keeps across restarts of the application."""
        return {
            "levels": {k: [v.level, v.failed_in_row, v.succeeded_in_row] for k, v in self._signatures.items()},
            "scores": [[sig, strat, s.attempts, s.succeeded, s.seconds] for (sig, strat), s in self._scores.items()],
            "history": list(self.history),
        }

    def restore(self, state: dict[str, Any], now: float) -> None:
        for signature, (level, failed, succeeded) in state.get("levels", {}).items():
            self._signatures[signature] = _Signature(
                level=int(level), since=now, failed_in_row=int(failed), succeeded_in_row=int(succeeded)
            )
        for sig, strat, attempts, succeeded, seconds in state.get("scores", []):
            self._scores[(sig, strat)] = _Score(int(attempts), int(succeeded), float(seconds))
        self.history.extend(state.get("history", []))


@attrs.frozen
class BudgetConfig:
    """``PoolConfig.retry_budget``'s shape: see RetryBudget."""

    ratio: float = attrs.field(default=0.2, validator=attrs.validators.ge(0))
    floor_per_s: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    window: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))


class RetryBudget:
    """Retries (failovers included) at most ``ratio`` x the calls started over the last
    ``window`` seconds, plus ``floor_per_s`` x ``window`` (so a quiet pool can still retry a few).

    It reads the pool's running totals (calls started, retries made) and keeps snapshots of them
    (at most one a second), so the hot path pays nothing for it."""

    def __init__(self, config: BudgetConfig, now: float) -> None:
        self.config = config
        # (time, calls, retries): the totals when the pool started, then at most one a second.
        self._snapshots: deque[tuple[float, int, int]] = deque([(now, 0, 0)])
        self.refused = 0

    def note(self, now: float, calls: int, retries: int) -> None:
        """Remember the totals now (called by the monitor, and when a retry is asked for)."""
        snaps = self._snapshots
        if not snaps or now - snaps[-1][0] >= 1.0:
            snaps.append((now, calls, retries))
        while len(snaps) > 1 and snaps[1][0] <= now - self.config.window:
            snaps.popleft()

    def allows(self, now: float, calls: int, retries: int) -> bool:
        """Whether one more retry fits (the totals include every call and retry so far)."""
        self.note(now, calls, retries)
        _, calls0, retries0 = self._snapshots[0]
        allowed = self.config.ratio * (calls - calls0) + self.config.floor_per_s * self.config.window
        if retries - retries0 + 1 <= allowed:
            return True
        self.refused += 1
        return False

    def describe(self, now: float, calls: int, retries: int) -> str:
        t0, calls0, retries0 = self._snapshots[0]
        return (
            f"the retry budget refused it: {retries - retries0} retries for {calls - calls0} calls "
            f"in the last {min(now - t0, self.config.window):.1f}s (PoolConfig.retry_budget: at most "
            f"{self.config.ratio:g} of the calls, plus {self.config.floor_per_s:g} a second of the "
            f"{self.config.window:g}s window)"
        )


@attrs.frozen
class AdaptiveConfig:
    """``PoolConfig(attempt_timeout="adaptive")``'s rule: see AdaptiveTimeouts."""

    factor: float = attrs.field(default=3.0, validator=attrs.validators.gt(1))
    percentile: float = attrs.field(default=0.99, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    floor: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))
    ceiling: float | None = attrs.field(default=None)
    warmup: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    samples: int = attrs.field(default=200, validator=attrs.validators.ge(1))


class AdaptiveTimeouts:
    """Per command: the attempt limit from its observed latency (see the module docstring)."""

    def __init__(self, config: AdaptiveConfig) -> None:
        self.config = config
        self._samples: dict[str, deque[float]] = {}
        self._sorted: dict[str, list[float]] = {}
        self._limits: dict[str, float] = {}

    def observe(self, command: str, seconds: float) -> None:
        """A successful attempt of ``command`` took ``seconds``."""
        window = self._samples.get(command)
        if window is None:
            window = self._samples[command] = deque()
            self._sorted[command] = []
        ordered = self._sorted[command]
        if len(window) == self.config.samples:
            old = window.popleft()
            del ordered[bisect.bisect_left(ordered, old)]
        window.append(seconds)
        bisect.insort(ordered, seconds)
        if len(ordered) >= self.config.warmup:
            rank = min(len(ordered) - 1, math.ceil(self.config.percentile * len(ordered)) - 1)
            limit = max(self.config.floor, self.config.factor * ordered[rank])
            if self.config.ceiling is not None:
                limit = min(limit, self.config.ceiling)
            self._limits[command] = limit

    def limit(self, command: str) -> float | None:
        """The attempt limit of ``command`` in seconds, or None while it warms up."""
        return self._limits.get(command)

    def report(self) -> dict[str, Any]:
        return {
            command: {"samples": len(self._samples[command]), "limit": self._limits.get(command)}
            for command in self._samples
        }



class RecoveryStore:
    """Keeps what a RecoveryLearner learned in a sqlite3 file across restarts of the application
    (``PoolConfig.recovery_store``), as seed 002 keeps its scores in a database. One row per
    signature's level, per (signature, strategy) score, and per history entry (the last
    ``history`` of them)."""

    def __init__(self, path: str) -> None:
        import sqlite3  # only when a store is configured

        self._db = sqlite3.connect(path)
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS levels (signature TEXT PRIMARY KEY, level INTEGER, "
                "failed_in_row INTEGER, succeeded_in_row INTEGER)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (signature TEXT, strategy TEXT, attempts INTEGER, "
                "succeeded INTEGER, seconds REAL, PRIMARY KEY (signature, strategy))"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS history (entry TEXT)")

    def load(self, learner: RecoveryLearner, now: float) -> None:
        import json

        state = {
            "levels": {row[0]: list(row[1:]) for row in self._db.execute("SELECT * FROM levels")},
            "scores": [list(row) for row in self._db.execute("SELECT * FROM scores")],
            "history": [json.loads(row[0]) for row in self._db.execute("SELECT entry FROM history ORDER BY rowid")],
        }
        learner.restore(state, now)

    def save(self, learner: RecoveryLearner) -> None:
        import json

        state = learner.state()
        with self._db:
            self._db.execute("DELETE FROM levels")
            self._db.executemany(
                "INSERT INTO levels VALUES (?, ?, ?, ?)", [(k, *v) for k, v in state["levels"].items()]
            )
            self._db.execute("DELETE FROM scores")
            self._db.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?)", state["scores"])
            self._db.execute("DELETE FROM history")
            self._db.executemany("INSERT INTO history VALUES (?)", [(json.dumps(e),) for e in state["history"]])

    def close(self) -> None:
        self._db.close()
