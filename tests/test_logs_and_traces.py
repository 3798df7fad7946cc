"""Structured logs (every record of a call carries its fields; worker stderr on ``pool.worker``
with its slot; the README's JSON formatter) and tracing with OpenTelemetry (a span per call and
per attempt; the trace context in the frame reaches the handler; nothing at all without it).
The tracing tests need the ``otel`` extra and opentelemetry-sdk (in the ``test`` extra)."""

from __future__ import annotations

import json
import logging
import signal
from typing import Any, Iterator

import pytest
import trio

import pool._events
from bridge_worker import Context
from pool import Pool, PoolError
from pool.testing import InProcessLauncher, WorkerPools, fake_pool

HANDLERS = ["bridge_worker.builtin", "bridge_worker.testing", "handlers_ops"]
CALL_FIELDS = {"call_id", "command", "session_id", "attempt", "worker_slot", "worker_id"}
WORKER_FIELDS = {"worker_slot", "worker_id", "pid"}


class JsonFormatter(logging.Formatter):
    """The README's example (Operations, "Logs"): one JSON object per record, with the pool's
    fields when the record has them."""

    FIELDS = ("call_id", "command", "session_id", "attempt", "worker_slot", "worker_id", "pid")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)})
        return json.dumps(entry)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger("pool")
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def fields(record: logging.LogRecord, names: set[str]) -> dict[str, Any]:
    return {name: getattr(record, name) for name in names if hasattr(record, name)}


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


async def test_every_record_of_a_call_carries_its_fields(autojump_clock: trio.abc.Clock, records: Records) -> None:
    launcher = InProcessLauncher()
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2, launcher=launcher) as pool:
            records.records.clear()  # (the workers' starts)
            for i in range(20):  # calls that succeed log nothing, not even at DEBUG
                await pool.execute_in_session("user-7", "echo", i)
            assert records.records == []

            async def die_once(args: Any, ctx: Context) -> Any:
                del launcher.simulate["trace_context"]
                raise SystemExit(9)

            launcher.simulate["trace_context"] = die_once
            await pool.execute_in_session("user-7", "trace_context")  # retried once, on another worker
            while pool.health()["status"] != "healthy":  # (the lost worker's replacement)
                await trio.sleep(0.01)
            with pytest.raises(PoolError):
                await pool.execute("raise_error", "on purpose")  # fails over once, then gives up
    of_calls = [r for r in records.records if r.name == "pool" and ("retrying" in r.getMessage() or "failed after" in r.getMessage())]
    assert len(of_calls) == 3, [r.getMessage() for r in records.records]
    retried, failed_over, failed = of_calls
    assert fields(retried, CALL_FIELDS) == {
        "call_id": retried.call_id,
        "command": "trace_context",
        "session_id": "user-7",
        "attempt": 1,
        "worker_slot": retried.worker_slot,
        "worker_id": retried.worker_id,
    }
    assert retried.worker_slot in (0, 1) and retried.worker_id >= 1
    assert fields(failed, CALL_FIELDS) == {
        "call_id": failed_over.call_id,  # the same call through its attempts
        "command": "raise_error",
        "session_id": None,
        "attempt": 2,
        "worker_slot": failed.worker_slot,
        "worker_id": failed.worker_id,
    }
    assert failed_over.attempt == 1 and failed_over.worker_id != failed.worker_id  # failed over
    assert failed_over.call_id != retried.call_id
    exited = [r for r in records.records if "exited with code" in r.getMessage()]
    assert exited and set(fields(exited[0], WORKER_FIELDS)) == WORKER_FIELDS
    for record in records.records:
        assert "\n" not in record.getMessage()  # one line per event


async def test_fields_are_built_only_for_records_that_are_emitted(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    real = pool._events.call_fields
    monkeypatch.setattr("pool._recovery.call_fields", lambda call: built.append(call) or real(call))
    level = logging.getLogger("pool").level
    logging.getLogger("pool").setLevel(logging.ERROR)
    try:
        with trio.fail_after(100):
            async with fake_pool(HANDLERS, size=2) as p:
                with pytest.raises(PoolError):
                    await p.execute("raise_error", "on purpose")  # logs at INFO: not emitted
                assert built == []
                logging.getLogger("pool").setLevel(logging.INFO)
                with pytest.raises(PoolError):
                    await p.execute("raise_error", "on purpose")
                assert [c.attempt for c in built] == [1, 2]  # its failover, and its failure
    finally:
        logging.getLogger("pool").setLevel(level)


async def test_worker_stderr_goes_to_pool_worker_with_the_slot_one_line_a_record(
    worker_pool: WorkerPools, records: Records
) -> None:
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=2) as p:
            await p.execute("say", ["first line", "second line"])
            worker = next(w for w in p.statistics().workers if w.calls == 1)
            with trio.fail_after(10):
                while len([r for r in records.records if r.name == "pool.worker"]) < 2:
                    await trio.sleep(0.01)
    lines = [r for r in records.records if r.name == "pool.worker" and "line" in r.getMessage()]
    assert [r.getMessage().rpartition(": ")[2] for r in lines] == ["first line", "second line"]
    for record in lines:
        assert fields(record, WORKER_FIELDS) == {"worker_slot": worker.slot, "worker_id": worker.id, "pid": worker.pid}
        assert f"slot {worker.slot}" in record.getMessage()


async def test_the_readme_s_json_formatter_writes_one_object_per_line(
    autojump_clock: trio.abc.Clock, records: Records
) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2) as p:
            with pytest.raises(PoolError):
                await p.execute_in_session("user-1", "raise_error", "on purpose")
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in records.records]
    assert lines and all("\n" not in line for line in lines)
    failed = [json.loads(line) for line in lines if "failed after" in line]
    assert len(failed) == 1
    assert failed[0]["command"] == "raise_error" and failed[0]["session_id"] == "user-1"
    assert failed[0]["attempt"] == 2 and {"call_id", "worker_slot", "worker_id", "level", "logger"} <= set(failed[0])


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A configured OpenTelemetry SDK for one test: its exporter keeps the finished spans."""
    trace = pytest.importorskip("opentelemetry.trace", reason="the otel extra is not installed")
    sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk (the test extra) is not installed")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # What set_tracer_provider does, undone after the test (the API lets a process set it once).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def ids(span: Any) -> tuple[str, str]:
    """The trace id and span id of ``span``, as a W3C traceparent writes them."""
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def parent_of(context: dict[str, str]) -> tuple[str, str]:
    """The trace id and parent span id a trace context names (``00-trace-parent-flags``)."""
    assert set(context) == {"traceparent"}, context
    version, trace_id, span_id, _ = context["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id


async def test_without_a_configured_tracer_provider_nothing_is_traced(autojump_clock: trio.abc.Clock) -> None:
    # The API's default (a proxy provider) means "not configured": calls go straight to the
    # orchestrator, and frames carry no context.
    pytest.importorskip("opentelemetry.trace", reason="the otel extra is not installed")
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1) as p:
            assert p._call == p._recovery.call
            assert (await p.execute("trace_context"))["trace_context"] is None


async def test_a_call_and_each_attempt_get_a_span_and_the_handler_joins_the_trace(
    autojump_clock: trio.abc.Clock, spans: Any
) -> None:
    from opentelemetry import trace

    launcher = InProcessLauncher()

    async def die_once(args: Any, ctx: Context) -> Any:
        del launcher.simulate["trace_context"]  # the retry runs the real handler
        raise SystemExit(9)

    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2, launcher=launcher) as p:
            tracer = trace.get_tracer("test")
            with tracer.start_as_current_span("caller") as caller:
                plain = await p.execute("trace_context")
                launcher.simulate["trace_context"] = die_once
                # In a session: the retry goes to another worker with the session's state, in a
                # request re-encoded there, which carries the context too.
                retried = await p.execute_in_session("user-9", "trace_context")
    finished = {s.name: [] for s in spans.get_finished_spans()}
    for s in spans.get_finished_spans():
        finished[s.name].append(s)
    calls = finished["pool.call trace_context"]
    attempts = finished["pool.attempt trace_context"]
    assert len(calls) == 2 and len(attempts) == 3
    first_call, second_call = calls
    for call in calls:
        assert call.parent.span_id == caller.get_span_context().span_id
        assert call.context.trace_id == caller.get_span_context().trace_id
        assert call.kind == trace.SpanKind.CLIENT and call.status.is_ok
    assert parent_of(plain["trace_context"]) == ids(first_call)
    assert parent_of(retried["trace_context"]) == ids(second_call)
    assert second_call.attributes["pool.session_id"] == "user-9"
    lost, ok = [a for a in attempts if a.parent.span_id == second_call.context.span_id]
    (plain_attempt,) = [a for a in attempts if a.parent.span_id == first_call.context.span_id]
    assert lost.attributes["pool.call_id"] == ok.attributes["pool.call_id"] != plain_attempt.attributes["pool.call_id"]
    assert (lost.attributes["pool.attempt"], ok.attributes["pool.attempt"]) == (1, 2)
    assert not lost.status.is_ok and lost.attributes["pool.error.category"] == "connection_error"
    assert ok.status.is_ok and lost.attributes["pool.worker_id"] != ok.attributes["pool.worker_id"]
    assert {"pool.worker_slot", "pool.worker_id"} <= set(ok.attributes)


async def test_a_failed_call_s_span_says_why(autojump_clock: trio.abc.Clock, spans: Any) -> None:
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=2) as p:
            with pytest.raises(PoolError):
                await p.execute("raise_error", "on purpose")
            with pytest.raises(PoolError):
                await p.execute("no_such_command")
    by_name: dict[str, list[Any]] = {}
    for s in spans.get_finished_spans():
        by_name.setdefault(s.name, []).append(s)
    (call,) = by_name["pool.call raise_error"]
    assert not call.status.is_ok and "RemoteError" in call.status.description
    assert call.attributes["pool.error.category"] == "python_error"
    assert len(by_name["pool.attempt raise_error"]) == 2  # and its failover
    (unknown,) = by_name["pool.call no_such_command"]
    assert not unknown.status.is_ok and "pool.attempt no_such_command" not in by_name


async def test_a_real_worker_gets_the_context_and_never_imports_opentelemetry(
    worker_pool: WorkerPools, spans: Any
) -> None:
    with trio.fail_after(30):
        async with worker_pool(HANDLERS, size=1) as p:
            got = await p.execute("trace_context")
            await p.execute("echo", 1)
            # A worker killed mid-call: the retry's frame is the same, context included.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.execute, "sleep", 0.5)
                await trio.sleep(0.2)
                _kill_all(p)
    (call,) = [s for s in spans.get_finished_spans() if s.name == "pool.call trace_context"]
    assert parent_of(got["trace_context"]) == ids(call) and got["otel_imported"] is False
    sleeps = [s for s in spans.get_finished_spans() if s.name == "pool.attempt sleep"]
    assert len(sleeps) == 2 and [s.status.is_ok for s in sleeps] == [False, True]


def _kill_all(p: Pool) -> None:
    import os

    for pid in p.worker_pids():
        os.kill(pid, signal.SIGKILL)
