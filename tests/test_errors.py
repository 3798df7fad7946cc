"""The PoolError hierarchy: classes, defaults, attributes, docstrings (pure, no I/O)."""

from __future__ import annotations

import copy
import pickle

import pytest
import trio

import pool._errors as errors_module
from pool._errors import (
    ERROR_CLASSES,
    CallerError,
    Category,
    CircuitOpenError,
    CommunicationError,
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
from pool._matrix import PoolErrorHandler

SEED_CATEGORIES = [
    "initialization_error", "connection_error", "communication_error", "timeout_error",
    "resource_error", "health_check_error", "session_error", "python_error", "system_error",
]

ALL_CLASSES: list[type[PoolError]] = [
    PoolError, InitializationError, WorkerConnectionError, CommunicationError, PoolTimeoutError,
    ResourceError, PoolSaturatedError, HealthCheckError, SessionError, RemoteError,
    PoolSystemError, CallerError, CircuitOpenError, PoolClosedError,
]


def test_enum_values_are_the_seeds_names_and_print_plainly() -> None:
    assert [c.value for c in Category] == SEED_CATEGORIES
    assert [s.value for s in Severity] == ["critical", "major", "minor", "warning"]
    assert [s.value for s in Strategy] == [
        "immediate_retry", "backoff_retry", "circuit_break", "failover", "abandon"
    ]
    assert str(Category.CONNECTION_ERROR) == "connection_error"
    assert f"{Severity.MAJOR}/{Strategy.FAILOVER}" == "major/failover"
    assert Category("timeout_error") is Category.TIMEOUT_ERROR
    assert Category.TIMEOUT_ERROR == "timeout_error"  # a str, so it compares with the seed's names


def test_one_class_per_category() -> None:
    assert [ERROR_CLASSES[Category(name)] for name in SEED_CATEGORIES] == [
        InitializationError, WorkerConnectionError, CommunicationError, PoolTimeoutError,
        ResourceError, HealthCheckError, SessionError, RemoteError, PoolSystemError,
    ]
    for category, cls in ERROR_CLASSES.items():
        assert issubclass(cls, PoolError)
        assert cls("m").category is category


def test_every_error_class_is_listed_here() -> None:
    # So that a new class cannot skip the docstring and default checks below.
    defined = {
        obj for obj in vars(errors_module).values()
        if isinstance(obj, type) and issubclass(obj, PoolError)
    }
    assert defined == set(ALL_CLASSES)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_every_class_has_its_own_docstring(cls: type[PoolError]) -> None:
    doc = cls.__dict__.get("__doc__")
    assert isinstance(doc, str) and len(doc.strip()) > 40


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_defaults(cls: type[PoolError]) -> None:
    err = cls("what happened; what to do")
    assert str(err) == err.message == "what happened; what to do"
    assert err.args == ("what happened; what to do",)
    assert err.context == {} and err.error is None and err.retry_after is None
    assert err.may_have_run is False
    assert err.caller_fault is (cls is CallerError)
    assert isinstance(err.category, Category)
    assert isinstance(err.severity, Severity)
    assert isinstance(err.recovery_strategy, Strategy)


def test_explicit_attributes_win_over_class_defaults() -> None:
    context = {"worker_id": 1}
    err = WorkerConnectionError(
        "m",
        category=Category.SYSTEM_ERROR,
        severity=Severity.WARNING,
        recovery_strategy=Strategy.ABANDON,
        context=context,
        error=("port_exited", -9),
        may_have_run=True,
        caller_fault=True,
        retry_after=3.0,
    )
    assert (err.category, err.severity, err.recovery_strategy) == (
        Category.SYSTEM_ERROR, Severity.WARNING, Strategy.ABANDON
    )
    assert err.context is context  # kept as given: cheap on failure paths
    assert err.error == ("port_exited", -9)
    assert (err.may_have_run, err.caller_fault, err.retry_after) == (True, True, 3.0)
    assert CallerError("m", caller_fault=False).caller_fault is False


def test_pool_closed_error_is_a_trio_closed_resource_error() -> None:
    err = PoolClosedError("the pool is closed")
    assert isinstance(err, PoolError) and isinstance(err, trio.ClosedResourceError)
    with pytest.raises(trio.ClosedResourceError):
        raise err
    with pytest.raises(PoolError):
        raise PoolClosedError("closed")
    assert (err.category, err.recovery_strategy) == (Category.SYSTEM_ERROR, Strategy.ABANDON)


def test_circuit_open_error_has_retry_after_and_circuit() -> None:
    err = CircuitOpenError("refused", circuit="predict", retry_after=12.5)
    assert (err.circuit, err.retry_after) == ("predict", 12.5)
    assert err.recovery_strategy is Strategy.CIRCUIT_BREAK and not err.caller_fault
    assert CircuitOpenError("refused").circuit is None


def test_pool_saturated_is_a_resource_error_that_is_not_an_outage() -> None:
    err = PoolSaturatedError("queue full")
    assert isinstance(err, ResourceError)
    assert err.category is Category.RESOURCE_ERROR
    assert (err.severity, err.recovery_strategy) == (Severity.MINOR, Strategy.ABANDON)


def test_caller_error_defaults() -> None:
    err = CallerError("unknown command 'x'")
    assert err.caller_fault is True
    assert (err.severity, err.recovery_strategy) == (Severity.WARNING, Strategy.ABANDON)


def test_a_caller_fault_defaults_to_warning_and_abandon_in_any_class() -> None:
    declared = RemoteError("rejected", caller_fault=True)
    assert (declared.severity, declared.recovery_strategy) == (Severity.WARNING, Strategy.ABANDON)
    assert declared.category is Category.PYTHON_ERROR
    plain = RemoteError("raised")
    assert (plain.severity, plain.recovery_strategy) == (Severity.MAJOR, Strategy.FAILOVER)
    explicit = RemoteError("m", caller_fault=True, severity=Severity.MINOR)
    assert (explicit.severity, explicit.recovery_strategy) == (Severity.MINOR, Strategy.ABANDON)


def test_remote_error_extra_attributes() -> None:
    err = RemoteError("m", remote_type="KeyError", remote_traceback="tb", may_have_run=True)
    assert (err.remote_type, err.remote_traceback, err.may_have_run) == ("KeyError", "tb", True)
    assert RemoteError("m").remote_type == "" and RemoteError("m").remote_traceback == ""


@pytest.mark.parametrize(
    "err",
    [
        RemoteError("m", remote_type="KeyError", remote_traceback="tb", caller_fault=True),
        CircuitOpenError("m", circuit="echo", retry_after=1.5, context={"attempt": 2}),
        PoolClosedError("m", may_have_run=True),
        WorkerConnectionError("m", severity=Severity.CRITICAL, error=("port_exited", -9)),
    ],
)
def test_errors_survive_pickle_and_copy(err: PoolError) -> None:
    for clone in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert type(clone) is type(err)
        assert vars(clone) == vars(err)
        assert str(clone) == str(err)


@pytest.mark.parametrize("category", list(Category))
def test_default_messages_are_sentences_with_something_to_do(category: Category) -> None:
    tag = {
        Category.INITIALIZATION_ERROR: "init_failed",
        Category.CONNECTION_ERROR: "port_exited",
        Category.COMMUNICATION_ERROR: "decode_error",
        Category.TIMEOUT_ERROR: "timeout",
        Category.RESOURCE_ERROR: "checkout_failed",
        Category.HEALTH_CHECK_ERROR: "health_check_failed",
        Category.SESSION_ERROR: "session_not_found",
        Category.PYTHON_ERROR: "python_exception",
        Category.SYSTEM_ERROR: "something_else",
    }[category]
    err = PoolErrorHandler.wrap_pool_error((tag, "detail"), {"worker_id": 5, "command": "cmd"})
    assert err.category is category
    # What happened, then what to do: at least two sentences, no unfilled template fields.
    assert err.message.count(". ") + err.message.count("; ") >= 1
    assert err.message.endswith(".")
    actions = ("retry", "fix", "raise", "make", "start", "nothing to do", "report")
    assert any(action in err.message.lower() for action in actions)
    assert "{" not in err.message
    assert str(err) == err.message
