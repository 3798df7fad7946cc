"""Supervisor: the worker slots (start, serve, bury, restart), the pool's size (resize, autoscale,
rolling restarts), restart pacing, the pool circuit, the monitor (heartbeats, memory limits, worker
ages, session TTLs, autoscaling) and the shutdown sequence.

Each slot keeps one worker alive: start it (spawn, then its hello within ``start_timeout``), hand it
to the checkout, let it serve until its channel ends, bury it (reap it, fail the calls it had), and
start the next. A slot whose starts keep failing waits longer each time
(``restart_delay`` doubling up to ``max_restart_delay``); past ``pool_circuit.failure_threshold``
failed starts in a row the pool circuit opens, and no slot starts anything until it lets one
trial through. While the circuit is open and no worker serves, calls fail fast with the startup
error, and calls already waiting fail with it too. A worker killed from outside is not a failed
start: a pool whose workers are SIGKILLed twenty times a second keeps replacing them.

The pool runs ``target`` slots (``PoolConfig.size`` at first). Growing adds slots. Shrinking
*retires* slots: a retired slot's worker takes no more calls, leaves once the ones it runs are done
(its sessions move on with their committed state, as after a crash but without one) and is not
replaced. A rolling restart replaces one worker at a time: it adds a spare slot, and once the
spare's worker serves, retires an old slot and waits until its worker has left. Resizing and
rolling restarts take turns (``_sizing``); the autoscaler (``pool._elastic``) stays still while
either runs.

Every wait of the shutdown sequence is bounded, whatever the worker processes do.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import signal
from collections import Counter
from typing import Any, Callable, Final, Mapping

import trio

from bridge_worker.protocol import PROTOCOL_VERSION, CommandInfo, Hello, Ping, encode
from pool._breaker import CircuitBreaker, CircuitState
from pool._checkout import Checkout, closed_error
from pool._config import PoolConfig, beat_timing
from pool._elastic import IdleWatch, QueueWatch, ScaleRule, age_limit
from pool._errors import InitializationError, PoolError
from pool._events import EventBus, PoolEvent, worker_fields
from pool._matrix import PoolErrorHandler, outside_error
from pool._metrics import PoolMetrics
from pool._process import Launcher
from pool._sessions import SessionStore
from pool._worker import DEAD, IDLE, KILL_WAIT, RETIRING, STARTING, StartFailure, Worker

_BEAT_PING = encode(Ping(0))  # to a worker that beats on its own: its pool is there

logger = logging.getLogger("pool")

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN

#: Why the pool ended a worker (the tag of ``Worker.death``), as a restart reason.
DEATH_REASONS: Final[Mapping[str, str]] = {
    "timeout": "timeout",  # its call's deadline or attempt timeout
    "cancelled": "cancel",  # its caller was cancelled
    "health_check_failed": "heartbeat",
    "resource_exhausted": "memory",  # over the hard limit
    "decode_error": "protocol_error",  # it sent a bad frame
    "port_exited": "crash",  # its channel broke
}


#: Every restart reason: restart_reason's answers, and a rolling restart's.
RESTART_REASONS: Final = (
    "crash",
    "killed",
    "timeout",
    "cancel",
    "heartbeat",
    "memory",
    "protocol_error",
    "recycled_calls",
    "recycled_failures",
    "age",
    "recovery",
    "rolling_restart",
)


def restart_reason(worker: Worker) -> str:
    """Why a slot had to replace ``worker`` (``statistics().restarts_by_reason``): how the pool
    ended it (DEATH_REASONS); else why it was asked to leave (``Worker.retire``: recycled for
    its calls, its failures, memory, age, by recovery); else it exited on its own: ``killed`` for
    a SIGKILL the pool did not send (an operator, the OOM killer), ``crash`` otherwise."""
    if worker.death is not None and worker.death[0] in DEATH_REASONS:
        return DEATH_REASONS[worker.death[0]]
    if worker.retire is not None:
        return worker.retire
    if worker.exit_code == -signal.SIGKILL and not worker.killed_by_pool:
        return "killed"
    return "crash"


class Slot:
    """One place for a worker: the worker it runs now, and whether it is to end."""

    __slots__ = ("index", "worker", "retired", "spare", "error", "recycle_at", "big_at_start", "ended", "pause")

    def __init__(self, index: int, spare: bool) -> None:
        #: Its number, unique among the slots that exist (``WorkerStatistics.slot``).
        self.index = index
        #: The worker it runs, from its spawn (STARTING) until it is buried.
        self.worker: Worker | None = None
        #: Its worker leaves once its calls are done, and is not replaced; then the slot ends.
        self.retired = False
        #: A rolling restart's spare until its first worker serves: one failed start ends it.
        self.spare = spare
        #: Why a spare's start failed.
        self.error: InitializationError | None = None
        #: When its worker is old enough to be recycled (PoolConfig.max_worker_age).
        self.recycle_at = math.inf
        #: Its worker was over the soft memory limit right after it started: it is not recycled
        #: for memory (a replacement would be as big: a recycle loop).
        self.big_at_start = False
        self.ended = trio.Event()
        #: The slot's wait before its next start, cancelled when the slot is retired.
        self.pause: trio.CancelScope | None = None


class Supervisor:
    """Starts, watches, replaces, resizes and finally stops the pool's workers."""

    def __init__(
        self,
        config: PoolConfig,
        launcher: Launcher,
        checkout: Checkout,
        sessions: SessionStore,
        pool_circuit: CircuitBreaker,
        errors: PoolErrorHandler,
        events: EventBus,
        clock: Callable[[], float],
        on_tick: Callable[[float], None] = lambda now: None,
        metrics: PoolMetrics | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._on_tick = on_tick  # the monitor's tick, for whoever keeps time-windowed counts
        self._launcher = launcher
        self._checkout = checkout
        self._sessions = sessions
        self.pool_circuit = pool_circuit
        pool_circuit.on_state_change = self._pool_circuit_changed
        self._errors = errors
        self._events = events
        self._now = clock
        self.starting: list[Worker] = []
        self.restarts = 0
        #: ``restarts`` by reason (see restart_reason); a rolling restart's are ``rolling_restart``.
        self.restarts_by_reason: Counter[str] = Counter()
        self.failed_starts = 0
        self.last_start_error: InitializationError | None = None
        # What open_pool and resize raise when workers cannot start (see _start_failed).
        self._gave_up: InitializationError | None = None
        self._worker_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._slots_scope = trio.CancelScope()
        self.slots_done = trio.Event()
        self.changed = trio.lowlevel.ParkingLot()  # a worker started or ended, a slot ended
        self._wakeup = trio.lowlevel.ParkingLot()  # slots waiting to start again
        #: The number of workers the pool runs now (PoolConfig.size at first).
        self.target = config.size
        #: Changes of ``target`` (resize, autoscale).
        self.size_changes = 0
        self._slots: dict[int, Slot] = {}
        self._sizing = trio.Lock()  # one resize or rolling restart at a time
        self._roll_asked = False  # recovery asked for a rolling restart, not done yet
        self._last_grow = -math.inf
        self._last_change = -math.inf
        self._scale_rule = (
            ScaleRule(config.size, config.max_size, config.scale_up_after, config.scale_down_after)
            if config.autoscaling and config.max_size is not None
            else None
        )
        self._queue_watch = QueueWatch()
        self._idle_watch = IdleWatch()
        #: Draws each worker's share of PoolConfig.worker_age_jitter.
        self.rng = random.Random()
        self._said_big_at_start = False

    # ------------------------------------------------------------------ slots

    async def run_slots(self) -> None:
        """Run every slot until the pool closes."""
        try:
            self._launcher.open(self.config)
            with self._slots_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for _ in range(self.target):
                        self._add_slot()
        finally:
            self.slots_done.set()

    def _add_slot(self, *, spare: bool = False) -> Slot:
        index = next(i for i in itertools.count() if i not in self._slots)
        slot = self._slots[index] = Slot(index, spare)
        assert self._nursery is not None
        self._nursery.start_soon(self._slot, slot)
        return slot

    async def _slot(self, slot: Slot) -> None:
        """Keep one worker alive in this slot: start, serve, bury, restart; until it is retired
        or the pool closes."""
        failures = 0
        checkout = self._checkout
        try:
            while not checkout.closing and not slot.retired:
                now = self._now()
                if not self.pool_circuit.allow(now):
                    if slot.spare:
                        slot.error = self._circuit_refusal(now)
                        return
                    # Open: until it lets a trial through. Half-open with its trials taken: until
                    # it changes. Either way a change of the circuit (or closing) wakes the slot.
                    wait = self.pool_circuit.time_until_retry(now)
                    await self._pause(slot, wait if wait > 0 else None)
                    continue
                worker = await self._start(slot)
                if worker is None:
                    if slot.spare:
                        return
                    failures += 1
                    cfg = self.config
                    await self._pause(slot, min(cfg.max_restart_delay, cfg.restart_delay * 2 ** (failures - 1)))
                    continue
                failures = 0
                try:
                    await worker.serve()
                finally:
                    # Also when the application's cancel scope around the pool cancels this task:
                    # the worker is killed and reaped on every way out (shielded inside).
                    await self._bury(slot, worker)
                if not checkout.closing and not slot.retired:
                    self.restarts += 1
                    self.restarts_by_reason[restart_reason(worker)] += 1
        finally:
            del self._slots[slot.index]
            slot.ended.set()
            self.changed.unpark_all()

    async def _pause(self, slot: Slot, seconds: float | None) -> None:
        """A slot's wait before its next start (None: until the pool circuit changes). Closing
        the pool or retiring the slot ends it at once, and so does the pool circuit changing (a
        worker started again: the others need not sit out their backoff)."""
        if self._checkout.closing or slot.retired:
            return
        with trio.move_on_after(math.inf if seconds is None else seconds) as scope:
            slot.pause = scope
            try:
                await self._wakeup.park()
            finally:
                slot.pause = None

    async def _start(self, slot: Slot) -> Worker | None:
        cfg = self.config
        checkout = self._checkout
        try:
            proc = self._launcher.launch(cfg.handlers, cfg.max_frame_size, cfg.max_session_state)
        except OSError as exc:
            slot.error = self._start_failed(StartFailure(f"cannot spawn {cfg.python!r}: {exc}"), "")
            return None
        worker = slot.worker = Worker(
            next(self._worker_ids),
            slot.index,
            proc,
            max_frame_size=cfg.max_frame_size,
            tail_lines=cfg.stderr_tail_lines,
            idle=checkout.idle,
            sink=checkout,
            clock=self._now,
        )
        self.starting.append(worker)
        assert self._nursery is not None
        self._nursery.start_soon(worker.run_helpers)
        try:
            hello: Hello | None = None
            with trio.move_on_at(worker.started_at + cfg.start_timeout):
                hello = await worker.handshake()
            if hello is None:
                raise StartFailure(f"worker did not say hello within {cfg.start_timeout}s (PoolConfig.start_timeout)")
            if hello.version != PROTOCOL_VERSION:
                raise StartFailure(
                    f"worker speaks protocol {hello.version}, the host {PROTOCOL_VERSION}: "
                    "install the same version of this package for both"
                )
        except StartFailure as failure:
            self.starting.remove(worker)
            slot.worker = None
            worker.kill(("init_failed", failure.message))
            await worker.reap()
            if not checkout.closing:
                slot.error = self._start_failed(failure, worker.stderr_text())
            return None
        except BaseException:
            # Cancelled while starting (a cancel scope around the whole pool): the process must
            # not outlive the pool, not even as a zombie.
            self.starting.remove(worker)
            slot.worker = None
            worker.kill(("pool_closed", "cancelled while starting"))
            await worker.reap()
            raise
        self.starting.remove(worker)
        if not proc.pid:  # a remote worker: its process id (on its own host) is in its hello
            proc.pid = hello.pid
        worker.commands = {c.name: c for c in hello.commands}
        now = self._now()
        self.pool_circuit.record_success(now)
        self.last_start_error = None
        if checkout.closing:
            worker.kill(("pool_closed", "the pool was closed while it started"))
            return worker
        worker.last_io = now
        logger.debug("worker %d (pid %d) ready in slot %d", worker.id, worker.pid, slot.index, extra=worker_fields(worker))
        if self._metrics is not None:
            self._metrics.worker_start.observe(now - worker.started_at)
        self._worker_event("worker_started", worker, slot=slot.index, startup_seconds=now - worker.started_at)
        if slot.retired:  # the pool shrank while it started: it leaves without serving
            worker.stop()
            return worker
        cfg = self.config
        if cfg.max_worker_age is not None:
            slot.recycle_at = now + age_limit(cfg.max_worker_age, cfg.worker_age_jitter, self.rng.random())
        slot.big_at_start = self._big_at_start(worker)
        checkout.add(worker)  # takes a waiting call at once, or goes idle
        self.changed.unpark_all()
        return worker

    def _big_at_start(self, worker: Worker) -> bool:
        """Whether ``worker`` is over the soft memory limit right after its start (handlers
        imported, start hooks run): recycling it would only start another as big, again and
        again. Said once per pool, as a warning."""
        soft = self.config.max_worker_memory
        if soft is None:
            return False
        rss = worker.proc.rss()
        if rss is None or rss <= soft:
            return False
        logger.log(
            logging.DEBUG if self._said_big_at_start else logging.WARNING,
            "worker %d uses %d bytes right after starting (handlers imported, start hooks run), "
            "over max_worker_memory (%d): a replacement would be as big, so workers over the soft "
            "limit from their start are not recycled for memory (the hard limit still applies). "
            "Raise PoolConfig.max_worker_memory above what a fresh worker needs.",
            worker.id,
            rss,
            soft,
        )
        self._said_big_at_start = True
        return True

    def _start_failed(self, failure: StartFailure, stderr_tail: str) -> InitializationError:
        message = f"a worker could not start: {failure.message}"
        if failure.module is not None:
            message += ". Fix the module or PoolConfig.handlers"
        if stderr_tail.strip():
            message += f"\n--- worker stderr (last lines) ---\n{stderr_tail}"
        error = self._errors.wrap_pool_error(("init_failed", message), {"message": message})
        assert isinstance(error, InitializationError)
        self.last_start_error = error
        logger.error("%s", message.splitlines()[0])
        now = self._now()
        if failure.counts:
            self.failed_starts += 1
            self.pool_circuit.record_failure(now)
        else:  # killed from outside while starting: not a crash loop; free a trial slot
            self.pool_circuit.release(now)
            self._wakeup.unpark_all()
        # open_pool gives up at once when a handlers module does not import (no retry can fix
        # that), and otherwise only once the pool circuit says starts keep failing: a start hook
        # that fails now and then is retried, as it is in an open pool.
        # The same rule holds for resize, which waits for workers to start too.
        broken_module = failure.module is not None and failure.module in self.config.handlers
        if (broken_module or self.pool_circuit.state is _OPEN) and self._gave_up is None:
            self._gave_up = error
        self.changed.unpark_all()
        return error

    async def _bury(self, slot: Slot, worker: Worker) -> None:
        """Reap a worker whose channel ended, fail its calls, free its slot."""
        with trio.CancelScope(shield=True):
            retiring = worker.state is RETIRING
            self._checkout.remove(worker)
            code = await worker.reap(self.config.shutdown_grace + 1.0 if retiring else 0.0)
            slot.worker = None
            self._checkout.fail_inflight(worker)
            if worker.death is not None:
                why = worker.death[0]
            else:  # it exited on its own: asked to (recycled, shrunk, replaced), or not
                why = "retired" if retiring else "port_exited"
            quiet = retiring or self._checkout.closing
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "worker %d (pid %d) exited with code %s (%s)",
                worker.id,
                worker.pid,
                code,
                why,
                extra=worker_fields(worker),
            )
            self._worker_event("worker_exited", worker, exit_code=code, reason=why)
            self.changed.unpark_all()

    # ------------------------------------------------------------------ the pool circuit

    def pool_down(self, now: float) -> PoolError | None:
        """The error a call gets while no worker can start and none serves, else None."""
        if self.pool_circuit.state is _CLOSED or any(w.serving for w in self._checkout.workers):
            return None
        cause = self.last_start_error
        message = "no worker can start, so the pool refuses calls"
        if cause is not None:
            message += f": {cause.message}"
        return outside_error(
            "pool_down",
            message,
            context={"circuit": "pool"},
            retry_after=self.pool_circuit.time_until_retry(now),
            error=cause,
        )

    def _circuit_refusal(self, now: float) -> InitializationError:
        """Why a spare cannot start: the pool circuit says starts keep failing."""
        message = (
            f"the pool circuit is {self.pool_circuit.state.value} (worker starts kept failing), so "
            f"no new worker may start for {self.pool_circuit.time_until_retry(now):.1f}s"
        )
        if self.last_start_error is not None:
            message += f"; the last start failed with: {self.last_start_error.message}"
        error = self._errors.wrap_pool_error(("init_failed", message), {"message": message})
        assert isinstance(error, InitializationError)
        return error

    def _pool_circuit_changed(
        self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState
    ) -> None:
        now = self._now()
        self._events.circuit_changed(breaker, old, new, now)
        self._wakeup.unpark_all()  # slots waiting on the circuit look again
        if new is _OPEN and self.pool_down(now) is not None:
            # Calls already waiting would wait out their deadlines: tell them now.
            self._checkout.fail_waiting(lambda: self.pool_down(now) or closed_error())

    # ------------------------------------------------------------------ opening and closing

    async def wait_ready(self) -> None:
        """Wait until the target's workers serve. Raises InitializationError if workers cannot
        start: at once for a handlers module that does not import (no retry can fix that),
        otherwise once the pool circuit opens (a start hook that fails now and then is retried),
        and PoolClosedError if the pool closes meanwhile."""
        while self.serving_count() < self.target:
            if self._gave_up is not None:
                raise self._gave_up
            if self._checkout.closing:
                raise closed_error()
            await self.changed.park()

    def serving_count(self) -> int:
        """Workers that serve and are not on their way out (recycled, retired)."""
        return sum(1 for w in self._checkout.workers if w.serving and not w.retire)

    async def shut_down(self) -> None:
        """Stop taking calls, let running ones finish within ``shutdown_grace``, then stop every
        worker and reap it. Every wait here is bounded."""
        checkout = self._checkout
        cfg = self.config
        checkout.closing = True
        self._wakeup.unpark_all()
        with trio.CancelScope(shield=True):
            checkout.fail_waiting(closed_error)
            self._sessions.shut_down(closed_error)
            with trio.move_on_after(cfg.shutdown_grace):
                while any(w.inflight for w in checkout.workers):
                    await self.changed.park()
            for w in self.starting + checkout.workers:
                if w.state is IDLE:
                    checkout.stop(w)
                elif w.state is not DEAD and w.state is not RETIRING:
                    w.kill(("pool_closed", "the pool was closed"))
            with trio.move_on_after(max(cfg.shutdown_grace, 1.0)):
                await self.slots_done.wait()
            for w in self.starting + checkout.workers:
                w.kill(("pool_closed", "the pool was closed"))
            with trio.move_on_after(KILL_WAIT + 2.0):
                await self.slots_done.wait()
            if not self.slots_done.is_set():
                logger.error("some workers did not end within %ss of SIGKILL; giving up on them", KILL_WAIT + 2.0)
                self._slots_scope.cancel()
                await self.slots_done.wait()
        self._launcher.close()

    # ------------------------------------------------------------------ the pool's size

    async def resize(self, size: int) -> None:
        """Grow or shrink to ``size`` workers. Growing returns once they all serve (raising
        InitializationError, as ``wait_ready`` does, if workers cannot start; the target stays, so
        the pool keeps trying, paced by the pool circuit). Shrinking retires the slots that cost
        least to lose (no worker yet, then idle workers with the fewest sessions) and returns at
        once: their workers take no new calls and leave when their calls are done."""
        async with self._sizing:
            if self._checkout.closing:
                raise closed_error()
            self._gave_up = None  # only a failure from now on is this resize's
            self._change_size(size, "resize")
            await self.wait_ready()

    def _change_size(self, size: int, cause: str, *, leaving: Slot | None = None, **data: Any) -> None:
        """Set the target: add slots, or retire ``leaving`` (else those that cost least)."""
        old = self.target
        if size == old:
            return
        now = self._now()
        if size > old:
            for _ in range(size - old):
                self._add_slot()
            self._last_grow = now
        else:
            for slot in [leaving] if leaving is not None else self._cheapest_slots(old - size):
                self._retire(slot, "shrink")
        self.target = size
        self._checkout.set_size(size)
        self.size_changes += 1
        self._last_change = now
        logger.info("pool size %d -> %d (%s)", old, size, cause)
        if self._events.callbacks:
            self._events.emit(PoolEvent("pool_resized", now, data={"from": old, "to": size, "cause": cause, **data}))
        self.changed.unpark_all()

    def _cheapest_slots(self, n: int) -> list[Slot]:
        """The ``n`` slots whose loss costs least: no worker (waiting to restart), a worker still
        starting, an idle one, a busy one; then fewer sessions to move, fewer calls to wait for,
        and the newest slot first."""
        rank = {STARTING: 1, IDLE: 2}

        def cost(slot: Slot) -> tuple[int, int, int, int]:
            w = slot.worker
            if w is None:
                return (0, 0, 0, -slot.index)
            return (rank.get(w.state, 3), len(w.sessions), len(w.inflight), -slot.index)

        return sorted((s for s in self._slots.values() if not s.retired), key=cost)[:n]

    def _retire(self, slot: Slot, reason: str) -> None:
        """The slot ends: its worker leaves once its calls are done and is not replaced (a worker
        still starting leaves as soon as it has said hello). ``reason``: why (``shrink``,
        ``rolling_restart``)."""
        slot.retired = True
        worker = slot.worker
        if worker is not None and worker.serving:
            self._checkout.retire(worker, reason)
        if slot.pause is not None:
            slot.pause.cancel()

    async def restart_workers(self) -> tuple[int, dict[str, CommandInfo]]:
        """Replace every worker, one at a time, by a new process (which imports the handler
        modules afresh): start the new one in a spare slot, and once it serves, retire an old
        one and wait until it has left (its sessions move on with their committed state). No
        call fails for it: the pool never has fewer workers serving than its target.

        A new worker that fails to start stops the roll: the workers not replaced yet keep
        serving, and InitializationError says how far it got and why. Returns the number of
        workers replaced and the command table of the new ones."""
        async with self._sizing:
            if self._checkout.closing:
                raise closed_error()
            started = self._now()
            old = sorted((s for s in self._slots.values() if not s.retired), key=lambda s: s.index)
            replaced = 0
            commands: dict[str, CommandInfo] = {}
            try:
                for slot in old:
                    if not slot.ended.is_set():
                        commands = await self._replace(slot)
                        replaced += 1
            except InitializationError as exc:
                stopped = self._roll_stopped(exc, replaced, len(old))
                self._roll_event(started, replaced, len(old), stopped.message)
                raise stopped from exc
            except BaseException as exc:  # the pool closed meanwhile, or the caller cancelled
                why = exc.message if isinstance(exc, PoolError) else "cancelled"
                self._roll_event(started, replaced, len(old), why)
                raise
            self._roll_event(started, replaced, len(old), None)
            return replaced, commands

    def start_rolling_restart(self, adopt: Callable[[dict[str, CommandInfo]], None]) -> bool:
        """Start :meth:`restart_workers` in the background (recovery's level 4), unless one is
        asked for or under way already, or the pool is closing; ``adopt`` gets the new command
        table when it is done. False if none was started."""
        if self._nursery is None or self._roll_asked or self._sizing.locked() or self._checkout.closing:
            return False
        self._roll_asked = True
        self._nursery.start_soon(self._roll_in_background, adopt)
        return True

    async def _roll_in_background(self, adopt: Callable[[dict[str, CommandInfo]], None]) -> None:
        try:
            replaced, commands = await self.restart_workers()
        except PoolError as exc:  # its workers_restarted event and this line say why
            logger.warning("the rolling restart recovery asked for stopped: %s", exc.message)
            return
        finally:
            self._roll_asked = False
        if replaced:
            adopt(commands)

    async def _replace(self, old: Slot) -> dict[str, CommandInfo]:
        """Start a worker in a spare slot; once it serves, retire ``old`` and wait until its
        worker has left. Returns the new worker's command table."""
        spare = self._add_slot(spare=True)
        try:
            while not spare.ended.is_set():
                worker = spare.worker
                if worker is not None and worker.serving:
                    break
                await self.changed.park()
        except BaseException:  # cancelled: the roll stops here, and the spare goes
            self._retire(spare, "rolling_restart")
            raise
        if spare.ended.is_set():
            if self._checkout.closing or spare.error is None:
                raise closed_error()
            raise spare.error
        assert worker is not None
        spare.spare = False  # an ordinary slot from now on: it restarts its worker as any does
        self._retire(old, "rolling_restart")
        self.restarts += 1
        self.restarts_by_reason["rolling_restart"] += 1
        await old.ended.wait()
        return dict(worker.commands)

    def _roll_stopped(self, error: InitializationError, replaced: int, total: int) -> PoolError:
        message = (
            f"restart_workers stopped after replacing {replaced} of {total} workers, because a new "
            "worker could not start; the workers not replaced keep serving (with the code they "
            f"loaded when they started). Fix the cause and call restart_workers() again. {error.message}"
        )
        return self._errors.wrap_pool_error(("init_failed", message), {"message": message, "replaced": replaced})

    def _roll_event(self, started: float, replaced: int, total: int, stopped: str | None) -> None:
        now = self._now()
        logger.log(
            logging.INFO if stopped is None else logging.WARNING,
            "rolling restart: %d of %d workers replaced in %.2fs%s",
            replaced,
            total,
            now - started,
            "" if stopped is None else f", stopped: {stopped.splitlines()[0]}",
        )
        if self._events.callbacks:
            data = {"replaced": replaced, "workers": total, "seconds": now - started, "stopped": stopped}
            self._events.emit(PoolEvent("workers_restarted", now, data=data))

    # ------------------------------------------------------------------ the monitor

    async def monitor(self) -> None:
        """Heartbeats (to idle workers; to every worker that beats on its own), memory limits,
        worker ages and session TTLs, every tick; the autoscaler looks more often when its
        ``scale_up_after`` needs it."""
        cfg = self.config
        limits = cfg.max_worker_memory is not None or cfg.hard_worker_memory is not None
        tick, silence = beat_timing(cfg)
        if cfg.session_ttl is not None:
            tick = min(tick, cfg.session_ttl / 2)
        rule = self._scale_rule
        look = tick if rule is None else min(tick, rule.up_after / 2)
        looks_per_tick = max(1, round(tick / look))
        ping_ids = itertools.count(1)
        for n in itertools.count(1):
            await trio.sleep(look)
            now = self._now()
            if rule is not None:
                self._autoscale(rule, now)
            if n % looks_per_tick:
                continue
            self._heartbeats(now, ping_ids, tick, silence)
            if limits:
                for w in list(self._checkout.workers):
                    if w.state is not DEAD:
                        self._check_memory(w)
            if cfg.max_worker_age is not None:
                self._check_ages(now)
            for session in self._sessions.expired(now):
                logger.debug("session %r expired after %ss idle", session.id, cfg.session_ttl)
                self._sessions.close(session.id)
            self._on_tick(now)

    def _heartbeats(self, now: float, ping_ids: itertools.count[int], tick: float, silence: float) -> None:
        cfg = self.config
        for w in list(self._checkout.workers):
            if w.state is DEAD:
                continue
            if w.proc.beats:
                # Busy or idle, it sends something every beat: silence means it is stopped or
                # cut off (no end of stream comes then). Ended before the next check would be
                # late, so that it is found within `silence` of its last byte.
                if now - w.last_io + tick > silence:
                    logger.warning(
                        "worker %d sent nothing for %.1fs: killing it", w.id, now - w.last_io, extra=worker_fields(w)
                    )
                    why = f"nothing from the worker in {silence:g}s (heartbeat_interval + heartbeat_timeout)"
                    w.kill(("health_check_failed", why))
                    continue
                try:
                    # So that it hears from its pool: it gives up after `silence` too.
                    w.proc.write(_BEAT_PING)
                except OSError:
                    pass
            elif w.ping_sent is not None:
                if now - w.ping_sent > cfg.heartbeat_timeout:
                    logger.warning(
                        "worker %d did not answer a heartbeat in %ss: killing it",
                        w.id,
                        cfg.heartbeat_timeout,
                        extra=worker_fields(w),
                    )
                    w.kill(("health_check_failed", f"no heartbeat answer in {cfg.heartbeat_timeout}s"))
            elif not w.inflight and now - w.last_io >= cfg.heartbeat_interval:
                w.ping_sent = now
                try:
                    w.proc.write(encode(Ping(next(ping_ids))))
                except OSError:
                    pass

    def _check_ages(self, now: float) -> None:
        for slot in self._slots.values():
            w = slot.worker
            if w is not None and w.serving and not w.retire and now >= slot.recycle_at:
                logger.info(
                    "worker %d has served %.1fs (PoolConfig.max_worker_age): recycling it after its call",
                    w.id,
                    now - w.started_at,
                    extra=worker_fields(w),
                )
                self._checkout.retire(w, "age")

    def _autoscale(self, rule: ScaleRule, now: float) -> None:
        """Apply the autoscaler's rule (``pool._elastic``), unless a resize or rolling restart
        is running."""
        checkout = self._checkout
        queue = checkout.queue
        wait = self._queue_watch.oldest_wait(queue, now)
        idle = self._idle_watch.idle_times(checkout.workers, now)
        if self._sizing.locked() or checkout.closing:
            return
        longest = max(idle, key=idle.__getitem__, default=None)
        current = self.target
        target = rule.target(
            now,
            current,
            oldest_wait=wait,
            waiting=len(queue),
            longest_idle=idle[longest] if longest is not None else 0.0,
            settled=self.serving_count() >= current and self.pool_circuit.state is _CLOSED,
            last_grow=self._last_grow,
            last_change=self._last_change,
        )
        if target > current:
            self._change_size(target, "autoscale", queue_wait=wait, waiting=len(queue))
        elif target < current and longest is not None:
            slot = self._slots[longest.slot]
            self._change_size(target, "autoscale", leaving=slot, idle_seconds=idle[longest])

    def _check_memory(self, w: Worker) -> None:
        rss = w.rss()
        if rss is None:
            return
        hard = self.config.hard_worker_memory
        soft = self.config.max_worker_memory
        if hard is not None and rss > hard:
            logger.warning(
                "worker %d uses %d bytes, over the hard limit %d: killing it", w.id, rss, hard, extra=worker_fields(w)
            )
            why = ("resource_exhausted", f"worker memory {rss} bytes over the hard limit {hard}")
            if w.inflight:  # the call it is running; those behind it fail as bystanders
                call = w.inflight.popleft()
                call.fail(self._checkout.worker_error(call, why, w))
            w.kill(why)
        elif soft is not None and rss > soft and not w.retire and not self._slots[w.slot].big_at_start:
            logger.info(
                "worker %d uses %d bytes, over %d: recycling it after its call", w.id, rss, soft, extra=worker_fields(w)
            )
            self._checkout.retire(w, "memory")

    def _worker_event(self, kind: str, worker: Worker, **data: Any) -> None:
        if self._events.callbacks:
            self._events.emit(PoolEvent(kind, self._now(), worker_id=worker.id, pid=worker.pid, data=data))
