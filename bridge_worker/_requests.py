"""Running requests in a worker: the command's lookup, its session's state in and out, and its
reply frame, which always fits the frame limit. No I/O: the worker's loop reads and writes.

The host's in-process workers (``pool.testing``) run requests through the same
:class:`RequestHandler`, so a session behaves the same in both: committed state, rollback when the
handler raises, ``session_not_found`` when it is not held here."""

from __future__ import annotations

import traceback
from typing import Any, Callable, Generator, Iterable, Mapping

from bridge_worker import Command, Context
from bridge_worker.protocol import (
    Batch,
    BatchError,
    CommandInfo,
    EncodeError,
    Encoder,
    ErrorReply,
    Message,
    RemoteKind,
    Request,
    StreamItem,
    decode_session_state,
    encode_session_state,
)


def _printable(text: str) -> str:
    """``text`` without lone surrogates, which UTF-8 (and so msgpack) cannot carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _type_name(exc_type: type[BaseException]) -> str:
    module = exc_type.__module__
    return exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"


def described(exc: BaseException) -> tuple[str, str, str]:
    """A handler's exception as (qualified type name, message, traceback), all printable."""
    tb = "".join(traceback.format_exception(exc))
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ raises still gets reported
        message = f"<{_type_name(type(exc))} object: str() failed>"
    return _printable(_type_name(type(exc)))[:256], _printable(message), _printable(tb)


def command_table(commands: Iterable[Command]) -> tuple[CommandInfo, ...]:
    """What the hello tells the host about each command."""
    return tuple(
        CommandInfo(
            c.name,
            c.idempotent,
            tuple(_type_name(t) for t in c.caller_errors),
            c.finish_on_cancel,
            c.pipelined,
            c.stream,
        )
        for c in commands
    )


#: A request whose handler may run now, as :meth:`RequestHandler.finish` needs it after the handler:
#: the request, its command, the handler's context and the session's committed state before the
#: call (None outside a session). A plain tuple: this is on every request's path.
Started = tuple[Request, Command, Context, "bytes | None"]


class _Refusal(Exception):
    """A call's reply is this error frame instead of its result (its session state refused)."""

    def __init__(self, frame: bytes) -> None:
        super().__init__()
        self.frame = frame


class RequestHandler:
    """Runs requests with the commands of ``commands`` and keeps the committed state of the
    sessions held here. :meth:`run` is the whole request; :meth:`start` and :meth:`finish` are its
    two halves, for a caller that runs the handler itself (the host's in-process workers, a
    stream's generator)."""

    def __init__(self, commands: Mapping[str, Command], max_frame_size: int, max_session_state: int) -> None:
        self.commands = commands
        self.max_frame_size = max_frame_size
        self.max_session_state = max_session_state
        self.encoder = Encoder(max_frame_size)
        # Committed state of the sessions the host placed here, as opaque msgpack bytes.
        self.sessions: dict[str, bytes] = {}

    def run(self, req: Request) -> bytes:
        """Run one request and return its reply frame (never raises for handler trouble)."""
        return self.run_command(req, self.commands.get(req.command))

    def run_command(self, req: Request, cmd: Command | None) -> bytes:
        """:meth:`run`, with the command already looked up (None: there is none of that name)."""
        if cmd is None:
            return self.unknown_command(req.id, req.command)
        sid = req.session_id
        if sid is None:  # the usual case first: no state to restore, compare or commit
            ctx = Context({}, None, req.id, req.command, req.trace_context)
            try:
                result = cmd.func(req.args, ctx)
            except SystemExit:
                raise  # a handler that exits ends its worker, as documented
            except BaseException as exc:  # any other failure of the handler becomes its reply
                return self.exception_frame(req.id, cmd, exc)
            try:
                return self.encoder.reply(req.id, result, None)
            except EncodeError as exc:
                return self.error_frame(req.id, RemoteKind.RESULT_NOT_ENCODABLE, str(exc), "", True, False)
        started = self.start(req, cmd)
        if isinstance(started, bytes):
            return started
        try:
            result = cmd.func(req.args, started[2])
        except SystemExit:
            raise
        except BaseException as exc:
            return self.exception_frame(req.id, cmd, exc)
        return self.finish(started, result)

    def start(self, req: Request, cmd: Command | None = None) -> bytes | Started:
        """The request's reply frame if its handler must not run (an unknown command, a session
        not held here), else the request ready to run, with its session's state in ``ctx``."""
        if cmd is None:
            cmd = self.commands.get(req.command)
            if cmd is None:
                return self.unknown_command(req.id, req.command)
        sid = req.session_id
        if sid is None:
            return req, cmd, Context({}, None, req.id, req.command, req.trace_context), None
        if req.session_state is not None:
            self.sessions[sid] = req.session_state
        state_before = self.sessions.get(sid)
        if state_before is None:
            # The host believes this worker holds the session, and it does not: say so, so the
            # host resends the committed state instead of running on an empty one.
            return self.error_frame(
                req.id, RemoteKind.SESSION_NOT_FOUND, f"session {sid!r} is not held here", "", False, False
            )
        context = Context(decode_session_state(state_before), sid, req.id, req.command, req.trace_context)
        return req, cmd, context, state_before

    def finish(self, started: Started, result: Any) -> bytes:
        """The reply frame of a handler that returned ``result``; commits what it left in
        ``ctx.session`` if that fits and encodes, and nothing otherwise."""
        req, _, ctx, state_before = started
        try:
            new_state = self._state_to_commit(req, ctx.session, state_before)
            frame = self.encoder.reply(req.id, result, new_state)
        except _Refusal as refusal:
            return refusal.frame
        except EncodeError as exc:
            # Nothing committed: the session keeps the state it had before this call.
            return self.error_frame(req.id, RemoteKind.RESULT_NOT_ENCODABLE, str(exc), "", True, False)
        if new_state is not None and req.session_id is not None:
            self.sessions[req.session_id] = new_state
        return frame

    def _state_to_commit(self, req: Request, session: Any, state_before: bytes | None) -> bytes | None:
        """The session state a call that ended normally commits (None: nothing, outside a
        session or unchanged). Raises _Refusal (its error frame) or EncodeError instead."""
        if state_before is None:
            return None
        if not isinstance(session, dict):  # rebound: a new dict commits like a mutation
            raise _Refusal(
                self.error_frame(
                    req.id,
                    RemoteKind.SESSION_STATE_NOT_A_DICT,
                    f"{req.command!r} set ctx.session to a {type(session).__name__}; it must stay a "
                    "dict of msgpack-able values. Nothing was committed.",
                    "",
                    True,
                    False,
                )
            )
        packed = encode_session_state(session)
        if packed == state_before:
            return None
        if len(packed) > self.max_session_state:
            raise _Refusal(
                self.error_frame(
                    req.id,
                    RemoteKind.SESSION_STATE_TOO_LARGE,
                    f"session state would be {len(packed)} bytes, over the limit of "
                    f"{self.max_session_state} (PoolConfig.max_session_state); not committed",
                    "",
                    True,
                    True,
                )
            )
        return packed

    def run_batch(self, batch: Batch, cmd: Command | None) -> bytes:
        """Run a chunk of ``pool.map``: the command on each item, in order, stopping at the
        first that raises. One Reply with every result, or a BatchError naming that item."""
        if cmd is None or cmd.stream:
            why = "a stream command cannot be mapped" if cmd is not None else "no such command"
            return self.error_frame(
                batch.id, RemoteKind.UNKNOWN_COMMAND, f"{batch.command!r}: {why} in this worker", "", False, True
            )
        func = cmd.func
        results = []
        ctx = Context({}, None, batch.id, batch.command)  # one per chunk: a fresh session dict per item
        for index, item in enumerate(batch.items):
            ctx.session = {}
            try:
                results.append(func(item, ctx))
            except SystemExit:
                raise
            except BaseException as exc:
                return self.batch_error_frame(batch.id, index, cmd, exc)
        return self.batch_reply(batch.id, results)

    def batch_reply(self, batch_id: int, results: list[Any]) -> bytes:
        """The reply frame of a chunk whose items all returned."""
        try:
            return self.encoder.reply(batch_id, results, None)
        except EncodeError as exc:
            return self.error_frame(batch_id, RemoteKind.RESULT_NOT_ENCODABLE, str(exc), "", True, False)

    def batch_error_frame(self, batch_id: int, index: int, cmd: Command, exc: BaseException) -> bytes:
        """The BatchError frame of a chunk whose item ``index`` raised ``exc``."""
        type_name, message, tb = described(exc)
        caller = isinstance(exc, cmd.caller_errors)
        return self._fitting(
            lambda limit: BatchError(batch_id, index, type_name, message[:limit], tb[-limit:] if limit else "", caller)
        )

    def open_stream(self, req: Request, cmd: Command) -> bytes | tuple[Started, Generator[Any, None, None]]:
        """Start a stream command: its generator (not advanced yet) with the request as
        :meth:`finish` needs it at the end, or the reply frame if it cannot start."""
        started = self.start(req, cmd)
        if isinstance(started, bytes):
            return started
        try:
            gen = cmd.func(req.args, started[2])
        except SystemExit:
            raise
        except BaseException as exc:
            return self.exception_frame(req.id, cmd, exc)
        return started, gen

    def stream_item(self, req: Request, cmd: Command, gen: Generator[Any, None, None]) -> tuple[bytes | None, bool]:
        """Run a stream's generator to its next item: ``(frame, ended)``. The item's StreamItem
        frame and False; or, once it has ended, True with None (it returned: :meth:`finish`
        gives the reply) or the error frame that ends the stream (it raised, or its item does
        not encode)."""
        try:
            item = next(gen)
        except StopIteration:
            return None, True
        except SystemExit:
            raise
        except BaseException as exc:  # after the items sent: the error ends the stream
            return self.exception_frame(req.id, cmd, exc), True
        try:
            return self.encoder.encode(StreamItem(req.id, item)), False
        except EncodeError as exc:
            gen.close()
            return self.error_frame(req.id, RemoteKind.RESULT_NOT_ENCODABLE, str(exc), "", True, False), True

    def unknown_command(self, request_id: int, name: str) -> bytes:
        return self.error_frame(
            request_id, RemoteKind.UNKNOWN_COMMAND, f"no command {name!r} in this worker", "", False, True
        )

    def exception_frame(self, request_id: int, cmd: Command, exc: BaseException) -> bytes:
        type_name, message, tb = described(exc)
        return self.error_frame(request_id, type_name, message, tb, True, isinstance(exc, cmd.caller_errors))

    def error_frame(
        self, request_id: int, remote_type: str, message: str, tb: str, ran: bool, caller: bool
    ) -> bytes:
        """An ErrorReply frame that always fits the frame limit: a handler whose message or
        traceback is huge (or not valid UTF-8) must get its error back, not crash its worker."""
        remote_type, message, tb = _printable(remote_type)[:256], _printable(message), _printable(tb)
        return self._fitting(
            lambda limit: ErrorReply(request_id, remote_type, message[:limit], tb[-limit:] if limit else "", ran, caller)
        )

    def _fitting(self, make: Callable[[int], Message]) -> bytes:
        """The frame of ``make(limit)``, the longest limit of message and traceback that fits."""
        limit = max(1024, self.max_frame_size // 4)
        while True:
            try:
                return self.encoder.encode(make(limit))
            except EncodeError:
                if not limit:
                    raise
                limit //= 4  # characters may take up to 4 bytes each: shrink until it fits
