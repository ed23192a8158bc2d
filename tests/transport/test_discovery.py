"""Discovery datagrams (dpool.transport.discovery, pure) and their UDP
endpoints on loopback (dpool.transport.udp): forged, replayed, stale,
oversized and truncated datagrams are dropped and nothing is sent back."""
import asyncio
import json
import os
import socket

import pytest

from dpool.transport import discovery as D
from dpool.transport import udp
from helpers import apoll as _poll

SECRET = b"discovery test secret, 32 bytes!"
KEY = D.discovery_key(SECRET)
BODY = D.node_body("n1", 4242, 4, 3, ["127.0.0.1"], 2)


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def verifier(clock=None):
    return D.Verifier(KEY, clock=clock or Clock())


def ping(now=1_000_000.0, **kw):
    return D.encode(KEY, D.PING, {"role": "client"}, pad_to=D.PING_SIZE, now=now, **kw)


def reason(v, data):
    with pytest.raises(D.Rejected) as info:
        v.check(data)
    return info.value.reason


def test_round_trip():
    msg = verifier().check(D.encode(KEY, D.ANNOUNCE, BODY, now=1_000_000.0))
    assert (msg.kind, msg.timestamp, dict(msg.body)) == (D.ANNOUNCE, 1_000_000.0, BODY)


def test_key_is_per_secret_and_not_the_secret():
    assert D.discovery_key(SECRET) == KEY and len(KEY) == 32
    assert D.discovery_key(SECRET + b"x") != KEY and SECRET not in KEY
    with pytest.raises(ValueError):
        D.discovery_key(b"")


def test_pings_are_padded_and_a_pong_never_exceeds_its_ping():
    data = ping()
    assert len(data) == D.PING_SIZE
    msg = verifier().check(data)
    pong = D.reply(KEY, msg, BODY, now=1_000_000.0)
    assert pong is not None and len(pong) <= len(data)
    assert verifier().check(pong).body["re"] == msg.nonce.hex()
    small = verifier().check(D.encode(KEY, D.PING, {}, now=1_000_000.0))   # unpadded
    assert D.reply(KEY, small, BODY) is None


def test_the_largest_node_body_fits_a_ping():
    body = D.node_body("x" * 500, 65535, 10**6, 10**6, ["y" * 500] * 10, 99, node_id="z" * 500)
    msg = verifier().check(ping())
    assert D.reply(KEY, msg, body, now=1_000_000.0) is not None


def test_a_non_ascii_node_name_and_addresses_still_fit_a_ping():
    """JSON escapes non-ASCII (6 bytes a character, 12 for an emoji): the
    cut is by encoded size, so a node named in any script still answers."""
    msg = verifier().check(ping())
    for text in ("Rechenknoten-Müller-", "計算ノード", "\U0001F600"):
        body = D.node_body(text * 100, 65535, 10**6, 10**6, [text * 100] * 10, 99)
        assert D.reply(KEY, msg, body, now=1_000_000.0) is not None, text
        assert body["name"].startswith(text[:3])


def test_forged_and_other_secret_rejected():
    v = verifier()
    data = bytearray(ping())
    data[40] ^= 1
    assert reason(v, bytes(data)) == "forged"
    other = D.encode(D.discovery_key(b"another secret of 32 bytes......"), D.PING, {},
                     now=1_000_000.0)
    assert reason(v, other) == "forged"


def test_replayed_rejected_then_forgotten_once_stale():
    clock = Clock()
    v = verifier(clock)
    data = ping()
    v.check(data)
    assert reason(v, data) == "replayed"
    clock.now += D.WINDOW + 1
    assert reason(v, data) == "stale"
    clock.now += D.WINDOW
    fresh = ping(now=clock.now)
    v.check(fresh)
    assert len(v._seen) == 1  # the old nonce was dropped from the cache


@pytest.mark.parametrize("offset", [D.WINDOW + 1, -D.WINDOW - 1])
def test_stale_rejected_both_ways(offset):
    assert reason(verifier(), ping(now=1_000_000.0 + offset)) == "stale"


def test_oversized_truncated_and_garbage_rejected():
    v = verifier()
    data = ping()
    assert reason(v, data + bytes(D.MAX_DATAGRAM)) == "size"
    assert reason(v, data[:20]) == "size"
    assert reason(v, data[:-1]) == "forged"
    assert reason(v, b"GET / HTTP/1.0\r\n" * 10) == "garbage"
    with pytest.raises(ValueError):
        D.encode(KEY, D.ANNOUNCE, {"x": "y" * D.MAX_DATAGRAM})


def test_forged_datagrams_do_not_fill_the_replay_cache():
    v = D.Verifier(KEY, clock=Clock(), cache_size=2)
    for _ in range(10):
        data = bytearray(ping())
        data[-1] ^= 1
        reason(v, bytes(data))
    v.check(ping())
    v.check(ping())
    assert reason(v, ping()) == "flood"   # full: refused, not evicted (fail closed)


def test_a_verified_body_that_is_not_an_object_is_rejected():
    import hashlib
    import hmac
    msg = D._HEADER.pack(D.MAGIC, D.ANNOUNCE, 0, 1_000_000_000, bytes(16), 2) + b"[]"
    data = msg + hmac.new(KEY, msg, hashlib.sha256).digest()
    assert reason(verifier(), data) == "malformed"


def test_found_from_prefers_the_source_then_listed_addresses():
    msg = verifier().check(D.encode(KEY, D.PONG, dict(BODY, addrs=["10.0.0.9"]),
                                    now=1_000_000.0))
    assert udp.found_from(msg, ("10.0.0.9", 1)).address == ("10.0.0.9", 4242)
    assert udp.found_from(msg, ("10.0.0.1", 1)).address == ("10.0.0.9", 4242)  # NAT / relay
    msg = verifier().check(D.encode(KEY, D.PONG, dict(BODY, addrs=[]), now=1_000_000.0))
    assert udp.found_from(msg, ("10.0.0.1", 1)).address == ("10.0.0.1", 4242)
    bad = verifier().check(D.encode(KEY, D.PONG, {"role": "node"}, now=1_000_000.0))
    assert udp.found_from(bad, ("10.0.0.1", 1)) is None


def _signed(kind, body_text):
    import hashlib
    import hmac
    import time
    data = body_text.encode()
    msg = D._HEADER.pack(D.MAGIC, kind, 0, int(time.time() * 1000), os.urandom(16),
                         len(data)) + data
    return msg + hmac.new(KEY, msg, hashlib.sha256).digest()


def test_non_finite_json_numbers_are_malformed():
    """Python's json takes NaN and Infinity (not JSON): a verified body
    carrying them is dropped, never handed on (int(inf) raises OverflowError)."""
    for text in ('{"role":"node","port":Infinity}', '{"cpus":NaN}', '{"x":-Infinity}'):
        assert reason(D.Verifier(KEY), _signed(D.ANNOUNCE, text)) == "malformed"


@pytest.mark.parametrize("field", [
    {"port": 1e308}, {"port": "4242"}, {"port": True}, {"port": [4242]},
    {"cpus": 1e308}, {"free": "x"}, {"cpus": None},
    {"addrs": "10.0.0.9"}, {"addrs": {"10.0.0.9": 1}}, {"addrs": [1]}, {"addrs": [None]},
    {"addrs": [["10.0.0.9"]]}, {"addrs": [""]}, {"name": {"a": 1}},
])
def test_found_from_names_no_node_for_a_body_of_wrong_types(field):
    """A verified body of the wrong shape names no node (None), never an
    exception in the receive callback nor an address made of its pieces
    (a string as addrs would be read a character at a time)."""
    msg = verifier().check(D.encode(KEY, D.ANNOUNCE, dict(BODY, **field), now=1_000_000.0))
    assert udp.found_from(msg, ("10.0.0.1", 1)) is None


def test_a_seeker_survives_a_verified_body_of_wrong_types():
    async def main():
        found = []
        seeker = await udp.Seeker(KEY, found.append, node_port=1, listen_port=0).start()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = ("127.0.0.1", seeker.listen_port)
        try:
            loop = asyncio.get_running_loop()
            errors = []
            loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
            for bad in ('{"role":"node","port":Infinity}', '{"role":"node","port":1e999}',
                        '{"role":"node","port":4242,"cpus":1e400}'):
                raw.sendto(_signed(D.ANNOUNCE, bad), target)
            raw.sendto(D.encode(KEY, D.ANNOUNCE, BODY), target)
            await _poll(lambda: found)
            assert not errors and [f.address for f in found] == [("127.0.0.1", 4242)]
        finally:
            seeker.close()
            raw.close()
    asyncio.run(main())


# ------------------------------------------------------------------ UDP on loopback

async def _node_and_seeker(host="127.0.0.7", found=None):
    node = await udp.Responder(KEY, lambda: BODY, host, 0, announce_to=[]).start()
    seeker = await udp.Seeker(KEY, (found if found is not None else []).append,
                              node_port=node.udp_port, listen_port=None).start()
    return node, seeker


def test_a_ping_to_the_loopback_broadcast_finds_a_node_on_127_0_0_x():
    async def main():
        found = []
        node, seeker = await _node_and_seeker(found=found)
        try:
            seeker.ping([(udp.LOOPBACK_BROADCAST, node.udp_port)])
            await _poll(lambda: found)
            assert found[0].address == ("127.0.0.1", 4242)   # as the node's body says
            assert found[0].source == ("127.0.0.7", node.udp_port)
            assert found[0].kind == D.PONG and found[0].name == "n1"
        finally:
            node.close()
            seeker.close()
    asyncio.run(main())


def _free_udp_port(host):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bindable(host, port):
    """Whether a socket without SO_REUSEADDR can bind (host, port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def test_a_responder_that_fails_to_start_closes_what_it_opened():
    """The node's broadcast address is taken (by a socket without
    SO_REUSEADDR): start raises OSError (the node logs "discovery is off")
    and its first socket, on the node's address, is closed, not leaked."""
    async def main():
        port = _free_udp_port("127.0.0.8")
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind((udp.LOOPBACK_BROADCAST, port))
        try:
            responder = udp.Responder(KEY, lambda: BODY, "127.0.0.8", port, announce_to=[])
            with pytest.raises(OSError):
                await responder.start()
            assert not responder.transports
            await _poll(lambda: _bindable("127.0.0.8", port))   # closes on the next turn
        finally:
            taken.close()
    asyncio.run(main())


def test_announcements_reach_every_listener_on_the_port():
    async def main():
        got1, got2 = [], []
        s1 = await udp.Seeker(KEY, got1.append, node_port=1, listen_port=0).start()
        s2 = await udp.Seeker(KEY, got2.append, node_port=1,
                              listen_port=s1.listen_port).start()
        node = await udp.Responder(KEY, lambda: BODY, "127.0.0.1", 0,
                                   announce_to=[(udp.LOOPBACK_BROADCAST, s1.listen_port)]).start()
        try:
            await _poll(lambda: got1 and got2)
            assert got1[0].kind == got2[0].kind == D.ANNOUNCE
        finally:
            for x in (node, s1, s2):
                x.close()
    asyncio.run(main())


def test_bad_datagrams_get_no_answer(caplog):
    """Forged, replayed, stale, oversized, truncated and unpadded pings are
    dropped with a rate-limited log and nothing goes back to their source."""
    async def main():
        node = await udp.Responder(KEY, lambda: BODY, "127.0.0.1", 0, announce_to=[]).start()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        target = ("127.0.0.1", node.udp_port)
        good = D.encode(KEY, D.PING, {}, pad_to=D.PING_SIZE)
        forged = bytearray(good)
        forged[33] ^= 1
        stale = D.encode(KEY, D.PING, {}, pad_to=D.PING_SIZE, now=1.0)
        bad = [bytes(forged), stale, good + bytes(D.MAX_DATAGRAM), good[:40],
               D.encode(KEY, D.PING, {}), b"\x00" * 600]
        try:
            raw.sendto(good, target)
            await _poll(lambda: node.pongs == 1)
            await _poll(lambda: _readable(raw))
            raw.recv(2000)
            for data in [good, *bad]:    # good again: a replay
                raw.sendto(data, target)
            await _poll(lambda: node.rejected == len(bad) + 1)
            # a fresh good ping after them is answered: nothing was sent before it
            raw.sendto(D.encode(KEY, D.PING, {}, pad_to=D.PING_SIZE), target)
            await _poll(lambda: node.pongs == 2)
            await _poll(lambda: _readable(raw))
            reply = raw.recv(2000)
            assert D.Verifier(KEY).check(reply).kind == D.PONG
            assert not _readable(raw)
            assert node.rejected == len(bad) + 1 and node.sent == 2
        finally:
            node.close()
            raw.close()
    with caplog.at_level("WARNING", logger="dpool.discovery"):
        asyncio.run(main())
    lines = [r for r in caplog.records if "discovery" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]   # rate-limited


def _readable(sock):
    import select
    return bool(select.select([sock], [], [], 0)[0])


def test_body_is_json_never_pickle():
    data = D.encode(KEY, D.ANNOUNCE, BODY, now=1_000_000.0)
    start, length = D.HEADER, int.from_bytes(data[30:32], "big")
    assert json.loads(data[start:start + length]) == BODY


def test_the_replay_cache_holds_the_pongs_of_thousands_of_nodes():
    """A client pinging N nodes remembers about 18 N nonces (its pings of the
    first minute: 8 in the first 7.5 s, then one every 5 s; a pong each).
    The cache of 8192 refused new pongs ("flood") past some 450 nodes."""
    clock = Clock()
    v = D.Verifier(KEY, clock=clock)
    nodes = 3000
    for round_ in range(18):
        clock.now = 1_000_000.0 + round_ * 3
        for node in range(nodes):
            v.check(D.encode(KEY, D.PONG, BODY, now=clock.now), f"10.0.{node >> 8}.{node & 255}")
    assert len(v._seen) == 18 * nodes


def test_one_source_cannot_fill_the_replay_cache_for_the_others():
    """At most source_share nonces from one sender's address: past that its
    datagrams are refused, another source's still get in."""
    v = D.Verifier(KEY, clock=Clock(), cache_size=4, source_share=2)
    v.check(ping(), "10.0.0.1")
    v.check(ping(), "10.0.0.1")
    with pytest.raises(D.Rejected) as info:
        v.check(ping(), "10.0.0.1")
    assert info.value.reason == "flood"
    v.check(ping(), "10.0.0.2")
    v.check(ping(), "10.0.0.2")
    assert reason(v, ping()) == "flood"   # (the whole cache is full too)


def test_a_sources_share_frees_as_its_nonces_expire():
    clock = Clock()
    v = D.Verifier(KEY, clock=clock, cache_size=8, source_share=1)
    v.check(ping(now=clock.now), "10.0.0.1")
    clock.now += 2 * D.WINDOW + 1
    v.check(ping(now=clock.now), "10.0.0.1")   # the first one's nonce expired
    assert v._per_source == {"10.0.0.1": 1}
