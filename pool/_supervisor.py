"""Supervisor: the worker slots (start, serve, bury, restart), restart pacing, the pool circuit,
the monitor (heartbeats, memory limits, session TTLs) and the shutdown sequence.

Each of ``PoolConfig.size`` slots keeps one worker alive: start it (spawn, then its hello within
``start_timeout``), hand it to the checkout, let it serve until its channel ends, bury it (reap it,
fail the calls it had), and start the next. A slot whose starts keep failing waits longer each time
(``restart_delay`` doubling up to ``max_restart_delay``); past ``pool_circuit.failure_threshold``
failed starts in a row the pool circuit opens, and no slot starts anything until it lets one
trial through. While the circuit is open and no worker serves, calls fail fast with the startup
error, and calls already waiting fail with it too. A worker killed from outside is not a failed
start: a pool whose workers are SIGKILLed twenty times a second keeps replacing them.

Every wait of the shutdown sequence is bounded, whatever the worker processes do.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import trio

from bridge_worker.protocol import PROTOCOL_VERSION, Hello, Ping, encode
from pool._breaker import CircuitBreaker, CircuitState
from pool._checkout import Checkout, closed_error
from pool._config import PoolConfig, beat_timing
from pool._errors import InitializationError, PoolError
from pool._events import EventBus, PoolEvent
from pool._matrix import PoolErrorHandler, outside_error
from pool._process import Launcher
from pool._sessions import SessionStore
from pool._worker import DEAD, IDLE, KILL_WAIT, RETIRING, StartFailure, Worker

logger = logging.getLogger("pool")

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN


class Supervisor:
    """Starts, watches, replaces and finally stops the pool's workers."""

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
    ) -> None:
        self.config = config
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
        self.failed_starts = 0
        self.last_start_error: InitializationError | None = None
        self._open_error: InitializationError | None = None  # what open_pool raises
        self._worker_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._slots_scope = trio.CancelScope()
        self.slots_done = trio.Event()
        self.changed = trio.lowlevel.ParkingLot()  # a worker started, ended or finished its calls
        self._wakeup = trio.lowlevel.ParkingLot()  # slots waiting to start again

    # ------------------------------------------------------------------ slots

    async def run_slots(self) -> None:
        """Run every slot until the pool closes."""
        try:
            self._launcher.open(self.config)
            with self._slots_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for slot in range(self.config.size):
                        nursery.start_soon(self._slot, slot)
        finally:
            self.slots_done.set()

    async def _slot(self, slot: int) -> None:
        """Keep one worker alive in this slot: start, serve, bury, restart."""
        failures = 0
        checkout = self._checkout
        while not checkout.closing:
            now = self._now()
            if not self.pool_circuit.allow(now):
                # Open: until it lets a trial through. Half-open with its trials taken: until it
                # changes. Either way a change of the circuit (or closing) wakes the slot.
                wait = self.pool_circuit.time_until_retry(now)
                await self._pause(wait if wait > 0 else None)
                continue
            worker = await self._start(slot)
            if worker is None:
                failures += 1
                cfg = self.config
                await self._pause(min(cfg.max_restart_delay, cfg.restart_delay * 2 ** (failures - 1)))
                continue
            failures = 0
            try:
                await worker.serve()
            finally:
                # Also when the application's cancel scope around the pool cancels this task:
                # the worker is killed and reaped on every way out (shielded inside).
                await self._bury(worker)
            if not checkout.closing:
                self.restarts += 1

    async def _pause(self, seconds: float | None) -> None:
        """A slot's wait before its next start (None: until the pool circuit changes). Closing
        the pool ends it at once, and so does the pool circuit changing (a worker started
        again: the others need not sit out their backoff)."""
        if self._checkout.closing:
            return
        if seconds is None:
            await self._wakeup.park()
            return
        with trio.move_on_after(seconds):
            await self._wakeup.park()

    async def _start(self, slot: int) -> Worker | None:
        cfg = self.config
        checkout = self._checkout
        try:
            proc = self._launcher.launch(cfg.handlers, cfg.max_frame_size, cfg.max_session_state)
        except OSError as exc:
            self._start_failed(StartFailure(f"cannot spawn {cfg.python!r}: {exc}"), "")
            return None
        worker = Worker(
            next(self._worker_ids),
            slot,
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
            worker.kill(("init_failed", failure.message))
            await worker.reap()
            if not checkout.closing:
                self._start_failed(failure, worker.stderr_text())
            return None
        except BaseException:
            # Cancelled while starting (a cancel scope around the whole pool): the process must
            # not outlive the pool, not even as a zombie.
            self.starting.remove(worker)
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
        logger.debug("worker %d (pid %d) ready in slot %d", worker.id, worker.pid, slot)
        self._worker_event("worker_started", worker, slot=slot, startup_seconds=now - worker.started_at)
        checkout.add(worker)  # takes a waiting call at once, or goes idle
        self.changed.unpark_all()
        return worker

    def _start_failed(self, failure: StartFailure, stderr_tail: str) -> None:
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
        broken_module = failure.module is not None and failure.module in self.config.handlers
        if (broken_module or self.pool_circuit.state is _OPEN) and self._open_error is None:
            self._open_error = error
        self.changed.unpark_all()

    async def _bury(self, worker: Worker) -> None:
        """Reap a worker whose channel ended, fail its calls, free its slot."""
        with trio.CancelScope(shield=True):
            retiring = worker.state is RETIRING
            self._checkout.remove(worker)
            code = await worker.reap(self.config.shutdown_grace + 1.0 if retiring else 0.0)
            self._checkout.fail_inflight(worker)
            why = worker.death[0] if worker.death is not None else "port_exited"
            quiet = retiring or self._checkout.closing
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "worker %d (pid %d) exited with code %s (%s)",
                worker.id,
                worker.pid,
                code,
                why,
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
        """Wait until every worker has said hello; raise if workers cannot start."""
        while len(self._checkout.workers) < self.config.size:
            if self._open_error is not None:
                raise self._open_error
            await self.changed.park()

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

    # ------------------------------------------------------------------ the monitor

    async def monitor(self) -> None:
        """Heartbeats (to idle workers; to every worker that beats on its own), memory limits,
        session TTLs."""
        cfg = self.config
        limits = cfg.max_worker_memory is not None or cfg.hard_worker_memory is not None
        tick, silence = beat_timing(cfg)
        if cfg.session_ttl is not None:
            tick = min(tick, cfg.session_ttl / 2)
        ping_ids = itertools.count(1)
        checkout = self._checkout
        beat_ping = encode(Ping(0))
        while True:
            await trio.sleep(tick)
            now = self._now()
            for w in list(checkout.workers):
                if w.state is DEAD:
                    continue
                if w.proc.beats:
                    # Busy or idle, it sends something every beat: silence means it is stopped
                    # or cut off (no end of stream comes then). Ended before the next check would
                    # be late, so that it is found within `silence` of its last byte.
                    if now - w.last_io + tick > silence:
                        logger.warning("worker %d sent nothing for %.1fs: killing it", w.id, now - w.last_io)
                        why = f"nothing from the worker in {silence:g}s (heartbeat_interval + heartbeat_timeout)"
                        w.kill(("health_check_failed", why))
                        continue
                    try:
                        # So that it hears from its pool: it gives up after `silence` too.
                        w.proc.write(beat_ping)
                    except OSError:
                        pass
                elif w.ping_sent is not None:
                    if now - w.ping_sent > cfg.heartbeat_timeout:
                        logger.warning(
                            "worker %d did not answer a heartbeat in %ss: killing it", w.id, cfg.heartbeat_timeout
                        )
                        w.kill(("health_check_failed", f"no heartbeat answer in {cfg.heartbeat_timeout}s"))
                        continue
                elif not w.inflight and now - w.last_io >= cfg.heartbeat_interval:
                    w.ping_sent = now
                    try:
                        w.proc.write(encode(Ping(next(ping_ids))))
                    except OSError:
                        pass
                if limits:
                    self._check_memory(w)
            for session in self._sessions.expired(now):
                logger.debug("session %r expired after %ss idle", session.id, cfg.session_ttl)
                self._sessions.close(session.id)

    def _check_memory(self, w: Worker) -> None:
        rss = w.rss()
        if rss is None:
            return
        hard = self.config.hard_worker_memory
        soft = self.config.max_worker_memory
        if hard is not None and rss > hard:
            logger.warning("worker %d uses %d bytes, over the hard limit %d: killing it", w.id, rss, hard)
            why = ("resource_exhausted", f"worker memory {rss} bytes over the hard limit {hard}")
            if w.inflight:  # the call it is running; those behind it fail as bystanders
                call = w.inflight.popleft()
                call.fail(self._checkout.worker_error(call, why, w))
            w.kill(why)
        elif soft is not None and rss > soft and not w.retire:
            logger.info("worker %d uses %d bytes, over %d: recycling it after its call", w.id, rss, soft)
            w.retire = True
            if w.state is IDLE:
                self._checkout.stop(w)

    def _worker_event(self, kind: str, worker: Worker, **data: Any) -> None:
        if self._events.callbacks:
            self._events.emit(PoolEvent(kind, self._now(), worker_id=worker.id, pid=worker.pid, data=data))
