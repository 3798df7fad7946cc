"""Checkout, the hot path: which worker runs each call, and when.

Every attempt of every call goes through here. :meth:`Checkout.start` routes it (an idle worker, a
busy one with room in its pipeline, or the FIFO queue) and writes the request, and the caller
parks once; the worker's reader hands the reply to :meth:`Checkout.replied`, which gives the worker its
next call at once and reschedules the caller directly. One timer task watches every deadline, kept
in one place (:class:`Deadlines`). There is no lock, cancel scope or extra task per call: all circuits closed, a call
costs a few dictionary lookups, a heap push, one write and one park.

Invariants:

1. A worker is in ``idle`` exactly when its state is IDLE (:meth:`Worker.set_state` keeps it so).
2. No queued call could run on an idle worker: a call is queued only when no idle worker may take
   it (a failover avoids the worker it failed on), and a worker that becomes free takes the first
   queued call it may run before it goes idle.
3. A QUEUED call is in exactly one queue (``queue``, or the ``pinned`` queue of its session's
   worker) and ``call.where`` names it; ``waiting`` counts them. A RUNNING or ABANDONED call is in
   its worker's ``inflight``, in the order it was written, which is the order the worker answers.
4. Every call that is not DONE has an entry in ``Deadlines`` no later than its deadline (and, while
   running, its attempt deadline); entries of DONE calls are skipped, and pruned in bulk.
5. A session call routed here holds its session's turn; a session sits on at most one worker, only
   a session call places it there, and a closed session is never placed again.
6. A call is written behind others (pipelined) only while the pool is calm (every worker up, every
   circuit closed), only behind calls that are pipelined too, in queue order, and never ahead of a
   session call waiting for that worker.
7. A failure found while routing, in the caller's own task, becomes that call's outcome; only a
   parked caller is rescheduled (see ``pool._call``).
"""

from __future__ import annotations

import heapq
import math
import signal
from bisect import bisect_left
from collections import deque
from typing import Any, Callable, cast

import outcome
import trio

from bridge_worker.protocol import (
    STREAM_WINDOW,
    BatchError,
    EncodeError,
    Encoder,
    ErrorReply,
    Reply,
    StreamCancel,
    StreamCredit,
    encode,
)
from pool._breaker import CircuitBreaker, CircuitRegistry, CircuitState
from pool._call import ABANDONED, DONE, NEW, QUEUED, RUNNING
from pool._config import PoolConfig
from pool._errors import PoolError
from pool._learning import AdaptiveTimeouts
from pool._matrix import PoolErrorHandler, outside_error
from pool._metrics import CALL_BUCKETS, PoolMetrics
from pool._sessions import SessionStore
from pool._worker import BUSY, DEAD, IDLE, Worker, WorkerCall

_CLOSED = CircuitState.CLOSED
# Deaths the pool causes for one call's sake; the calls pipelined behind it fail as if the worker
# had died under them (they did not cause it, and are retried if they may be).
_ONE_CALLS_FAULT = frozenset({"timeout", "cancelled", "resource_exhausted"})
# The heap is pruned of finished calls' entries when it grows past this, or twice its live size.
_PRUNE_MIN = 1024
# What wakes a stream's consumer for a new item (its end wakes it with the final reply).
_MORE = object()
# A stream's worker gets credit for the items its consumer took, this many at a time.
_CREDIT_EVERY = STREAM_WINDOW // 2


class Checkout:
    """Idle workers, the wait queues, routing, dispatch, replies and deadlines (see above)."""

    def __init__(
        self,
        config: PoolConfig,
        errors: PoolErrorHandler,
        sessions: SessionStore,
        circuits: CircuitRegistry,
        pool_circuit: CircuitBreaker,
        clock: Callable[[], float],
        metrics: PoolMetrics | None = None,
    ) -> None:
        self.config = config
        self._errors = errors
        self._sessions = sessions
        self._circuits = circuits
        self._pool_circuit = pool_circuit
        self._now = clock
        self._size = config.size
        self._depth = config.pipeline_depth
        limit = config.attempt_timeout
        self._attempt_timeout = None if limit is None or limit == "adaptive" else float(limit)
        #: Each command's attempt limit from its latency, with attempt_timeout="adaptive".
        self.adaptive = AdaptiveTimeouts(config.adaptive_timeouts) if limit == "adaptive" else None
        self._max_queue = config.max_queue
        self._encoder = Encoder(config.max_frame_size)
        self.workers: list[Worker] = []  # said hello and not yet buried (RETIRING included)
        self.idle: list[Worker] = []
        self.queue: deque[WorkerCall] = deque()  # calls for any worker, first come first served
        self.pinned = 0  # calls waiting in the pinned queues of their sessions' workers
        self.closing = False
        self._deadlines = Deadlines()
        self._timer_scope = trio.CancelScope()
        # Each attempt's wait for a worker, when metrics are recorded.
        self._waits = metrics.queue_wait if metrics is not None else None

    # ------------------------------------------------------------------ the caller's side

    @property
    def waiting(self) -> int:
        """Calls waiting for a worker or for their session's turn."""
        return len(self.queue) + self.pinned + self._sessions.waiting

    def check_room(self, session_id: str | None) -> None:
        """Raise PoolSaturatedError if no more calls may wait (PoolConfig.max_queue)."""
        if len(self.queue) + self.pinned + self._sessions.waiting >= self._max_queue:
            raise self._saturated(session_id)

    def _saturated(self, session_id: str | None) -> PoolError:
        return outside_error(
            "queue_full",
            f"the pool is saturated: {self.waiting} calls are already waiting for "
            f"{self._size} workers. Slow down, or raise PoolConfig.max_queue or size.",
            context={"session_id": session_id},
        )

    def start(self, call: WorkerCall) -> None:
        """Route ``call`` (in its caller's task, which then parks on it unless it has its
        ``outcome`` already). Raises PoolError when it cannot even wait: it did not start."""
        if self.closing:  # a retry after the pool began to close: nothing would serve it
            raise closed_error()
        if self._deadlines.add(call.deadline, call):
            self._timer_scope.deadline = call.deadline
        try:
            self._place(call, new=True)
        except PoolError:  # no room to wait
            call.drop()
            raise

    def abort(self, call: WorkerCall) -> None:
        """The parked caller of ``call`` was cancelled."""
        state = call.state
        if state is QUEUED:
            self._unqueue(call)
            call.drop()
        elif state is RUNNING:
            worker = call.worker
            assert worker is not None
            # Kill the worker whenever in doubt, unless the command chose to let a cancelled call
            # finish, or other calls share the worker's pipeline (killing it would fail them;
            # pipelined commands are short by declaration). Either way the deadline still bounds
            # it, and its reply is dropped when it comes.
            if call.stream is not None:
                self.cancel_stream(call)  # a stream has a clean way to stop: no kill needed
            elif call.info.finish_on_cancel or len(worker.inflight) > 1:
                call.move(ABANDONED)
            else:
                call.drop()
                worker.kill(("cancelled", "caller cancelled the call"))

    # ------------------------------------------------------------------ routing

    def _place(self, call: WorkerCall, *, new: bool) -> None:
        """Give ``call`` to a worker now, or queue it (``new``: a call not yet counted as
        waiting, which may find the queue full)."""
        session = call.session
        if session is None:
            idle = self.idle
            if idle:
                worker: Worker | None = idle[-1]
                if worker is call.avoid and len(self.workers) > 1:
                    worker = next((w for w in idle if w is not call.avoid), None)
                if worker is not None:
                    self._dispatch(worker, call)
                    return
            elif call.pipelined and not self.queue:
                busy = self._pipe_target(call)
                if busy is not None:
                    self._dispatch(busy, call)
                    return
            self._enqueue(call, self.queue, new)
            return
        if session.closed:
            call.fail(session.closed_error())
            return
        holder = cast("Worker | None", session.holder)
        if holder is None or not holder.serving:
            holder = self._least_loaded(call.avoid)
            if holder is None:  # no worker up right now: the first one that is takes it
                self._enqueue(call, self.queue, new)
                return
            session.place(holder)
        if holder.state is IDLE:
            self._dispatch(holder, call)
        else:
            self._enqueue(call, holder.pinned, new)

    def _least_loaded(self, avoid: Worker | None) -> Worker | None:
        best: Worker | None = None
        best_key: tuple[int, int, int] | None = None
        for w in self.workers:
            if not w.serving or (w is avoid and len(self.workers) > 1):
                continue
            key = (len(w.sessions), len(w.inflight), len(w.pinned))
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def _enqueue(self, call: WorkerCall, queue: deque[WorkerCall], new: bool) -> None:
        # check_room(), written out: most calls that wait come here.
        if new and len(self.queue) + self.pinned + self._sessions.waiting >= self._max_queue:
            raise self._saturated(call.session.id if call.session is not None else None)
        if call.state is NEW:
            call.move(QUEUED)
            if self._waits is not None and not call.queued_at:
                call.queued_at = self._now()
        queue.append(call)
        call.where = queue
        if queue is not self.queue:
            self.pinned += 1

    def _unqueue(self, call: WorkerCall) -> None:
        queue = call.where
        if queue is not None:
            queue.remove(call)
            call.where = None
            if queue is not self.queue:
                self.pinned -= 1

    def _dispatch(self, worker: Worker, call: WorkerCall, now: float | None = None) -> bool:
        """Write ``call`` to ``worker``. False if it failed instead (its session's state does not
        fit in a frame with it). ``now``: the time, if the caller has just read it (for the
        queue-wait metric; else the clock is read when a queued call needs it)."""
        frame = call.frame
        session = call.session
        if session is not None:
            if session.holder is not worker:
                session.place(worker)
            if not session.on_worker:
                # This worker does not hold the session yet: send its committed state along.
                try:
                    frame = self._encoder.request(
                        call.req_id, call.command, call.args, session.id, session.state, call.trace_context
                    )
                except EncodeError as exc:
                    call.fail(outside_error(
                        "session_limit",
                        f"session {session.id!r}: its committed state ({len(session.state)} "
                        f"bytes) and these arguments together are over the frame limit "
                        f"({self.config.max_frame_size} bytes, PoolConfig.max_frame_size): "
                        f"{exc}. Keep session state smaller. The call did not run.",
                        context=self.call_context(call, False),
                    ))
                    return False
                session.on_worker = True
        waits = self._waits
        if waits is not None:  # (Histogram.observe, written out: this is every attempt's path)
            if call.state is QUEUED:
                wait = (self._now() if now is None else now) - call.queued_at
                waits.counts[bisect_left(CALL_BUCKETS, wait)] += 1
                waits.sum += wait
            else:
                waits.counts[0] += 1  # it waited for nothing: the lowest bucket
        call.move(RUNNING)
        call.worker = worker
        worker.inflight.append(call)
        if worker.state is not BUSY:
            worker.set_state(BUSY)
        if self._attempt_timeout is not None:
            call.attempt_deadline = min(call.deadline, self._now() + self._attempt_timeout)
            if self._deadlines.add(call.attempt_deadline, call):
                self._timer_scope.deadline = call.attempt_deadline
        elif self.adaptive is not None:
            call.started = now = self._now()
            limit = self.adaptive.limit(call.info.name)
            if limit is not None:
                call.attempt_deadline = min(call.deadline, now + limit)
                if self._deadlines.add(call.attempt_deadline, call):
                    self._timer_scope.deadline = call.attempt_deadline
        proc = worker.proc
        call.offset = proc.written
        try:
            proc.write(frame)
        except OSError:
            return True  # the worker is dying; its reader sees the end and fails this call
        call.sent = True
        return True

    # ------------------------------------------------------------------ pipelining

    def _calm(self) -> bool:
        """Pipelining is for the fast path: every worker up, every circuit closed. While the pool
        is degraded (a worker restarting, failures piling up) calls wait for a free worker, so
        that one more death fails one call rather than every call behind it. (At least the
        target's workers: a rolling restart's spare, or workers leaving after a shrink, do not
        make the pool degraded.)"""
        return (
            len(self.workers) >= self._size
            and not self._circuits.not_closed
            and self._pool_circuit.state is _CLOSED
        )

    def _pipe_target(self, call: WorkerCall) -> Worker | None:
        """The busy worker with the fewest calls in flight that may take ``call`` behind them."""
        if not self._calm():
            return None
        best: Worker | None = None
        best_n = self._depth
        for w in self.workers:
            n = len(w.inflight)
            if n < best_n and self._has_room(w, call):
                best, best_n = w, n
                if n == 1:
                    break
        return best

    def _has_room(self, worker: Worker, call: WorkerCall) -> bool:
        """Whether ``call`` (pipelined) may be written behind the calls ``worker`` is running:
        they are pipelined too and leave room, the worker is not about to be recycled, no session
        call waits for it (those go first, when it is free), and it is not the worker a failover
        avoids."""
        inflight = worker.inflight
        limit = self.config.max_calls_per_worker
        return (
            0 < len(inflight) < self._depth
            and inflight[0].pipelined
            and worker.state is BUSY
            and (call.avoid is not worker or len(self.workers) == 1)
            and not worker.retire
            and not worker.pinned
            and (limit is None or worker.calls + len(inflight) < limit)
            and worker.failures < self.config.recycle_after_failures
            and not self.closing
        )

    def _top_up(self, worker: Worker, now: float | None = None) -> None:
        """Refill a busy worker's pipeline from the head of the queue (in queue order)."""
        if not self._calm():
            return
        queue = self.queue
        while queue and queue[0].pipelined and self._has_room(worker, queue[0]):
            call = queue.popleft()
            call.where = None
            self._dispatch(worker, call, now)

    # ------------------------------------------------------------------ the worker's side

    def replied(self, worker: Worker, call: WorkerCall, msg: Reply | ErrorReply | BatchError) -> None:
        """``worker`` answered ``call`` (its reader has taken it off ``inflight``)."""
        session = call.session
        if session is not None and type(msg) is Reply and msg.session_state is not None:
            # Also for a call whose caller is gone: the worker has committed it.
            session.commit(worker, msg.session_state, self._now())
        # (The worker's reader read the clock as this reply arrived: the queue-wait metric of a
        # call handed to the worker now needs no other read.)
        if not worker.inflight:
            self.release(worker, worker.last_io)
        elif self.queue:
            self._top_up(worker, worker.last_io)
        call.finish(outcome.Value(msg))

    # ------------------------------------------------------------------ streams

    def stream_item(self, call: WorkerCall, item: Any) -> None:
        """An item of a stream call arrived: keep it for the consumer, and wake it if it waits."""
        buffer = call.stream
        if buffer is None or call.state is not RUNNING:
            return  # its consumer left (the worker had not seen the cancel yet): dropped
        buffer.items.append(item)
        if call.parked:
            call.parked = False
            trio.lowlevel.reschedule(call.task, outcome.Value(_MORE))

    async def next_item(self, call: WorkerCall) -> tuple[bool, Any]:
        """``(True, item)``: the stream's next item; ``(False, reply)``: its end (the worker's
        Reply or ErrorReply). Raises the PoolError of a stream its worker failed (died, timed
        out). Gives the worker credit as the consumer takes items."""
        buffer = call.stream
        assert buffer is not None
        while True:
            if buffer.items:
                buffer.taken += 1
                buffer.unacked += 1
                if buffer.unacked >= _CREDIT_EVERY and call.state is RUNNING:
                    self._credit(call, buffer.unacked)
                    buffer.unacked = 0
                return True, buffer.items.popleft()
            result = call.outcome
            if result is not None:
                return False, result.unwrap()
            call.parked = True
            got = await trio.lowlevel.wait_task_rescheduled(call.abort)
            if got is not _MORE:
                return False, got

    def cancel_stream(self, call: WorkerCall) -> None:
        """The consumer of a stream left before its end (or was cancelled): the worker closes
        the generator (its ``finally`` runs) and stays usable; what is still on its way is
        dropped, and the deadline still bounds it."""
        if call.state is QUEUED:
            self._unqueue(call)
            call.drop()
        elif call.state is RUNNING:
            call.move(ABANDONED)
            assert call.stream is not None and call.worker is not None
            call.stream.items.clear()
            try:
                call.worker.proc.write(encode(StreamCancel(call.req_id)))
            except OSError:
                pass  # dying: its reader reports that

    def _credit(self, call: WorkerCall, n: int) -> None:
        assert call.worker is not None
        try:
            call.worker.proc.write(encode(StreamCredit(call.req_id, n)))
        except OSError:
            pass

    def release(self, worker: Worker, now: float | None = None) -> None:
        """``worker`` has no call in flight: give it its next call, recycle it, or idle it.
        ``now``: the time, if the caller has just read it (see :meth:`_dispatch`)."""
        limit = self.config.max_calls_per_worker
        if (
            worker.retire
            or self.closing
            or (limit is not None and worker.calls >= limit)
            or worker.failures >= self.config.recycle_after_failures
        ):
            if worker.retire is None and not self.closing:
                worker.retire = "recycled_calls" if limit is not None and worker.calls >= limit else "recycled_failures"
            self.stop(worker)
            return
        while True:
            call = self._next_for(worker)
            if call is None:
                if worker.state is BUSY:
                    worker.set_state(IDLE)
                return
            if self._dispatch(worker, call, now):
                break
        if call.pipelined and self.queue:
            self._top_up(worker, now)

    def _next_for(self, worker: Worker) -> WorkerCall | None:
        """The next call ``worker`` may run: its sessions' calls first, then the queue's."""
        if worker.pinned:
            call = worker.pinned.popleft()
            self.pinned -= 1
        else:
            queue = self.queue
            if not queue:
                return None
            call = queue[0]
            if call.avoid is worker and len(self.workers) > 1:
                # A failover must run elsewhere: this worker takes the next call it may run.
                found = next((c for c in queue if c.avoid is not worker), None)
                if found is None:
                    return None
                call = found
                queue.remove(call)
            else:
                queue.popleft()
        call.where = None
        return call

    def add(self, worker: Worker) -> None:
        """A worker said hello: it serves from now on, starting with what waits."""
        self.workers.append(worker)
        worker.set_state(IDLE)
        self.release(worker)

    def set_size(self, size: int) -> None:
        """The pool's target size changed (resize, autoscale): the pool is calm with that many
        workers up."""
        self._size = size

    def retire(self, worker: Worker, reason: str) -> None:
        """Take ``worker`` out of service: it takes no more calls once the ones it runs are done,
        then exits (its sessions move on with their committed state, its waiting calls go
        elsewhere). Whether it is replaced is its slot's business; ``reason`` says why it leaves
        (``memory``, ``age``, ``rolling_restart``, ``shrink``)."""
        worker.retire = reason
        if worker.state is IDLE:
            self.stop(worker)

    def stop(self, worker: Worker) -> None:
        """Recycle ``worker``: it exits after its calls, its waiting calls go elsewhere, and the
        supervisor replaces it."""
        worker.stop()
        self._reroute_pinned(worker)

    def recycle(self, worker: Worker) -> None:
        """Replace ``worker`` once its calls are done (recovery level 3)."""
        if worker.serving:
            worker.retire = "recovery"
            if worker.state is IDLE:
                self.stop(worker)

    def remove(self, worker: Worker) -> None:
        """``worker``'s channel ended: it serves nothing more. Its waiting calls go elsewhere,
        its sessions move off with their committed state."""
        if worker.state is not DEAD:
            worker.set_state(DEAD)
        if worker in self.workers:
            self.workers.remove(worker)
        self._reroute_pinned(worker)
        if len(self.workers) == 1 and self.queue:
            (last,) = self.workers
            if last.state is IDLE:
                # A failover that avoided it waited for another worker; now there is none.
                self.release(last)

    def _reroute_pinned(self, worker: Worker) -> None:
        """Route the calls that waited for ``worker`` elsewhere; their sessions move with their
        committed state (none of these calls has been sent)."""
        for session in list(worker.sessions):
            session.move_off()
        while worker.pinned:
            call = worker.pinned.popleft()
            call.where = None
            self.pinned -= 1
            if self.closing:
                call.fail(closed_error())
            else:
                self._place(call, new=False)

    def fail_inflight(self, worker: Worker) -> None:
        """Fail the calls ``worker`` had in flight when it died (after :meth:`Worker.reap`)."""
        calls = list(worker.inflight)
        worker.inflight.clear()
        code = worker.exit_code
        why = worker.death or ("port_exited", code)
        if why[0] in _ONE_CALLS_FAULT:
            # The call that caused it has failed already; these only shared its worker.
            why = ("port_exited", code)
        for call in calls:
            # A request still unread in the pipe never reached the worker: the call did not
            # run, so it is safe to run again even if its command is not idempotent.
            if call.sent:
                call.sent = worker.delivered > call.offset
            if why[0] == "pool_closed":
                error: PoolError = closed_error(may_have_run=call.sent)
            else:
                error = self.worker_error(call, why, worker)
            call.fail(error)

    def fail_waiting(self, error: Callable[[], PoolError]) -> None:
        """Fail every call waiting for a worker (the pool closes, or no worker can start)."""
        for queue in [self.queue] + [w.pinned for w in self.workers]:
            while queue:
                call = queue.popleft()
                call.where = None
                if queue is not self.queue:
                    self.pinned -= 1
                call.fail(error())

    def session_closed(self, session_id: str) -> None:
        """A session was closed: its call waiting for a worker (there is at most one: the one
        that holds its turn) fails without running."""
        for queue in [self.queue] + [w.pinned for w in self.workers]:
            for call in [c for c in queue if c.session is not None and c.session.id == session_id]:
                self._unqueue(call)
                assert call.session is not None
                call.fail(call.session.closed_error())

    # ------------------------------------------------------------------ the invariants, checked

    def check_invariants(self) -> None:
        """Raise AssertionError where an invariant of this module's docstring does not hold.
        For tests: it walks every queue and worker."""
        workers = self.workers
        idle = self.idle
        assert len(set(map(id, idle))) == len(idle), "a worker twice in the idle list"
        assert all(w in workers for w in idle), "an idle worker the checkout does not have"
        for w in workers:  # 1
            assert (w.state is IDLE) == (w in idle), f"worker {w.id} is {w.state}, idle list: {w in idle}"
        for call in self.queue:  # 2, 3
            assert call.state is QUEUED and call.where is self.queue, f"{call.req_id} in the queue"
            for w in idle:
                assert call.avoid is w and len(workers) > 1, f"{call.req_id} waits beside idle worker {w.id}"
        pinned = 0
        live: list[WorkerCall] = list(self.queue)
        for w in workers:
            for call in w.pinned:  # 3, 5
                assert call.state is QUEUED and call.where is w.pinned, f"{call.req_id} pinned to {w.id}"
                assert call.session is not None and call.session.holder is w, f"{call.req_id} pinned to {w.id}"
                live.append(call)
            pinned += len(w.pinned)
            for call in w.inflight:  # 3
                assert call.worker is w, f"{call.req_id} in the wrong worker's inflight"
                if call.state is DONE:
                    assert w.state is DEAD, f"{call.req_id} is done but still in worker {w.id}"
                else:
                    assert call.state is RUNNING or call.state is ABANDONED, f"{call.req_id}: {call.state}"
                    live.append(call)
            if len(w.inflight) > 1:  # 6
                assert all(c.pipelined for c in w.inflight), f"worker {w.id}: a call not pipelined in a pipeline"
            for session in w.sessions:  # 5
                assert session.holder is w and not session.closed, f"session {session.id} on worker {w.id}"
        assert pinned == self.pinned, f"pinned count {self.pinned}, pinned calls {pinned}"
        entries: dict[int, float] = {}
        for deadline, call in self._deadlines.entries():  # 4
            entries[id(call)] = min(deadline, entries.get(id(call), math.inf))
        for call in live:
            if call.deadline != math.inf:
                assert entries.get(id(call), math.inf) <= call.deadline, f"{call.req_id} has no deadline entry"

    # ------------------------------------------------------------------ deadlines

    async def run_timer(self) -> None:
        """The one task that watches every call's deadline."""
        deadlines = self._deadlines
        while True:
            with trio.CancelScope(deadline=deadlines.next) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            for call in deadlines.expired(now):
                state = call.state
                if state is QUEUED:
                    if call.deadline <= now:
                        self._unqueue(call)
                        call.fail(self._no_worker_in_time(call))
                elif state is RUNNING or state is ABANDONED:
                    if call.attempt_deadline <= now:
                        assert call.worker is not None
                        self._timed_out(call.worker, now)

    def _timed_out(self, worker: Worker, now: float) -> None:
        # A cancelled call left to finish counts too: a worker is never busy for ever.
        late = [c for c in worker.inflight if c.attempt_deadline <= now]
        why = ("timeout", "command_timeout")
        for call in late:
            worker.inflight.remove(call)
            if call.state is RUNNING:
                call.fail(self.worker_error(call, why, worker))
            else:
                call.drop()
        worker.kill(why)

    # ------------------------------------------------------------------ errors

    def call_context(self, call: WorkerCall, may_have_run: bool) -> dict[str, Any]:
        worker = call.worker
        return {
            "command": call.command,
            "session_id": call.session.id if call.session is not None else None,
            "worker_id": worker.id if worker is not None else None,
            "attempt": call.attempt,
            "may_have_run": may_have_run,
        }

    def worker_error(self, call: WorkerCall, why: tuple[str, Any], worker: Worker) -> PoolError:
        """The error of a call whose worker failed it (died, timed out, was killed)."""
        context = self.call_context(call, call.sent)
        code = worker.exit_code
        if code is not None:
            context["exit_code"] = code
            # SIGKILL that the pool did not send: an operator, the OOM killer, a chaos test.
            context["killed_from_outside"] = code == -signal.SIGKILL and not worker.killed_by_pool
        tail = worker.stderr_text(lines=10)
        if tail.strip():
            context["stderr"] = tail
        return self._errors.wrap_pool_error(why, context)

    def _no_worker_in_time(self, call: WorkerCall) -> PoolError:
        return outside_error(
            "no_worker_in_time",
            f"no worker took {call.command!r} before its deadline: all were busy, so nothing "
            "ran and no worker was touched. Raise the call's timeout or the pool's size, or "
            "send fewer calls at once.",
            context=self.call_context(call, False),
            error=("timeout", "checkout_timeout"),
        )


def closed_error(may_have_run: bool = False) -> PoolError:
    error = outside_error("pool_closed", "the pool is closed; open a new pool to run more calls")
    error.may_have_run = may_have_run
    error.context["may_have_run"] = may_have_run
    return error


class Deadlines:
    """Every deadline the checkout watches, with lazy deletion (as trio's own ``Deadlines``): an
    entry stays until its time comes, or until finished calls' entries are over half of them and
    are dropped in bulk; the timer skips the entries of calls that are DONE.

    Calls that start later with the same timeout get later deadlines, so nearly every deadline
    comes in order: those go in a FIFO, for the price of an append; the others in a heap.
    """

    __slots__ = ("next", "_fifo", "_last", "_heap", "_prune_at")

    def __init__(self) -> None:
        #: The earliest deadline held (math.inf: none). It may be a finished call's.
        self.next = math.inf
        self._fifo: deque[tuple[float, WorkerCall]] = deque()
        self._last = -math.inf  # the FIFO's last deadline
        # (deadline, id(call), call): ids tell equal deadlines apart without comparing calls.
        self._heap: list[tuple[float, int, WorkerCall]] = []
        self._prune_at = _PRUNE_MIN

    def add(self, deadline: float, call: WorkerCall) -> bool:
        """Watch ``deadline`` for ``call``. True if it is now the earliest."""
        if deadline == math.inf:
            return False
        if deadline >= self._last:
            self._fifo.append((deadline, call))
            self._last = deadline
        else:
            heapq.heappush(self._heap, (deadline, id(call), call))
        if len(self._fifo) + len(self._heap) > self._prune_at:
            self._prune()
        if deadline < self.next:
            self.next = deadline
            return True
        return False

    def expired(self, now: float) -> list[WorkerCall]:
        """Take out the entries due by ``now``; their calls (finished or not), in deadline order."""
        due: list[WorkerCall] = []
        fifo, heap = self._fifo, self._heap
        while True:
            if fifo and fifo[0][0] <= now and (not heap or fifo[0][0] <= heap[0][0]):
                due.append(fifo.popleft()[1])
            elif heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap)[2])
            else:
                break
        self.next = min(fifo[0][0] if fifo else math.inf, heap[0][0] if heap else math.inf)
        return due

    def entries(self) -> list[tuple[float, WorkerCall]]:
        return list(self._fifo) + [(deadline, call) for deadline, _, call in self._heap]

    def _prune(self) -> None:
        self._fifo = deque(entry for entry in self._fifo if entry[1].state is not DONE)
        self._heap = [entry for entry in self._heap if entry[2].state is not DONE]
        heapq.heapify(self._heap)
        self._prune_at = max(_PRUNE_MIN, 2 * (len(self._fifo) + len(self._heap)))
