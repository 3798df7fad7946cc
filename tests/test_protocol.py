"""The wire codec: round trips, arbitrary chunking, and refusal of every malformed stream.

Sans-IO as in h11's tests: bytes are fed in by hand, one at a time or split at random points;
nothing here opens a pipe or a socket.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, TypeGuard

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge_worker.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    Batch,
    BatchError,
    EOF,
    NEED_DATA,
    PROTOCOL_VERSION,
    CloseSession,
    CommandInfo,
    Decoder,
    EncodeError,
    Encoder,
    ErrorReply,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Reply,
    Request,
    Shutdown,
    StartupFailed,
    StreamCancel,
    StreamCredit,
    StreamItem,
    decode_session_state,
    encode,
    encode_session_state,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The wire format, written out independently of the module under test.
TAGS: dict[type, int] = {
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
INT = "int"
STR = "str"
BOOL = "bool"
ANY = "any"
OPT_STR = "str|None"
OPT_BYTES = "bytes|None"
LIST = "list"
OPT_INT = "int|None"
TABLE = "command table"
TRACE = "map of str to str"
SCHEMA: dict[int, tuple[str, ...]] = {
    0: (INT, INT, TABLE),
    1: (STR, STR, STR),
    2: (INT, STR, ANY, OPT_STR, OPT_BYTES),
    3: (INT, ANY, OPT_BYTES),
    4: (INT, STR, STR, STR, BOOL, BOOL),
    5: (INT,),
    6: (INT, OPT_INT),
    7: (STR,),
    8: (),
    9: (INT, STR, LIST),
    10: (INT, INT, STR, STR, STR, BOOL),
    11: (INT, ANY),
    12: (INT, INT),
    13: (INT,),
}
#: A field some tags may add after those of SCHEMA (protocol 5: a Request's trace context, sent
#: only when the call is traced; a body without it is exactly a protocol 4 Request's).
OPTIONAL_TAIL: dict[int, str] = {2: TRACE}


def frame(obj: Any) -> bytes:
    """A well-framed body holding any msgpack object (4-byte big-endian length + body)."""
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def field_ok(kind: str, x: Any) -> bool:
    """Does a decoded msgpack value fit a field of this kind? (The oracle for the decoder.)"""
    if kind == ANY:
        return True
    if kind == INT:
        return type(x) is int
    if kind == STR:
        return type(x) is str
    if kind == BOOL:
        return type(x) is bool
    if kind == OPT_STR:
        return x is None or type(x) is str
    if kind == OPT_BYTES:
        return x is None or type(x) is bytes
    if kind == LIST:
        return type(x) is list
    if kind == OPT_INT:
        return x is None or type(x) is int
    if kind == TRACE:
        return type(x) is dict and all(type(k) is str and type(v) is str for k, v in x.items())
    assert kind == TABLE
    return type(x) is list and all(
        type(e) is list
        and len(e) == 6
        and type(e[0]) is str
        and type(e[1]) is bool
        and type(e[2]) is list
        and all(type(n) is str for n in e[2])
        and type(e[3]) is bool
        and type(e[4]) is bool
        and type(e[5]) is bool
        for e in x
    )


def body_ok(obj: Any) -> bool:
    """Should a frame whose body decodes to ``obj`` be accepted?"""
    if type(obj) is not list or not obj or type(obj[0]) is not int or obj[0] not in SCHEMA:
        return False
    kinds = SCHEMA[obj[0]]
    if obj[0] == 0 and len(obj) == 4 and type(obj[1]) is int and obj[1] != PROTOCOL_VERSION:
        # Another version's hello: its table may have another shape; only the header is checked
        # (the host then reports the version mismatch).
        return type(obj[2]) is int and type(obj[3]) is list
    tail = OPTIONAL_TAIL.get(obj[0])
    if tail is not None and len(obj) == 2 + len(kinds):
        return field_ok(tail, obj[-1]) and all(field_ok(k, x) for k, x in zip(kinds, obj[1:]))
    return len(obj) == 1 + len(kinds) and all(field_ok(k, x) for k, x in zip(kinds, obj[1:]))


def well_typed(msg: object) -> TypeGuard[Message]:
    """Is ``msg`` a message instance whose fields all have the types the receiver relies on?"""
    if type(msg) not in TAGS:
        return False
    assert isinstance(msg, tuple)
    if type(msg) is Hello:
        return (
            type(msg.version) is int
            and type(msg.pid) is int
            and type(msg.commands) is tuple
            and all(
                type(c) is CommandInfo
                and type(c.name) is str
                and type(c.idempotent) is bool
                and type(c.caller_errors) is tuple
                and all(type(n) is str for n in c.caller_errors)
                and type(c.finish_on_cancel) is bool
                and type(c.pipelined) is bool
                and type(c.stream) is bool
                for c in msg.commands
            )
        )
    tag = TAGS[type(msg)]
    kinds = SCHEMA[tag]
    tail = OPTIONAL_TAIL.get(tag)
    if tail is not None:  # the message always has the field; None when the body left it out
        if len(msg) != len(kinds) + 1 or not (msg[-1] is None or field_ok(tail, msg[-1])):
            return False
        msg = msg[:-1]
    return len(msg) == len(kinds) and all(field_ok(k, x) for k, x in zip(kinds, msg))


def same(a: Any, b: Any) -> bool:
    """Strict equality: same types all the way down (True is not 1), floats bit for bit
    (so NaN equals itself and -0.0 is not 0.0), dicts in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    return bool(a == b)


def same_list(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def drain(
    decoder: Decoder, limit: int, out: list[Message] | None = None, batch: bool = False
) -> object:
    """Append every message next_message gives to ``out`` until a sentinel; return that.
    ``batch``: take them with messages() instead (the hot path's loop), then the sentinel.

    Appending as it goes keeps what was delivered before an exception. Bounded: a decoder that
    keeps producing messages past ``limit`` fails the test instead of hanging it.
    """
    if batch:
        for _ in range(limit + 1):
            got = decoder.messages()
            if not got:
                msg = decoder.next_message()
                assert msg is NEED_DATA or msg is EOF, msg
                return msg
            for msg in got:
                assert well_typed(msg), msg
            if out is not None:
                out.extend(got)
        raise AssertionError(f"decoder produced more than {limit} batches")
    for _ in range(limit + 1):
        msg = decoder.next_message()
        if msg is NEED_DATA or msg is EOF:
            return msg
        assert well_typed(msg), msg
        if out is not None:
            out.append(msg)
    raise AssertionError(f"decoder produced more than {limit} messages")


def feed(chunks: list[bytes], decoder: Decoder | None = None, batch: bool = False) -> list[Message]:
    """Feed chunks as an I/O loop would (draining after each), then EOF; check the sentinels."""
    d = Decoder() if decoder is None else decoder
    limit = sum(map(len, chunks)) // 5 + 1  # the smallest valid frame is 5 bytes
    got: list[Message] = []
    for chunk in chunks:
        if not chunk:
            continue  # b"" would mean end of stream
        d.receive_data(chunk)
        assert drain(d, limit, got, batch) is NEED_DATA
    d.receive_data(b"")
    assert drain(d, limit, got, batch) is EOF
    assert d.next_message() is EOF  # and it stays at EOF
    return got


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

wire_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
keys = st.one_of(wire_ints, st.text(max_size=8), st.binary(max_size=8))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    wire_ints,
    st.floats(),  # NaN and infinities included: msgpack carries doubles bit for bit
    st.text(max_size=20),
    st.binary(max_size=20),
)
payloads = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=12,
)
ids = wire_ints
opt_str = st.none() | st.text(max_size=10)
opt_bytes = st.none() | st.binary(max_size=30)
trace_contexts = st.none() | st.dictionaries(st.text(max_size=12), st.text(max_size=60), max_size=3)
command_infos = st.builds(
    CommandInfo,
    st.text(max_size=10),
    st.booleans(),
    st.lists(st.text(max_size=10), max_size=3).map(tuple),
    st.booleans(),
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, ids, ids, st.lists(command_infos, max_size=3).map(tuple)),
    st.builds(StartupFailed, st.text(max_size=10), st.text(max_size=10), st.text(max_size=30)),
    st.builds(Request, ids, st.text(max_size=10), payloads, opt_str, opt_bytes, trace_contexts),
    st.builds(Reply, ids, payloads, opt_bytes),
    st.builds(
        ErrorReply,
        ids,
        st.text(max_size=10),
        st.text(max_size=10),
        st.text(max_size=30),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(Ping, ids),
    st.builds(Pong, ids, st.none() | ids),
    st.builds(CloseSession, st.text(max_size=10)),
    st.just(Shutdown()),
    st.builds(Batch, ids, st.text(max_size=10), st.lists(payloads, max_size=4)),
    st.builds(
        BatchError,
        ids,
        ids,
        st.text(max_size=10),
        st.text(max_size=10),
        st.text(max_size=30),
        st.booleans(),
    ),
    st.builds(StreamItem, ids, payloads),
    st.builds(StreamCredit, ids, ids),
    st.builds(StreamCancel, ids),
)


def as_body(msg: Message) -> list[Any]:
    """The body a well-behaved peer sends for ``msg`` (decoded msgpack form)."""
    obj = msgpack.unpackb(encode(msg)[4:], strict_map_key=False)
    assert isinstance(obj, list)
    return obj


@st.composite
def mutated_bodies(draw: st.DrawFn) -> list[Any]:
    """A valid message's body with one field replaced, one dropped, or one added."""
    body = as_body(draw(messages))
    how = draw(st.sampled_from(["replace", "drop", "add", "retag"]))
    if how == "replace" and len(body) > 1:
        i = draw(st.integers(1, len(body) - 1))
        body[i] = draw(payloads)
    elif how == "drop" and len(body) > 1:
        del body[draw(st.integers(1, len(body) - 1))]
    elif how == "add":
        body.append(draw(payloads))
    else:
        body[0] = draw(st.one_of(st.integers(-2, 10), payloads))
    return body


@st.composite
def bad_tables(draw: st.DrawFn) -> list[Any]:
    """A Hello body whose command table is built from random entries (mostly malformed)."""
    entry = st.one_of(
        payloads,
        st.lists(st.one_of(st.text(max_size=3), st.booleans(), st.lists(payloads, max_size=2)),
                 min_size=3, max_size=5),
    )
    return [0, draw(ids), draw(ids), draw(st.lists(entry, max_size=3))]


shaped_bodies = st.one_of(
    payloads,
    st.builds(lambda tag, rest: [tag, *rest], st.integers(-1, 9), st.lists(payloads, max_size=7)),
    mutated_bodies(),
    bad_tables(),
)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

NESTED = {
    "list": [1, [2, [3, None]], {"k": b"\x00\xff"}],
    7: "int key",
    -3: {0: [], 1: {}},
    b"bin": True,
    "unicode": "żółw ☃ 𝄞 日本",
    "big": [2**64 - 1, -(2**63), 2**63, 0],
    "floats": [0.5, -0.0, 1e308, float("inf"), float("-inf")],
    "none": None,
    "empty": "",
}

EXAMPLES: list[Any] = [
    pytest.param(
        Hello(
            PROTOCOL_VERSION,
            4242,
            (
                CommandInfo("predict", True, ("builtins.ValueError", "mod.BadInput"), False, False),
                CommandInfo("train", False, (), True, False),
                CommandInfo("lookup", True, (), False, True),
            ),
        ),
        id="hello",
    ),
    pytest.param(Hello(PROTOCOL_VERSION, 1, ()), id="hello-no-commands"),
    pytest.param(
        StartupFailed("handlers.mod", "ImportError: nope", "Traceback ...\n  ☃\n"), id="startup"
    ),
    pytest.param(Request(1, "predict", NESTED, None, None), id="request-plain"),
    pytest.param(
        Request(2**64 - 1, "step", [1, 2.5, "x"], "session-ü", encode_session_state({"n": 1})),
        id="request-session-state",
    ),
    pytest.param(Request(3, "step", None, "s", None), id="request-session-no-state"),
    pytest.param(Request(0, "", b"", None, b""), id="request-empty-state-bytes"),
    pytest.param(
        Request(4, "predict", NESTED, "s", None, {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}),
        id="request-traced",
    ),
    pytest.param(Request(5, "predict", None, None, None, {}), id="request-empty-trace-context"),
    pytest.param(Reply(1, NESTED, None), id="reply"),
    pytest.param(Reply(-(2**63), [NESTED, NESTED], b"\x81\xa1n\x02"), id="reply-state"),
    pytest.param(Reply(5, None, None), id="reply-none"),
    pytest.param(
        ErrorReply(9, "builtins.ValueError", "bad ☃", "Traceback...", True, False), id="error"
    ),
    pytest.param(ErrorReply(9, "", "", "", False, True), id="error-empty"),
    pytest.param(Batch(7, "square", [1, NESTED, None, []]), id="batch"),
    pytest.param(Batch(8, "square", []), id="batch-empty"),
    pytest.param(BatchError(7, 2, "builtins.ValueError", "no ☃", "Traceback...", True), id="batch-error"),
    pytest.param(StreamItem(11, NESTED), id="stream-item"),
    pytest.param(StreamCredit(11, 8), id="stream-credit"),
    pytest.param(StreamCancel(11), id="stream-cancel"),
    pytest.param(
        Hello(PROTOCOL_VERSION, 2, (CommandInfo("tokens", True, (), False, False, True),)),
        id="hello-stream-command",
    ),
    pytest.param(Ping(0), id="ping"),
    pytest.param(Pong(2**64 - 1, 2**40), id="pong"),
    pytest.param(Pong(0, None), id="pong-beat-without-rss"),
    pytest.param(CloseSession("session-ü"), id="close"),
    pytest.param(Shutdown(), id="shutdown"),
]


@pytest.mark.parametrize("msg", EXAMPLES)
def test_round_trip_examples(msg: Message) -> None:
    data = encode(msg)
    d = Decoder()
    d.receive_data(data)
    got = d.next_message()
    assert same(got, msg), got
    assert d.next_message() is NEED_DATA


@pytest.mark.parametrize("msg", EXAMPLES)
def test_wire_format_is_length_prefix_then_tagged_array(msg: Message) -> None:
    # Tags are the wire format: a renumbering would break peers of another version.
    data = encode(msg)
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    body = msgpack.unpackb(data[4:], strict_map_key=False)
    assert body[0] == TAGS[type(msg)]
    optional_left_out = TAGS[type(msg)] in OPTIONAL_TAIL and msg[-1] is None
    assert len(body) == 1 + len(msg) - optional_left_out


def test_protocol_version_is_an_int() -> None:
    assert type(PROTOCOL_VERSION) is int and PROTOCOL_VERSION >= 1


TRACEPARENT = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}


def test_an_untraced_request_is_the_frame_it_was_in_protocol_4() -> None:
    # Tracing adds a field only when there is a context to carry: the untraced frame costs
    # not one byte more, from both encoders.
    protocol_4 = frame([2, 7, "echo", {"a": 1}, None, None])
    assert encode(Request(7, "echo", {"a": 1}, None, None)) == protocol_4
    assert Encoder().request(7, "echo", {"a": 1}, None, None) == protocol_4
    assert Encoder().encode(Request(7, "echo", {"a": 1}, None, None)) == protocol_4


def test_a_traced_request_carries_its_context_as_a_trailing_field() -> None:
    data = Encoder().request(7, "echo", {"a": 1}, "s", b"\x80", TRACEPARENT)
    assert data == frame([2, 7, "echo", {"a": 1}, "s", b"\x80", TRACEPARENT])
    for batch in (False, True):
        got: list[Message] = []
        d = Decoder()
        d.receive_data(data + encode(Ping(1)))
        assert drain(d, 5, got, batch) is NEED_DATA
        assert got == [Request(7, "echo", {"a": 1}, "s", b"\x80", TRACEPARENT), Ping(1)]


def test_the_handler_sees_the_trace_context_and_none_without_one() -> None:
    from bridge_worker import Command
    from bridge_worker._requests import RequestHandler

    seen: list[Any] = []
    cmd = Command("look", lambda args, ctx: seen.append(ctx.trace_context), True, (), False)
    handler = RequestHandler({"look": cmd}, DEFAULT_MAX_FRAME_SIZE, 1 << 20)
    handler.run(Request(1, "look", None, None, None, TRACEPARENT))
    handler.run(Request(2, "look", None, None, None))
    handler.run(Request(3, "look", None, "s", encode_session_state({}), TRACEPARENT))  # in a session too
    assert seen == [TRACEPARENT, None, TRACEPARENT]


def test_another_versions_hello_decodes_so_the_host_can_name_the_mismatch() -> None:
    # Version 1's command table had four fields per entry; ours has five.
    old = msgpack.packb([TAGS[Hello], 1, 77, [["echo", True, [], False]]])
    d = Decoder()
    d.receive_data(struct.pack(">I", len(old)) + old)
    assert d.next_message() == Hello(1, 77, ())
    # The same table under our own version is a bad frame.
    bad = msgpack.packb([TAGS[Hello], PROTOCOL_VERSION, 77, [["echo", True, [], False]]])
    d = Decoder()
    d.receive_data(struct.pack(">I", len(bad)) + bad)
    with pytest.raises(ProtocolError):
        d.next_message()


@SETTINGS
@given(messages)
def test_round_trip_any_message(msg: Message) -> None:
    d = Decoder()
    d.receive_data(encode(msg))
    got = d.next_message()
    assert same(got, msg)
    assert d.next_message() is NEED_DATA


def test_payload_tuples_arrive_as_lists() -> None:
    # msgpack has one array type: documents what callers get back.
    d = Decoder()
    d.receive_data(encode(Reply(1, (1, (2, 3)), None)))
    got = d.next_message()
    assert isinstance(got, Reply)
    assert same(got.result, [1, [2, 3]])


# ---------------------------------------------------------------------------------------------
# Streams: whole, byte by byte, split anywhere
# ---------------------------------------------------------------------------------------------


def test_example_stream_whole_and_byte_by_byte() -> None:
    msgs: list[Message] = [p.values[0] for p in EXAMPLES]
    data = b"".join(encode(m) for m in msgs)
    assert same_list(feed([data]), msgs)
    assert same_list(feed([data[i : i + 1] for i in range(len(data))]), msgs)


@SETTINGS
@given(st.lists(messages, max_size=8), st.lists(st.integers(min_value=0), max_size=20), st.booleans())
def test_stream_split_anywhere(msgs: list[Message], points: list[int], batch: bool) -> None:
    data = b"".join(encode(m) for m in msgs)
    assert same_list(feed([data], batch=batch), msgs)
    assert same_list(feed(split(data, points), batch=batch), msgs)


@FEW
@given(st.lists(messages, max_size=4), st.booleans())
def test_stream_byte_by_byte(msgs: list[Message], batch: bool) -> None:
    data = b"".join(encode(m) for m in msgs)
    assert same_list(feed([data[i : i + 1] for i in range(len(data))], batch=batch), msgs)


def test_complete_frame_buffered_before_eof_is_still_delivered() -> None:
    d = Decoder()
    d.receive_data(encode(Ping(1)) + encode(Pong(2, None)))
    d.receive_data(b"")
    assert d.next_message() == Ping(1)
    assert d.next_message() == Pong(2, None)
    assert d.next_message() is EOF


def test_empty_stream_is_a_clean_eof() -> None:
    d = Decoder()
    assert d.next_message() is NEED_DATA
    d.receive_data(b"")
    assert d.next_message() is EOF
    d.receive_data(b"")  # a second close is harmless
    assert d.next_message() is EOF


def test_iteration_drains_buffered_messages() -> None:
    msgs: list[Message] = [Ping(1), Reply(2, {"a": [1]}, None), CloseSession("s")]
    last = encode(Shutdown()) + encode(Pong(3, 4096))
    d = Decoder()
    d.receive_data(b"".join(encode(m) for m in msgs) + last[:3])
    assert list(d) == msgs
    assert list(d) == []  # stopped at NEED_DATA, nothing consumed past it
    d.receive_data(last[3:])
    assert [m for m in d] == [Shutdown(), Pong(3, 4096)]
    d.receive_data(b"")
    assert list(d) == []
    assert d.next_message() is EOF


def test_iteration_raises_on_a_bad_frame_after_delivering_the_good_ones() -> None:
    d = Decoder()
    d.receive_data(encode(Ping(1)) + frame(["not", "a", "message"]))
    it = iter(d)
    assert next(it) == Ping(1)
    with pytest.raises(ProtocolError):
        next(it)


def test_a_batch_delivers_the_good_frames_before_a_bad_one_raises() -> None:
    d = Decoder()
    good = [Reply(1, "a", None), Ping(2), Request(3, "echo", [1], None, None)]
    d.receive_data(b"".join(encode(m) for m in good) + frame(["not", "a", "message"]) + encode(Pong(4, None)))
    got: list[Message] = []
    with pytest.raises(ProtocolError):
        for _ in range(5):  # bounded: a Ping (not on the fast path) ends a batch early
            got += d.messages()
    assert got == good
    with pytest.raises(ProtocolError):  # and it stays broken
        d.next_message()


# ---------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [Ping(1), Reply(1, NESTED, b"state"), Shutdown()])
def test_eof_inside_any_frame_is_a_protocol_error(msg: Message) -> None:
    data = encode(msg)
    for cut in range(1, len(data)):
        d = Decoder()
        d.receive_data(data[:cut])
        assert d.next_message() is NEED_DATA
        d.receive_data(b"")
        with pytest.raises(ProtocolError, match="end of stream"):
            d.next_message()


@SETTINGS
@given(st.lists(messages, max_size=4), messages, st.data())
def test_truncated_stream_delivers_whole_frames_then_fails(
    before: list[Message], last: Message, data: st.DataObject
) -> None:
    tail = encode(last)
    cut = data.draw(st.integers(1, len(tail) - 1), label="cut")
    d = Decoder()
    d.receive_data(b"".join(encode(m) for m in before) + tail[:cut])
    got: list[Message] = []
    assert drain(d, len(before), got) is NEED_DATA
    assert same_list(got, before)
    d.receive_data(b"")
    with pytest.raises(ProtocolError):
        d.next_message()


# ---------------------------------------------------------------------------------------------
# Garbage and malformed frames
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    st.lists(messages, max_size=3),
    st.binary(max_size=200),
    st.lists(st.integers(min_value=0), max_size=10),
    st.booleans(),
)
@example([Ping(1)], b"\xff\xff\xff\xffthis is not a frame", [], True)
@example([Ping(1)], b"\xff\xff\xff\xffthis is not a frame", [], False)
@example([], b"\x00\x00\x00\x00", [], False)
@example([], b"\x00\x00\x00\x01\xc1", [], True)  # 0xc1: the one byte msgpack never uses
def test_garbage_only_ever_raises_protocol_error(
    good: list[Message], garbage: bytes, points: list[int], batch: bool
) -> None:
    stream = b"".join(encode(m) for m in good) + garbage
    chunks = split(stream, points)
    limit = len(stream) // 5 + 1
    d = Decoder()
    got: list[Message] = []
    sentinel: object = None
    try:
        for chunk in chunks:
            d.receive_data(chunk)
            sentinel = drain(d, limit, got, batch)
        d.receive_data(b"")
        sentinel = drain(d, limit, got, batch)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # and it stays broken
            d.next_message()
    else:
        # Garbage that happened to be whole valid frames: then it is a clean end.
        assert sentinel is EOF
    assert same_list(got[: len(good)], good)  # what came before the garbage still arrived


V = PROTOCOL_VERSION  # a hello of our own version: its command table is checked

BAD_BODIES = [
    pytest.param(3, id="not-an-array"),
    pytest.param({"0": 3}, id="a-map"),
    pytest.param("hello", id="a-string"),
    pytest.param(b"\x03\x01", id="bytes"),
    pytest.param([], id="empty-array"),
    pytest.param([9], id="unknown-tag"),
    pytest.param([-1, 1], id="negative-tag"),
    pytest.param(["3", 1, None, None], id="str-tag"),
    pytest.param([True, 1, 1, []], id="bool-tag"),
    pytest.param([3.0, 1, None, None], id="float-tag"),
    pytest.param([None], id="nil-tag"),
    pytest.param([3, "1", None, None], id="reply-str-id"),
    pytest.param([3, 1.0, None, None], id="reply-float-id"),
    pytest.param([3, True, None, None], id="reply-bool-id"),
    pytest.param([3, 1, None, "state"], id="reply-str-state"),
    pytest.param([3, 1, None, 0], id="reply-int-state"),
    pytest.param([3, 1, None], id="reply-too-few"),
    pytest.param([3, 1, None, None, None], id="reply-too-many"),
    pytest.param([2, 1, b"cmd", None, None, None], id="request-bytes-command"),
    pytest.param([2, 1, "cmd", None, b"sid", None], id="request-bytes-session-id"),
    pytest.param([2, 1, "cmd", None, None, "state"], id="request-str-state"),
    pytest.param([2, 1, "cmd", None, None], id="request-too-few"),
    pytest.param([2, 1, "cmd", None, None, None, None], id="request-nil-trace-context"),
    pytest.param([2, 1, "cmd", None, None, None, ["traceparent"]], id="request-trace-context-a-list"),
    pytest.param([2, 1, "cmd", None, None, None, {"traceparent": 1}], id="request-trace-int-value"),
    pytest.param([2, 1, "cmd", None, None, None, {b"traceparent": "x"}], id="request-trace-bytes-key"),
    pytest.param([2, 1, "cmd", None, None, None, {}, None], id="request-too-many"),
    pytest.param([4, 1, "T", "m", "tb", 1, False], id="error-int-for-bool"),
    pytest.param([4, 1, "T", "m", None, True, False], id="error-none-traceback"),
    pytest.param([4, 1, "T", "m", "tb", True], id="error-too-few"),
    pytest.param([0, V, 2, {}], id="hello-table-a-map"),
    pytest.param([0, V, 2, None], id="hello-table-none"),
    pytest.param([0, V, 2, ["predict"]], id="hello-entry-a-str"),
    pytest.param([0, V, 2, [["predict", True, [], False]]], id="hello-entry-too-short"),
    pytest.param([0, V, 2, [["predict", True, [], False, False, 1]]], id="hello-entry-too-long"),
    pytest.param([0, V, 2, [["predict", 1, [], False, False]]], id="hello-idempotent-int"),
    pytest.param([0, V, 2, [["predict", True, "ValueError", False, False]]], id="hello-errors-a-str"),
    pytest.param([0, V, 2, [["predict", True, [1], False, False]]], id="hello-error-name-int"),
    pytest.param([0, V, 2, [[b"predict", True, [], False, False]]], id="hello-name-bytes"),
    pytest.param([0, V, 2, [["predict", True, [], None, False]]], id="hello-finish-none"),
    pytest.param([0, V, 2, [["predict", True, [], False, 1]]], id="hello-pipelined-int"),
    pytest.param([0, "1", 2, []], id="hello-str-version"),
    pytest.param([0, 1, 2.0, []], id="hello-float-pid"),
    pytest.param([1, "m", "msg", None], id="startup-none-traceback"),
    pytest.param([5, "1"], id="ping-str-id"),
    pytest.param([6, None], id="pong-nil-id"),
    pytest.param([6], id="pong-no-id"),
    pytest.param([6, 1], id="pong-of-protocol-2-without-rss"),
    pytest.param([6, 1, "4096"], id="pong-str-rss"),
    pytest.param([6, 1, 4096.0], id="pong-float-rss"),
    pytest.param([6, 1, True], id="pong-bool-rss"),
    pytest.param([7, 1], id="close-int-session"),
    pytest.param([7, b"s"], id="close-bytes-session"),
    pytest.param([8, None], id="shutdown-with-a-field"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_well_formed_msgpack_of_the_wrong_shape_is_refused(body: Any) -> None:
    assert not body_ok(body)  # the oracle agrees these are wrong
    d = Decoder()
    d.receive_data(frame(body))
    with pytest.raises(ProtocolError):
        d.next_message()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty-body"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x92\x05", id="array-short-of-its-items"),
        pytest.param(msgpack.packb([5, 1]) + b"\x00", id="trailing-bytes-in-frame"),
        pytest.param(b"\x92\x07\xa2\xff\xfe", id="invalid-utf8-str"),
        pytest.param(b"\x91" * 5000 + b"\xc0", id="nested-too-deep"),
        pytest.param(b"\x81\x91\x01\x02", id="array-as-map-key"),
    ],
)
def test_malformed_msgpack_inside_a_frame_is_refused(raw: bytes) -> None:
    d = Decoder()
    d.receive_data(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(ProtocolError) as info:
        d.next_message()
    assert info.value.__cause__ is not None  # the msgpack/shape error, for the log


@SETTINGS
@given(shaped_bodies)
def test_any_msgpack_body_is_a_valid_message_or_a_protocol_error(body: Any) -> None:
    d = Decoder()
    d.receive_data(frame(body))
    decoded = msgpack.unpackb(msgpack.packb(body), strict_map_key=False)
    if body_ok(decoded):
        msg = d.next_message()
        assert well_typed(msg), msg
        expected = decoded
        if decoded[0] == 0 and decoded[1] != PROTOCOL_VERSION and not field_ok(TABLE, decoded[3]):
            expected = [0, decoded[1], decoded[2], []]  # another version's table: not read
        assert same(as_body(msg), expected)  # nothing else lost or reinterpreted
        assert d.next_message() is NEED_DATA
    else:
        with pytest.raises(ProtocolError):
            d.next_message()


# ---------------------------------------------------------------------------------------------
# Frame size limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 10, 1000])
def test_oversized_header_is_refused_before_the_body_arrives(limit: int) -> None:
    d = Decoder(max_frame_size=limit)
    d.receive_data(struct.pack(">I", limit + 1))  # only the header
    with pytest.raises(ProtocolError, match="over the limit"):
        d.next_message()


def test_default_limit_is_enforced_from_the_header() -> None:
    d = Decoder()
    d.receive_data(struct.pack(">I", DEFAULT_MAX_FRAME_SIZE + 1))
    with pytest.raises(ProtocolError):
        d.next_message()
    d = Decoder()
    d.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        d.next_message()
    d = Decoder()
    d.receive_data(struct.pack(">I", DEFAULT_MAX_FRAME_SIZE))  # at the limit: wait for it
    assert d.next_message() is NEED_DATA


def test_header_split_across_chunks_is_still_checked() -> None:
    d = Decoder(max_frame_size=100)
    header = struct.pack(">I", 101)
    d.receive_data(header[:3])
    assert d.next_message() is NEED_DATA
    d.receive_data(header[3:])
    with pytest.raises(ProtocolError):
        d.next_message()


def test_frame_exactly_at_the_limit_passes_both_ways() -> None:
    msg = Reply(1, "x" * 100, None)
    size = len(encode(msg)) - 4
    data = encode(msg, max_frame_size=size)
    d = Decoder(max_frame_size=size)
    d.receive_data(data)
    assert d.next_message() == msg
    with pytest.raises(ProtocolError):
        small = Decoder(max_frame_size=size - 1)
        small.receive_data(data)
        small.next_message()


def test_encode_refuses_a_message_over_the_limit() -> None:
    msg = Reply(1, b"\x00" * 1000, None)
    size = len(encode(msg)) - 4
    with pytest.raises(EncodeError, match="over the frame limit"):
        encode(msg, max_frame_size=size - 1)
    with pytest.raises(EncodeError):
        encode(Shutdown(), max_frame_size=0)
    assert encode(msg, max_frame_size=size) == encode(msg)  # refusal leaves nothing behind


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(object(), id="object"),
        pytest.param({1, 2}, id="set"),
        pytest.param({"nested": [1, {"deep": frozenset()}]}, id="nested-frozenset"),
        pytest.param(2**64, id="int-too-big"),
        pytest.param(-(2**63) - 1, id="int-too-small"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param(memoryview(b"abcdef")[::2], id="non-contiguous-memoryview"),
        pytest.param(lambda: None, id="function"),
    ],
)
def test_unencodable_payload_is_an_encode_error(payload: Any) -> None:
    with pytest.raises(EncodeError) as info:
        encode(Reply(1, payload, None))
    assert info.value.__cause__ is not None
    with pytest.raises(EncodeError):
        encode(Request(1, "cmd", payload, None, None))
    with pytest.raises(EncodeError):
        encode_session_state({"s": payload})
    # The sender's mistake does not poison anything: encoding goes on working.
    d = Decoder()
    d.receive_data(encode(Reply(2, [1, 2], None)))
    assert d.next_message() == Reply(2, [1, 2], None)


def test_self_referencing_payload_is_an_encode_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodeError):
        encode(Reply(1, loop, None))
    assert encode(Ping(1)) == struct.pack(">I", 3) + msgpack.packb([5, 1])


# ---------------------------------------------------------------------------------------------
# Stickiness and end of stream
# ---------------------------------------------------------------------------------------------


def _broken_by_garbage() -> Decoder:
    d = Decoder()
    d.receive_data(frame([42]))
    with pytest.raises(ProtocolError):
        d.next_message()
    return d


def _broken_by_oversize() -> Decoder:
    d = Decoder(max_frame_size=4)
    d.receive_data(struct.pack(">I", 5))
    with pytest.raises(ProtocolError):
        d.next_message()
    return d


def _broken_by_truncation() -> Decoder:
    d = Decoder()
    d.receive_data(encode(Ping(1))[:-1])
    d.receive_data(b"")
    with pytest.raises(ProtocolError):
        d.next_message()
    return d


def _broken_by_data_after_eof() -> Decoder:
    d = Decoder()
    d.receive_data(b"")
    with pytest.raises(ProtocolError, match="after end of stream"):
        d.receive_data(encode(Ping(1)))
    return d


@pytest.mark.parametrize(
    "broken",
    [_broken_by_garbage, _broken_by_oversize, _broken_by_truncation, _broken_by_data_after_eof],
)
def test_protocol_error_is_sticky(broken: Callable[[], Decoder]) -> None:
    d = broken()
    for _ in range(3):
        with pytest.raises(ProtocolError):
            d.next_message()
        with pytest.raises(ProtocolError):
            d.receive_data(encode(Ping(1)))  # even perfectly good data
        with pytest.raises(ProtocolError):
            d.receive_data(b"")
        with pytest.raises(ProtocolError):
            list(d)


def test_sticky_error_names_the_original_failure_and_does_not_grow() -> None:
    d = Decoder(max_frame_size=4)
    d.receive_data(struct.pack(">I", 5))
    with pytest.raises(ProtocolError) as first:
        d.next_message()
    depths = []
    for _ in range(20):
        with pytest.raises(ProtocolError) as again:
            d.next_message()
        assert again.value.__cause__ is first.value
        assert "over the limit" in str(again.value)
        tb, depth = again.value.__traceback__, 0
        while tb is not None:
            tb, depth = tb.tb_next, depth + 1
        depths.append(depth)
    # Re-raising one stored instance would lengthen its traceback on every call.
    assert len(set(depths)) == 1


def test_data_after_eof_is_a_protocol_error_even_with_frames_pending() -> None:
    d = Decoder()
    d.receive_data(encode(Ping(1)))
    d.receive_data(b"")
    with pytest.raises(ProtocolError):
        d.receive_data(encode(Ping(2)))
    with pytest.raises(ProtocolError):
        d.next_message()


def test_bytearray_and_memoryview_chunks_are_accepted() -> None:
    data = encode(Ping(1)) + encode(Pong(2, None))
    d = Decoder()
    d.receive_data(bytearray(data[:5]))  # type: ignore[arg-type]
    d.receive_data(memoryview(data)[5:])  # type: ignore[arg-type]
    assert list(d) == [Ping(1), Pong(2, None)]


# ---------------------------------------------------------------------------------------------
# Session state
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(payloads)
def test_session_state_round_trip(state: Any) -> None:
    data = encode_session_state(state)
    assert type(data) is bytes
    assert same(decode_session_state(data), state)


@SETTINGS
@given(st.dictionaries(keys, payloads, max_size=5))
def test_session_state_survives_a_request_and_a_reply(state: dict[Any, Any]) -> None:
    blob = encode_session_state(state)
    d = Decoder()
    d.receive_data(encode(Request(1, "c", None, "sid", blob)) + encode(Reply(1, None, blob)))
    req, rep = list(d)
    assert isinstance(req, Request) and isinstance(rep, Reply)
    assert req.session_state == blob and rep.session_state == blob  # opaque, untouched
    assert same(decode_session_state(rep.session_state), state)


def test_session_state_with_int_keys_round_trips() -> None:
    state = {1: "a", -2: {3: [b"x"]}, "k": None}
    assert same(decode_session_state(encode_session_state(state)), state)


@pytest.mark.parametrize("state", [object(), {1, 2}, {"a": object()}, 2**70])
def test_unencodable_session_state_is_an_encode_error(state: Any) -> None:
    with pytest.raises(EncodeError, match="session state"):
        encode_session_state(state)
    assert decode_session_state(encode_session_state({"ok": 1})) == {"ok": 1}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 1000, 50_000])
def test_buffer_stays_bounded_over_a_long_stream(chunk: int) -> None:
    msgs = [Reply(i, {"i": i, "pad": "x" * (i % 200)}, None) for i in range(10_000)]
    data = b"".join(encode(m) for m in msgs)
    assert len(data) > 4 * (2 * 65536 + 2 * chunk)  # long enough for growth to show
    d = Decoder()
    largest = 0
    got = 0
    for i in range(0, len(data), chunk):
        d.receive_data(data[i : i + chunk])
        while True:
            msg = d.next_message()
            if msg is NEED_DATA:
                break
            assert msg == msgs[got]
            got += 1
        largest = max(largest, len(d._buf))
    assert got == len(msgs)
    # Consumed bytes are dropped: the buffer holds at most about one compaction window plus
    # a couple of chunks, however long the stream.
    assert largest <= 2 * 65536 + 2 * chunk, largest
