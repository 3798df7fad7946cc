"""Circuit breakers: a pure closed / open / half_open state machine, and a registry of named ones.

Pure in the sans-IO sense: every operation is given ``now`` (seconds on one monotonic clock, such as
``trio.current_time()``), and nothing here reads a clock, sleeps or runs the protected work. The
caller asks ``allow(now)`` before a call and reports how it ended with exactly one of
``record_success``, ``record_failure`` or ``release`` (no outcome: cancelled). Callers are never
serialized through the breaker (the seed's GenServer ran every call inside itself).

What each operation does in each state (the transitions are ``_TRANSITIONS`` below)::

    state      allow                        record_success          record_failure       release
    ---------  ---------------------------  ----------------------  -------------------  ---------
    closed     admit                        failures = 0            failures += 1;       -
                                                                    at failure_threshold
                                                                    -> open
    open       refuse until last_failure    ignored (a call from    last_failure = now   -
               + timeout; then -> half_open before it opened)       (extends the open
               and admit as the first trial                         period)
    half_open  admit while trials in        successes += 1, frees   -> open at once      frees a
               flight < half_open_requests  a trial; at                                  trial
                                            success_threshold
                                            -> closed

A late failure while open extends the open period, as the seed does: a call that was already
running when the circuit opened and then fails is fresh evidence that the dependency is still down,
so probing it again should wait a full ``timeout`` from then.

The breaker does not know which call holds which trial slot. A call admitted while closed can end
after the circuit went half-open; its outcome is then counted as a trial's (a success there is
recent evidence too), and the trial count never drops below zero.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Final, TypeAlias

import attrs
from attrs.validators import ge, instance_of


class CircuitState(str, enum.Enum):
    """A circuit's state; a ``str`` so that ``breaker.state == "open"`` holds."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Module-level aliases: an identity test against a global is the cheapest check on the hot path.
_CLOSED: Final = CircuitState.CLOSED
_OPEN: Final = CircuitState.OPEN
_HALF_OPEN: Final = CircuitState.HALF_OPEN


class _Event(enum.Enum):
    """What moves a circuit: the conditions the operations detect."""

    TRIP = enum.auto()  # failure_threshold consecutive failures while closed
    PROBE = enum.auto()  # a call asks after the open period has passed
    TRIAL_FAILED = enum.auto()  # any failure while half-open
    RECOVERED = enum.auto()  # success_threshold successes while half-open
    RESET = enum.auto()  # closed by hand
    FORCE = enum.auto()  # opened by hand (a recovery that chose to stop the command)


# (state, event) -> next state. A pair that is missing is a bug in this module, hence KeyError.
_TRANSITIONS: Final[dict[tuple[CircuitState, _Event], CircuitState]] = {
    (_CLOSED, _Event.TRIP): _OPEN,
    (_OPEN, _Event.PROBE): _HALF_OPEN,
    (_OPEN, _Event.RESET): _CLOSED,
    (_HALF_OPEN, _Event.TRIAL_FAILED): _OPEN,
    (_HALF_OPEN, _Event.RECOVERED): _CLOSED,
    (_HALF_OPEN, _Event.RESET): _CLOSED,
    (_CLOSED, _Event.FORCE): _OPEN,
    (_HALF_OPEN, _Event.FORCE): _OPEN,
}

_positive_int = [instance_of(int), ge(1)]


@attrs.frozen
class BreakerConfig:
    """When a circuit opens and closes; the defaults are the seed's."""

    #: consecutive failures while closed that open the circuit
    failure_threshold: int = attrs.field(default=5, validator=_positive_int)
    #: successes while half-open that close the circuit
    success_threshold: int = attrs.field(default=3, validator=_positive_int)
    #: seconds the circuit stays open after its last failure before it admits a trial call
    timeout: float = attrs.field(default=60.0, validator=[instance_of((int, float)), ge(0)])
    #: trial calls in flight at once while half-open
    half_open_requests: int = attrs.field(default=3, validator=_positive_int)


StateChangeHook: TypeAlias = Callable[["CircuitBreaker", CircuitState, CircuitState], None]


@attrs.frozen
class BreakerStatistics:
    """A snapshot of one breaker, taken by `CircuitBreaker.statistics`."""

    name: str
    state: CircuitState
    #: failures since the last success or since the circuit closed
    failure_count: int
    #: successes while half-open (toward success_threshold)
    success_count: int
    #: admitted half-open trials that have not ended yet
    trials_in_flight: int
    #: times the circuit opened (reopening from half-open included)
    opened_count: int
    last_failure: float | None
    last_state_change: float | None
    total_failures: int
    total_successes: int
    #: calls refused by `CircuitBreaker.allow`
    rejected: int


@attrs.define(eq=False)
class CircuitBreaker:
    """One named circuit. Compares by identity; `statistics` gives a frozen snapshot.

    ``on_state_change(breaker, old, new)`` is called synchronously after each change of state, once
    the breaker is consistent again; it must not block. A `CircuitRegistry` sets it on the breakers
    it creates.
    """

    name: str
    config: BreakerConfig = attrs.field(factory=BreakerConfig)
    on_state_change: StateChangeHook | None = attrs.field(default=None, kw_only=True)

    _state: CircuitState = attrs.field(default=_CLOSED, init=False)
    _failures: int = attrs.field(default=0, init=False)
    _successes: int = attrs.field(default=0, init=False)
    _trials: int = attrs.field(default=0, init=False)
    _opened_count: int = attrs.field(default=0, init=False)
    _last_failure: float | None = attrs.field(default=None, init=False)
    _last_state_change: float | None = attrs.field(default=None, init=False)
    _total_failures: int = attrs.field(default=0, init=False)
    _total_successes: int = attrs.field(default=0, init=False)
    _rejected: int = attrs.field(default=0, init=False)

    @property
    def state(self) -> CircuitState:
        return self._state

    def allow(self, now: float) -> bool:
        """Whether a call may start now. An admitted call must later report exactly one outcome."""
        if self._state is _CLOSED:
            return True
        if self._state is _OPEN:
            if now >= self._retry_at():
                self._move(_Event.PROBE, now)  # entering half_open admits this call as a trial
                return True
        elif self._trials < self.config.half_open_requests:
            self._trials += 1
            return True
        self._rejected += 1
        return False

    def record_success(self, now: float) -> None:
        """An admitted call succeeded."""
        self._total_successes += 1
        if self._state is _CLOSED:
            self._failures = 0
        elif self._state is _HALF_OPEN:
            self._failures = 0
            self._successes += 1
            self._free_trial()
            if self._successes >= self.config.success_threshold:
                self._move(_Event.RECOVERED, now)

    def record_failure(self, now: float) -> None:
        """An admitted call failed."""
        self._total_failures += 1
        self._failures += 1
        if self._state is _CLOSED:
            if self._failures >= self.config.failure_threshold:
                self._move(_Event.TRIP, now)
        elif self._state is _HALF_OPEN:
            self._move(_Event.TRIAL_FAILED, now)
        else:
            self._last_failure = now

    def release(self, now: float) -> None:
        """An admitted call ended with no outcome (it was cancelled): give back its trial slot."""
        if self._state is _HALF_OPEN:
            self._free_trial()

    def reset(self, now: float) -> None:
        """Close the circuit by hand and forget its counts (its totals stay)."""
        if self._state is _CLOSED:
            self._failures = 0
        else:
            self._move(_Event.RESET, now)

    def trip(self, now: float) -> None:
        """Open the circuit by hand now (an open one only starts its open period again)."""
        if self._state is _OPEN:
            self._last_failure = now
        else:
            self._move(_Event.FORCE, now)

    def time_until_retry(self, now: float) -> float:
        """Seconds until an open circuit admits a trial call; 0 when it is not open."""
        if self._state is not _OPEN:
            return 0.0
        return max(0.0, self._retry_at() - now)

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(
            name=self.name,
            state=self._state,
            failure_count=self._failures,
            success_count=self._successes,
            trials_in_flight=self._trials,
            opened_count=self._opened_count,
            last_failure=self._last_failure,
            last_state_change=self._last_state_change,
            total_failures=self._total_failures,
            total_successes=self._total_successes,
            rejected=self._rejected,
        )

    def _retry_at(self) -> float:
        # Only called while open, and opening always sets _last_failure.
        assert self._last_failure is not None
        return self._last_failure + self.config.timeout

    def _free_trial(self) -> None:
        if self._trials:
            self._trials -= 1

    def _move(self, event: _Event, now: float) -> None:
        old = self._state
        new = _TRANSITIONS[old, event]
        self._state = new
        self._last_state_change = now
        self._successes = 0
        if new is _OPEN:
            self._opened_count += 1
            self._last_failure = now
            self._trials = 0
        elif new is _HALF_OPEN:
            # The only way into half_open is admitting a call, which is the first trial.
            self._trials = 1
        else:
            self._failures = 0
            self._trials = 0
        if self.on_state_change is not None:
            self.on_state_change(self, old, new)


@attrs.define(eq=False)
class CircuitRegistry:
    """Named breakers, created on first use with ``config`` (or ``overrides[name]``).

    Sets each breaker's ``on_state_change`` to keep a count of circuits that are not closed, so
    `all_closed` is O(1), then forwards the change to its own ``on_state_change``.
    """

    config: BreakerConfig = attrs.field(factory=BreakerConfig)
    overrides: Mapping[str, BreakerConfig] = attrs.field(factory=dict, kw_only=True)
    on_state_change: StateChangeHook | None = attrs.field(default=None, kw_only=True)

    _breakers: dict[str, CircuitBreaker] = attrs.field(factory=dict, init=False)
    #: How many of its breakers are not closed (0: all closed; the hot path reads this). Read only.
    not_closed: int = attrs.field(default=0, init=False)

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(
                name,
                self.overrides.get(name, self.config),
                on_state_change=self._state_changed,
            )
            self._breakers[name] = breaker
        return breaker

    def __iter__(self) -> Iterator[str]:
        return iter(self._breakers)

    def __len__(self) -> int:
        return len(self._breakers)

    def items(self) -> Iterator[tuple[str, CircuitBreaker]]:
        return iter(self._breakers.items())

    def all_closed(self) -> bool:
        return self.not_closed == 0

    def states(self) -> dict[str, CircuitState]:
        return {name: breaker.state for name, breaker in self._breakers.items()}

    def statistics(self) -> dict[str, BreakerStatistics]:
        return {name: breaker.statistics() for name, breaker in self._breakers.items()}

    def _state_changed(
        self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState
    ) -> None:
        # Count first, so a forwarded hook that raises cannot leave the count wrong.
        if old is _CLOSED:
            self.not_closed += 1
        elif new is _CLOSED:
            self.not_closed -= 1
        if self.on_state_change is not None:
            self.on_state_change(breaker, old, new)
