"""Retry schedules (pure), and the `retry` and `circuit_breaker` decorators for async functions.

A schedule is an iterator of delays in seconds: the n-th value is the wait after the n-th failed
attempt. The schedules read no clock and do no I/O, so their values can be checked one by one; every
delay is capped at ``cap``. The decorators are the thin trio layer: they sleep with `trio.sleep`
and pass ``clock()`` to a `CircuitBreaker` as its ``now``.

Both decorators gate a call through a breaker with the same two pieces, `_refusal` before the call
and `_run_gated` around it. ``@retry(circuit=b)`` records every attempt on ``b``; to count only a
call's final outcome (as the pool's command circuits do), put ``@circuit_breaker(b)`` outside a
``@retry()`` instead.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, Final, ParamSpec, Protocol, TypeAlias, TypeVar

import trio

from pool._breaker import CircuitBreaker
from pool._errors import CircuitOpenError

Schedule: TypeAlias = Iterator[float]
#: builds the exception raised when ``breaker`` refuses a call: (breaker, retry_after seconds)
OnRefused: TypeAlias = Callable[[CircuitBreaker, float], BaseException]

P = ParamSpec("P")
T = TypeVar("T")


class AsyncDecorator(Protocol):
    """What `retry` and `circuit_breaker` return: keeps the decorated function's signature."""

    def __call__(
        self, fn: Callable[P, Awaitable[T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...


def _check_bounds(base: float, cap: float) -> None:
    if not 0 <= base <= cap:
        raise ValueError(f"need 0 <= base <= cap, got base={base!r}, cap={cap!r}")


def immediate() -> Schedule:
    """0, 0, 0, ...: retry at once."""
    while True:
        yield 0.0


def linear(base: float, cap: float) -> Schedule:
    """base, 2*base, 3*base, ..., capped."""
    _check_bounds(base, cap)
    return _linear(base, cap)


def _linear(base: float, cap: float) -> Schedule:
    n = 1
    # Multiply by an exact integer rather than add: 7 * 0.1 does not accumulate rounding.
    while n * base < cap:
        yield n * base
        n += 1
    while True:
        yield float(cap)


def exponential(base: float, cap: float, factor: float = 2.0) -> Schedule:
    """base, base*factor, base*factor**2, ..., capped."""
    _check_bounds(base, cap)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor!r}")
    return _exponential(base, cap, factor)


def _exponential(base: float, cap: float, factor: float) -> Schedule:
    delay = float(base)
    while delay < cap:
        yield delay
        delay *= factor
    while True:
        yield float(cap)


def fibonacci(base: float, cap: float) -> Schedule:
    """base, base, 2*base, 3*base, 5*base, ..., capped."""
    _check_bounds(base, cap)
    return _fibonacci(base, cap)


def _fibonacci(base: float, cap: float) -> Schedule:
    a, b = 1, 1
    while a * base < cap:
        yield a * base
        a, b = b, a + b
    while True:
        yield float(cap)


def decorrelated_jitter(
    base: float, cap: float, rng: random.Random | None = None
) -> Schedule:
    """AWS "decorrelated jitter": each delay is uniform in [base, 3 * previous delay], capped.

    Pass a seeded ``rng`` for a reproducible schedule. (The seed drew from [0, 3 * previous], which
    can retry at once after a long wait; AWS's formula keeps ``base`` as the floor.)
    """
    _check_bounds(base, cap)
    if base <= 0:
        raise ValueError(f"decorrelated jitter needs base > 0, got {base!r}")
    return _decorrelated_jitter(base, cap, rng if rng is not None else random.Random())


def _decorrelated_jitter(base: float, cap: float, rng: random.Random) -> Schedule:
    delay = base
    while True:
        delay = min(cap, rng.uniform(base, delay * 3))
        yield delay


#: backoff name -> schedule factory taking (base, cap). "none" is the seed's name for no waiting.
BACKOFFS: Final[Mapping[str, Callable[[float, float], Schedule]]] = {
    "none": lambda base, cap: immediate(),
    "immediate": lambda base, cap: immediate(),
    "linear": linear,
    "exponential": exponential,
    "fibonacci": fibonacci,
    "decorrelated_jitter": decorrelated_jitter,
}


def circuit_open_error(breaker: CircuitBreaker, retry_after: float) -> BaseException:
    """The default refusal: a `CircuitOpenError` naming the circuit, with ``retry_after``."""
    return CircuitOpenError(
        f"circuit {breaker.name!r} is open; retry in {retry_after:.1f}s",
        circuit=breaker.name,
        retry_after=retry_after,
    )


def _refusal(
    breaker: CircuitBreaker | None, on_refused: OnRefused, clock: Callable[[], float]
) -> BaseException | None:
    """The exception to raise if ``breaker`` refuses a call now; None when admitted."""
    if breaker is None:
        return None
    now = clock()
    if breaker.allow(now):
        return None
    return on_refused(breaker, breaker.time_until_retry(now))


async def _run_gated(
    call: Callable[[], Awaitable[T]],
    breaker: CircuitBreaker | None,
    clock: Callable[[], float],
    failure_if: Callable[[T], bool] | None,
) -> T:
    """Await an admitted call and report how it ended to ``breaker``."""
    if breaker is None:
        return await call()
    try:
        result = await call()
    except Exception:
        breaker.record_failure(clock())
        raise
    except BaseException:
        # Cancelled (or KeyboardInterrupt...): no verdict on the dependency; free the trial slot.
        breaker.release(clock())
        raise
    if failure_if is not None and failure_if(result):
        breaker.record_failure(clock())
    else:
        breaker.record_success(clock())
    return result


def retry(
    *,
    attempts: int = 3,
    schedule: Callable[[], Schedule] = lambda: exponential(0.1, 2.0),
    retry_on: type[Exception] | tuple[type[Exception], ...] = (Exception,),
    circuit: CircuitBreaker | None = None,
    on_refused: OnRefused = circuit_open_error,
    clock: Callable[[], float] = trio.current_time,
) -> AsyncDecorator:
    """Retry an async function up to ``attempts`` times in all, waiting per ``schedule()``.

    Only exceptions matching ``retry_on`` are retried; anything else, and `trio.Cancelled` or any
    other `BaseException` that is not an `Exception`, goes straight out. When attempts (or a finite
    schedule) run out, the last exception is re-raised as itself. ``schedule`` is called once per
    call, so each call starts its own backoff.

    With ``circuit``, each attempt first asks ``circuit.allow``; a refusal raises
    ``on_refused(circuit, retry_after)`` (chained from the previous attempt's exception, if any)
    and is not retried. Each attempt's outcome is recorded on the circuit; a cancelled attempt
    gives its slot back.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    # Enforced, not only typed: retrying Cancelled or KeyboardInterrupt would defeat them.
    retryable = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    if not all(issubclass(kind, Exception) for kind in retryable):
        raise TypeError(f"retry_on must be Exception subclasses, got {retry_on!r}")

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
            delays = schedule()
            last_error: Exception | None = None
            attempt = 1
            while True:
                refused = _refusal(circuit, on_refused, clock)
                if refused is not None:
                    raise refused from last_error
                try:
                    return await _run_gated(lambda: fn(*args, **kwargs), circuit, clock, None)
                except retryable as error:
                    delay = next(delays, None) if attempt < attempts else None
                    if delay is None:
                        raise
                    last_error = error
                await trio.sleep(delay)
                attempt += 1

        return retrying

    return decorate


def circuit_breaker(
    breaker: CircuitBreaker,
    *,
    on_refused: OnRefused = circuit_open_error,
    failure_if: Callable[[Any], bool] | None = None,
    clock: Callable[[], float] = trio.current_time,
) -> AsyncDecorator:
    """Gate an async function through ``breaker``.

    The work runs in the caller's task and callers run concurrently: the breaker is only asked
    before and told after, never held. A refused call raises ``on_refused(breaker, retry_after)`` without running. A raised `Exception`
    counts as a failure, and so does a returned value for which ``failure_if(value)`` is true (the
    value is still returned). A cancelled call gives its half-open trial slot back.
    """

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def gated(*args: P.args, **kwargs: P.kwargs) -> T:
            refused = _refusal(breaker, on_refused, clock)
            if refused is not None:
                raise refused
            return await _run_gated(lambda: fn(*args, **kwargs), breaker, clock, failure_if)

        return gated

    return decorate
