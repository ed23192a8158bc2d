"""Authentication and hello: what happens before a connection carries messages.

Both sides know a shared ``secret`` (bytes).  Nothing but the fixed-format
messages below is read before authentication; each is at most 256 bytes, and
the whole exchange (authentication and hello) runs under one deadline.
Digests are HMAC-SHA256 and compared with :func:`hmac.compare_digest`.

Authentication, the server challenges first::

    1. server -> client   MAGIC (8 bytes) + nonce_s (32 bytes from os.urandom)
    2. client: checks MAGIC (else ProtocolError), draws nonce_c, then
       client -> server   MAGIC + nonce_c + HMAC(secret, b"C" + nonce_s + nonce_c)
    3. server: checks MAGIC (else ProtocolError) and the client's digest.
       Wrong digest:      server -> client  FAIL (1 byte), server closes the
                          connection and raises AuthenticationError.
       Right digest:      server -> client  OK (1 byte) + HMAC(secret, b"S" + nonce_c + nonce_s)
    4. client: reads the status byte (FAIL -> AuthenticationError), then checks
       the server's digest (mismatch -> AuthenticationError).  A client thus
       never sends anything else to a peer that does not know the secret.

The b"C"/b"S" prefixes and the nonce order make each side's proof useless as
the other side's, so a proof can't be reflected back.  End of stream during
these steps is an AuthenticationError; the deadline expiring a TimeoutError.

Hello, framed messages from here on (see :mod:`dpool.transport.frames`)::

    5. client -> server   one message, one frame: a JSON object (the client's hello)
    6. server -> client   one message, one frame: a JSON object (the server's hello)
    7. each side compares the peer's ``"protocol"`` with its own; on a
       difference both raise VersionMismatch naming both versions (the server
       sends its hello first, so the client learns the server's version).

The client speaks first in the hello so that, during steps 1-4, neither side
ever has more than one fixed-size pre-auth message in flight towards it.
A hello is JSON only, never pickle; it must hold ``"protocol"`` (an int), the
caller adds anything else (Python and cloudpickle versions, cpus, name...).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os

from dpool.errors import AuthenticationError, ConnectionClosed, ProtocolError, VersionMismatch

PROTOCOL_VERSION = 1

MAGIC = b"DPOOL\x00\x01\x00"
NONCE_SIZE = 32
DIGEST_SIZE = 32
OK = b"\x00"
FAIL = b"\x01"
CHALLENGE_SIZE = len(MAGIC) + NONCE_SIZE                 # step 1
RESPONSE_SIZE = len(MAGIC) + NONCE_SIZE + DIGEST_SIZE    # step 2
PROOF_SIZE = DIGEST_SIZE                                 # step 3, after OK
PREAUTH_MAX = 256


def _digest(secret, data):
    return hmac.new(secret, data, hashlib.sha256).digest()


def check_secret(secret):
    """Reject secrets that are not bytes-like (a ``str`` is a likely mistake)."""
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    return bytes(secret)


def _check_magic(msg, what):
    if msg[:len(MAGIC)] != MAGIC:
        raise ProtocolError(f"{what} does not start with the dpool magic "
                            f"(got {bytes(msg[:len(MAGIC)])!r}); not a dpool peer "
                            f"or an incompatible handshake version")


# -- pure steps --------------------------------------------------------------

def make_challenge() -> tuple[bytes, bytes]:
    """Step 1 (server): return ``(nonce_s, message)``."""
    nonce_s = os.urandom(NONCE_SIZE)
    return nonce_s, MAGIC + nonce_s


def answer_challenge(secret: bytes, challenge: bytes) -> tuple[bytes, bytes, bytes]:
    """Step 2 (client): return ``(nonce_s, nonce_c, message)``."""
    if len(challenge) != CHALLENGE_SIZE:
        raise ProtocolError(f"challenge is {len(challenge)} bytes, expected {CHALLENGE_SIZE}")
    _check_magic(challenge, "challenge")
    nonce_s = bytes(challenge[len(MAGIC):])
    nonce_c = os.urandom(NONCE_SIZE)
    return nonce_s, nonce_c, MAGIC + nonce_c + _digest(secret, b"C" + nonce_s + nonce_c)


def verify_response(secret: bytes, nonce_s: bytes, response: bytes) -> bytes:
    """Step 3 (server): check the client's response; return the reply to send.

    Raises AuthenticationError on a wrong digest (the caller then sends
    ``FAIL`` and closes), ProtocolError on a malformed message.
    """
    if len(response) != RESPONSE_SIZE:
        raise ProtocolError(f"response is {len(response)} bytes, expected {RESPONSE_SIZE}")
    _check_magic(response, "response")
    nonce_c = bytes(response[len(MAGIC):len(MAGIC) + NONCE_SIZE])
    got = bytes(response[len(MAGIC) + NONCE_SIZE:])
    if not hmac.compare_digest(got, _digest(secret, b"C" + nonce_s + nonce_c)):
        raise AuthenticationError("client failed authentication (wrong secret?)")
    return OK + _digest(secret, b"S" + nonce_c + nonce_s)


def check_status(status: bytes) -> None:
    """Step 4a (client): the server's status byte."""
    if status == FAIL:
        raise AuthenticationError("server rejected our authentication (wrong secret?)")
    if status != OK:
        raise ProtocolError(f"bad authentication status byte {bytes(status)!r}")


def verify_proof(secret: bytes, nonce_s: bytes, nonce_c: bytes, proof: bytes) -> None:
    """Step 4b (client): check the server's proof of the secret."""
    if not hmac.compare_digest(bytes(proof), _digest(secret, b"S" + nonce_c + nonce_s)):
        raise AuthenticationError("server failed authentication (wrong secret?)")


def encode_hello(hello: dict) -> bytes:
    return json.dumps(hello, separators=(",", ":")).encode()


def decode_hello(frames, peer: str) -> dict:
    """Steps 5/6: the peer's hello message as a dict."""
    if len(frames) != 1:
        raise ProtocolError(f"hello from {peer} has {len(frames)} frames, expected 1")
    try:
        hello = json.loads(bytes(frames[0]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"hello from {peer} is not JSON: {exc}") from None
    if not isinstance(hello, dict):
        raise ProtocolError(f"hello from {peer} is not a JSON object")
    version = hello.get("protocol")
    if type(version) is not int:
        raise ProtocolError(f"hello from {peer} has no integer 'protocol' field")
    return hello


def check_versions(ours: int, theirs: int, peer: str) -> None:
    """Step 7."""
    if ours != theirs:
        raise VersionMismatch(f"protocol version mismatch: this side speaks {ours}, "
                              f"peer at {peer} speaks {theirs}")


def own_hello(hello) -> dict:
    """The hello to send: the caller's dict (or callable's result) + protocol."""
    hello = dict(hello() if callable(hello) else (hello or {}))
    hello.setdefault("protocol", PROTOCOL_VERSION)
    return hello


# -- asyncio drivers -----------------------------------------------------------
# ``conn`` is a Connection in pre-auth mode; see connection.py for _read_exact,
# _write_raw and _start_framing.  The caller applies the deadline.

async def _read(conn, n):
    try:
        return await conn._read_exact(n)
    except ConnectionClosed as exc:
        raise AuthenticationError(
            f"{conn.peer} closed the connection during authentication") from exc


async def server_handshake(conn, secret: bytes, hello) -> dict:
    """Steps 1-7 for the server side; sets and returns ``conn.hello``."""
    nonce_s, challenge = make_challenge()
    conn._write_raw(challenge)
    response = await _read(conn, RESPONSE_SIZE)
    try:
        reply = verify_response(secret, nonce_s, response)
    except AuthenticationError:
        conn._write_raw(FAIL)
        conn.close()
        raise
    conn._write_raw(reply)
    conn._start_framing()
    return await _exchange_hello(conn, own_hello(hello), client=False)


async def client_handshake(conn, secret: bytes, hello) -> dict:
    """Steps 1-7 for the client side; sets and returns ``conn.hello``."""
    challenge = await _read(conn, CHALLENGE_SIZE)
    nonce_s, nonce_c, response = answer_challenge(secret, challenge)
    conn._write_raw(response)
    check_status(await _read(conn, 1))
    verify_proof(secret, nonce_s, nonce_c, await _read(conn, PROOF_SIZE))
    conn._start_framing()
    return await _exchange_hello(conn, own_hello(hello), client=True)


async def _exchange_hello(conn, mine: dict, client: bool) -> dict:
    if client:
        conn.send([encode_hello(mine)])
    theirs = decode_hello(await conn.recv(), conn.peer)
    if not client:
        conn.send([encode_hello(mine)])
    conn.hello = theirs
    check_versions(mine["protocol"], theirs["protocol"], conn.peer)
    return theirs
