"""The runtime's state tables and invariants: a call's and a worker's transitions, and the
checkout's invariants (its module docstring) held after every step of random traffic with kills,
cancellations, timeouts and sessions (hypothesis, on the fake worker in virtual time)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge_worker.protocol import CommandInfo
from fake_worker import FakeLauncher
from pool import Pool, PoolConfig, PoolError, open_pool
from pool._call import TRANSITIONS as CALL_TRANSITIONS
from pool._call import Call, CallState, TransitionError
from pool._worker import TRANSITIONS as WORKER_TRANSITIONS
from pool._worker import Worker, WorkerState

# ---------------------------------------------------------------- the tables


def _call() -> Call[Any, Any]:
    info = CommandInfo("echo", True, (), False, False)
    return Call(info, None, b"", 1, 1, math.inf, None, None, lambda c: None)


@pytest.mark.parametrize("old", list(CallState))
@pytest.mark.parametrize("new", list(CallState))
async def test_a_call_moves_only_as_its_table_allows(old: CallState, new: CallState) -> None:
    call = _call()
    call.state = old
    if new in CALL_TRANSITIONS[old]:
        call.move(new)
        assert call.state is new
    else:
        with pytest.raises(TransitionError):
            call.move(new)
        assert call.state is old


async def test_an_outcome_before_the_caller_parks_is_kept_not_rescheduled() -> None:
    call = _call()
    assert call.fail(ValueError("found while routing"))
    assert call.state is CallState.DONE and call.outcome is not None
    with pytest.raises(ValueError):
        call.outcome.unwrap()
    assert not call.fail(ValueError("again"))  # one outcome only


class _Proc:
    pid = 1
    written = 0

    def kill(self) -> None:
        pass


@pytest.mark.parametrize("old", list(WorkerState))
@pytest.mark.parametrize("new", list(WorkerState))
async def test_a_worker_moves_only_as_its_table_allows_and_keeps_the_idle_list(
    old: WorkerState, new: WorkerState
) -> None:
    idle: list[Worker] = []
    worker = Worker(
        1, 0, _Proc(), max_frame_size=1024, tail_lines=5, idle=idle, sink=None, clock=trio.current_time  # type: ignore[arg-type]
    )
    worker.state = old
    if old is WorkerState.IDLE:
        idle.append(worker)
    if new in WORKER_TRANSITIONS[old]:
        worker.set_state(new)
        assert worker.state is new
    else:
        with pytest.raises(TransitionError):
            worker.set_state(new)
    assert (worker.state is WorkerState.IDLE) == (worker in idle)


def test_a_pool_has_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="open_pool"):
        Pool(PoolConfig(), None)


# ---------------------------------------------------------------- the checkout under random traffic

COMMANDS = ["echo", "sleep", "psleep", "raise_error", "crash_idem", "nsleep", "hang_finish", "counter"]
calls = st.tuples(
    st.just("call"),
    st.sampled_from(COMMANDS),
    st.sampled_from([None, None, "a", "b"]),  # session
    st.sampled_from([None, 0.4, 3.0]),  # timeout
    st.sampled_from([None, None, 0.0, 0.2]),  # cancel the caller after this long
)
kills = st.tuples(st.just("kill"), st.integers(0, 50))
waits = st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.3, 1.5]))
closes = st.tuples(st.just("close_session"), st.sampled_from(["a", "b"]))
ops = st.lists(st.one_of(calls, calls, calls, kills, waits, waits, closes), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, depth=st.sampled_from([1, 3]))
# Found by this test: a failover waiting for another worker than the idle one, when the other dies.
@example(ops=[("call", "echo", None, None, None)] * 7 + [
    ("call", "nsleep", None, None, None), ("call", "raise_error", None, None, None), ("kill", 0)
], depth=1)
def test_the_checkout_keeps_its_invariants_under_random_traffic(ops: list[Any], depth: int) -> None:
    async def main() -> None:
        outcomes: list[Any] = []
        with trio.fail_after(600):  # virtual seconds
            async with trio.open_nursery() as outer:
                launcher = FakeLauncher(outer)
                config = PoolConfig(size=2, pipeline_depth=depth, max_queue=50, timeout=5.0)
                async with open_pool(config, launcher=launcher) as pool:
                    checkout = pool._checkout

                    async def one(command: str, session: str | None, timeout: float | None, cancel: float | None) -> None:
                        args: Any = 0.1 if command in ("sleep", "psleep", "nsleep") else "x"
                        if command == "crash_idem":
                            args = 1  # its exit code
                        result: Any = None
                        with trio.CancelScope() as scope:
                            if cancel == 0.0:
                                scope.cancel()
                            elif cancel is not None:
                                scope.deadline = trio.current_time() + cancel
                            try:
                                if session is None:
                                    result = await pool.execute(command, args, timeout=timeout)
                                else:
                                    result = await pool.execute_in_session(session, command, args, timeout=timeout)
                            except PoolError as exc:
                                result = exc
                            outcomes.append((command, result))
                        if command == "echo" and not isinstance(result, PoolError) and not scope.cancelled_caught:
                            assert result == "x"

                    async with trio.open_nursery() as n:
                        for op in ops:
                            if op[0] == "call":
                                n.start_soon(one, *op[1:])
                            elif op[0] == "kill":
                                alive = [p for p in launcher.launched if p.code is None]
                                if alive:
                                    alive[op[1] % len(alive)].exit(-9)
                            elif op[0] == "wait":
                                await trio.sleep(op[1])
                            else:
                                await pool.close_session(op[1])
                            await trio.testing.wait_all_tasks_blocked()
                            checkout.check_invariants()
                        # Everything started ends (within its deadline) and leaves nothing behind.
                    checkout.check_invariants()
                    assert pool.statistics().queued == 0
                assert pool.statistics().queued == 0
                outer.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
