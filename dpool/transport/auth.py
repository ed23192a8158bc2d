"""Authentication and hello: what happens before a connection carries messages.

Both sides know a shared ``secret`` (bytes).  Nothing but the fixed-format
messages below is read before authentication; each is at most 256 bytes, and
the whole exchange (authentication and hello) runs under one deadline.

The secret is never used directly: each side stretches it with
``hashlib.scrypt`` (N=2**14, r=8, p=1: about 50 ms and 16 MiB per guess) under
a random salt the server draws once per process and sends in its challenge;
the stretched key is cached per (secret, salt) in the process, so only the
first connection to a node pays for it; a client stretches in a thread, not
in its event loop, one stretch at a time.  A node that closed the
connection while the client stretched for it (its pre-auth deadline passed,
e.g. a client meeting dozens of nodes on a loaded machine) is connected to
again at once, once, by ``tcp.connect``: the key is cached then, so the
node's deadline never has to cover the client's stretch.  Digests are HMAC-SHA256 under the
stretched key, compared with :func:`hmac.compare_digest`.

Authentication, the server proves first::

    1. server -> client  MAGIC (8) + flags (1) + salt (16) + nonce_s (32)
    2. client -> server  MAGIC (8) + nonce_c (32); the client sends it as soon
                         as it is connected, without waiting for step 1
    3. server -> client  HMAC(key, b"S" + transcript)          (32)
    4. client: checks the server's proof (mismatch -> AuthenticationError,
       and the client closes having sent nothing that depends on the secret);
       client -> server  HMAC(key, b"C" + transcript)          (32)
    5. server: checks the client's proof.
       Wrong:  server -> client  FAIL (1 byte), closes, raises AuthenticationError.
       Right:  server -> client  OK (1 byte)

``transcript`` is message 1 + message 2, so the flags and the salt are
covered by both proofs: a man in the middle who changes them fails the
handshake.  The b"C"/b"S" prefixes make each side's proof useless as the
other's.

Why the server proves first: a client connects to whatever address it was
given (a host name, an announcement), so a rogue listener is the easy attack;
it learns only ``nonce_c`` and can't prove anything, so it gets nothing it can
test guesses against.  A rogue *client* does get the server's proof, but only
by connecting to a real node (which counts and logs such connections), and
testing each guess offline costs a full scrypt (~50 ms, 16 MiB), under a salt
that is different for each node.

Message protection: flag bit 0 (``PROTECT``) says every message after the
handshake travels in AES-256-GCM records (see :mod:`dpool.transport.records`)
under per-connection keys: HKDF-SHA256 of the stretched key over the
transcript, one key per direction, the record's sequence number as the
nonce.  The server sets it on every connection without TLS; under TLS the
records are left out (TLS protects the messages).  A client without TLS
refuses a server that does not set it.

A node with TLS peeks at the first byte a new connection sends: a TLS
client starts with a handshake record (0x16), a plaintext dpool client with
step 2 (MAGIC).  To the latter the node sends ``tls_required_notice()``, a
step 1 with only the ``TLS_REQUIRED`` flag, and closes; the client fails at
once with an error saying that the node requires TLS.

Hello, framed messages from here on (see :mod:`dpool.transport.frames`)::

    6. client -> server   one message, one frame: a JSON object (the client's hello)
    7. server -> client   one message, one frame: a JSON object (the server's hello)
    8. each side compares the peer's ``"protocol"`` with its own, and also
       ``"python"`` (major.minor) and ``"cloudpickle"`` when its own hello
       holds them (pickles of functions don't cross those versions); on a
       difference both raise VersionMismatch naming both sides' versions (the
       server sends its hello even so, so the client learns the server's).

A hello is JSON only, never pickle; it must hold ``"protocol"`` (an int), the
caller adds anything else (Python and cloudpickle versions, cpus, name...).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dpool.errors import AuthenticationError, ConnectionClosed, ProtocolError, VersionMismatch
from dpool.records import Value

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .connection import Connection

#: What a side says about itself in its hello: a dict, or a callable making one.
Hello = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None

log = logging.getLogger("dpool.transport")

# 2: attempt numbers in RUN and DONE, HEARTBEAT; 3: BYTES_FLAG in frame lengths;
# 4: STREAM_FLAG (a frame relayed in chunks, forward.py)
PROTOCOL_VERSION = 4

MAGIC = b"DPOOL\x00\x02\x00"
NONCE_SIZE = 32
SALT_SIZE = 16
DIGEST_SIZE = 32
KEY_SIZE = 32
OK = b"\x00"
FAIL = b"\x01"
PROTECT = 0x01
TLS_REQUIRED = 0x80
CHALLENGE_SIZE = len(MAGIC) + 1 + SALT_SIZE + NONCE_SIZE     # step 1
REPLY_SIZE = len(MAGIC) + NONCE_SIZE                         # step 2
PROOF_SIZE = DIGEST_SIZE                                     # steps 3 and 4
PREAUTH_MAX = 256
#: Secrets shorter than this are warned about (they can be guessed).
SHORT_SECRET = 16
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 2**20, "dklen": KEY_SIZE}
#: One salt per process: every server of this process sends it.
PROCESS_SALT = os.urandom(SALT_SIZE)


class WeakSecretWarning(UserWarning):
    """The shared secret is short enough to be guessed."""


def check_secret(secret: object) -> bytes:
    """Reject secrets that are not bytes-like (a ``str`` is a likely mistake)."""
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    return bytes(secret)


#: Keys kept (one per node process met: each has its own salt; 64 bytes
#: each): a dpool-scheduler meets each of its nodes again for every client.
STRETCH_CACHE = 16384


@functools.lru_cache(maxsize=STRETCH_CACHE)
def stretch(secret: bytes, salt: bytes) -> bytes:
    """The secret stretched with scrypt under ``salt`` (cached per process)."""
    if 0 < len(secret) < SHORT_SECRET:
        warnings.warn(f"the shared secret is only {len(secret)} bytes long and can be "
                      f"guessed: use at least {SHORT_SECRET} random bytes (e.g. "
                      "`dpool-node --generate-secret`)",
                      WeakSecretWarning, stacklevel=2)
    return hashlib.scrypt(secret, salt=salt, **SCRYPT)


#: One stretch at a time in a process: a client meeting N nodes stretches
#: for each in turn, so the first nodes' handshakes complete in time instead
#: of all N finishing together, late (and N x 16 MiB at once).
_STRETCH_LOCK = threading.Lock()


def stretch_in_turn(secret: bytes, salt: bytes) -> tuple[bytes, bool]:
    """``stretch`` one at a time; also says whether the key had to be computed."""
    with _STRETCH_LOCK:
        misses = stretch.cache_info().misses
        key = stretch(secret, salt)
        return key, stretch.cache_info().misses != misses


def stretch_early(secret: bytes, salt: bytes, then: Callable[[], None]) -> None:
    """``stretch`` in turn, calling ``then`` first, the lock held: a
    handshake's ``stretch_in_turn`` after ``then`` waits for this key
    (:mod:`dpool.transport.early`)."""
    with _STRETCH_LOCK:
        then()
        stretch(secret, salt)


class StretchedTooLate(AuthenticationError):
    """The server closed the connection while the client stretched the secret
    for its salt (past the server's pre-auth deadline, on a loaded machine or
    meeting many nodes): the key is cached now, so connecting again is quick."""


def _check_magic(msg: bytes, what: str) -> None:
    if msg[:len(MAGIC)] != MAGIC:
        raise ProtocolError(f"{what} does not start with the dpool magic "
                            f"(got {bytes(msg[:len(MAGIC)])!r}); not a dpool peer "
                            f"or an incompatible handshake version")


# -- pure steps --------------------------------------------------------------

class Challenge(Value):
    """Step 1 as the client reads it."""

    __slots__ = _fields = ("raw", "flags", "salt")

    def __init__(self, raw: bytes, flags: int, salt: bytes) -> None:
        self.raw = raw
        self.flags = flags
        self.salt = salt

    @property
    def protect(self) -> bool:
        return bool(self.flags & PROTECT)


class Keys(Value):
    """Per-connection record keys, one for each direction."""

    __slots__ = _fields = ("send", "recv")

    def __init__(self, send: bytes, recv: bytes) -> None:
        self.send = send
        self.recv = recv


def make_challenge(salt: bytes = PROCESS_SALT, protect: bool = True) -> bytes:
    """Step 1 (server): the challenge message (it holds a fresh nonce)."""
    flags = PROTECT if protect else 0
    return MAGIC + bytes([flags]) + salt + os.urandom(NONCE_SIZE)


def tls_required_notice() -> bytes:
    """What a TLS node sends, in plaintext, to a client that spoke plaintext dpool."""
    return MAGIC + bytes([TLS_REQUIRED]) + bytes(SALT_SIZE + NONCE_SIZE)


def parse_challenge(msg: bytes) -> Challenge:
    """Step 1 (client)."""
    if len(msg) != CHALLENGE_SIZE:
        raise ProtocolError(f"challenge is {len(msg)} bytes, expected {CHALLENGE_SIZE}")
    _check_magic(msg, "challenge")
    start = len(MAGIC) + 1
    return Challenge(bytes(msg), msg[len(MAGIC)], bytes(msg[start:start + SALT_SIZE]))


def make_reply() -> bytes:
    """Step 2 (client): the client's nonce."""
    return MAGIC + os.urandom(NONCE_SIZE)


def check_reply(msg: bytes) -> None:
    """Step 2 (server)."""
    if len(msg) != REPLY_SIZE:
        raise ProtocolError(f"reply is {len(msg)} bytes, expected {REPLY_SIZE}")
    _check_magic(msg, "reply")


def prove(key: bytes, side: bytes, transcript: bytes) -> bytes:
    """Steps 3 (``side=b"S"``) and 4 (``side=b"C"``)."""
    return hmac.new(key, side + transcript, hashlib.sha256).digest()


def check_proof(key: bytes, side: bytes, transcript: bytes, proof: bytes) -> None:
    """Steps 4 and 5: raise AuthenticationError unless ``proof`` is right."""
    if not hmac.compare_digest(bytes(proof), prove(key, side, transcript)):
        who = "node" if side == b"S" else "client"
        raise AuthenticationError(f"{who} failed authentication: it did not prove it knows "
                                  f"the secret (wrong secret?)")


def check_status(status: bytes) -> None:
    """Step 5 (client): the server's status byte."""
    if status == FAIL:
        raise AuthenticationError("server rejected our authentication (wrong secret?)")
    if status != OK:
        raise ProtocolError(f"bad authentication status byte {bytes(status)!r}")


def import_crypto() -> None:
    """Import what sealed records need (cryptography, else imported with the
    first sealed connection): a server sealing its connections calls this as
    it starts, so that a missing cryptography fails its start, not each
    client's handshake."""
    import cryptography.hazmat.primitives.ciphers.aead
    import cryptography.hazmat.primitives.kdf.hkdf  # noqa: F401


def import_crypto_meanwhile() -> None:
    """A fresh client's first sealed connection imports cryptography (~10 ms)
    while its thread stretches the secret (scrypt releases the GIL), rather
    than after (issue 13: a fresh process's first pool via a node).  A
    missing cryptography raises where it did, in :func:`derive_keys`."""
    try:
        import_crypto()
        import cryptography.hazmat.primitives.hashes  # noqa: F401  (derive_keys')
    except ImportError:
        pass


def derive_keys(key: bytes, transcript: bytes, *, server: bool) -> Keys:
    """Per-connection record keys from the stretched key and both nonces."""
    from cryptography.hazmat.primitives import hashes  # (see records._aesgcm)
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    okm = HKDF(hashes.SHA256(), 2 * KEY_SIZE, salt=hashlib.sha256(transcript).digest(),
               info=b"dpool records v1").derive(key)
    to_server, to_client = okm[:KEY_SIZE], okm[KEY_SIZE:]
    return Keys(to_client, to_server) if server else Keys(to_server, to_client)


def encode_hello(hello: dict) -> bytes:
    import json  # (here: a fresh client's early connection imports this module first)

    return json.dumps(hello, separators=(",", ":")).encode()


def decode_hello(frames: Sequence[ReadableBuffer], peer: str) -> dict[str, Any]:
    """Steps 6/7: the peer's hello message as a dict."""
    if len(frames) != 1:
        raise ProtocolError(f"hello from {peer} has {len(frames)} frames, expected 1")
    import json

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
    """Step 8, the protocol version."""
    if ours != theirs:
        raise VersionMismatch(f"protocol version mismatch: this side speaks {ours}, "
                              f"peer at {peer} speaks {theirs}")


#: Hello fields that must be equal on both sides when this side's hello has them.
RUNTIME_FIELDS = ("python", "cloudpickle")


def check_runtime(mine: dict[str, Any], theirs: dict[str, Any], peer: str) -> None:
    """Step 8, the runtimes: functions pickled by one Python minor version or
    cloudpickle version can't be trusted to load (or run) on another."""
    wrong = [key for key in RUNTIME_FIELDS if key in mine and theirs.get(key) != mine[key]]
    if wrong:
        ours = ", ".join(f"{key} {mine[key]}" for key in RUNTIME_FIELDS if key in mine)
        other = ", ".join(f"{key} {theirs.get(key, '(not given)')}" for key in RUNTIME_FIELDS
                          if key in mine)
        raise VersionMismatch(f"{' and '.join(wrong)} version mismatch: this side runs "
                              f"{ours}; peer at {peer} runs {other}")


def own_hello(hello: Hello) -> dict[str, Any]:
    """The hello to send: the caller's dict (or callable's result) + protocol."""
    hello = dict(hello() if callable(hello) else (hello or {}))
    hello.setdefault("protocol", PROTOCOL_VERSION)
    return hello


# -- asyncio drivers -----------------------------------------------------------
# ``conn`` is a Connection in pre-auth mode; see connection.py for _read_exact,
# _write_raw and _start_framing.  The caller applies the deadline.

async def _read(conn: Connection, n: int) -> bytes:
    try:
        return await conn._read_exact(n)
    except ConnectionClosed as exc:
        why = f": {exc.__cause__}" if exc.__cause__ is not None else ""   # e.g. a TLS alert
        raise AuthenticationError(
            f"{conn.peer} closed the connection during authentication{why}") from exc


async def server_handshake(conn: Connection, secret: bytes, hello: Hello, *,
                           protect: bool = True) -> dict[str, Any]:
    """Steps 1-8 for the server side; sets and returns ``conn.hello``."""
    key = stretch(secret, PROCESS_SALT)
    challenge = make_challenge(PROCESS_SALT, protect)
    conn._write_raw(challenge)
    reply = await _read(conn, REPLY_SIZE)
    check_reply(reply)
    transcript = challenge + reply
    conn._write_raw(prove(key, b"S", transcript))
    proof = await _read(conn, PROOF_SIZE)
    try:
        check_proof(key, b"C", transcript, proof)
    except AuthenticationError:
        conn._write_raw(FAIL)
        conn.close()
        raise
    conn._write_raw(OK)
    conn._start_framing(derive_keys(key, transcript, server=True) if protect else None)
    return await _exchange_hello(conn, own_hello(hello), client=False)


async def client_handshake(conn: Connection, secret: bytes, hello: Hello, *,
                           tls: bool = False,
                           begun: tuple[bytes, bytes] | None = None) -> dict[str, Any]:
    """Steps 1-8 for the client side; sets and returns ``conn.hello``.
    ``begun``: (the reply sent, the challenge read) on this connection's
    socket by :mod:`dpool.transport.early`, which stretched (or is
    stretching) the secret for its salt: the handshake goes on from there."""
    import asyncio

    if begun is None:
        reply = make_reply()
        conn._write_raw(reply)       # at once: it holds nothing but a nonce
        raw = await _read(conn, CHALLENGE_SIZE)
    else:
        reply, raw = begun
    challenge = parse_challenge(raw)
    if challenge.flags & TLS_REQUIRED:
        raise ProtocolError(f"the node at {conn.peer} requires TLS: connect with cafile=... "
                            f"(and certfile=/keyfile= if it asks for client certificates)")
    if not (challenge.protect or tls):
        raise ProtocolError(f"{conn.peer} offers no message protection on a connection "
                            f"without TLS; refusing it")
    transcript = challenge.raw + reply
    # In a thread (scrypt releases the GIL): the loop serves other
    # connections meanwhile.  A client meeting many nodes (each its own salt)
    # stretches for them in turn; a node whose deadline passed meanwhile is
    # met again by connect() with the key cached (StretchedTooLate).
    stretching = asyncio.get_running_loop().run_in_executor(None, stretch_in_turn, secret,
                                                            challenge.salt)  # (started now)
    mine = own_hello(hello)  # (meanwhile too: it may import what it names)
    if challenge.protect:
        import_crypto_meanwhile()
    key, fresh = await stretching
    try:
        check_proof(key, b"S", transcript, await _read(conn, PROOF_SIZE))
        conn._write_raw(prove(key, b"C", transcript))
        check_status(await _read(conn, 1))
    except (AuthenticationError, ConnectionClosed) as exc:
        closed = isinstance(exc, ConnectionClosed) or isinstance(exc.__cause__, ConnectionClosed)
        if (fresh or begun is not None) and closed:  # (begun: stretched meanwhile)
            raise StretchedTooLate(f"{conn.peer} closed the connection while this client "
                                   f"stretched the secret for its salt") from exc
        raise
    conn._start_framing(derive_keys(key, transcript, server=False)
                        if challenge.protect else None)
    return await _exchange_hello(conn, mine, client=True)


async def _exchange_hello(conn: Connection, mine: dict[str, Any], client: bool) -> dict[str, Any]:
    if client:
        conn.send([encode_hello(mine)])
    theirs = decode_hello(await conn.recv(), conn.peer)
    if not client:
        conn.send([encode_hello(mine)])
    conn.hello = theirs
    check_versions(mine["protocol"], theirs["protocol"], conn.peer)
    check_runtime(mine, theirs, conn.peer)
    return theirs
