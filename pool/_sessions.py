"""SessionStore: the live sessions, which worker holds each, their committed state, turns and TTL.

A session's calls run one at a time, in arrival order: a call takes the session's turn before it
is routed and hands it on when it ends (:meth:`Session.take_turn`, :meth:`Session.end_turn`).
Waiting for a turn is a trio ParkingLot, FIFO and cancellation-safe. A closed session wakes its
waiters with an error, is never placed on a worker again, and commits nothing more.

The worker side of a session (its copy of the state) is dropped whenever the session leaves a
worker that still serves: on close, on failover, on expiry.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import trio

from bridge_worker.protocol import encode_session_state
from pool._errors import PoolError
from pool._matrix import outside_error

#: The committed state of a session that has none yet.
EMPTY_STATE = encode_session_state({})


class SessionHolder(Protocol):
    """What a session needs of the worker that holds it."""

    @property
    def sessions(self) -> set[Session]:
        """The sessions it holds."""

    def drop_session(self, session_id: str) -> None:
        """Tell the worker process to forget the session's state, if it still serves."""


class Session:
    """One caller session: its holder, committed state (opaque msgpack bytes) and turns."""

    __slots__ = ("id", "holder", "on_worker", "state", "last_used", "busy", "closed", "_turns", "_store")

    def __init__(self, session_id: str, now: float, store: SessionStore) -> None:
        self.id = session_id
        self.holder: SessionHolder | None = None  # the worker that holds it (enforced routing)
        self.on_worker = False  # that worker has the committed state already
        self.state = EMPTY_STATE
        self.last_used = now
        self.busy = False  # a call of this session holds its turn
        self.closed = False
        self._turns = trio.lowlevel.ParkingLot()
        self._store = store

    def place(self, holder: SessionHolder) -> None:
        """Put the session on ``holder`` (it gets the committed state with its next call)."""
        if holder is not self.holder:
            self.move_off()
            self.holder = holder
            holder.sessions.add(self)

    def move_off(self) -> None:
        """The session leaves its worker (dead, recycled, failed over, or the session closed):
        the worker forgets its copy, and the next call goes to a worker with the committed state."""
        holder = self.holder
        if holder is not None:
            holder.sessions.discard(self)
            holder.drop_session(self.id)
        self.holder = None
        self.on_worker = False

    def try_turn(self) -> bool:
        """Take the turn if it is free (the usual case, without an await)."""
        if self.busy or self.closed:
            return False
        self.busy = True
        return True

    async def take_turn(self, deadline: float) -> None:
        """Wait for this session's earlier calls; then this call holds the turn until
        :meth:`end_turn`. Raises PoolError (without the turn) on a timeout or a close."""
        if self.closed:
            raise self.closed_error()
        if not self.busy:
            self.busy = True
            return
        store = self._store
        store.waiting += 1
        try:
            with trio.move_on_at(deadline) as scope:
                await self._turns.park()
        finally:
            store.waiting -= 1
        if scope.cancelled_caught:
            raise outside_error(
                "no_worker_in_time",
                f"session {self.id!r}: the deadline passed while this call waited for the "
                "session's earlier calls (a session runs one call at a time); nothing ran",
                context={"session_id": self.id},
                error=("timeout", "session_turn"),
            )
        if self.closed:  # woken by close(): nobody holds a closed session's turn
            raise self.closed_error()

    def end_turn(self) -> None:
        """Hand the turn to the next waiting call, or free it."""
        if self.closed:
            return
        if not self._turns.unpark():
            self.busy = False

    def close(self) -> None:
        """Forget the session: its waiting calls fail, its worker drops its state."""
        self.closed = True
        self.busy = False
        self._turns.unpark_all()
        self.move_off()

    def commit(self, holder: SessionHolder, state: bytes, now: float) -> None:
        """A call on ``holder`` returned with new state: keep it, unless the session has left
        that worker or was closed meanwhile (then the worker's copy is dropped anyway)."""
        if holder is self.holder and not self.closed:
            self.state = state
        self.last_used = now

    def closed_error(self) -> PoolError:
        """The error of a call that waited for this session when it closed."""
        if self._store.shut is not None:
            return self._store.shut()
        return outside_error(
            "session_closed",
            f"session {self.id!r} was closed while this call waited for it; it did not run. "
            "A new call with this id starts a new, empty session.",
            context={"session_id": self.id},
        )


class SessionStore:
    """The live sessions, bounded in number; idle ones expire after ``ttl`` seconds."""

    def __init__(self, max_sessions: int, ttl: float | None) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self.waiting = 0  # calls waiting for a session's turn
        #: Set when the pool closes: the error its waiting calls get.
        self.shut: Callable[[], PoolError] | None = None
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def open(self, session_id: str, now: float) -> Session:
        """The session with this id, created by its first call."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        if len(self._sessions) >= self.max_sessions:
            raise outside_error(
                "session_limit",
                f"too many live sessions ({self.max_sessions}, PoolConfig.max_sessions): "
                f"session {session_id!r} was not created. Close sessions you no longer need "
                "(close_session), lower session_ttl, or raise max_sessions.",
                context={"session_id": session_id},
            )
        session = self._sessions[session_id] = Session(session_id, now, self)
        return session

    def close(self, session_id: str) -> None:
        """Forget a session (see :meth:`Session.close`); unknown ids are ignored."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()

    def shut_down(self, error: Callable[[], PoolError]) -> None:
        """The pool is closing: every session is closed, and calls waiting for a turn get
        ``error()``."""
        self.shut = error
        for session_id in list(self._sessions):
            self.close(session_id)

    def expired(self, now: float) -> list[Session]:
        """Idle sessions past their TTL (no call holds or waits for their turn)."""
        if self.ttl is None:
            return []
        limit = now - self.ttl
        return [
            s
            for s in self._sessions.values()
            if not s.busy and not s._turns and s.last_used <= limit
        ]
