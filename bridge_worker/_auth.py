"""The mutual HMAC-SHA256 challenge a TCP worker and its pool run before any frame: sans-IO,
shared by both sides (the pool imports it, as it does ``protocol``).

Both sides hold a shared token; each proves it to the other without sending it::

    pool   -> worker   MAGIC | pool nonce (32)
    worker -> pool     MAGIC | worker nonce (32) | slot (32) | MAC("worker->pool", ...)
    pool   -> worker   status (1) | params (24) | MAC("pool->worker", ...)

Each MAC covers the magic, both fresh nonces, the slot and (the pool's) status and parameters,
and starts with the direction it was sent in, so a MAC seen going one way is never accepted
coming back (no reflection), and one seen in an earlier connection never matches new nonces
(no replay). MACs are compared with :func:`hmac.compare_digest`. The worker proves itself first:
a peer that has not proved anything learns nothing but a random nonce.

Every message has a fixed size, so a side never reads more than it expects before the other is
authenticated: whatever a peer sends that is not exactly this is garbage and ends the connection.

``slot`` pairs a connection with the pool's slot that started the worker: a one-time nonce the
launcher gives the worker in its environment, or 32 zero bytes for a worker started by anything
else (it takes any free slot). ``status`` says whether the pool took the worker; ``params`` are
the pool's limits and heartbeat timing (see :class:`Params`).

HMAC authenticates the two ends when the connection opens; it neither encrypts nor protects the
frames that follow. On a network you do not trust, run it inside TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Final, NamedTuple

#: Identifies the handshake and its version; a peer that starts with anything else is not a worker.
MAGIC: Final = b"TWPOOL\x00\x01"
NONCE_SIZE: Final = 32
SLOT_SIZE: Final = 32
MAC_SIZE: Final = hashlib.sha256().digest_size
#: A slot of zeros: a worker that nobody assigned to a slot.
ANY_SLOT: Final = bytes(SLOT_SIZE)

_PARAMS = struct.Struct(">QQII")

#: pool -> worker: the challenge.
CHALLENGE_SIZE: Final = len(MAGIC) + NONCE_SIZE
#: worker -> pool: its proof.
PROOF_SIZE: Final = len(MAGIC) + NONCE_SIZE + SLOT_SIZE + MAC_SIZE
#: pool -> worker: its answer.
ANSWER_SIZE: Final = 1 + _PARAMS.size + MAC_SIZE

#: The environment variable a worker reads its token from (never the command line: ps shows it).
TOKEN_ENV: Final = "BRIDGE_WORKER_TOKEN"
#: The environment variable a launcher passes a worker's one-time slot nonce in.
SLOT_ENV: Final = "BRIDGE_WORKER_SLOT"
#: The shortest token accepted: an eavesdropper who saw one handshake can test guesses offline.
MIN_TOKEN_LENGTH: Final = 16


class Status:
    """The pool's verdict in its answer."""

    ACCEPTED: Final = 0
    #: Authenticated, but no slot wants this worker (all are taken, or its slot nonce is stale).
    NO_SLOT: Final = 1


class AuthError(Exception):
    """The peer is not a worker or pool holding the token: wrong magic, wrong MAC, bad fields."""


class Params(NamedTuple):
    """What the pool tells an authenticated worker."""

    max_frame_size: int
    max_session_state: int
    #: Seconds between the heartbeats the worker sends on its own (busy or not).
    beat: float
    #: Seconds without a byte from the pool after which the worker gives up on it and exits.
    silence: float


def token_key(token: str | bytes) -> bytes:
    """The HMAC key of a token: its bytes. Raises ValueError for a token that is not a printable
    secret of at least MIN_TOKEN_LENGTH characters (``secrets.token_hex(32)`` is a good one)."""
    if isinstance(token, str):
        if not token.isprintable():
            raise ValueError("the token must be printable (secrets.token_hex(32) is a good one)")
        key = token.encode("utf-8")
    elif isinstance(token, bytes):
        if not all(0x20 <= b < 0x7F for b in token):
            raise ValueError("a bytes token must be printable ASCII (secrets.token_hex(32) is a good one)")
        key = token
    else:
        raise TypeError(f"the token must be str or bytes, got {type(token).__name__}")
    if len(key) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"the token is {len(key)} characters; use at least {MIN_TOKEN_LENGTH} (secrets.token_hex(32) is a good one)"
        )
    return key


def _mac(key: bytes, direction: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join((direction, MAGIC) + parts), hashlib.sha256).digest()


def challenge() -> tuple[bytes, bytes]:
    """Pool side, first: ``(pool_nonce, message)``."""
    nonce = os.urandom(NONCE_SIZE)  # what secrets.token_bytes is, without importing random
    return nonce, MAGIC + nonce


def prove(key: bytes, challenge_message: bytes, slot: bytes) -> tuple[bytes, bytes, bytes]:
    """Worker side: ``(pool_nonce, worker_nonce, proof message)`` for the pool's challenge."""
    if len(challenge_message) != CHALLENGE_SIZE or not challenge_message.startswith(MAGIC):
        raise AuthError("the peer is not a pool of this protocol (bad challenge)")
    if len(slot) != SLOT_SIZE:
        raise ValueError(f"a slot is {SLOT_SIZE} bytes")
    pool_nonce = challenge_message[len(MAGIC) :]
    nonce = os.urandom(NONCE_SIZE)
    mac = _mac(key, b"worker->pool", pool_nonce, nonce, slot)
    return pool_nonce, nonce, MAGIC + nonce + slot + mac


def check_proof(key: bytes, pool_nonce: bytes, message: bytes) -> tuple[bytes, bytes]:
    """Pool side: ``(worker_nonce, slot)`` of a valid proof; AuthError otherwise."""
    if len(message) != PROOF_SIZE or not message.startswith(MAGIC):
        raise AuthError("not a worker of this protocol (bad magic)")
    i = len(MAGIC)
    nonce, slot, mac = message[i : i + NONCE_SIZE], message[i + NONCE_SIZE : -MAC_SIZE], message[-MAC_SIZE:]
    if nonce == pool_nonce:
        raise AuthError("the peer sent our own nonce back")
    if not hmac.compare_digest(mac, _mac(key, b"worker->pool", pool_nonce, nonce, slot)):
        raise AuthError("wrong MAC: the peer does not hold the token")
    return nonce, slot


def answer(key: bytes, pool_nonce: bytes, worker_nonce: bytes, slot: bytes, status: int, params: Params) -> bytes:
    """Pool side, last: the answer to a valid proof."""
    body = bytes([status]) + _PARAMS.pack(
        params.max_frame_size, params.max_session_state, round(params.beat * 1000), round(params.silence * 1000)
    )
    return body + _mac(key, b"pool->worker", pool_nonce, worker_nonce, slot, body)


def check_answer(
    key: bytes, pool_nonce: bytes, worker_nonce: bytes, slot: bytes, message: bytes
) -> tuple[int, Params]:
    """Worker side: ``(status, params)`` of a valid answer; AuthError otherwise."""
    if len(message) != ANSWER_SIZE:
        raise AuthError("the pool's answer has the wrong size")
    body, mac = message[:-MAC_SIZE], message[-MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, b"pool->worker", pool_nonce, worker_nonce, slot, body)):
        raise AuthError("wrong MAC: the peer does not hold the token")
    frame, state, beat_ms, silence_ms = _PARAMS.unpack(body[1:])
    if not beat_ms or not silence_ms:
        raise AuthError("the pool sent no heartbeat timing")
    return body[0], Params(frame, state, beat_ms / 1000, silence_ms / 1000)
