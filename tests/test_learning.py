"""Recovery that learns: levels, strategy choice, the retry budget and adaptive attempt timeouts,
as pure objects with ``now`` passed in, then through a pool of fake workers on autojump_clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from fake_worker import fake_launcher
from pool import (
    AdaptiveConfig,
    BreakerConfig,
    CircuitOpenError,
    LearningConfig,
    PoolConfig,
    PoolTimeoutError,
    WorkerConnectionError,
    open_pool,
)
from pool._errors import Strategy
from pool._learning import AdaptiveTimeouts, BudgetConfig, RecoveryLearner, RetryBudget

SIG = "cmd:connection_error"


def fail(learner: RecoveryLearner, level: int, now: float, strategy: str = "retry") -> list[Any]:
    return learner.record(
        command="cmd", category="connection_error", level=level, strategy=strategy,
        succeeded=False, seconds=0.1, attempts=2, now=now,
    )


def succeed(learner: RecoveryLearner, level: int, now: float, strategy: str = "retry", seconds: float = 0.1) -> list[Any]:
    return learner.record(
        command="cmd", category="connection_error", level=level, strategy=strategy,
        succeeded=True, seconds=seconds, attempts=2, now=now,
    )


# ---------------------------------------------------------------- levels


def test_a_signature_climbs_after_failed_recoveries_and_falls_after_successes() -> None:
    learner = RecoveryLearner(LearningConfig(climb_after=2, fall_after=2, level_ttl=100))
    assert learner.level(SIG, 0)[0] == 1
    for level in (1, 2, 3, 4):
        assert fail(learner, level, 1.0) == []
        (change,) = fail(learner, level, 1.0)
        assert (change.old, change.new) == (level, level + 1)
    assert learner.level(SIG, 1.0)[0] == 5
    assert fail(learner, 5, 1.0) == [] and fail(learner, 5, 1.0) == []  # 5 is the top
    assert succeed(learner, 5, 2.0) == []
    (change,) = succeed(learner, 5, 2.0)
    assert (change.old, change.new) == (5, 4)
    assert learner.level(SIG, 2.0)[0] == 4


def test_a_quiet_signature_falls_one_level_per_ttl() -> None:
    learner = RecoveryLearner(LearningConfig(climb_after=1, level_ttl=10))
    for level in (1, 2, 3):
        fail(learner, level, 0.0)
    assert learner.level(SIG, 9.9)[0] == 4
    level, changes = learner.level(SIG, 25.0)  # 10 s after the last failure, then 10 s more
    assert level == 2 and [(c.old, c.new) for c in changes] == [(4, 3), (3, 2)]
    assert learner.level(SIG, 1000.0)[0] == 1


def test_max_level_caps_the_climb() -> None:
    learner = RecoveryLearner(LearningConfig(climb_after=1, max_level=2))
    fail(learner, 1, 0.0)
    assert fail(learner, 2, 0.0) == [] and learner.level(SIG, 0.0)[0] == 2


def test_an_outcome_at_a_level_the_signature_left_counts_for_nothing() -> None:
    learner = RecoveryLearner(LearningConfig(climb_after=1))
    fail(learner, 1, 0.0)  # -> level 2
    assert fail(learner, 1, 0.0) == []  # a slow call still recovering at level 1
    assert learner.level(SIG, 0.0)[0] == 2


# ---------------------------------------------------------------- strategy choice


def test_the_strategy_with_the_better_measured_success_is_chosen() -> None:
    learner = RecoveryLearner(LearningConfig(explore_every=1000))
    assert learner.choose(SIG, 1, Strategy.BACKOFF_RETRY, False, 0.0) == "retry"  # untried: the first
    for _ in range(3):
        fail(learner, 1, 0.0, "retry")
        learner = _reset_level(learner)
    succeed(learner, 1, 0.0, "failover")
    assert learner.choose(SIG, 1, Strategy.BACKOFF_RETRY, False, 0.0) == "failover"


def test_a_tie_goes_to_the_faster_recovery() -> None:
    learner = RecoveryLearner(LearningConfig(explore_every=1000))
    succeed(learner, 1, 0.0, "retry", seconds=0.5)
    succeed(learner, 1, 0.0, "failover", seconds=0.1)
    assert learner.choose(SIG, 1, Strategy.BACKOFF_RETRY, False, 0.0) == "failover"


def test_every_nth_choice_explores_the_strategy_tried_least() -> None:
    learner = RecoveryLearner(LearningConfig(explore_every=4, fall_after=1000))
    for _ in range(5):
        succeed(learner, 1, 0.0, "retry")
    choices = [learner.choose(SIG, 1, Strategy.BACKOFF_RETRY, False, 0.0) for _ in range(8)]
    assert choices == ["retry", "retry", "retry", "failover"] * 2


def test_the_matrix_limits_the_candidates() -> None:
    learner = RecoveryLearner()
    # python_error: the matrix says fail over, so "retry" (perhaps on the same worker) is out.
    assert learner.choose(SIG, 1, Strategy.FAILOVER, False, 0.0) == "failover"
    assert learner.choose(SIG, 2, Strategy.FAILOVER, False, 0.0) == "backoff_failover"
    # one failover per call: after it, only what stays on any worker
    assert learner.choose(SIG, 1, Strategy.BACKOFF_RETRY, True, 0.0) == "retry"
    assert learner.choose(SIG, 1, Strategy.FAILOVER, True, 0.0) is None
    assert learner.choose(SIG, 3, Strategy.BACKOFF_RETRY, True, 0.0) is None
    assert learner.choose(SIG, 5, Strategy.BACKOFF_RETRY, True, 0.0) == "circuit_open"


def _reset_level(learner: RecoveryLearner) -> RecoveryLearner:
    """Keep the scores, forget the level (a test of choice, not of levels)."""
    fresh = RecoveryLearner(learner.config)
    fresh.restore({"scores": learner.state()["scores"]}, 0.0)
    return fresh


def test_the_report_has_its_shape_and_a_bounded_history() -> None:
    learner = RecoveryLearner(LearningConfig(history=5))
    for i in range(8):
        succeed(learner, 1, float(i), "retry", seconds=0.2)
    fail(learner, 1, 9.0, "failover")
    report = learner.report(10.0)
    assert set(report) == {"levels", "strategies", "by_signature", "history"}
    assert report["levels"][SIG]["level"] == 1
    assert report["strategies"]["retry"] == {
        "attempts": 8, "succeeded": 8, "success_rate": 1.0, "mean_seconds": pytest.approx(0.2)
    }
    assert report["strategies"]["failover"]["success_rate"] == 0.0
    assert len(report["history"]) == 5 and report["history"][-1]["outcome"] == "failed"
    assert set(report["history"][0]) == {"time", "command", "category", "level", "strategy", "outcome", "seconds", "attempts"}


# ---------------------------------------------------------------- retry budget


def test_the_budget_allows_its_share_of_the_calls_plus_its_floor() -> None:
    budget = RetryBudget(BudgetConfig(ratio=0.2, floor_per_s=1.0, window=10.0), now=0.0)
    # 100 calls in the window: 0.2 x 100 + 1 x 10 = 30 retries
    for retries in range(30):
        assert budget.allows(5.0, 100, retries), retries
    assert not budget.allows(5.0, 100, 30)
    assert budget.refused == 1
    assert "retry budget refused" in budget.describe(5.0, 100, 30)


def test_the_budget_window_slides() -> None:
    budget = RetryBudget(BudgetConfig(ratio=0.0, floor_per_s=0.1, window=10.0), now=0.0)
    assert budget.allows(1.0, 0, 0) is True  # 0.1 x 10 = 1 retry a window
    assert not budget.allows(2.0, 0, 1)
    for t in range(3, 15):
        budget.note(float(t), 0, 1)
    assert budget.allows(15.0, 0, 1)  # the retry of t=1 left the window


# ---------------------------------------------------------------- adaptive attempt timeouts


def test_no_attempt_limit_before_warmup_then_a_percentile_times_a_factor() -> None:
    adaptive = AdaptiveTimeouts(AdaptiveConfig(factor=3.0, percentile=0.9, floor=0.05, warmup=10, samples=20))
    for i in range(9):
        adaptive.observe("cmd", 0.1)
        assert adaptive.limit("cmd") is None
    adaptive.observe("cmd", 0.2)
    assert adaptive.limit("cmd") == pytest.approx(0.3)  # 90th percentile of 10: 0.1, x 3
    for _ in range(20):
        adaptive.observe("cmd", 0.01)
    assert adaptive.limit("cmd") == pytest.approx(0.05)  # the old samples left; the floor holds
    capped = AdaptiveTimeouts(AdaptiveConfig(warmup=1, ceiling=1.0))
    capped.observe("cmd", 10.0)
    assert capped.limit("cmd") == 1.0


# ---------------------------------------------------------------- through a pool


FAST = PoolConfig(size=2, start_timeout=1.0)


async def test_a_crashing_command_climbs_every_level_then_opens_its_circuit(autojump_clock: trio.abc.Clock) -> None:
    events: list[Any] = []
    config = PoolConfig(
        size=2,
        learning=LearningConfig(climb_after=1, level_ttl=1000),
        event_callbacks=[events.append],
        retry_budget=None,
    )
    with trio.fail_after(2000):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            for _ in range(10):
                try:
                    await pool.execute("crash_idem", 1)
                except (WorkerConnectionError, CircuitOpenError):
                    pass
            report = pool.recovery_report()
            assert report["levels"]["crash_idem:connection_error"]["level"] == 5
            changes = [(e.data["from"], e.data["to"]) for e in events if e.kind == "recovery_level_changed"]
            assert changes[:4] == [(1, 2), (2, 3), (3, 4), (4, 5)]
            assert pool.statistics().circuits["crash_idem"] == "open"
            with pytest.raises(CircuitOpenError):
                await pool.execute("crash_idem", 1)
            used = [e["strategy"] for e in report["history"]]
            assert {"recycle", "restart_all"} <= set(used), used
            # Level 4 is a rolling restart (in the background): a new worker serves before an old
            # one leaves, and every worker is replaced.
            assert any(e.kind == "worker_started" and e.data["slot"] == 2 for e in events)  # a spare
            while not any(e.kind == "workers_restarted" for e in events):
                await trio.sleep(0.1)
            (roll,) = [e for e in events if e.kind == "workers_restarted"]
            assert roll.data["replaced"] == roll.data["workers"] == 2 and roll.data["stopped"] is None, roll
            assert await pool.execute("echo", 1) == 1  # other commands are not affected


async def test_levels_fall_back_when_recoveries_succeed_again(autojump_clock: trio.abc.Clock) -> None:
    events: list[Any] = []
    config = PoolConfig(
        size=2,
        learning=LearningConfig(climb_after=1, fall_after=1, level_ttl=1000),
        event_callbacks=[events.append],
        retry_budget=None,
    )
    with trio.fail_after(2000):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            launcher.flaky_failures = 100
            with pytest.raises(WorkerConnectionError):
                await pool.execute("flaky", 1)  # every attempt crashes: its recovery failed
            assert pool.recovery_report()["levels"]["flaky:connection_error"]["level"] == 2
            launcher.flaky_failures = 1
            assert await pool.execute("flaky", 2) == 2  # one crash, then recovered
            assert pool.recovery_report()["levels"]["flaky:connection_error"]["level"] == 1
            assert [(e.data["from"], e.data["to"]) for e in events if e.kind == "recovery_level_changed"] == [
                (1, 2), (2, 1)
            ]


async def test_no_level_ever_runs_a_non_idempotent_call_again(autojump_clock: trio.abc.Clock) -> None:
    config = PoolConfig(size=2, learning=LearningConfig(climb_after=1), retry_budget=None)
    with trio.fail_after(2000):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            for i in range(12):
                try:
                    await pool.execute("crash", 1)
                except (WorkerConnectionError, CircuitOpenError):
                    pass
            crashes = sum(1 for p in launcher.launched for r in p.requests if r.command == "crash")
            assert crashes <= 12  # one request per call at most: never run again
            assert pool.statistics().retries == 0 and pool.statistics().failovers == 0


async def test_the_retry_budget_refuses_retries_past_it_in_a_burst(autojump_clock: trio.abc.Clock) -> None:
    config = PoolConfig(
        size=2,
        retry_budget=0.1,
        retry_budget_floor=0.2,
        learning=LearningConfig(max_level=1),
        command_circuit=BreakerConfig(failure_threshold=1000),  # the budget alone limits it
    )
    refused = []
    with trio.fail_after(2000):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            launcher.flaky_failures = 10_000  # every attempt of "flaky" crashes its worker
            for _ in range(20):
                try:
                    await pool.execute("flaky", 1)
                except WorkerConnectionError as exc:
                    if "retry budget refused" in exc.message:
                        refused.append(exc)
            retries = pool.statistics().retries + pool.statistics().failovers
            # At most 0.1 x the calls so far + 0.2 x 10 s: 2 retries for the first call, one
            # more once 10 calls have started, one more at 20; every call ended refused.
            assert retries == 4, retries
            assert len(refused) == 20
            assert pool.recovery_report()["budget"]["refused"] == 20


async def test_adaptive_timeouts_kill_a_hung_attempt_long_before_the_deadline(autojump_clock: trio.abc.Clock) -> None:
    config = PoolConfig(
        size=2,
        timeout=60.0,
        attempt_timeout="adaptive",
        adaptive_timeouts=AdaptiveConfig(factor=3.0, warmup=20, floor=0.05),
    )
    with trio.fail_after(2000):
        async with fake_launcher() as launcher, open_pool(config, launcher=launcher) as pool:
            launcher.hang_next = 1
            with pytest.raises(PoolTimeoutError):  # before warm-up: only the deadline bounds it
                await pool.execute("sometimes_hang", 0.1, timeout=2.0)
            for _ in range(20):
                assert await pool.execute("sometimes_hang", 0.1) == 0.1
            assert pool.recovery_report()["attempt_timeouts"]["sometimes_hang"]["limit"] == pytest.approx(0.3)
            launcher.hang_next = 1
            t0 = trio.current_time()
            assert await pool.execute("sometimes_hang", 0.1) == 0.1  # killed at 0.3 s, retried
            assert trio.current_time() - t0 == pytest.approx(0.4)
            assert pool.statistics().retries == 1


async def test_what_was_learned_outlives_the_pool_in_a_recovery_store(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    store = str(tmp_path / "recovery.sqlite")
    config = PoolConfig(size=2, learning=LearningConfig(climb_after=1, level_ttl=10_000), recovery_store=store, retry_budget=None)
    with trio.fail_after(2000):
        async with fake_launcher() as launcher:
            async with open_pool(config, launcher=launcher) as pool:
                launcher.flaky_failures = 100
                with pytest.raises(WorkerConnectionError):
                    await pool.execute("flaky", 1)
                before = pool.recovery_report()
            async with open_pool(config, launcher=launcher) as pool:
                after = pool.recovery_report()
    assert after["levels"]["flaky:connection_error"]["level"] == before["levels"]["flaky:connection_error"]["level"] == 2
    assert after["strategies"] == before["strategies"]
    assert after["history"] == before["history"] and after["history"]
