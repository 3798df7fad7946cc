"""SessionStore: which worker holds each session, its committed state, its turn, its TTL."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Iterator

import trio

from bridge_worker.protocol import encode_session_state
from pool._errors import ResourceError

if TYPE_CHECKING:
    from pool._worker import Worker

#: The committed state of a session that has none yet.
EMPTY_STATE = encode_session_state({})


class Session:
    """One caller session: affinity, committed state (opaque msgpack bytes) and its turn queue."""

    __slots__ = ("id", "worker", "on_worker", "state", "last_used", "busy", "waiters", "closed")

    def __init__(self, session_id: str, now: float) -> None:
        self.id = session_id
        self.worker: Worker | None = None  # the worker that holds it (enforced routing)
        self.on_worker = False  # that worker already has the committed state
        self.state = EMPTY_STATE
        self.last_used = now
        self.busy = False  # a call of this session is running (calls go one at a time)
        self.waiters: deque[trio.lowlevel.Task] = deque()  # the next calls, in arrival order
        self.closed = False

    def move_off(self) -> None:
        """Its worker is gone or was given up: the next call goes elsewhere with the state."""
        if self.worker is not None:
            self.worker.sessions.discard(self)
        self.worker = None
        self.on_worker = False

    def place(self, worker: Worker) -> None:
        self.move_off()
        self.worker = worker
        worker.sessions.add(self)


class SessionStore:
    """The live sessions, bounded in number; idle ones expire after ``ttl`` seconds."""

    def __init__(self, max_sessions: int, ttl: float | None) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
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
            raise ResourceError(
                f"too many live sessions ({self.max_sessions}, PoolConfig.max_sessions): "
                f"session {session_id!r} was not created. Close sessions you no longer need "
                "(close_session), lower session_ttl, or raise max_sessions.",
                context={"session_id": session_id},
                caller_fault=True,
            )
        session = self._sessions[session_id] = Session(session_id, now)
        return session

    def forget(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
            session.move_off()
        return session

    def expired(self, now: float) -> list[Session]:
        """Idle sessions past their TTL (not busy, nobody waiting)."""
        if self.ttl is None:
            return []
        limit = now - self.ttl
        return [
            s for s in self._sessions.values() if not s.busy and not s.waiters and s.last_used <= limit
        ]
