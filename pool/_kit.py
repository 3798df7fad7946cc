"""The testing kit's parts (``pool.testing`` is the pytest plugin over them): pools that check no
worker outlives them, a fake pool over in-process workers, chaos that kills and stops workers
and remembers what it did, and the orphan check.

Everything here goes through the pool's public API (``statistics()``, ``worker_pids()``,
``open_pool``'s launcher), and works the same on real and in-process workers: a pid above
``FIRST_FAKE_PID`` is an in-process worker, which is sent its "signal" in process and never a
real one.
"""

from __future__ import annotations

import math
import os
import random
import signal as signals
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Iterable

import attrs
import psutil
import trio

from pool._config import PoolConfig
from pool._inprocess import FIRST_FAKE_PID, InProcessLauncher, in_process_worker
from pool._pool import Pool, WorkerStatistics, open_pool
from pool._process import Launcher, LocalLauncher, WorkerProcess

#: The states of a worker that serves calls, in ``statistics().workers``.
SERVING = ("idle", "busy")
#: How often the kit looks at the pool's snapshot while it waits for something there.
POLL = 0.005


def _config(handlers: Iterable[str] | None, size: int, config: dict[str, Any]) -> PoolConfig:
    if handlers is not None:
        config = {"handlers": tuple(handlers), **config}
    return PoolConfig(size=size, **config)


# ---------------------------------------------------------------------------------------------
# Processes that must be gone
# ---------------------------------------------------------------------------------------------


class _Watched:
    """A worker process to check on later, by identity: a pid that another process took over
    since is not it (psutil compares start times), and an in-process worker is checked in
    process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.reported = False  # found alive once (and killed): a failure says so only once
        self._in_process = in_process_worker(pid)
        self._process: psutil.Process | None = None
        if self._in_process is None and pid < FIRST_FAKE_PID:
            try:
                self._process = psutil.Process(pid)
            except psutil.Error:
                pass  # gone already

    def alive(self) -> str | None:
        """A line saying what it is if it is still alive (a zombie is not), else None."""
        if self._in_process is not None:
            if self._in_process.code is not None:
                return None
            return f"pid {self.pid}: in-process worker, still running"
        if self._process is None:
            return None
        try:
            with self._process.oneshot():
                status = self._process.status()
                if status == psutil.STATUS_ZOMBIE:
                    return None
                cmdline = " ".join(self._process.cmdline()) or self._process.name()
        except psutil.Error:
            return None
        return f"pid {self.pid} ({status}): {cmdline[:200]}"

    def stopped(self) -> bool:
        """Stopped (SIGSTOP has taken effect), or gone."""
        if self._in_process is not None:
            return self._in_process.stopped or self._in_process.code is not None
        if self._process is None:
            return True
        try:
            return self._process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return True

    def kill(self) -> None:
        if self._in_process is not None:
            self._in_process.kill()
        elif self._process is not None:
            try:
                self._process.kill()  # psutil refuses if the pid now names another process
            except psutil.Error:
                pass


def assert_no_orphans(pids: Iterable[int]) -> None:
    """Fail (AssertionError) listing those of ``pids`` that are still alive; zombies (exited,
    not yet reaped) do not count. In-process workers' pids count while their worker runs."""
    alive = [line for line in (_Watched(pid).alive() for pid in pids) if line is not None]
    if alive:
        raise AssertionError("processes still alive:\n  " + "\n  ".join(alive))


class _RecordingLauncher:
    """Launches through another launcher and watches every process it started."""

    def __init__(self, inner: Launcher) -> None:
        self._inner = inner
        self.watched: list[_Watched] = []

    def open(self, config: PoolConfig) -> None:
        self._inner.open(config)

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> WorkerProcess:
        proc = self._inner.launch(handlers, max_frame_size, max_session_state)
        self.watched.append(_Watched(proc.pid))
        return proc

    def close(self) -> None:
        self._inner.close()


class WorkerPools:
    """What the ``worker_pool`` fixture gives: ``async with worker_pool(handlers=[...], size=2,
    **config) as pool`` opens a pool (real worker processes unless ``launcher=`` says otherwise).
    Once it is closed, it fails if one of its worker processes is still alive ``exit_timeout``
    seconds later (and kills it; a pool reaps its workers before it returns, so the wait is
    short), or if closing took longer than ``close_timeout`` (default: twice
    ``shutdown_grace``, plus 10 s). :meth:`check` (the fixture's teardown) kills and reports
    what is left of pools the test never closed, and what failed after a failing body.
    """

    def __init__(self, *, exit_timeout: float = 1.0) -> None:
        self.exit_timeout = exit_timeout
        self._launchers: list[_RecordingLauncher] = []
        self._problems: list[str] = []

    @property
    def pids(self) -> list[int]:
        """Every worker process the pools opened here started, in order."""
        return [w.pid for launcher in self._launchers for w in launcher.watched]

    def __call__(
        self,
        handlers: Iterable[str] | None = None,
        size: int = 2,
        *,
        launcher: Launcher | None = None,
        close_timeout: float | None = None,
        **config: Any,
    ) -> AsyncContextManager[Pool]:
        cfg = _config(handlers, size, config)
        if launcher is None:
            launcher = LocalLauncher(cfg.python, dict(cfg.env))
        bound = close_timeout if close_timeout is not None else 2 * cfg.shutdown_grace + 10.0
        return self._open(cfg, _RecordingLauncher(launcher), bound)

    @asynccontextmanager
    async def _open(
        self, cfg: PoolConfig, launcher: _RecordingLauncher, close_timeout: float
    ) -> AsyncIterator[Pool]:
        self._launchers.append(launcher)
        body_ok = False
        closing_since: float | None = None
        try:
            async with open_pool(cfg, launcher=launcher) as pool:
                try:
                    yield pool
                    body_ok = True
                finally:
                    closing_since = trio.current_time()
        finally:
            problems = []
            if closing_since is not None and trio.current_time() - closing_since > close_timeout:
                took = trio.current_time() - closing_since
                problems.append(f"the pool took {took:.1f}s to close, over the bound of {close_timeout}s")
            with trio.CancelScope(shield=True):
                leftover = await self._outlived(launcher.watched)
            if leftover:
                problems.append(_outlived_message(leftover))
                for w in leftover:
                    w.kill()
                    w.reported = True
            if problems and body_ok:
                raise AssertionError("\n".join(problems))
            # The body failed: that is the test's failure; these come with the fixture's teardown.
            self._problems += problems

    async def _outlived(self, watched: list[_Watched]) -> list[_Watched]:
        """The processes still alive after waiting up to ``exit_timeout`` for them to go."""
        with trio.move_on_after(self.exit_timeout):
            while any(w.alive() for w in watched):
                await trio.sleep(POLL)
        return [w for w in watched if w.alive()]

    def check(self) -> None:
        """Kill what is still alive of every pool opened here, and fail saying what it was and
        what went wrong at closing (for pools whose body failed)."""
        leftover = [w for launcher in self._launchers for w in launcher.watched if not w.reported and w.alive()]
        problems = self._problems + ([_outlived_message(leftover)] if leftover else [])
        for w in leftover:
            w.kill()
        if problems:
            raise AssertionError("\n".join(problems))


def _outlived_message(leftover: list[_Watched]) -> str:
    lines = "\n  ".join(line for line in (w.alive() or f"pid {w.pid}" for w in leftover))
    return f"worker processes outlived their pool (killed now):\n  {lines}"


@asynccontextmanager
async def fake_pool(
    handlers: Iterable[str] | None = None,
    size: int = 2,
    *,
    launcher: InProcessLauncher | None = None,
    **config: Any,
) -> AsyncIterator[Pool]:
    """A real :class:`Pool` over in-process workers: the same API, the real handler functions
    (their modules imported into this process), run on this trio run's clock, so that a test on
    ``autojump_clock`` runs deadlines, retries and backoff in virtual time. Handlers must not
    block (they run on the event loop); pass ``launcher=InProcessLauncher(simulate={...})`` to
    make a command slow, hang or crash its worker."""
    async with open_pool(_config(handlers, size, config), launcher=launcher or InProcessLauncher()) as pool:
        yield pool


# ---------------------------------------------------------------------------------------------
# Chaos
# ---------------------------------------------------------------------------------------------


@attrs.frozen
class ChaosRecord:
    """One thing :class:`Chaos` did: at ``time`` (``trio.current_time()``), ``action`` (the
    signal's name) to the worker ``pid`` in ``slot``; ``note`` says what came of it."""

    time: float
    action: str
    slot: int
    pid: int
    note: str = ""

    def __str__(self) -> str:
        line = f"t={self.time:.3f} {self.action} slot {self.slot} pid {self.pid}"
        return f"{line}: {self.note}" if self.note else line


class Chaos:
    """Kills and stops a pool's workers (real or in-process), and keeps a log of what it did
    (:attr:`log`, :meth:`describe`), for the test's failure message. It signals a worker once at
    most, and only one that serves. Random choices come from ``random.Random(seed)``: the same
    seed makes the same choices for the same pool states."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.log: list[ChaosRecord] = []
        self._stopped: list[_Watched] = []
        self._signalled: set[int] = set()  # each worker gets one signal from here, at most

    async def kill_worker(self, pool: Pool, worker: int | None = None, *, timeout: float = 10.0) -> ChaosRecord:
        """SIGKILL the worker in slot ``worker`` (None: a serving worker at random) and wait until
        the pool has a new worker serving in that slot. Fails (AssertionError) if it has none
        within ``timeout`` seconds."""
        victim = await self._choose(pool, worker, timeout)
        record = self._send(victim, signals.SIGKILL)
        index = len(self.log) - 1
        with trio.move_on_after(timeout):
            while True:
                workers = pool.statistics().workers
                new = [w for w in workers if w.slot == victim.slot and w.id != victim.id and w.state in SERVING]
                if new and all(w.id != victim.id for w in workers):
                    took = trio.current_time() - record.time
                    self.log[index] = record = attrs.evolve(
                        record, note=f"replaced by pid {new[0].pid} after {took:.3f}s"
                    )
                    return record
                await trio.sleep(POLL)
        self.log[index] = attrs.evolve(record, note=f"not replaced within {timeout}s")
        raise AssertionError(
            f"the pool did not replace the worker killed in slot {victim.slot} within {timeout}s "
            f"(health: {pool.health()['status']})\n{self.describe()}"
        )

    async def stop_worker(self, pool: Pool, worker: int | None = None, *, timeout: float = 10.0) -> ChaosRecord:
        """SIGSTOP the worker in slot ``worker`` (None: a serving worker at random), a hang the
        pool finds by its heartbeat or a call's deadline; returns once it is stopped. What is
        still stopped when the test ends is killed then (:meth:`release`)."""
        victim = await self._choose(pool, worker, timeout)
        watched = _Watched(victim.pid)
        record = self._send(victim, signals.SIGSTOP)
        self._stopped.append(watched)
        # A process stops when the signal is delivered, a moment later: until then it may still
        # read and answer. Whoever waits here gets a worker that is a hang.
        with trio.move_on_after(timeout):
            while not watched.stopped():
                await trio.sleep(POLL)
        return record

    @asynccontextmanager
    async def killing(
        self, pool: Pool, every: float = 0.05, signal: int = signals.SIGKILL
    ) -> AsyncIterator[list[ChaosRecord]]:
        """While the block runs, send ``signal`` to a serving worker chosen at random every
        ``every`` seconds. A tick that finds no worker to signal sends nothing, and a tick the
        event loop ran more than half a period late is not made up for: two signals are never
        less than ``every / 2`` apart. Yields the list of what it sent, growing as it goes."""
        if not every > 0:
            raise ValueError(f"every must be a positive number of seconds, got {every!r}")
        sent: list[ChaosRecord] = []
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_killing, pool, every, signal, sent)
            try:
                yield sent
            except BaseException as exc:
                # Kept aside, not raised through the nursery: it would come out wrapped.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    async def _keep_killing(self, pool: Pool, every: float, signum: int, sent: list[ChaosRecord]) -> None:
        start = trio.current_time()
        tick = 1
        while True:
            await trio.sleep_until(start + tick * every)
            targets = self._targets(pool)
            if targets:
                sent.append(self._send(self.rng.choice(targets), signum))
            # The next tick on the grid that is at least half a period away.
            tick = max(tick + 1, math.ceil((trio.current_time() - start) / every + 0.5))

    def release(self) -> None:
        """Kill every worker process stopped here that is still there (the pool's own end kills
        them too; this is for a test that failed first)."""
        for watched in self._stopped:
            if watched.alive() is not None:
                watched.kill()
                if watched.pid < FIRST_FAKE_PID:
                    try:
                        os.kill(watched.pid, signals.SIGCONT)  # so that it can die
                    except OSError:
                        pass
        self._stopped.clear()

    def describe(self) -> str:
        """What was done, one line per action, for a failure message."""
        lines = "\n".join(f"  {record}" for record in self.log)
        return f"chaos (seed {self.seed}), {len(self.log)} actions:\n{lines}"

    async def _choose(self, pool: Pool, slot: int | None, timeout: float) -> WorkerStatistics:
        """A serving worker: the one in ``slot``, or one at random; waits for one to serve."""
        size = pool.statistics().size
        if slot is not None and not 0 <= slot < size:
            raise ValueError(f"worker must be a slot number in 0..{size - 1} or None, got {slot!r}")
        with trio.move_on_after(timeout):
            while True:
                targets = self._targets(pool)
                if slot is not None:
                    targets = [w for w in targets if w.slot == slot]
                if targets:
                    return targets[0] if slot is not None else self.rng.choice(targets)
                await trio.sleep(POLL)
        where = "any slot" if slot is None else f"slot {slot}"
        raise AssertionError(f"no worker served in {where} within {timeout}s\n{self.describe()}")

    def _targets(self, pool: Pool) -> list[WorkerStatistics]:
        """The workers serving now that were not signalled here yet: a worker just killed looks
        like it serves until the pool sees it end, and a second kill would be a wasted one."""
        return [w for w in pool.statistics().workers if w.state in SERVING and w.pid not in self._signalled]

    def _send(self, victim: WorkerStatistics, signum: int) -> ChaosRecord:
        """Send the signal now and log it. ``victim`` comes from a snapshot taken with no
        checkpoint since, so the pool has not reaped it: its pid still names that worker."""
        note = ""
        self._signalled.add(victim.pid)
        worker = in_process_worker(victim.pid)
        if worker is not None:
            worker.send_signal(signum)
        elif victim.pid < FIRST_FAKE_PID:
            try:
                os.kill(victim.pid, signum)
            except ProcessLookupError:
                note = "already gone"
        record = ChaosRecord(trio.current_time(), signals.Signals(signum).name, victim.slot, victim.pid, note)
        self.log.append(record)
        return record

