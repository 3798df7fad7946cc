"""The error matrix, row by row: pure, synchronous, no I/O.

The expected values are written out here from the seed (004) and DESIGN.md, not read from
DEFAULT_POLICY, so that a change to the policy's tables has to change this file too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest
import trio

from bridge_worker.protocol import EncodeError, ProtocolError
from pool._errors import (
    ERROR_CLASSES,
    CallerError,
    Category,
    CircuitOpenError,
    CommunicationError,
    ErrorInput,
    HealthCheckError,
    InitializationError,
    PoolClosedError,
    PoolError,
    PoolSaturatedError,
    PoolSystemError,
    PoolTimeoutError,
    RemoteError,
    ResourceError,
    SessionError,
    Severity,
    Strategy,
    WorkerConnectionError,
)
from pool._matrix import (
    DEFAULT_POLICY,
    OUTSIDE_MATRIX,
    outside_case,
    outside_error,
    MatrixPolicy,
    PoolErrorHandler,
    StrategyRule,
)

C, S, R = Category, Severity, Strategy
H = PoolErrorHandler

IMMEDIATE = (0.0, 0.1, 0.2)
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)
FALLBACK = (1.0,)

# The decision table: tag -> category, base severity, strategy at attempt 1, max retries, delays.
DECISION_TABLE: list[tuple[str, Category, Severity, Strategy, int, tuple[float, ...]]] = [
    ("port_exited", C.CONNECTION_ERROR, S.MAJOR, R.BACKOFF_RETRY, 5, BACKOFF),
    ("connect_failed", C.CONNECTION_ERROR, S.MAJOR, R.BACKOFF_RETRY, 5, BACKOFF),
    ("checkout_failed", C.RESOURCE_ERROR, S.CRITICAL, R.CIRCUIT_BREAK, 1, FALLBACK),
    ("timeout", C.TIMEOUT_ERROR, S.MAJOR, R.BACKOFF_RETRY, 2, BACKOFF),
    ("encode_error", C.COMMUNICATION_ERROR, S.MAJOR, R.IMMEDIATE_RETRY, 3, IMMEDIATE),
    ("decode_error", C.COMMUNICATION_ERROR, S.MAJOR, R.IMMEDIATE_RETRY, 3, IMMEDIATE),
    ("health_check_failed", C.HEALTH_CHECK_ERROR, S.MINOR, R.BACKOFF_RETRY, 3, BACKOFF),
    ("python_exception", C.PYTHON_ERROR, S.MAJOR, R.FAILOVER, 1, FALLBACK),
    ("init_failed", C.INITIALIZATION_ERROR, S.CRITICAL, R.CIRCUIT_BREAK, 3, FALLBACK),
    ("session_not_found", C.SESSION_ERROR, S.MINOR, R.IMMEDIATE_RETRY, 2, IMMEDIATE),
    ("circuit_open", C.SYSTEM_ERROR, S.CRITICAL, R.ABANDON, 0, FALLBACK),  # any other tag
    ("command_error", C.SYSTEM_ERROR, S.CRITICAL, R.ABANDON, 0, FALLBACK),
]

# One tag per category, to reach a category from an error tuple.
TAG_OF = {
    C.INITIALIZATION_ERROR: "init_failed",
    C.CONNECTION_ERROR: "port_exited",
    C.COMMUNICATION_ERROR: "decode_error",
    C.TIMEOUT_ERROR: "timeout",
    C.RESOURCE_ERROR: "checkout_failed",
    C.HEALTH_CHECK_ERROR: "health_check_failed",
    C.SESSION_ERROR: "session_not_found",
    C.PYTHON_ERROR: "python_exception",
    C.SYSTEM_ERROR: "no_such_tag",
}

# (severity, strategy) at attempts 1..5, as the seed's code decides them.
_CB, _AB, _BO, _IM, _FO = R.CIRCUIT_BREAK, R.ABANDON, R.BACKOFF_RETRY, R.IMMEDIATE_RETRY, R.FAILOVER
BY_ATTEMPT: dict[Category, list[tuple[Severity, Strategy]]] = {
    C.INITIALIZATION_ERROR: [(S.CRITICAL, _CB)] * 2 + [(S.CRITICAL, _AB)] * 3,
    C.CONNECTION_ERROR: [(S.MAJOR, _BO)] * 3 + [(S.CRITICAL, _AB)] * 2,
    C.COMMUNICATION_ERROR: [(S.MAJOR, _IM)] * 3 + [(S.CRITICAL, _AB)] * 2,
    C.TIMEOUT_ERROR: [(S.MAJOR, _BO)] * 3 + [(S.CRITICAL, _AB)] * 2,
    C.RESOURCE_ERROR: [(S.CRITICAL, _CB)] * 2 + [(S.CRITICAL, _AB)] * 3,
    C.HEALTH_CHECK_ERROR: [(S.MINOR, _BO)] * 3 + [(S.MAJOR, _BO)] * 2,
    C.SESSION_ERROR: [(S.MINOR, _IM)] * 3 + [(S.MAJOR, _IM)] * 2,
    C.PYTHON_ERROR: [(S.MAJOR, _FO)] * 3 + [(S.CRITICAL, _AB)] * 2,
    C.SYSTEM_ERROR: [(S.CRITICAL, _AB)] * 5,
}

# The same with affecting_all_workers: critical up to attempt 3, and the attempt upgrade (tested
# first in the seed's cond) from attempt 4.
BY_ATTEMPT_ALL_WORKERS: dict[Category, list[tuple[Severity, Strategy]]] = {
    C.INITIALIZATION_ERROR: [(S.CRITICAL, _CB)] * 2 + [(S.CRITICAL, _AB)] * 3,
    C.CONNECTION_ERROR: [(S.CRITICAL, _BO)] * 2 + [(S.CRITICAL, _AB)] * 3,
    # communication_error has a rule only for major: a critical one falls through to abandon.
    C.COMMUNICATION_ERROR: [(S.CRITICAL, _AB)] * 5,
    C.TIMEOUT_ERROR: [(S.CRITICAL, _BO)] * 2 + [(S.CRITICAL, _AB)] * 3,
    C.RESOURCE_ERROR: [(S.CRITICAL, _CB)] * 2 + [(S.CRITICAL, _AB)] * 3,
    C.HEALTH_CHECK_ERROR: [(S.CRITICAL, _BO)] * 2 + [(S.CRITICAL, _AB)] + [(S.MAJOR, _BO)] * 2,
    C.SESSION_ERROR: [(S.CRITICAL, _IM)] * 2 + [(S.CRITICAL, _AB)] + [(S.MAJOR, _IM)] * 2,
    C.PYTHON_ERROR: [(S.CRITICAL, _FO)] * 2 + [(S.CRITICAL, _AB)] * 3,
    C.SYSTEM_ERROR: [(S.CRITICAL, _AB)] * 5,
}

# Attempts after which a call is really retried when each failure is wrapped for its own attempt:
# the Max Retries cap and the strategy turning to abandon both bound it.
RETRIED_ATTEMPTS: dict[Category, set[int]] = {
    C.INITIALIZATION_ERROR: set(),
    C.CONNECTION_ERROR: {1, 2, 3},  # capped at 5, but abandon from attempt 4 (critical)
    C.COMMUNICATION_ERROR: {1, 2, 3},
    C.TIMEOUT_ERROR: {1, 2},
    C.RESOURCE_ERROR: set(),
    C.HEALTH_CHECK_ERROR: {1, 2, 3},
    C.SESSION_ERROR: {1, 2},
    C.PYTHON_ERROR: {1},  # failover, once
    C.SYSTEM_ERROR: set(),
}

MAX_RETRIES = {C.INITIALIZATION_ERROR: 3, C.CONNECTION_ERROR: 5, C.COMMUNICATION_ERROR: 3,
               C.TIMEOUT_ERROR: 2, C.RESOURCE_ERROR: 1, C.HEALTH_CHECK_ERROR: 3,
               C.SESSION_ERROR: 2, C.PYTHON_ERROR: 1, C.SYSTEM_ERROR: 0}


def wrap(tag: str, payload: Any = "x", **context: Any) -> PoolError:
    return H.wrap_pool_error((tag, payload), context)


# ---------------------------------------------------------------- the decision table, row by row


@pytest.mark.parametrize(("tag", "category", "severity", "strategy", "max_retries", "delays"),
                         DECISION_TABLE)
def test_decision_table_row(
    tag: str,
    category: Category,
    severity: Severity,
    strategy: Strategy,
    max_retries: int,
    delays: tuple[float, ...],
) -> None:
    err = wrap(tag, attempt=1)
    assert type(err) is ERROR_CLASSES[category]
    assert (err.category, err.severity, err.recovery_strategy) == (category, severity, strategy)
    assert DEFAULT_POLICY.max_retries[category] == max_retries
    # Delays per attempt, and the last one repeats past the list.
    got = [H.get_retry_delay(err, n) for n in range(1, len(delays) + 3)]
    assert got == list(delays) + [delays[-1]] * 2


def test_every_category_has_a_row_in_every_table() -> None:
    everything = set(Category)
    assert {row[1] for row in DECISION_TABLE} == everything
    assert set(BY_ATTEMPT) == set(BY_ATTEMPT_ALL_WORKERS) == set(RETRIED_ATTEMPTS) == everything
    assert set(DEFAULT_POLICY.base_severity) == everything
    assert set(DEFAULT_POLICY.max_retries) == everything
    assert set(ERROR_CLASSES) == everything
    # Every category but the fallback is reachable from a tag.
    reachable = set(DEFAULT_POLICY.categories.values()) | {DEFAULT_POLICY.default_category}
    assert reachable == everything
    assert set(DEFAULT_POLICY.delays) == set(Strategy)
    for category in Category:  # a default message for each (an unformatted one would fail)
        assert wrap(TAG_OF[category]).message


def test_policy_refuses_a_table_without_a_row_for_a_category() -> None:
    rows = {c: n for c, n in DEFAULT_POLICY.max_retries.items() if c is not C.SESSION_ERROR}
    with pytest.raises(ValueError, match="session_error"):
        attrs.evolve(DEFAULT_POLICY, max_retries=rows)
    severities = {c: s for c, s in DEFAULT_POLICY.base_severity.items() if c is not C.TIMEOUT_ERROR}
    with pytest.raises(ValueError, match="timeout_error"):
        attrs.evolve(DEFAULT_POLICY, base_severity=severities)
    delays = {s: d for s, d in DEFAULT_POLICY.delays.items() if s is not R.FAILOVER}
    with pytest.raises(ValueError, match="failover"):
        attrs.evolve(DEFAULT_POLICY, delays=delays)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_retries": {**DEFAULT_POLICY.max_retries, C.TIMEOUT_ERROR: -1}},
        {"delays": {**DEFAULT_POLICY.delays, R.BACKOFF_RETRY: ()}},
        {"delays": {**DEFAULT_POLICY.delays, R.BACKOFF_RETRY: (1.0, -2.0)}},
        {"strategy_rules": DEFAULT_POLICY.strategy_rules[:-1]},  # no catch-all rule last
        {"strategy_rules": ()},
        {"upgrade_after_attempt": -1},
    ],
)
def test_policy_refuses_invalid_tables(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        attrs.evolve(DEFAULT_POLICY, **changes)


def test_policy_tables_are_read_only() -> None:
    retries: Any = DEFAULT_POLICY.max_retries
    categories: Any = DEFAULT_POLICY.categories
    with pytest.raises(TypeError):
        retries[C.TIMEOUT_ERROR] = 9
    with pytest.raises(TypeError):
        categories["oom"] = C.RESOURCE_ERROR


# ---------------------------------------------------------------- severity and strategy by attempt


@pytest.mark.parametrize("category", list(Category))
def test_verdict_by_attempt(category: Category) -> None:
    got = [wrap(TAG_OF[category], attempt=n) for n in range(1, 6)]
    assert [(e.severity, e.recovery_strategy) for e in got] == BY_ATTEMPT[category]


@pytest.mark.parametrize("category", list(Category))
def test_verdict_by_attempt_affecting_all_workers(category: Category) -> None:
    got = [wrap(TAG_OF[category], attempt=n, affecting_all_workers=True) for n in range(1, 6)]
    assert [(e.severity, e.recovery_strategy) for e in got] == BY_ATTEMPT_ALL_WORKERS[category]


def test_severity_goes_up_one_step_at_attempt_4_not_3() -> None:
    assert wrap("health_check_failed", attempt=3).severity is S.MINOR
    assert wrap("health_check_failed", attempt=4).severity is S.MAJOR
    assert wrap("port_exited", attempt=3).severity is S.MAJOR
    assert wrap("port_exited", attempt=4).severity is S.CRITICAL
    assert wrap("init_failed", attempt=4).severity is S.CRITICAL  # critical stays critical


def test_affecting_all_workers_makes_it_critical_and_abandons_from_attempt_3() -> None:
    got = [wrap("port_exited", attempt=n, affecting_all_workers=True) for n in (1, 2, 3)]
    assert [e.severity for e in got] == [S.CRITICAL] * 3
    assert [e.recovery_strategy for e in got] == [_BO, _BO, _AB]


def test_attempt_upgrade_wins_over_affecting_all_workers() -> None:
    # The seed's cond tests attempt > 3 first: a minor error at attempt 4 becomes major, not
    # critical, even when it affects all workers.
    err = wrap("session_not_found", attempt=4, affecting_all_workers=True)
    assert (err.severity, err.recovery_strategy) == (S.MAJOR, _IM)


def test_missing_attempt_means_attempt_1() -> None:
    # The seed's `nil > 3` would upgrade every first failure; we read it as attempt 1.
    for err in (wrap("health_check_failed"), wrap("health_check_failed", attempt=None)):
        assert err.context["attempt"] == 1
        assert (err.severity, err.recovery_strategy) == (S.MINOR, _BO)
    assert H.format_for_logging(PoolSystemError("m")).count("Attempt: 1") == 1


# ---------------------------------------------------------------- should_retry and get_retry_delay


@pytest.mark.parametrize("category", list(Category))
def test_should_retry_is_capped_exactly_at_max_retries(category: Category) -> None:
    err = wrap(TAG_OF[category])  # the strategy of attempt 1, held fixed
    limit = MAX_RETRIES[category]
    if err.recovery_strategy in (_BO, _IM):
        assert H.should_retry(err, limit) is True
        assert H.should_retry(err, limit + 1) is False
    elif err.recovery_strategy is _FO:  # python_error: max 1, and failover only once anyway
        assert [H.should_retry(err, n) for n in (1, 2)] == [True, False]
    else:
        assert not any(H.should_retry(err, n) for n in range(1, limit + 3))


@pytest.mark.parametrize("category", list(Category))
def test_attempts_really_retried(category: Category) -> None:
    retried = {n for n in range(1, 9) if H.should_retry(wrap(TAG_OF[category], attempt=n), n)}
    assert retried == RETRIED_ATTEMPTS[category]


def test_failover_is_retried_only_after_attempt_1_and_within_max_retries() -> None:
    err = wrap("python_exception")
    assert err.recovery_strategy is _FO
    assert [H.should_retry(err, n) for n in (1, 2, 3)] == [True, False, False]
    generous = PoolErrorHandler(
        attrs.evolve(DEFAULT_POLICY, max_retries={**MAX_RETRIES, C.PYTHON_ERROR: 5})
    )
    assert [generous.should_retry(err, n) for n in (1, 2)] == [True, False]
    none = PoolErrorHandler(
        attrs.evolve(DEFAULT_POLICY, max_retries={**MAX_RETRIES, C.PYTHON_ERROR: 0})
    )
    assert none.should_retry(err, 1) is False


def test_circuit_break_and_abandon_never_retry_even_under_a_generous_cap() -> None:
    handler = PoolErrorHandler(
        attrs.evolve(DEFAULT_POLICY, max_retries={c: 10 for c in Category})
    )
    for tag in ("init_failed", "checkout_failed", "no_such_tag"):
        err = wrap(tag)
        assert err.recovery_strategy in (_CB, _AB)
        assert not any(handler.should_retry(err, n) for n in range(1, 12))


def test_caller_fault_is_never_retried_whatever_its_strategy() -> None:
    err = WorkerConnectionError("m", caller_fault=True, recovery_strategy=_BO)
    assert H.should_retry(err, 1) is False


def test_retry_delays_repeat_the_last_one() -> None:
    backoff = wrap("port_exited")
    got = [H.get_retry_delay(backoff, n) for n in (1, 5, 6, 7, 100)]
    assert got == [1.0, 16.0, 16.0, 16.0, 16.0]
    immediate = wrap("decode_error")
    assert [H.get_retry_delay(immediate, n) for n in (1, 2, 3, 4, 9)] == [0.0, 0.1, 0.2, 0.2, 0.2]
    assert H.get_retry_delay(wrap("python_exception"), 1) == 1.0


def test_attempts_count_from_1() -> None:
    err = wrap("port_exited")
    with pytest.raises(ValueError):
        H.should_retry(err, 0)
    with pytest.raises(ValueError):
        H.get_retry_delay(err, 0)


# ---------------------------------------------------------------- inputs other than tuples


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (TimeoutError(), PoolTimeoutError),
        (trio.TooSlowError(), PoolTimeoutError),
        (BrokenPipeError(32, "Broken pipe"), WorkerConnectionError),
        (ConnectionResetError(), WorkerConnectionError),
        (trio.BrokenResourceError(), WorkerConnectionError),
        (EncodeError("not msgpack-able"), CommunicationError),
        (ProtocolError("bad frame"), CommunicationError),
        (msgpack.FormatError("bad"), CommunicationError),
        (msgpack.ExtraData(1, b"x"), CommunicationError),
        (RuntimeError("who knows"), PoolSystemError),
        (ValueError("bad"), PoolSystemError),
        (trio.ClosedResourceError(), PoolSystemError),
    ],
)
def test_exceptions_as_input(error: BaseException, cls: type[PoolError]) -> None:
    err = H.wrap_pool_error(error)
    assert type(err) is cls
    assert err.error is error
    assert type(error).__name__ in err.message


@pytest.mark.parametrize("error", [(), (42, "x"), ("no_such_tag",), (None,)])
def test_odd_tuples_are_system_errors(error: ErrorInput) -> None:
    err = H.wrap_pool_error(error)
    assert type(err) is PoolSystemError
    assert err.error == error
    assert repr(error) in err.message


def test_a_pool_error_is_rewrapped_for_the_new_attempt() -> None:
    cause = OSError("pipe")
    first = wrap("port_exited", -9, worker_id=3, command="echo", timestamp=10.0)
    first.__cause__ = cause
    again = H.wrap_pool_error(first, {"attempt": 4, "session_id": "s", "timestamp": 20.0})
    assert again is not first and type(again) is WorkerConnectionError
    assert (again.severity, again.recovery_strategy) == (S.CRITICAL, _AB)
    assert again.context["worker_id"] == 3 and again.context["session_id"] == "s"
    assert again.context["attempt"] == 4 and again.context["timestamp"] == 20.0
    assert again.context["severity"] is S.CRITICAL
    assert again.message == first.message and again.error == ("port_exited", -9)
    assert again.__cause__ is cause
    # The first error is left as it was.
    assert (first.severity, first.recovery_strategy) == (S.MAJOR, _BO)
    assert first.context["attempt"] == 1 and "session_id" not in first.context


def test_rewrap_stamps_a_fresh_timestamp_and_takes_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = wrap("timeout", timestamp=10.0)
    monkeypatch.setattr(time, "time", lambda: 99.0)
    again = H.wrap_pool_error(first, {"message": "new words", "may_have_run": True})
    assert again.context["timestamp"] == 99.0
    assert str(again) == again.message == "new words" and again.args == ("new words",)
    assert again.may_have_run is True and first.may_have_run is False
    blamed = H.wrap_pool_error(first, {"caller_fault": True})
    assert blamed.caller_fault is True
    assert (blamed.severity, blamed.recovery_strategy) == (S.WARNING, _AB)


def test_rewrap_keeps_the_verdict_of_errors_outside_the_matrix() -> None:
    refused = CircuitOpenError("open", circuit="echo", retry_after=2.5)
    again = H.wrap_pool_error(refused, {"attempt": 5, "affecting_all_workers": True})
    assert type(again) is CircuitOpenError
    assert (again.severity, again.recovery_strategy) == (S.MAJOR, _CB)
    assert (again.circuit, again.retry_after, again.context["attempt"]) == ("echo", 2.5, 5)
    declared = RemoteError("bad", caller_fault=True, remote_type="ValueError")
    again2 = H.wrap_pool_error(declared, {"attempt": 2})
    assert isinstance(again2, RemoteError) and again2.remote_type == "ValueError"
    assert (again2.severity, again2.recovery_strategy) == (S.WARNING, _AB)


# ---------------------------------------------------------------- context, message, attributes


def test_wrapped_context_is_a_new_dict_with_the_verdict() -> None:
    given = {"worker_id": 7, "command": "echo", "timestamp": 5.0}
    err = H.wrap_pool_error(("timeout", "command_timeout"), given)
    assert err.context is not given
    assert given == {"worker_id": 7, "command": "echo", "timestamp": 5.0}
    assert err.context == {
        "worker_id": 7,
        "command": "echo",
        "timestamp": 5.0,
        "error_category": C.TIMEOUT_ERROR,
        "severity": S.MAJOR,
        "recovery_strategy": _BO,
        "attempt": 1,
    }


def test_timestamp_from_context_reads_no_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("the clock was read")

    monkeypatch.setattr(time, "time", no_clock)
    assert wrap("timeout", timestamp=1.5).context["timestamp"] == 1.5
    monkeypatch.setattr(time, "time", lambda: 42.0)
    assert wrap("timeout").context["timestamp"] == 42.0


def test_connection_message_says_what_happened_and_what_to_do() -> None:
    err = wrap("port_exited", -9, worker_id=3, command="echo")
    assert err.message == (
        "worker 3 was lost while running 'echo' (killed by signal 9); the pool replaces it. "
        "Retry if the command is idempotent."
    )
    assert "exited with code 1" in wrap("port_exited", 1).message


def test_initialization_message_names_the_module_and_shows_stderr() -> None:
    payload = {"module": "myapp.commands", "type": "ModuleNotFoundError",
               "message": "No module named 'myapp'", "stderr": "Traceback ...\nModuleNotFoundError"}
    err = wrap("init_failed", payload, worker_id=1)
    assert type(err) is InitializationError
    assert "'myapp.commands'" in err.message and "No module named 'myapp'" in err.message
    assert err.message.endswith("Traceback ...\nModuleNotFoundError")
    assert "Fix the handlers module" in err.message


def test_messages_use_worker_command_and_session_from_context() -> None:
    session = wrap("session_not_found", session_id="user-42")
    assert type(session) is SessionError and "session 'user-42'" in session.message
    timeout = wrap("timeout", "command_timeout", worker_id=0, command="slow")
    assert "worker 0" in timeout.message and "'slow'" in timeout.message
    assert "Raise the timeout" in timeout.message
    resource = wrap("checkout_failed", "no worker", command="echo")
    assert type(resource) is ResourceError and "'echo'" in resource.message
    health = wrap("health_check_failed", "no pong", worker_id=2)
    assert type(health) is HealthCheckError and "worker 2" in health.message


def test_message_from_context_overrides_the_default() -> None:
    assert wrap("timeout", message="custom words").message == "custom words"


def test_python_exception_carries_the_remote_type_and_traceback() -> None:
    payload = {"type": "ValueError", "message": "bad input", "traceback": "Traceback (...)"}
    err = H.wrap_pool_error(("python_exception", payload), {"worker_id": 1, "may_have_run": True})
    assert isinstance(err, RemoteError)
    assert (err.remote_type, err.remote_traceback) == ("ValueError", "Traceback (...)")
    assert "ValueError: bad input" in err.message and err.may_have_run is True
    assert err.caller_fault is False


def test_declared_caller_error_skips_the_matrix() -> None:
    payload = {"type": "ValueError", "message": "bad input"}
    err = H.wrap_pool_error(("python_exception", payload),
                            {"caller_fault": True, "command": "predict", "attempt": 1})
    assert isinstance(err, RemoteError) and err.caller_fault is True
    assert (err.severity, err.recovery_strategy) == (S.WARNING, _AB)
    assert err.message.startswith("'predict' rejected its input: ValueError: bad input")
    assert H.should_retry(err, 1) is False


# ---------------------------------------------------------------- the second table


def test_outside_matrix_rows_are_never_retried() -> None:
    for row in OUTSIDE_MATRIX:
        err = outside_error(row.key, "m")
        assert type(err) is row.error_class, row.case
        assert (err.category, err.severity, err.recovery_strategy, err.caller_fault) == (
            row.category, row.severity, row.strategy, row.caller_fault
        ), row.case
        assert outside_case(err) is row, row.case
        assert not any(H.should_retry(err, n) for n in range(1, 5)), row.case
        # Re-wrapping for a later attempt keeps the row's verdict.
        again = H.wrap_pool_error(err, {"attempt": 4})
        assert (again.severity, again.recovery_strategy) == (row.severity, row.strategy), row.case
    assert len({row.key for row in OUTSIDE_MATRIX}) == len(OUTSIDE_MATRIX)


def test_errors_built_without_the_table_fall_under_its_rows_by_class() -> None:
    samples: dict[str, PoolError] = {
        "unencodable_arguments": H.caller_error("m", error=EncodeError("x")),
        "declared_caller_error": H.wrap_pool_error(
            ("python_exception", {"type": "ValueError"}), {"caller_fault": True}
        ),
        "circuit_open": CircuitOpenError("m", circuit="echo", retry_after=1.0),
        "queue_full": PoolSaturatedError("m"),
        "pool_closed": PoolClosedError("m"),
    }
    for key, err in samples.items():
        case = outside_case(err)
        assert case is not None and case.error_class is type(err), key
    # The matrix decides for everything else, a timeout of a running call included.
    assert outside_case(H.wrap_pool_error(("timeout", "command_timeout"))) is None
    assert outside_case(H.wrap_pool_error(("port_exited", -9))) is None


def test_caller_error_helper() -> None:
    err = H.caller_error(
        "the arguments cannot be sent",
        context={"command": "echo", "timestamp": 3.0},
        error=EncodeError("x"),
    )
    assert isinstance(err, CallerError) and err.message == "the arguments cannot be sent"
    assert err.may_have_run is False and err.caller_fault is True
    assert err.context == {"command": "echo", "timestamp": 3.0, "attempt": 1,
                           "error_category": C.COMMUNICATION_ERROR, "severity": S.WARNING,
                           "recovery_strategy": _AB}


@pytest.mark.parametrize("category", list(Category))
def test_class_defaults_are_the_matrix_verdict_at_attempt_1(category: Category) -> None:
    direct = ERROR_CLASSES[category]("m")
    wrapped = wrap(TAG_OF[category])
    assert (direct.category, direct.severity, direct.recovery_strategy) == (
        wrapped.category, wrapped.severity, wrapped.recovery_strategy
    )


# ---------------------------------------------------------------- custom policies, the class API


def test_custom_policy_changes_the_result() -> None:
    policy = attrs.evolve(
        DEFAULT_POLICY,
        categories={**DEFAULT_POLICY.categories, "oom_killed": C.RESOURCE_ERROR},
        max_retries={**DEFAULT_POLICY.max_retries, C.TIMEOUT_ERROR: 3},
        delays={**DEFAULT_POLICY.delays, R.BACKOFF_RETRY: (0.5,)},
        strategy_rules=(StrategyRule(C.SESSION_ERROR, None, R.FAILOVER),
                        *DEFAULT_POLICY.strategy_rules),
    )
    handler = PoolErrorHandler(policy)
    assert type(handler.wrap_pool_error(("oom_killed", 1))) is ResourceError
    assert type(H.wrap_pool_error(("oom_killed", 1))) is PoolSystemError
    timeout = handler.wrap_pool_error(("timeout", "x"))
    assert handler.should_retry(timeout, 3) is True and H.should_retry(timeout, 3) is False
    assert handler.get_retry_delay(timeout, 2) == 0.5 and H.get_retry_delay(timeout, 2) == 2.0
    assert handler.wrap_pool_error(("session_not_found", "s")).recovery_strategy is _FO
    assert DEFAULT_POLICY.max_retries[C.TIMEOUT_ERROR] == 2  # evolve left the default alone


def test_custom_exception_table() -> None:
    class OutOfGPU(Exception):
        pass

    policy = attrs.evolve(DEFAULT_POLICY, exception_categories=[(OutOfGPU, C.RESOURCE_ERROR)])
    assert type(PoolErrorHandler(policy).wrap_pool_error(OutOfGPU())) is ResourceError
    assert type(PoolErrorHandler(policy).wrap_pool_error(TimeoutError())) is PoolSystemError


def test_class_and_default_instance_agree() -> None:
    assert PoolErrorHandler().policy is DEFAULT_POLICY
    on_class = H.wrap_pool_error(("timeout", "x"), {"timestamp": 1.0})
    on_instance = PoolErrorHandler().wrap_pool_error(("timeout", "x"), {"timestamp": 1.0})
    assert on_class.context == on_instance.context and on_class.message == on_instance.message


def test_format_for_logging_has_every_field() -> None:
    err = wrap("port_exited", -9, worker_id=3, session_id="user-42", attempt=2,
               command="echo", may_have_run=True, timestamp=1.0)
    text = H.format_for_logging(err)
    lines = text.splitlines()
    assert lines[0] == f"Pool Error: {err.message}"
    for line in ("Type: WorkerConnectionError", "Category: connection_error", "Severity: major",
                 "Recovery: backoff_retry", "Worker: 3", "Session: user-42", "Attempt: 2",
                 "May have run: True", "Caller fault: False", "Retry after: N/A"):
        assert line in lines
    assert "'command': 'echo'" in text and "'timestamp': 1.0" in text
    assert "Worker: N/A" in H.format_for_logging(wrap("timeout"))
    assert "Retry after: 2.5" in H.format_for_logging(CircuitOpenError("m", retry_after=2.5))


def test_policy_equality_follows_values() -> None:
    assert attrs.evolve(DEFAULT_POLICY) == DEFAULT_POLICY
    assert attrs.evolve(DEFAULT_POLICY, upgrade_after_attempt=5) != DEFAULT_POLICY
    assert isinstance(DEFAULT_POLICY, MatrixPolicy)


def test_the_readme_shows_the_outside_matrix_table_as_it_is() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for row in OUTSIDE_MATRIX:
        line = (
            f"| {row.case} | `{row.key}` | `{row.error_class.__name__}` | {row.category} | "
            f"{row.severity} | {row.strategy} | {'yes' if row.caller_fault else 'no'} | {row.handling} |"
        )
        assert line in readme, f"README.md's 'Outside the matrix' table lacks or differs on:\n{line}"
