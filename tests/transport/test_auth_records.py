"""The handshake's pure steps (server proves first, scrypt-stretched key) and
the AEAD record layer that protects every message after it."""
import asyncio
import collections
import hashlib
import os
import struct
import threading

import pytest

from dpool.errors import AuthenticationError, ProtocolError
from dpool.transport import auth, connect
from dpool.transport.frames import FrameDecoder, encode
from dpool.transport.records import RECORD_DATA, Sealer, SecureDecoder, take

KEY = bytes(range(32))


def handshake(client_secret=b"k" * 16, server_secret=b"k" * 16):
    """Steps 1-5 with the pure functions; returns (transcript, client key, server key)."""
    challenge = auth.make_challenge()
    assert len(challenge) == auth.CHALLENGE_SIZE <= 256
    parsed = auth.parse_challenge(challenge)
    assert parsed.protect and parsed.salt == auth.PROCESS_SALT
    reply = auth.make_reply()
    assert len(reply) == auth.REPLY_SIZE <= 256
    auth.check_reply(reply)
    transcript = challenge + reply
    return (transcript, auth.stretch(client_secret, parsed.salt),
            auth.stretch(server_secret, auth.PROCESS_SALT))


def test_handshake_steps_succeed_with_same_secret():
    transcript, ck, sk = handshake()
    auth.check_proof(ck, b"S", transcript, auth.prove(sk, b"S", transcript))
    auth.check_proof(sk, b"C", transcript, auth.prove(ck, b"C", transcript))
    auth.check_status(auth.OK)
    client, server = (auth.derive_keys(ck, transcript, server=False),
                      auth.derive_keys(sk, transcript, server=True))
    assert client.send == server.recv and client.recv == server.send
    assert client.send != client.recv


def test_server_proves_first_and_a_wrong_secret_fails_either_way():
    transcript, ck, sk = handshake(client_secret=b"c" * 16, server_secret=b"s" * 16)
    with pytest.raises(AuthenticationError, match="node failed authentication"):
        auth.check_proof(ck, b"S", transcript, auth.prove(sk, b"S", transcript))
    with pytest.raises(AuthenticationError, match="client failed authentication"):
        auth.check_proof(sk, b"C", transcript, auth.prove(ck, b"C", transcript))
    with pytest.raises(AuthenticationError):
        auth.check_status(auth.FAIL)


def test_proofs_cannot_be_reflected_and_cover_the_flags_and_salt():
    transcript, key, _ = handshake()
    with pytest.raises(AuthenticationError):
        auth.check_proof(key, b"C", transcript, auth.prove(key, b"S", transcript))
    downgraded = bytearray(transcript)
    downgraded[len(auth.MAGIC)] = 0          # a man in the middle clears PROTECT
    with pytest.raises(AuthenticationError):
        auth.check_proof(key, b"S", bytes(downgraded), auth.prove(key, b"S", transcript))


def test_handshake_rejects_bad_magic_and_sizes():
    with pytest.raises(ProtocolError, match="magic"):
        auth.parse_challenge(b"X" * auth.CHALLENGE_SIZE)
    with pytest.raises(ProtocolError, match="expected"):
        auth.parse_challenge(auth.MAGIC)
    with pytest.raises(ProtocolError, match="magic"):
        auth.check_reply(b"Y" * auth.REPLY_SIZE)
    with pytest.raises(ProtocolError):
        auth.check_status(b"\x07")


def test_secret_is_stretched_with_scrypt_and_cached(caplog):
    salt = os.urandom(auth.SALT_SIZE)
    key = auth.stretch(b"a long enough secret", salt)
    assert key == hashlib.scrypt(b"a long enough secret", salt=salt, **auth.SCRYPT)
    assert auth.SCRYPT["n"] * auth.SCRYPT["r"] * 128 >= 16 * 2**20   # 16 MiB a guess
    info = auth.stretch.cache_info()
    assert auth.stretch(b"a long enough secret", salt) == key
    assert auth.stretch.cache_info().hits == info.hits + 1
    assert auth.stretch(b"a long enough secret", os.urandom(16)) != key  # salted
    assert not caplog.records


def test_short_secret_is_warned_about():
    with pytest.warns(auth.WeakSecretWarning, match="only 5 bytes"):
        auth.stretch(b"short", os.urandom(auth.SALT_SIZE))


# -- records ----------------------------------------------------------------------------

def sealed_stream(messages, key=KEY):
    sealer, wire = Sealer(key), []
    for frames in messages:
        wire += sealer.seal_all(collections.deque(encode(frames)))
    return b"".join(bytes(p) for p in wire)


def opener(key=KEY):
    return SecureDecoder(FrameDecoder(), key)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 10**6])
def test_records_round_trip_any_split(chunk):
    messages = [[b"small"], [os.urandom(3 * RECORD_DATA + 5), b"x"], [], [b"y" * 70000] * 3]
    wire = sealed_stream(messages)
    dec, got = opener(), []
    for i in range(0, len(wire), chunk):
        got += dec.feed(wire[i:i + chunk])
    assert [[bytes(f) for f in m] for m in got] == messages
    assert not dec.partial


def test_large_frame_records_are_each_at_most_record_data():
    sealer = Sealer(KEY)
    pieces = sealer.seal_all(collections.deque(encode([bytes(5 * RECORD_DATA)])))
    sizes = [struct.unpack("<I", p)[0] for p in pieces[::2]]
    assert len(sizes) == 6 and max(sizes) == RECORD_DATA + 16


def records(wire):
    out, pos = [], 0
    while pos < len(wire):
        size = struct.unpack_from("<I", wire, pos)[0]
        out.append(wire[pos:pos + 4 + size])
        pos += 4 + size
    return out


@pytest.mark.parametrize("attack", ["forge", "flip", "replay", "reorder", "drop",
                                    "wrong-key", "plain-frame", "huge-length"])
def test_tampered_records_are_refused(attack):
    recs = records(sealed_stream([[b"one"], [b"two"], [b"three"]]))
    if attack == "forge":
        recs[1] = struct.pack("<I", 16 + 3) + os.urandom(19)
    elif attack == "flip":
        recs[1] = recs[1][:5] + bytes([recs[1][5] ^ 1]) + recs[1][6:]
    elif attack == "replay":
        recs[1] = recs[0]
    elif attack == "reorder":
        recs[0], recs[1] = recs[1], recs[0]
    elif attack == "drop":
        del recs[0]
    elif attack == "wrong-key":
        recs = records(sealed_stream([[b"one"]], key=bytes(32)))
    elif attack == "plain-frame":
        recs = [b"".join(encode([b"an unprotected frame"]))]
    else:
        recs = [struct.pack("<I", 2**31) + b"x" * 100]
    dec = opener()
    with pytest.raises(ProtocolError, match="record"):
        for rec in recs:
            dec.feed(rec)
    with pytest.raises(ProtocolError):           # stays failed
        dec.feed(b"\0" * 4)


def test_take_slices_big_parts_and_joins_small_ones():
    parts = collections.deque([b"ab", b"cd", memoryview(b"efghij")])
    assert bytes(take(parts, 3)) == b"abc"
    assert bytes(take(parts, 100)) == b"defghij"
    assert not parts
    big = bytes(10)
    parts = collections.deque([big])
    first = take(parts, 4)
    assert isinstance(first, memoryview) and first.obj is big   # no copy


def test_the_client_keeps_its_event_loop_running_while_it_stretches_the_secret(monkeypatch):
    """Each node has its own salt, so a client meeting N nodes at once
    stretches the secret N times (~50-100 ms each).  In the event loop, that
    blocks everything else the client does (other nodes' results) and runs
    the stretches one after another while every node's authentication
    deadline (3 s) runs: a client of a few dozen nodes lost the last ones."""
    real_scrypt, ticked, calls, done = hashlib.scrypt, threading.Event(), [], []

    def scrypt(*args, **kwargs):
        calls.append(threading.current_thread())
        ticked.clear()
        if not ticked.wait(5):
            raise AssertionError("the event loop did not run while the secret was stretched")
        return real_scrypt(*args, **kwargs)

    async def node_with_its_own_salt(reader, writer):
        try:
            writer.write(auth.make_challenge(os.urandom(auth.SALT_SIZE)))  # salt not cached
            await reader.readexactly(auth.REPLY_SIZE)
            writer.write(os.urandom(auth.PROOF_SIZE))    # (no secret here: a wrong proof)
            await reader.read()
        finally:
            writer.close()
            done[0].set()

    async def main():
        done.append(asyncio.Event())

        async def tick():
            while True:
                ticked.set()
                await asyncio.sleep(0.001)
        ticker = asyncio.ensure_future(tick())
        server = await asyncio.start_server(node_with_its_own_salt, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(AuthenticationError, match="node failed authentication"):
                await connect("127.0.0.1", port, secret=b"s" * 32, hello={}, timeout=10)
            await asyncio.wait_for(done[0].wait(), 5)
        finally:
            ticker.cancel()
            server.close()
            await server.wait_closed()

    monkeypatch.setattr(hashlib, "scrypt", scrypt)
    asyncio.run(main())
    assert len(calls) == 1 and calls[0] is not threading.main_thread()
