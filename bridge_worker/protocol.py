"""The wire codec between the pool (host) and a worker: sans-IO, shared by both sides.

A frame is a 4-byte big-endian body length followed by a msgpack body. The body is an array
whose first element is the message tag; the rest are the message's fields in order. Frames are
length-prefixed (rather than relying on msgpack being self-delimiting) so that an oversized or
garbage frame is refused from its header, before any of it is buffered.

    encoder side:  encode(message) -> bytes, or Encoder().encode / .request / .reply (one per owner)
    decoder side:  d = Decoder(); d.receive_data(chunk); d.next_message() -> message | NEED_DATA | EOF

Any decode failure raises :class:`ProtocolError` and is sticky, as in h11: a channel that has
produced one bad frame cannot be trusted again, so every later call raises too. Encoding a message
whose payload msgpack cannot represent raises :class:`EncodeError`; that is the sender's problem,
not the channel's, and the channel stays usable.

Session state travels as opaque bytes (msgpack-encoded by the worker): the host stores, measures
and sends it back without ever decoding it.

A Request may end with one optional field, its trace context (protocol 5): present only when the
host traces the call, so an untraced request's frame is byte for byte what it was in protocol 4.

This module uses only the standard library and msgpack: workers import it and must start fast.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Final, NamedTuple, Union

import msgpack

_unpackb = msgpack.unpackb
_tuple_new = tuple.__new__  # builds a message without its NamedTuple's Python-level __new__

#: Bumped on any incompatible change to the messages below; carried in Hello.
PROTOCOL_VERSION: Final = 5

#: Default largest frame body, in bytes, either direction.
DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")
_HEADER_SIZE: Final = _HEADER.size


class ProtocolError(Exception):
    """The byte stream is not a valid frame sequence: the peer is broken or not a peer.

    The channel is dead after this; the side that sees it closes the channel (the host kills
    that worker).
    """


class EncodeError(Exception):
    """A message's payload cannot be encoded (not msgpack-able, or over the frame size limit).

    The fault lies with whoever supplied the payload; the channel is untouched and stays usable.
    """


class RemoteKind:
    """``ErrorReply.remote_type`` values that the worker itself gives, not a handler's exception
    (those are the exception's qualified type name). Both sides read them from here."""

    #: The request named a command this worker does not have.
    UNKNOWN_COMMAND: Final = "UnknownCommand"
    #: The host believed this worker holds the session, and it does not.
    SESSION_NOT_FOUND: Final = "SessionNotFound"
    #: The session state the call would commit is over the limit; nothing was committed.
    SESSION_STATE_TOO_LARGE: Final = "SessionStateTooLarge"
    #: The handler set ``ctx.session`` to something that is not a dict; nothing was committed.
    SESSION_STATE_NOT_A_DICT: Final = "SessionStateNotADict"
    #: The handler returned a value (or left session state) that cannot be encoded.
    RESULT_NOT_ENCODABLE: Final = "EncodeError"


class CommandInfo(NamedTuple):
    """One entry of a worker's command table, as announced in Hello."""

    name: str
    idempotent: bool
    caller_errors: tuple[str, ...]  # exception type names (qualified) that are caller mistakes
    finish_on_cancel: bool  # a cancelled call lets the handler finish instead of killing the worker
    pipelined: bool  # short and idempotent: the host may write it behind other calls (pipelining)
    stream: bool = False  # a generator: its calls answer with StreamItems, then a Reply (open_stream)


class Hello(NamedTuple):
    """Worker -> host, once, when the worker is ready to serve."""

    version: int
    pid: int
    commands: tuple[CommandInfo, ...]


class StartupFailed(NamedTuple):
    """Worker -> host, instead of Hello, when a handlers module or its start hook failed."""

    module: str
    message: str
    traceback: str


class Request(NamedTuple):
    """Host -> worker: run a command.

    ``session_state`` is the session's committed state (opaque msgpack bytes) when the host
    sends it: for a session new to this worker. None means "use what you have" (or nothing).
    ``trace_context`` is the caller's trace context (W3C ``traceparent`` and friends, str to str)
    when the host traces the call; the worker hands it to the handler as ``ctx.trace_context``.
    On the wire it is an optional trailing field, left out when None.
    """

    id: int
    command: str
    args: Any
    session_id: str | None
    session_state: bytes | None
    trace_context: dict[str, str] | None = None


class Reply(NamedTuple):
    """Worker -> host: the command returned. ``session_state`` is set only when it changed."""

    id: int
    result: Any
    session_state: bytes | None


class ErrorReply(NamedTuple):
    """Worker -> host: the command did not return a value.

    ``handler_ran`` says whether the handler was entered (so its side effects may have happened);
    ``caller_error`` says the exception is one of the command's declared caller error types.
    """

    id: int
    remote_type: str
    message: str
    traceback: str
    handler_ran: bool
    caller_error: bool


class Ping(NamedTuple):
    """Host -> worker heartbeat."""

    id: int


class Pong(NamedTuple):
    """Worker -> host heartbeat answer: the Ping's id (0 for a beat the worker sends on its own,
    see ``bridge_worker._tcp``), and the worker's resident memory in bytes as it measures it
    (None where it cannot): the host reads a remote worker's memory from here, since psutil
    cannot see another machine."""

    id: int
    rss: int | None


class CloseSession(NamedTuple):
    """Host -> worker: forget this session's state."""

    session_id: str


class Shutdown(NamedTuple):
    """Host -> worker: finish and exit."""


class Batch(NamedTuple):
    """Host -> worker: run a command on each item, in order (a chunk of ``pool.map``). Answered
    by one Reply whose result is the list of results, or a BatchError at the first item that
    raised."""

    id: int
    command: str
    items: list[Any]


class BatchError(NamedTuple):
    """Worker -> host: the item at ``position`` in a Batch raised (the items before it ran; their
    results are not sent). The other fields are ErrorReply's."""

    id: int
    position: int
    remote_type: str
    message: str
    traceback: str
    caller_error: bool


class StreamItem(NamedTuple):
    """Worker -> host: the next item a stream command's generator yielded."""

    id: int
    item: Any


class StreamCredit(NamedTuple):
    """Host -> worker: the consumer took ``n`` more items of stream ``id``: its generator may
    run that many items further ahead (it starts with :data:`STREAM_WINDOW`)."""

    id: int
    n: int


class StreamCancel(NamedTuple):
    """Host -> worker: the consumer of stream ``id`` left: close the generator (its ``finally``
    runs) and end the stream with a Reply that commits nothing."""

    id: int


Message = Union[
    Hello,
    StartupFailed,
    Request,
    Reply,
    ErrorReply,
    Ping,
    Pong,
    CloseSession,
    Shutdown,
    Batch,
    BatchError,
    StreamItem,
    StreamCredit,
    StreamCancel,
]

#: Items a stream's generator may yield ahead of its consumer before it waits for credit.
STREAM_WINDOW: Final = 16

# Tags are part of the wire format: never renumber, only append.
_TAGS: Final[dict[type[Message], int]] = {
    Hello: 0,
    StartupFailed: 1,
    Request: 2,
    Reply: 3,
    ErrorReply: 4,
    Ping: 5,
    Pong: 6,
    CloseSession: 7,
    Shutdown: 8,
    Batch: 9,
    BatchError: 10,
    StreamItem: 11,
    StreamCredit: 12,
    StreamCancel: 13,
}
# Fields each tag's body carries after the tag. A Request's last field is optional (left out
# when None), so its body may be one shorter.
_ARITY: Final[dict[int, tuple[int, ...]]] = {tag: (len(cls._fields),) for cls, tag in _TAGS.items()}
_ARITY[_TAGS[Request]] = (len(Request._fields) - 1, len(Request._fields))


def _is_trace_context(x: object) -> bool:
    return type(x) is dict and all(type(k) is str and type(v) is str for k, v in x.items())


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned by :meth:`Decoder.next_message` when a whole frame is not buffered yet.
NEED_DATA: Final = _Sentinel("NEED_DATA")
#: Returned by :meth:`Decoder.next_message` after a clean end of stream.
EOF: Final = _Sentinel("EOF")


def _is_str_or_none(x: object) -> bool:
    return x is None or type(x) is str


def _is_bytes_or_none(x: object) -> bool:
    return x is None or type(x) is bytes


def _check_hello(f: list[Any]) -> Hello:
    version, pid, commands = f
    if type(version) is not int or type(pid) is not int or not isinstance(commands, list):
        raise ValueError("bad hello fields")
    try:
        return Hello(version, pid, _command_table(commands))
    except (ValueError, TypeError):
        if version == PROTOCOL_VERSION:
            raise
        # Another version's command table may have another shape: let the host report the
        # version mismatch rather than a bad frame.
        return Hello(version, pid, ())


def _command_table(commands: list[Any]) -> tuple[CommandInfo, ...]:
    table = []
    for entry in commands:
        name, idempotent, caller_errors, finish_on_cancel, pipelined, stream = entry
        if (
            type(name) is not str
            or type(idempotent) is not bool
            or type(finish_on_cancel) is not bool
            or type(pipelined) is not bool
            or type(stream) is not bool
            or not isinstance(caller_errors, list)
            or not all(type(e) is str for e in caller_errors)
        ):
            raise ValueError("bad command table entry")
        table.append(
            CommandInfo(name, idempotent, tuple(caller_errors), finish_on_cancel, pipelined, stream)
        )
    return tuple(table)


def _check(cond: bool) -> None:
    if not cond:
        raise ValueError("bad field types")


def _build(tag: int, f: list[Any]) -> Message:
    # Field checks for everything the receiver will branch or index on; payloads (args, result)
    # are the application's and stay as decoded.
    if tag == 3:  # Reply: the hot path, checked first
        _check(type(f[0]) is int and _is_bytes_or_none(f[2]))
        return Reply(f[0], f[1], f[2])
    if tag == 2:
        trace = f[5] if len(f) == 6 else None
        _check(
            type(f[0]) is int
            and type(f[1]) is str
            and _is_str_or_none(f[3])
            and _is_bytes_or_none(f[4])
            and (len(f) == 5 or _is_trace_context(trace))
        )
        return Request(f[0], f[1], f[2], f[3], f[4], trace)
    if tag == 4:
        _check(
            type(f[0]) is int
            and type(f[1]) is str
            and type(f[2]) is str
            and type(f[3]) is str
            and type(f[4]) is bool
            and type(f[5]) is bool
        )
        return ErrorReply(f[0], f[1], f[2], f[3], f[4], f[5])
    if tag == 0:
        return _check_hello(f)
    if tag == 1:
        _check(all(type(x) is str for x in f))
        return StartupFailed(f[0], f[1], f[2])
    if tag == 5:
        _check(type(f[0]) is int)
        return Ping(f[0])
    if tag == 6:
        _check(type(f[0]) is int and (f[1] is None or type(f[1]) is int))
        return Pong(f[0], f[1])
    if tag == 7:
        _check(type(f[0]) is str)
        return CloseSession(f[0])
    if tag == 9:
        _check(type(f[0]) is int and type(f[1]) is str and type(f[2]) is list)
        return Batch(f[0], f[1], f[2])
    if tag == 10:
        _check(
            type(f[0]) is int
            and type(f[1]) is int
            and type(f[2]) is str
            and type(f[3]) is str
            and type(f[4]) is str
            and type(f[5]) is bool
        )
        return BatchError(f[0], f[1], f[2], f[3], f[4], f[5])
    if tag == 11:
        _check(type(f[0]) is int)
        return StreamItem(f[0], f[1])
    if tag == 12:
        _check(type(f[0]) is int and type(f[1]) is int)
        return StreamCredit(f[0], f[1])
    if tag == 13:
        _check(type(f[0]) is int)
        return StreamCancel(f[0])
    return Shutdown()


# Any exception from packing is the payload's fault: msgpack's own refusals (TypeError,
# ValueError, OverflowError, BufferError for a non-contiguous memoryview), and whatever a value's
# own methods raise while msgpack walks it (a dict subclass whose items() fails).
_UNENCODABLE: Final = (Exception,)


def encode(message: Message, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Return the frame for ``message``.

    Raises :class:`EncodeError` if a payload is not msgpack-able or the frame would be larger
    than ``max_frame_size``.
    """
    return _frame(msgpack.packb, type(message).__name__, _fields(message), max_frame_size)


def _fields(message: Message) -> tuple[Any, ...]:
    """The body of ``message``: its tag, then its fields (a Request's trace context only when
    there is one)."""
    if type(message) is Request and message.trace_context is None:
        return (_TAGS[Request], *message[:-1])
    return (_TAGS[type(message)], *message)


def _frame(
    pack: Callable[[Any], bytes], what: str, fields: tuple[Any, ...], max_frame_size: int
) -> bytes:
    try:
        body = pack(fields)
    except _UNENCODABLE as exc:
        raise EncodeError(f"cannot encode {what}: {exc}") from exc
    if len(body) > max_frame_size:
        raise EncodeError(
            f"{what} is {len(body)} bytes encoded, over the frame limit of {max_frame_size} bytes"
        )
    return _HEADER.pack(len(body)) + body


class Encoder:
    """:func:`encode` for the owner of one end of a channel, with shortcuts for the messages of
    the hot path. It keeps a msgpack packer of its own (reusing one is about twice as fast as
    ``msgpack.packb`` for small messages), so it is not thread-safe: one per owner."""

    __slots__ = ("max_frame_size", "_small", "_pack")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._small = min(max_frame_size, _PACKER_KEEPS)  # frames up to this need no check
        # A packer whose pack() raises resets its buffer, so it stays usable after a refusal.
        self._pack = msgpack.Packer().pack

    def encode(self, message: Message) -> bytes:
        what = type(message).__name__
        try:
            body = self._pack(_fields(message))
        except _UNENCODABLE as exc:
            raise self._refused(what, exc) from exc
        return self._frame(what, body)

    def request(
        self,
        id: int,
        command: str,
        args: Any,
        session_id: str | None,
        session_state: bytes | None,
        trace_context: dict[str, str] | None = None,
    ) -> bytes:
        """The frame of ``Request(id, command, args, session_id, session_state, trace_context)``."""
        try:
            if trace_context is None:
                body = self._pack((2, id, command, args, session_id, session_state))
            else:
                body = self._pack((2, id, command, args, session_id, session_state, trace_context))
        except _UNENCODABLE as exc:
            raise self._refused("Request", exc) from exc
        if len(body) > self._small:
            return self._frame("Request", body)
        return _HEADER.pack(len(body)) + body

    def reply(self, id: int, result: Any, session_state: bytes | None) -> bytes:
        """The frame of ``Reply(id, result, session_state)``."""
        try:
            body = self._pack((3, id, result, session_state))
        except _UNENCODABLE as exc:
            raise self._refused("Reply", exc) from exc
        if len(body) > self._small:
            return self._frame("Reply", body)
        return _HEADER.pack(len(body)) + body

    def _frame(self, what: str, body: bytes) -> bytes:
        size = len(body)
        if size > _PACKER_KEEPS:
            # A packer keeps the capacity its biggest message needed: let a big one go with it.
            self._pack = msgpack.Packer().pack
        if size > self.max_frame_size:
            raise EncodeError(
                f"{what} is {size} bytes encoded, over the frame limit of {self.max_frame_size} bytes"
            )
        return _HEADER.pack(size) + body

    def _refused(self, what: str, exc: Exception) -> EncodeError:
        self._pack = msgpack.Packer().pack  # its buffer may have grown before the refusal
        return EncodeError(f"cannot encode {what}: {exc}")


#: Frames up to this size leave the reused packer's buffer as it is.
_PACKER_KEEPS: Final = 1 << 20


def encode_session_state(state: Any) -> bytes:
    """Encode session state to the opaque bytes that travel in Request and Reply."""
    try:
        return msgpack.packb(state)
    except _UNENCODABLE as exc:
        raise EncodeError(f"session state is not msgpack-able: {exc}") from exc


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if type(key) is list else key


def _dict_with_tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_hashable(k): v for k, v in pairs}


def _unpack(data: bytes | bytearray) -> Any:
    """msgpack.unpackb, except that a map key that is an array decodes as a tuple.

    Python's tuple keys (``{(1, 2): "x"}``) encode as msgpack arrays, which decode as lists, which
    cannot be dict keys: without this, an argument or result that :func:`encode` accepted would
    make the receiving side fail to decode the frame (and the host kill a worker for it). The
    slower hook runs only when the fast path fails.
    """
    try:
        return msgpack.unpackb(data, strict_map_key=False)
    except TypeError:
        return msgpack.unpackb(data, strict_map_key=False, object_pairs_hook=_dict_with_tuple_keys)


def decode_session_state(data: bytes) -> Any:
    """Inverse of :func:`encode_session_state` (worker side only)."""
    return _unpack(data)


class Decoder:
    """Turns a byte stream into messages. No I/O: feed it with :meth:`receive_data`."""

    __slots__ = ("_buf", "_pos", "_eof", "_error", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not decoded yet (part of a frame, after NEED_DATA)."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the channel; ``b""`` means the peer closed it."""
        self._raise_if_failed()
        if not data:
            self._eof = True
            return
        if self._eof:
            self._fail("data received after end of stream")
        self._buf += data

    def _raise_if_failed(self) -> None:
        # A fresh exception each call: re-raising the one instance would append to its
        # traceback every time (keeping every frame it passed through alive).
        if self._error is not None:
            raise ProtocolError(f"channel already failed: {self._error}") from self._error

    def _fail(self, why: str, cause: BaseException | None = None) -> None:
        self._error = ProtocolError(why)
        self._error.__cause__ = cause
        raise self._error

    def next_message(self) -> Message | _Sentinel:
        """The next whole message, or :data:`NEED_DATA`, or :data:`EOF` after a clean close."""
        if self._error is not None:
            self._raise_if_failed()
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available >= _HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self.max_frame_size:
                self._fail(
                    f"frame of {size} bytes is over the limit of {self.max_frame_size} bytes"
                )
            end = pos + _HEADER_SIZE + size
            if len(buf) >= end:
                body = buf[pos + _HEADER_SIZE : end]
                if end == len(buf):
                    buf.clear()
                    self._pos = 0
                else:
                    self._pos = end
                    if end > 65536 and end * 2 > len(buf):
                        del buf[:end]
                        self._pos = 0
                # The hot path first: a reply or a request whose fields are well typed.
                try:
                    f = _unpackb(body, strict_map_key=False)
                except Exception:
                    return self._decode_body(body)
                if type(f) is list and f and type(f[0]) is int:
                    n = len(f)
                    if (
                        f[0] == 3
                        and n == 4
                        and type(f[1]) is int
                        and (f[3] is None or type(f[3]) is bytes)
                    ):
                        return _tuple_new(Reply, (f[1], f[2], f[3]))
                    if (
                        f[0] == 2
                        and n == 6
                        and type(f[1]) is int
                        and type(f[2]) is str
                        and (f[4] is None or type(f[4]) is str)
                        and (f[5] is None or type(f[5]) is bytes)
                    ):
                        return _tuple_new(Request, (f[1], f[2], f[3], f[4], f[5], None))
                return self._decode_body(body)
        if self._eof:
            if available:
                self._fail(f"end of stream inside a frame ({available} bytes pending)")
            return EOF
        return NEED_DATA

    def messages(self) -> list[Message]:
        """Every whole message buffered now, in order (maybe none; then :meth:`next_message`
        says NEED_DATA or EOF). The same as calling :meth:`next_message` until it returns a
        sentinel, in one call: the loop both sides run for every batch they read. A bad frame
        after good ones is left for the next call to raise, so the good ones are not lost."""
        if self._error is not None:
            self._raise_if_failed()
        buf = self._buf
        pos = self._pos
        size = len(buf)
        limit = self.max_frame_size
        unpack_from = _HEADER.unpack_from
        unpackb = _unpackb
        new = _tuple_new
        out: list[Message] = []
        append = out.append
        while size - pos >= _HEADER_SIZE:
            (n,) = unpack_from(buf, pos)
            end = pos + _HEADER_SIZE + n
            if n > limit or end > size:
                break  # over the limit (next_message raises), or not whole yet
            body = buf[pos + _HEADER_SIZE : end]
            try:
                f = unpackb(body, strict_map_key=False)
            except Exception:
                f = None
            # The hot path: a reply or a request whose fields are well typed (as next_message).
            if type(f) is list and f and type(f[0]) is int:
                tag = f[0]
                if tag == 3 and len(f) == 4 and type(f[1]) is int and (f[3] is None or type(f[3]) is bytes):
                    append(new(Reply, (f[1], f[2], f[3])))
                    pos = end
                    continue
                if (
                    tag == 2
                    and len(f) == 6
                    and type(f[1]) is int
                    and type(f[2]) is str
                    and (f[4] is None or type(f[4]) is str)
                    and (f[5] is None or type(f[5]) is bytes)
                ):
                    append(new(Request, (f[1], f[2], f[3], f[4], f[5], None)))
                    pos = end
                    continue
            if out:
                break  # the general decoder may raise: deliver what came before it first
            self._pos = end
            self._compact()
            return [self._decode_body(body)]
        self._pos = pos
        self._compact()
        return out

    def _compact(self) -> None:
        buf = self._buf
        pos = self._pos
        if pos == len(buf):
            buf.clear()
            self._pos = 0
        elif pos > 65536 and pos * 2 > len(buf):
            del buf[:pos]
            self._pos = 0

    def _decode_body(self, body: bytearray) -> Message:
        try:
            fields = _unpack(body)
            tag = fields[0]
            if type(fields) is not list or type(tag) is not int or len(fields) - 1 not in _ARITY.get(tag, ()):
                raise ValueError("not a known message")
            return _build(tag, fields[1:])
        except Exception as exc:  # any decode or shape failure means the same: dead channel
            self._fail(f"invalid frame: {exc!r}", exc)
            raise AssertionError("unreachable")  # pragma: no cover

    def __iter__(self) -> "Decoder":
        return self

    def __next__(self) -> Message:
        """Iterate over the messages buffered now (stops at NEED_DATA or EOF)."""
        msg = self.next_message()
        if isinstance(msg, _Sentinel):
            raise StopIteration
        return msg
