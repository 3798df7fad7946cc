"""Retry schedules (exact values) and the retry / circuit_breaker decorators on a virtual clock."""

from __future__ import annotations

import random
from itertools import islice

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import MockClock

from pool._breaker import BreakerConfig, CircuitBreaker, CircuitState
from pool._errors import CircuitOpenError
from pool._retry import (
    BACKOFFS,
    Schedule,
    circuit_breaker,
    decorrelated_jitter,
    exponential,
    fibonacci,
    immediate,
    linear,
    retry,
)


def first(schedule: Schedule, n: int) -> list[float]:
    return list(islice(schedule, n))


# -- schedules ----------------------------------------------------------------------------------


def test_immediate() -> None:
    assert first(immediate(), 5) == [0.0] * 5


def test_linear() -> None:
    assert first(linear(0.5, 2.0), 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert first(linear(1.0, 2.5), 4) == [1.0, 2.0, 2.5, 2.5]
    # An integer multiple, not a running sum: the 7th value is 7 * 0.1 exactly.
    assert first(linear(0.1, 10.0), 7)[-1] == 7 * 0.1


def test_exponential() -> None:
    assert first(exponential(1.0, 10.0), 6) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert first(exponential(0.5, 100.0, factor=3), 7) == [0.5, 1.5, 4.5, 13.5, 40.5, 100.0, 100.0]
    assert first(exponential(2.0, 5.0, factor=1), 3) == [2.0, 2.0, 2.0]


def test_fibonacci() -> None:
    assert first(fibonacci(1.0, 10.0), 8) == [1.0, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 10.0]
    assert first(fibonacci(0.5, 100.0), 7) == [0.5, 0.5, 1.0, 1.5, 2.5, 4.0, 6.5]


def test_schedules_are_infinite_and_end_at_the_cap() -> None:
    for schedule in (linear(1.0, 30.0), exponential(1.0, 30.0), fibonacci(1.0, 30.0)):
        assert first(schedule, 2000)[-1] == 30.0
    assert first(exponential(1.0, float("inf")), 2000)[-1] == float("inf")  # no OverflowError


def test_decorrelated_jitter_is_the_aws_formula_and_reproducible() -> None:
    expected = []
    rng = random.Random(7)
    previous = 0.5
    for _ in range(20):
        previous = min(10.0, rng.uniform(0.5, previous * 3))
        expected.append(previous)
    assert first(decorrelated_jitter(0.5, 10.0, random.Random(7)), 20) == expected
    assert first(decorrelated_jitter(0.5, 10.0, random.Random(7)), 20) == expected
    assert first(decorrelated_jitter(0.5, 10.0, random.Random(8)), 20) != expected


@given(
    seed=st.integers(0, 2**32),
    base=st.floats(0.001, 10.0),
    spread=st.floats(1.0, 100.0),
)
def test_decorrelated_jitter_stays_within_base_and_cap(
    seed: int, base: float, spread: float
) -> None:
    cap = base * spread
    delays = first(decorrelated_jitter(base, cap, random.Random(seed)), 50)
    previous = base
    for delay in delays:
        assert base <= delay <= cap
        assert delay <= max(base, previous * 3)
        previous = delay


@pytest.mark.parametrize(
    "make",
    [
        lambda: linear(-1.0, 1.0),
        lambda: linear(2.0, 1.0),
        lambda: exponential(1.0, 0.5),
        lambda: exponential(1.0, 10.0, factor=0.5),
        lambda: fibonacci(float("nan"), 1.0),
        lambda: decorrelated_jitter(0.0, 1.0),
        lambda: decorrelated_jitter(2.0, 1.0),
    ],
)
def test_bad_schedule_arguments_fail_when_called_not_when_iterated(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_backoffs_by_name() -> None:
    assert set(BACKOFFS) == {
        "none",
        "immediate",
        "linear",
        "exponential",
        "fibonacci",
        "decorrelated_jitter",
    }
    assert first(BACKOFFS["none"](1.0, 5.0), 3) == [0.0, 0.0, 0.0]
    assert first(BACKOFFS["immediate"](1.0, 5.0), 3) == [0.0, 0.0, 0.0]
    assert first(BACKOFFS["linear"](1.0, 5.0), 3) == [1.0, 2.0, 3.0]
    assert first(BACKOFFS["exponential"](1.0, 5.0), 4) == [1.0, 2.0, 4.0, 5.0]
    assert first(BACKOFFS["fibonacci"](1.0, 5.0), 6) == [1.0, 1.0, 2.0, 3.0, 5.0, 5.0]
    assert all(1.0 <= d <= 5.0 for d in first(BACKOFFS["decorrelated_jitter"](1.0, 5.0), 50))


# -- retry --------------------------------------------------------------------------------------


class Flaky:
    """An async callable that raises the given exceptions in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.times.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class Refused(Exception):
    def __init__(self, breaker: CircuitBreaker, retry_after: float) -> None:
        super().__init__(breaker.name, retry_after)
        self.circuit = breaker.name
        self.retry_after = retry_after


async def test_fails_twice_then_succeeds_after_exactly_the_backoff(
    autojump_clock: MockClock,
) -> None:
    flaky = Flaky(OSError("1"), OSError("2"))
    call = retry(attempts=3, schedule=lambda: exponential(1.0, 10.0))(flaky)
    with trio.fail_after(60):
        assert await call() == "ok"
    assert flaky.times == [0.0, 1.0, 3.0]
    assert trio.current_time() == 3.0


async def test_exhausted_attempts_reraise_the_last_exception_itself(
    autojump_clock: MockClock,
) -> None:
    flaky = Flaky(ValueError("1"), ValueError("2"), ValueError("3"), ValueError("unused"))
    call = retry(attempts=3, schedule=lambda: linear(1.0, 10.0))(flaky)
    with trio.fail_after(60):
        with pytest.raises(ValueError) as info:
            await call()
    assert type(info.value) is ValueError
    assert str(info.value) == "3"
    assert flaky.times == [0.0, 1.0, 3.0]
    assert trio.current_time() == 3.0  # no wait after the last attempt


async def test_each_call_starts_its_own_schedule(autojump_clock: MockClock) -> None:
    flaky = Flaky(OSError(), OSError(), OSError())
    call = retry(attempts=2, schedule=lambda: exponential(1.0, 10.0))(flaky)
    with trio.fail_after(60):
        with pytest.raises(OSError):
            await call()
        assert await call() == "ok"
    assert flaky.times == [0.0, 1.0, 1.0, 2.0]


async def test_a_finite_schedule_ends_the_retries(autojump_clock: MockClock) -> None:
    flaky = Flaky(*(OSError(str(n)) for n in range(5)))
    call = retry(attempts=5, schedule=lambda: iter([0.5]))(flaky)
    with trio.fail_after(60):
        with pytest.raises(OSError, match="1"):
            await call()
    assert flaky.times == [0.0, 0.5]


async def test_only_matching_exceptions_are_retried(autojump_clock: MockClock) -> None:
    flaky = Flaky(ConnectionError(), KeyError("not transient"))
    call = retry(attempts=5, schedule=immediate, retry_on=OSError)(flaky)
    with trio.fail_after(60):
        with pytest.raises(KeyError):
            await call()
    assert len(flaky.times) == 2


class Interrupt(BaseException):
    pass


async def test_base_exceptions_are_never_retried(autojump_clock: MockClock) -> None:
    flaky = Flaky(Interrupt())
    call = retry(attempts=5, schedule=immediate)(flaky)
    with trio.fail_after(60):
        with pytest.raises(Interrupt):
            await call()
    assert len(flaky.times) == 1


async def test_cancellation_is_not_retried(autojump_clock: MockClock) -> None:
    calls = 0

    @retry(attempts=5, schedule=immediate)
    async def hang() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    with trio.fail_after(60):
        with trio.move_on_after(5) as scope:
            await hang()
    assert scope.cancelled_caught
    assert calls == 1
    assert trio.current_time() == 5.0


async def test_cancellation_during_the_backoff_ends_the_call(
    autojump_clock: MockClock,
) -> None:
    flaky = Flaky(OSError(), OSError())
    call = retry(attempts=3, schedule=lambda: linear(10.0, 10.0))(flaky)
    with trio.fail_after(60):
        with trio.move_on_after(4) as scope:
            await call()
    assert scope.cancelled_caught
    assert flaky.times == [0.0]
    assert trio.current_time() == 4.0


def test_retry_arguments_are_checked_at_decoration() -> None:
    with pytest.raises(ValueError):
        retry(attempts=0)
    with pytest.raises(TypeError):
        retry(retry_on=(OSError, trio.Cancelled))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        retry(retry_on=BaseException)  # type: ignore[arg-type]


async def test_retry_keeps_the_functions_identity_and_arguments(
    autojump_clock: MockClock,
) -> None:
    @retry(attempts=2, schedule=immediate)
    async def add(x: int, *, y: int) -> int:
        """Adds."""
        return x + y

    assert add.__name__ == "add"
    assert add.__doc__ == "Adds."
    with trio.fail_after(1):
        assert await add(1, y=2) == 3


# -- retry with a circuit -----------------------------------------------------------------------


async def test_retry_opens_the_circuit_then_is_refused(autojump_clock: MockClock) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=2, timeout=10.0))
    flaky = Flaky(*(ValueError(str(n)) for n in range(5)))
    call = retry(
        attempts=5, schedule=lambda: linear(1.0, 10.0), circuit=breaker, on_refused=Refused
    )(flaky)
    with trio.fail_after(60):
        with pytest.raises(Refused) as info:
            await call()
    # Attempt 1 at 0 fails, attempt 2 at 1 fails and opens the circuit, attempt 3 at 3 is refused.
    assert flaky.times == [0.0, 1.0]
    assert trio.current_time() == 3.0
    assert info.value.circuit == "svc"
    assert info.value.retry_after == 8.0
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "1"
    stats = breaker.statistics()
    assert (stats.state, stats.total_failures, stats.rejected) == (CircuitState.OPEN, 2, 1)


async def test_retry_refused_at_once_by_an_open_circuit(autojump_clock: MockClock) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=1, timeout=10.0))
    breaker.record_failure(0.0)
    flaky = Flaky()
    call = retry(attempts=3, circuit=breaker, on_refused=Refused)(flaky)
    with trio.fail_after(60):
        await trio.sleep(4)
        with pytest.raises(Refused) as info:
            await call()
    assert flaky.times == []
    assert info.value.retry_after == 6.0
    assert info.value.__cause__ is None
    assert trio.current_time() == 4.0


async def test_retry_records_each_attempt_on_the_circuit(autojump_clock: MockClock) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=5))
    flaky = Flaky(OSError(), OSError())
    call = retry(attempts=3, schedule=immediate, circuit=breaker, on_refused=Refused)(flaky)
    with trio.fail_after(60):
        assert await call() == "ok"
    stats = breaker.statistics()
    assert (stats.total_failures, stats.total_successes, stats.failure_count) == (2, 1, 0)


async def test_retry_through_a_half_open_circuit_closes_it(
    autojump_clock: MockClock,
) -> None:
    config = BreakerConfig(failure_threshold=1, success_threshold=1, timeout=10.0)
    breaker = CircuitBreaker("svc", config)
    breaker.record_failure(0.0)
    call = retry(attempts=2, circuit=breaker, on_refused=Refused)(Flaky())
    with trio.fail_after(60):
        await trio.sleep(10)
        assert await call() == "ok"
    assert breaker.state is CircuitState.CLOSED


async def test_retry_releases_the_trial_slot_on_cancel(autojump_clock: MockClock) -> None:
    config = BreakerConfig(
        failure_threshold=1, success_threshold=1, timeout=10.0, half_open_requests=1
    )
    breaker = CircuitBreaker("svc", config)
    breaker.record_failure(0.0)

    @retry(attempts=3, schedule=immediate, circuit=breaker, on_refused=Refused)
    async def hang() -> None:
        await trio.sleep_forever()

    with trio.fail_after(60):
        await trio.sleep(10)
        with trio.move_on_after(1):
            await hang()
    stats = breaker.statistics()
    assert (stats.state, stats.trials_in_flight) == (CircuitState.HALF_OPEN, 0)
    assert breaker.allow(trio.current_time())  # the single slot is free again


# -- circuit_breaker ----------------------------------------------------------------------------


async def test_circuit_breaker_passes_results_and_records_success(
    autojump_clock: MockClock,
) -> None:
    breaker = CircuitBreaker("svc")

    @circuit_breaker(breaker, on_refused=Refused)
    async def double(x: int) -> int:
        await trio.sleep(1)
        return 2 * x

    with trio.fail_after(60):
        assert await double(21) == 42
    assert double.__name__ == "double"
    assert breaker.statistics().total_successes == 1
    assert trio.current_time() == 1.0


async def test_circuit_breaker_counts_raised_exceptions_and_opens(
    autojump_clock: MockClock,
) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=2, timeout=30.0))
    flaky = Flaky(*(OSError(str(n)) for n in range(5)))
    call = circuit_breaker(breaker, on_refused=Refused)(flaky)
    with trio.fail_after(60):
        for n in range(2):
            with pytest.raises(OSError, match=str(n)):
                await call()
            await trio.sleep(5)
        with pytest.raises(Refused) as info:
            await call()
    assert len(flaky.times) == 2  # the refused call never ran
    assert info.value.retry_after == 25.0  # opened at 5, refused at 10
    assert breaker.state is CircuitState.OPEN


async def test_circuit_breaker_counts_returned_failures(autojump_clock: MockClock) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=2))

    def is_error(result: dict[str, str]) -> bool:
        return result["status"] == "error"

    @circuit_breaker(breaker, on_refused=Refused, failure_if=is_error)
    async def call(status: str) -> dict[str, str]:
        return {"status": status}

    with trio.fail_after(60):
        assert await call("error") == {"status": "error"}  # still returned to the caller
        assert breaker.statistics().failure_count == 1
        assert await call("ok") == {"status": "ok"}
        assert breaker.statistics().failure_count == 0
        await call("error")
        await call("error")
    assert breaker.state is CircuitState.OPEN


async def test_circuit_breaker_releases_the_trial_slot_on_cancel(
    autojump_clock: MockClock,
) -> None:
    config = BreakerConfig(
        failure_threshold=1, success_threshold=1, timeout=10.0, half_open_requests=1
    )
    breaker = CircuitBreaker("svc", config)
    breaker.record_failure(0.0)
    gate = trio.Event()

    @circuit_breaker(breaker, on_refused=Refused)
    async def wait() -> str:
        await gate.wait()
        return "done"

    with trio.fail_after(60):
        await trio.sleep(10)
        with trio.move_on_after(1):
            await wait()
        assert breaker.statistics().trials_in_flight == 0
        gate.set()
        assert await wait() == "done"  # admitted: the cancelled trial gave its slot back
    assert breaker.state is CircuitState.CLOSED


async def test_circuit_breaker_never_serializes_callers(autojump_clock: MockClock) -> None:
    breaker = CircuitBreaker("svc")

    @circuit_breaker(breaker, on_refused=Refused)
    async def slow() -> None:
        await trio.sleep(5)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(slow)
    assert trio.current_time() == 5.0
    assert breaker.statistics().total_successes == 10


async def test_circuit_breaker_outside_retry_counts_only_the_final_outcome(
    autojump_clock: MockClock,
) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=2))
    flaky = Flaky(OSError(), OSError())
    call = circuit_breaker(breaker, on_refused=Refused)(
        retry(attempts=3, schedule=lambda: exponential(1.0, 10.0))(flaky)
    )
    with trio.fail_after(60):
        assert await call() == "ok"
    stats = breaker.statistics()
    assert (stats.total_failures, stats.total_successes, stats.state) == (0, 1, CircuitState.CLOSED)
    assert trio.current_time() == 3.0


async def test_default_refusal_is_a_circuit_open_error(autojump_clock: MockClock) -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=1, timeout=10.0))
    breaker.record_failure(0.0)
    call = circuit_breaker(breaker)(Flaky())
    with trio.fail_after(60):
        await trio.sleep(2.5)
        with pytest.raises(CircuitOpenError) as info:
            await call()
    assert info.value.circuit == "svc"
    assert info.value.retry_after == 7.5
    assert "'svc'" in str(info.value)
    assert "7.5s" in str(info.value)
