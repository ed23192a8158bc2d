"""Discovery datagrams: format, MAC, freshness.  Pure: no sockets here
(:mod:`dpool.transport.udp` sends and receives them).

Nodes answer pings and announce themselves when they start; clients,
schedulers and relays ping and listen.  Every datagram is fixed-format, never
a pickle, and carries an HMAC-SHA256 under the discovery key, derived once
per secret from the cluster secret (:func:`discovery_key`).  On the wire,
network byte order::

    offset  size
    0       4     MAGIC b"DPd1"
    4       1     kind: 1 PING, 2 ANNOUNCE, 3 PONG
    5       1     reserved, 0
    6       8     timestamp: milliseconds since the Unix epoch (sender's clock)
    14      16    nonce: random
    30      2     L: length of the body
    32      L     body: a JSON object, UTF-8
    32+L    P     padding: P zero bytes (pings are padded to PING_SIZE)
    end-32  32    MAC: HMAC-SHA256(discovery key, every byte before it)

A receiver (:class:`Verifier`) drops, without answering, a datagram that is
shorter than HEADER + MAC or longer than MAX_DATAGRAM, does not start with
MAGIC, fails its MAC (compared in constant time), is of an unknown kind, is
stamped more than ``window`` seconds away from the receiver's clock (stale),
repeats a nonce seen within the window (replayed), or whose body is not a
JSON object.  The MAC is checked before the body is parsed, and a nonce is
remembered only once its MAC verified, so forged datagrams can neither
fill the replay cache nor make a node parse JSON.

No amplification: a pong is never larger than the ping that caused it
(:func:`reply`; a pong that would be is not sent).  Pings are padded to
PING_SIZE, and a node's pong body is trimmed to fit (:func:`node_body`).

What travels in clear: the kind, the timestamp, the nonce and the body
(a node's name, TCP port, addresses, CPU counts and protocol version); the
secret does not, and the MAC does not help guess it faster than the TCP
handshake does (each guess costs one scrypt).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .auth import stretch

__all__ = ["PING", "ANNOUNCE", "PONG", "Message", "Rejected", "Verifier", "discovery_key",
           "encode", "reply", "node_body", "PING_SIZE", "MAX_DATAGRAM"]

MAGIC = b"DPd1"
PING, ANNOUNCE, PONG = 1, 2, 3
KINDS = {PING: "ping", ANNOUNCE: "announce", PONG: "pong"}
_HEADER = struct.Struct("!4sBBQ16sH")
HEADER = _HEADER.size          # 32
MAC_SIZE = 32
NONCE_SIZE = 16
#: The largest datagram sent or accepted (fits the IPv6 minimum MTU, 1280).
MAX_DATAGRAM = 1200
#: Every ping is padded to this size: the most a pong may be.
PING_SIZE = 640
#: Seconds a datagram's timestamp may be away from the receiver's clock.
WINDOW = 30.0
#: Nonces remembered at most (some 11 MB); past it new datagrams are refused
#: (fail closed).  A client pinging N nodes remembers about 18 N (the pongs
#: of its first minute of pings): room for some 3,600 nodes.
CACHE_SIZE = 65536
#: Nonces remembered at most per source address, so that one source (a
#: relay forwarding for its 2048 nodes fits) can't fill the cache for all.
SOURCE_SHARE = 16384
#: Fixed scrypt salt of the discovery key (one key per secret, cluster-wide).
SALT = b"dpool-discovery1"
#: Longest node name and address carried (longer ones are cut).
NAME_MAX = 64


def discovery_key(secret: bytes) -> bytes:
    """The discovery MAC key for ``secret``: scrypt (as the handshake's, under
    the fixed SALT) then HMAC, so it is never the handshake's key.  Cached:
    the ~50 ms of scrypt are paid once per secret and process."""
    return _key(bytes(secret))


@functools.lru_cache(maxsize=16)
def _key(secret: bytes) -> bytes:
    if not secret:
        raise ValueError("discovery needs a shared secret (a node or client without one "
                         "can't authenticate datagrams)")
    return hmac.new(stretch(secret, SALT), b"dpool discovery mac v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class Message:
    """A verified datagram: its kind, timestamp (s), nonce, body and size."""
    kind: int
    timestamp: float
    nonce: bytes
    body: Mapping[str, Any]
    size: int


class Rejected(ValueError):
    """A datagram that is dropped; ``reason`` is one word for the log summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def encode(key: bytes, kind: int, body: Mapping[str, Any], *, pad_to: int = 0,
           now: float | None = None, nonce: bytes | None = None) -> bytes:
    """One datagram of ``kind`` carrying ``body``, padded to ``pad_to`` bytes."""
    data = json.dumps(dict(body), separators=(",", ":")).encode()
    stamp = int((time.time() if now is None else now) * 1000)
    head = _HEADER.pack(MAGIC, kind, 0, stamp, nonce or os.urandom(NONCE_SIZE), len(data))
    size = HEADER + len(data) + MAC_SIZE
    if size > MAX_DATAGRAM:
        raise ValueError(f"discovery body of {len(data)} bytes is too large")
    msg = head + data + bytes(max(0, pad_to - size))
    return msg + hmac.new(key, msg, hashlib.sha256).digest()


def reply(key: bytes, ping: Message, body: Mapping[str, Any],
          now: float | None = None) -> bytes | None:
    """The pong to ``ping`` (``body`` plus ``"re"``, the ping's nonce), or
    None if it would be larger than the ping (never amplify)."""
    pong = encode(key, PONG, dict(body, re=ping.nonce.hex()), now=now)
    return pong if len(pong) <= ping.size else None


def node_body(name: str, port: int, cpus: int, free_cpus: int, addrs: list[str],
              protocol: int, node_id: str = "") -> dict[str, Any]:
    """What a node says about itself (announce and pong); names and addresses
    are cut to NAME_MAX bytes of JSON, at most 4 addresses, so a pong fits in
    PING_SIZE.  ``node_id`` (random per node process, at most 32 characters)
    lets a client that hears one node at two addresses use it once."""
    body = {"role": "node", "name": _cut(name), "port": int(port),
            "cpus": int(cpus), "free": int(free_cpus), "protocol": int(protocol),
            "addrs": [_cut(a) for a in addrs[:4]]}
    if node_id:
        body["id"] = _cut(node_id)[:32]
    return body


def _cut(text: Any) -> str:
    """``text`` cut so that its JSON encoding (which escapes every non-ASCII
    character, 6 or 12 bytes each) takes at most NAME_MAX bytes."""
    text = str(text)[:NAME_MAX]
    while len(json.dumps(text)) - 2 > NAME_MAX:
        text = text[:-1]
    return text


class Verifier:
    """Checks datagrams under one key: MAC, freshness, replays.

    ``check(datagram, source)`` returns the :class:`Message` or raises
    :class:`Rejected`.  The replay cache holds the nonces of the verified
    datagrams of the last ``2 * window`` seconds: at most ``cache_size``,
    and at most ``source_share`` of them from one ``source`` (the sender's
    address).
    """

    def __init__(self, key: bytes, window: float = WINDOW, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = time.time, source_share: int = SOURCE_SHARE):
        self.key = key
        self.window = window
        self.cache_size = cache_size
        self.source_share = source_share
        self.clock = clock
        self._seen: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()  # -> (expiry, source)
        self._per_source: dict[Any, int] = {}   # source -> its nonces in _seen

    def check(self, datagram: bytes, source: Any = None) -> Message:
        size = len(datagram)
        if not HEADER + MAC_SIZE <= size <= MAX_DATAGRAM:
            raise Rejected("size", f"a datagram of {size} bytes")
        magic, kind, _, stamp, nonce, length = _HEADER.unpack_from(datagram)
        if magic != MAGIC:
            raise Rejected("garbage", "not a dpool discovery datagram")
        signed, mac = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
        if not hmac.compare_digest(hmac.new(self.key, signed, hashlib.sha256).digest(), mac):
            raise Rejected("forged", "a datagram whose MAC does not verify "
                                     "(forged, or another secret)")
        if kind not in KINDS or HEADER + length > len(signed):
            raise Rejected("malformed", f"a datagram of unknown kind {kind} or bad length")
        now = self.clock()
        if abs(now - stamp / 1000) > self.window:
            raise Rejected("stale", f"a datagram stamped {stamp / 1000 - now:+.0f} s from "
                                    f"this host's clock (window {self.window:g} s)")
        self._remember(nonce, now, source)
        body = self._body(bytes(datagram[HEADER:HEADER + length]))
        return Message(kind, stamp / 1000, nonce, body, size)

    def _remember(self, nonce: bytes, now: float, source: Any) -> None:
        seen, counts = self._seen, self._per_source
        while seen and next(iter(seen.values()))[0] < now:
            _, (_, old) = seen.popitem(last=False)
            counts[old] -= 1
            if not counts[old]:
                del counts[old]
        if nonce in seen:
            raise Rejected("replayed", "a datagram seen before (replayed)")
        if len(seen) >= self.cache_size:
            raise Rejected("flood", "too many datagrams within the window")
        if counts.get(source, 0) >= self.source_share:
            raise Rejected("flood", "too many datagrams from one source within the window")
        seen[nonce] = (now + 2 * self.window, source)   # a clock step back can't let it in again
        counts[source] = counts.get(source, 0) + 1

    @staticmethod
    def _body(data: bytes) -> Mapping[str, Any]:
        try:   # NaN, Infinity and 1e999 are refused: no float that int() can't take
            body = json.loads(data, parse_constant=_not_json, parse_float=_finite)
        except (UnicodeDecodeError, ValueError):
            body = None
        if not isinstance(body, dict):
            raise Rejected("malformed", "a datagram whose body is not a JSON object")
        return body


def _not_json(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value
