"""The circuit breaker state machine and its registry, driven with explicit ``now`` values."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from pool._breaker import (
    BreakerConfig,
    BreakerStatistics,
    CircuitBreaker,
    CircuitRegistry,
    CircuitState,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

Change = tuple[CircuitBreaker, CircuitState, CircuitState]


def recording_breaker(
    config: BreakerConfig = BreakerConfig(),
) -> tuple[CircuitBreaker, list[Change]]:
    changes: list[Change] = []
    breaker = CircuitBreaker(
        "svc", config, on_state_change=lambda b, old, new: changes.append((b, old, new))
    )
    return breaker, changes


def opened_at(now: float, config: BreakerConfig = BreakerConfig()) -> CircuitBreaker:
    breaker = CircuitBreaker("svc", config)
    for _ in range(config.failure_threshold):
        breaker.record_failure(now)
    assert breaker.state is OPEN
    return breaker


# -- configuration ------------------------------------------------------------------------------


def test_config_defaults_are_the_seeds() -> None:
    assert BreakerConfig() == BreakerConfig(
        failure_threshold=5, success_threshold=3, timeout=60.0, half_open_requests=3
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"failure_threshold": 0},
        {"success_threshold": 0},
        {"half_open_requests": 0},
        {"failure_threshold": 2.5},
        {"timeout": -1.0},
        {"timeout": float("nan")},
        {"timeout": "60"},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        BreakerConfig(**bad)  # type: ignore[arg-type]


def test_config_accepts_a_zero_timeout_and_evolves() -> None:
    config = attrs.evolve(BreakerConfig(), timeout=0)
    assert config.timeout == 0
    assert config.failure_threshold == 5


def test_state_is_a_string() -> None:
    breaker = opened_at(0.0)
    assert breaker.state == "open"
    assert CircuitState("half_open") is HALF_OPEN
    assert CLOSED == "closed"


# -- closed -------------------------------------------------------------------------------------


def test_closed_admits_and_opens_at_exactly_the_threshold() -> None:
    breaker, changes = recording_breaker(BreakerConfig(failure_threshold=3))
    assert breaker.allow(0.0)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state is CLOSED
    assert breaker.allow(2.5)
    assert changes == []
    breaker.record_failure(3.0)
    assert breaker.state is OPEN
    assert changes == [(breaker, CLOSED, OPEN)]
    stats = breaker.statistics()
    assert stats.last_failure == 3.0
    assert stats.last_state_change == 3.0
    assert stats.opened_count == 1
    assert stats.failure_count == 3


def test_success_while_closed_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=3))
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    breaker.record_success(3.0)
    assert breaker.statistics().failure_count == 0
    breaker.record_failure(4.0)
    breaker.record_failure(5.0)
    assert breaker.state is CLOSED
    breaker.record_failure(6.0)
    assert breaker.state is OPEN


def test_release_while_closed_changes_nothing() -> None:
    breaker = CircuitBreaker("svc")
    breaker.record_failure(1.0)
    before = breaker.statistics()
    breaker.release(2.0)
    assert breaker.statistics() == before


# -- open ---------------------------------------------------------------------------------------


def test_open_refuses_until_exactly_the_timeout_then_admits_as_half_open() -> None:
    breaker, changes = recording_breaker(BreakerConfig(failure_threshold=1, timeout=60.0))
    breaker.record_failure(10.0)
    assert not breaker.allow(10.0)
    assert not breaker.allow(69.999)
    assert breaker.state is OPEN
    assert breaker.statistics().rejected == 2
    assert breaker.allow(70.0)
    assert breaker.state is HALF_OPEN
    assert changes == [(breaker, CLOSED, OPEN), (breaker, OPEN, HALF_OPEN)]
    stats = breaker.statistics()
    assert stats.trials_in_flight == 1  # the admitting call is the first trial
    assert stats.last_state_change == 70.0
    assert stats.rejected == 2


def test_time_until_retry() -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=1, timeout=60.0))
    assert breaker.time_until_retry(5.0) == 0.0
    breaker.record_failure(10.0)
    assert breaker.time_until_retry(10.0) == 60.0
    assert breaker.time_until_retry(40.0) == 30.0
    assert breaker.time_until_retry(70.0) == 0.0
    assert breaker.time_until_retry(500.0) == 0.0  # still open (nobody asked), never negative
    assert breaker.allow(500.0)
    assert breaker.time_until_retry(500.0) == 0.0  # half-open


def test_late_success_while_open_is_ignored() -> None:
    breaker = opened_at(10.0)
    before = breaker.statistics()
    breaker.record_success(20.0)
    after = breaker.statistics()
    assert after.state is OPEN
    assert attrs.evolve(after, total_successes=before.total_successes) == before
    assert after.total_successes == before.total_successes + 1


def test_late_failure_while_open_extends_the_open_period() -> None:
    breaker, changes = recording_breaker(BreakerConfig(failure_threshold=1, timeout=60.0))
    breaker.record_failure(10.0)
    breaker.record_failure(30.0)
    assert breaker.statistics().last_failure == 30.0
    assert breaker.statistics().last_state_change == 10.0
    assert breaker.statistics().opened_count == 1
    assert breaker.time_until_retry(70.0) == 20.0
    assert not breaker.allow(70.0)
    assert breaker.allow(90.0)
    assert changes == [(breaker, CLOSED, OPEN), (breaker, OPEN, HALF_OPEN)]


def test_release_while_open_changes_nothing() -> None:
    breaker = opened_at(10.0)
    before = breaker.statistics()
    breaker.release(20.0)
    assert breaker.statistics() == before


# -- half_open ----------------------------------------------------------------------------------


def half_open_at(now: float, config: BreakerConfig) -> CircuitBreaker:
    """A breaker that opened at 0 and admitted its first trial at ``now`` (>= config.timeout)."""
    breaker = opened_at(0.0, config)
    assert breaker.allow(now)
    assert breaker.state is HALF_OPEN
    return breaker


def test_half_open_limits_trials_in_flight() -> None:
    breaker = half_open_at(60.0, BreakerConfig(half_open_requests=3))
    assert breaker.allow(61.0)
    assert breaker.allow(62.0)
    assert breaker.statistics().trials_in_flight == 3
    assert not breaker.allow(63.0)
    assert not breaker.allow(64.0)
    stats = breaker.statistics()
    assert stats.trials_in_flight == 3
    assert stats.rejected == 2
    assert stats.state is HALF_OPEN


def test_release_frees_a_trial_slot() -> None:
    breaker = half_open_at(60.0, BreakerConfig(half_open_requests=1))
    assert not breaker.allow(61.0)
    breaker.release(62.0)
    assert breaker.statistics().trials_in_flight == 0
    assert breaker.state is HALF_OPEN
    assert breaker.allow(63.0)
    assert breaker.statistics().trials_in_flight == 1


def test_release_never_drops_trials_below_zero() -> None:
    breaker = half_open_at(60.0, BreakerConfig(half_open_requests=2))
    breaker.release(61.0)
    breaker.release(62.0)  # a call admitted before the circuit opened, cancelled now
    assert breaker.statistics().trials_in_flight == 0
    assert breaker.allow(63.0)
    assert breaker.allow(64.0)
    assert not breaker.allow(65.0)


def test_success_threshold_successes_close_the_circuit() -> None:
    config = BreakerConfig(success_threshold=3, half_open_requests=3)
    breaker = half_open_at(60.0, config)
    changes: list[Change] = []
    breaker.on_state_change = lambda b, old, new: changes.append((b, old, new))
    assert breaker.allow(60.0)
    assert breaker.allow(60.0)
    breaker.record_success(61.0)
    breaker.record_success(62.0)
    stats = breaker.statistics()
    assert (stats.state, stats.success_count, stats.trials_in_flight) == (HALF_OPEN, 2, 1)
    assert changes == []
    breaker.record_success(63.0)
    assert changes == [(breaker, HALF_OPEN, CLOSED)]
    stats = breaker.statistics()
    assert (stats.state, stats.success_count, stats.trials_in_flight, stats.failure_count) == (
        CLOSED,
        0,
        0,
        0,
    )
    assert stats.last_state_change == 63.0
    assert breaker.allow(64.0)


def test_successes_free_slots_so_more_successes_than_slots_can_close() -> None:
    breaker = half_open_at(60.0, BreakerConfig(success_threshold=2, half_open_requests=1))
    assert not breaker.allow(60.0)
    breaker.record_success(61.0)
    assert breaker.state is HALF_OPEN
    assert breaker.allow(62.0)
    breaker.record_success(63.0)
    assert breaker.state is CLOSED


def test_one_failure_while_half_open_reopens_at_once() -> None:
    breaker = half_open_at(60.0, BreakerConfig(timeout=60.0, success_threshold=3))
    assert breaker.allow(60.0)
    breaker.record_success(61.0)
    changes: list[Change] = []
    breaker.on_state_change = lambda b, old, new: changes.append((b, old, new))
    breaker.record_failure(62.0)
    assert changes == [(breaker, HALF_OPEN, OPEN)]
    stats = breaker.statistics()
    assert stats.state is OPEN
    assert stats.trials_in_flight == 0
    assert stats.success_count == 0
    assert stats.opened_count == 2
    assert stats.last_failure == 62.0
    assert breaker.time_until_retry(62.0) == 60.0
    assert not breaker.allow(121.0)
    assert breaker.allow(122.0)


# -- reset, statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("half_open", [False, True])
def test_reset_closes_by_hand(half_open: bool) -> None:
    breaker = opened_at(0.0)
    if half_open:
        assert breaker.allow(60.0)
    changes: list[Change] = []
    breaker.on_state_change = lambda b, old, new: changes.append((b, old, new))
    breaker.reset(61.0)
    assert changes == [(breaker, HALF_OPEN if half_open else OPEN, CLOSED)]
    stats = breaker.statistics()
    assert (stats.state, stats.failure_count, stats.trials_in_flight) == (CLOSED, 0, 0)
    assert stats.last_state_change == 61.0
    assert stats.opened_count == 1  # history stays
    assert breaker.allow(61.0)


def test_reset_while_closed_forgets_failures_without_a_state_change() -> None:
    breaker, changes = recording_breaker(BreakerConfig(failure_threshold=2))
    breaker.record_failure(1.0)
    breaker.reset(2.0)
    assert breaker.statistics().failure_count == 0
    assert breaker.statistics().last_state_change is None
    breaker.record_failure(3.0)
    assert breaker.state is CLOSED
    assert changes == []


def test_statistics_snapshot() -> None:
    breaker = CircuitBreaker("db", BreakerConfig(failure_threshold=2, timeout=10.0))
    assert breaker.statistics() == BreakerStatistics(
        name="db",
        state=CLOSED,
        failure_count=0,
        success_count=0,
        trials_in_flight=0,
        opened_count=0,
        last_failure=None,
        last_state_change=None,
        total_failures=0,
        total_successes=0,
        rejected=0,
    )
    breaker.record_success(1.0)
    breaker.record_failure(2.0)
    breaker.record_failure(3.0)  # opens
    assert not breaker.allow(4.0)
    assert breaker.allow(13.0)  # half-open, trial 1
    assert breaker.allow(13.5)  # trial 2
    breaker.record_success(14.0)
    snapshot = breaker.statistics()
    assert snapshot == BreakerStatistics(
        name="db",
        state=HALF_OPEN,
        failure_count=0,
        success_count=1,
        trials_in_flight=1,
        opened_count=1,
        last_failure=3.0,
        last_state_change=13.0,
        total_failures=2,
        total_successes=2,
        rejected=1,
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.rejected = 0  # type: ignore[misc]
    breaker.record_failure(15.0)
    assert snapshot.state is HALF_OPEN  # a snapshot, not a view


def test_breakers_compare_by_identity() -> None:
    assert CircuitBreaker("a") != CircuitBreaker("a")


def test_zero_timeout_admits_a_trial_at_the_same_instant() -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=1, timeout=0.0))
    breaker.record_failure(5.0)
    assert breaker.state is OPEN
    assert breaker.allow(5.0)
    assert breaker.state is HALF_OPEN


# -- registry -----------------------------------------------------------------------------------


def test_registry_creates_on_first_use_with_its_config_or_an_override() -> None:
    default = BreakerConfig(failure_threshold=2)
    special = BreakerConfig(failure_threshold=7)
    registry = CircuitRegistry(default, overrides={"special": special})
    assert len(registry) == 0
    a = registry.get("a")
    assert registry.get("a") is a
    assert a.name == "a"
    assert a.config is default
    assert registry.get("special").config is special
    assert list(registry) == ["a", "special"]
    assert dict(registry.items()) == {"a": a, "special": registry.get("special")}
    assert registry.states() == {"a": CLOSED, "special": CLOSED}
    assert registry.statistics()["a"] == a.statistics()
    assert len(registry) == 2


def test_registry_all_closed_follows_every_transition() -> None:
    config = BreakerConfig(failure_threshold=1, success_threshold=1, timeout=10.0)
    changes: list[tuple[str, CircuitState, CircuitState]] = []
    registry = CircuitRegistry(
        config, on_state_change=lambda b, old, new: changes.append((b.name, old, new))
    )
    assert registry.all_closed()  # empty
    a, b = registry.get("a"), registry.get("b")
    assert registry.all_closed()
    a.record_failure(0.0)
    assert not registry.all_closed()
    b.record_failure(1.0)
    assert not registry.all_closed()
    assert a.allow(10.0)  # open -> half_open: still not closed
    assert not registry.all_closed()
    a.record_success(11.0)
    assert a.state is CLOSED
    assert not registry.all_closed()  # b is still open
    b.reset(12.0)
    assert registry.all_closed()
    assert changes == [
        ("a", CLOSED, OPEN),
        ("b", CLOSED, OPEN),
        ("a", OPEN, HALF_OPEN),
        ("a", HALF_OPEN, CLOSED),
        ("b", OPEN, CLOSED),
    ]
    assert registry.states() == {"a": CLOSED, "b": CLOSED}


def test_registry_count_survives_a_hook_that_raises() -> None:
    def explode(breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        raise RuntimeError("observer bug")

    registry = CircuitRegistry(BreakerConfig(failure_threshold=1), on_state_change=explode)
    breaker = registry.get("a")
    with pytest.raises(RuntimeError):
        breaker.record_failure(0.0)
    assert breaker.state is OPEN
    assert not registry.all_closed()


# -- properties ---------------------------------------------------------------------------------


class BreakerMachine(RuleBasedStateMachine):
    """Random operations, in the way a caller uses them, never leave a breaker inconsistent.

    Admitted calls go into a bundle and each reports at most one outcome; stale outcomes (from
    calls admitted before the circuit opened) happen naturally.
    """

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.observed: dict[str, CircuitState] = {}
        self.registry = CircuitRegistry(BreakerConfig(), on_state_change=self._observe)

    def _observe(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        assert old is not new
        assert self.observed[breaker.name] is old  # no change is missed or reported twice
        assert breaker.state is new  # reported once the breaker is consistent
        self.observed[breaker.name] = new

    @initialize(
        failure_threshold=st.integers(1, 4),
        success_threshold=st.integers(1, 4),
        timeout=st.sampled_from([0.0, 1.0, 5.0]),
        half_open_requests=st.integers(1, 3),
    )
    def configure(
        self,
        failure_threshold: int,
        success_threshold: int,
        timeout: float,
        half_open_requests: int,
    ) -> None:
        self.registry.config = BreakerConfig(
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            timeout=timeout,
            half_open_requests=half_open_requests,
        )
        for name in ("a", "b"):
            self.registry.get(name)
            self.observed[name] = CLOSED

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 5.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(target=calls, name=st.sampled_from(["a", "b"]))
    def allow(self, name: str) -> tuple[str, bool]:
        breaker = self.registry.get(name)
        was_open_and_due = breaker.state is OPEN and breaker.time_until_retry(self.now) == 0
        admitted = breaker.allow(self.now)
        if was_open_and_due:
            assert admitted and breaker.state is HALF_OPEN
        return name, admitted

    @rule(call=consumes(calls), outcome=st.sampled_from(["success", "failure", "release"]))
    def finish(self, call: tuple[str, bool], outcome: str) -> None:
        name, admitted = call
        if not admitted:
            return
        breaker = self.registry.get(name)
        if outcome == "success":
            breaker.record_success(self.now)
        elif outcome == "failure":
            breaker.record_failure(self.now)
        else:
            breaker.release(self.now)

    @rule(name=st.sampled_from(["a", "b"]))
    def reset(self, name: str) -> None:
        self.registry.get(name).reset(self.now)
        assert self.registry.get(name).state is CLOSED

    @invariant()
    def consistent(self) -> None:
        for name, breaker in self.registry.items():
            stats = breaker.statistics()
            config = breaker.config
            assert stats.state is self.observed.get(name, CLOSED)
            assert 0 <= stats.trials_in_flight <= config.half_open_requests
            assert 0 <= breaker.time_until_retry(self.now) <= config.timeout
            if stats.state is CLOSED:
                assert stats.trials_in_flight == 0
                assert stats.success_count == 0
                assert stats.failure_count < config.failure_threshold
            elif stats.state is OPEN:
                assert stats.trials_in_flight == 0
                assert stats.success_count == 0
                assert stats.last_failure is not None
                assert stats.opened_count >= 1
            else:
                assert stats.success_count < config.success_threshold
                assert stats.opened_count >= 1
        states = self.registry.states()
        assert self.registry.all_closed() == all(s is CLOSED for s in states.values())


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_breaker_state_machine = BreakerMachine.TestCase
