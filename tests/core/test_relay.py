"""dpool.core.relay on loopback: what a relay hears from nodes reaches its
clients as announcements it signs itself; a client that pings it learns the
nodes within the bytes it sent; bad datagrams get nothing; relayed
announcements are never relayed again (no loops)."""
import asyncio
import select
import socket

from dpool.core import relay as R
from dpool.transport import discovery as D
from dpool.transport import udp
from helpers import apoll as poll

SECRET = b"relay test secret of 32 bytes..."
KEY = D.discovery_key(SECRET)


def body(n, port=4000, addr="127.0.0.1"):
    return D.node_body(f"n{n}", port + n, 2, 2, [addr], 2)


class Net:
    """Nodes (Responders on 127.0.0.1), a relay pinging them, clients."""

    def __init__(self):
        self.closing = []

    async def node(self, n, announce_to=()):
        node = await udp.Responder(KEY, lambda: body(n), "127.0.0.1", 0,
                                   announce_to=list(announce_to)).start()
        self.closing.append(node)
        return node

    async def relay(self, nodes=(), clients=(), **kw):
        kw.setdefault("ping_to", [("127.0.0.1", node.udp_port) for node in nodes])
        relay = await R.Relay(KEY, clients, node_port=1, port=0, host="127.0.0.1",
                              listen_port=0, interval=60, **kw).start()
        self.closing.append(relay)
        return relay

    async def client(self, found, **kw):
        kw.setdefault("listen_port", 0)
        client = await udp.Seeker(KEY, found.append, node_port=1, host="127.0.0.1",
                                  **kw).start()
        self.closing.append(client)
        return client

    def close(self):
        for x in self.closing:
            x.close()


def run(test):
    async def main():
        net = Net()
        try:
            await test(net)
        finally:
            net.close()
    asyncio.run(main())


def names(found):
    return {f.name for f in found}


def test_nodes_that_answer_the_relays_ping_reach_a_named_client():
    async def test(net):
        found = []
        client = await net.client(found)
        nodes = [await net.node(n) for n in (1, 2)]
        await net.relay(nodes, clients=[("127.0.0.1", client.listen_port)])
        await poll(lambda: names(found) == {"n1", "n2"})
        assert {f.kind for f in found} == {D.ANNOUNCE}          # signed anew, not the pongs
        assert {f.address for f in found} == {("127.0.0.1", 4001), ("127.0.0.1", 4002)}
        assert all("re" not in f.body and f.body["via"] for f in found)
    run(test)


def test_a_nodes_announcement_is_forwarded_and_a_restarted_relay_finds_it_again():
    async def test(net):
        found = []
        client = await net.client(found)
        clients = [("127.0.0.1", client.listen_port)]
        relay = await net.relay(clients=clients, ping_to=[])
        node = await net.node(1, announce_to=[("127.0.0.1", relay.listen_port)])
        await poll(lambda: names(found) == {"n1"})
        relay.close()
        found.clear()
        await net.relay([node], clients=clients)      # a new relay: it pings at start
        await poll(lambda: names(found) == {"n1"})
    run(test)


def test_a_client_that_pings_the_relay_learns_the_nodes_within_what_it_sent():
    async def test(net):
        nodes = [await net.node(n) for n in range(1, 7)]
        relay = await net.relay(nodes)
        await poll(lambda: len(relay.known()) == 6)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        verifier = D.Verifier(KEY)
        pinged, got, heard = 0, 0, set()
        try:
            while len(heard) < 6:                     # each ping buys the next ones
                assert pinged < 6 * D.PING_SIZE, "the client never heard of every node"
                ping = D.encode(KEY, D.PING, {"role": "client"}, pad_to=D.PING_SIZE)
                raw.sendto(ping, ("127.0.0.1", relay.relay_port))
                pinged += len(ping)
                await poll(lambda: relay.stats.client_pings == pinged // D.PING_SIZE)
                while readable(raw):
                    data = raw.recv(2048)
                    got += len(data)
                    msg = verifier.check(data)
                    assert msg.kind == D.ANNOUNCE and msg.body["via"]
                    heard.add(msg.body["name"])
                assert got <= pinged                   # never more bytes than it sent
            assert pinged > D.PING_SIZE and relay.stats.withheld
        finally:
            raw.close()
    run(test)


def readable(sock):
    return bool(select.select([sock], [], [], 0)[0])


def test_forged_replayed_and_oversized_datagrams_get_nothing():
    async def test(net):
        found = []
        client = await net.client(found)
        relay = await net.relay(clients=[("127.0.0.1", client.listen_port)], ping_to=[])
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        try:
            good_ping = D.encode(KEY, D.PING, {"role": "client"}, pad_to=D.PING_SIZE)
            announce = D.encode(KEY, D.ANNOUNCE, body(1))
            forged = bytearray(announce)
            forged[40] ^= 1
            other = D.encode(D.discovery_key(b"another secret of 32 bytes......"),
                             D.PING, {}, pad_to=D.PING_SIZE)
            bad = [bytes(forged), other, good_ping + bytes(D.MAX_DATAGRAM),
                   D.encode(KEY, D.ANNOUNCE, body(2), now=1.0), b"\0" * 700]
            raw.sendto(good_ping, ("127.0.0.1", relay.relay_port))
            await poll(lambda: relay.stats.client_pings == 1)
            for data in [good_ping, *bad]:                 # good_ping again: a replay
                raw.sendto(data, ("127.0.0.1", relay.relay_port))
                raw.sendto(data, ("127.0.0.1", relay.listen_port))
            await poll(lambda: relay.rejected == 2 * len(bad) + 2)   # + the replays
            assert relay.stats.client_pings == 1 and relay.stats.forwarded == 0
            assert not readable(raw) and found == []
        finally:
            raw.close()
    run(test)


def test_relayed_announcements_are_not_relayed_again():
    relayed = R.relayed_body(dict(body(1), re="ab"), "127.0.0.1", "r1")
    assert relayed == dict(body(1), via="r1")
    assert R.relayed_body(relayed, "127.0.0.1", "r2") is None
    moved = R.relayed_body(D.node_body("n", 1, 1, 1, ["10.0.0.1", "10.0.0.9"], 2), "10.0.0.9",
                           "r")
    assert moved["addrs"] == ["10.0.0.9", "10.0.0.1"]
    nat = R.relayed_body(D.node_body("n", 1, 1, 1, ["192.0.2.1"], 2), "10.0.0.9", "r")
    assert nat["addrs"] == ["192.0.2.1"]                  # its --ext-host, as it said
    assert R.relayed_body(D.node_body("n", 1, 1, 1, [], 2), "10.0.0.9", "r")["addrs"] == [
        "10.0.0.9"]

    async def test(net):
        found = []
        client = await net.client(found)
        second = await net.relay(clients=[("127.0.0.1", client.listen_port)], ping_to=[])
        node = await net.node(1)
        first = await net.relay([node], clients=[("127.0.0.1", second.listen_port)])
        await poll(lambda: first.stats.forwarded >= 1)
        await poll(lambda: second.verifier._seen)   # the second heard it (handled at once)...
        assert second.stats.forwarded == 0 and found == []   # ... and passed nothing on
    run(test)


def heard(port, addr="127.0.0.1"):
    """A verified pong from a node at ``addr``, as the relay's Seeker hands it on."""
    body = D.node_body(f"n{port}", port, 1, 1, [addr], 2)
    return udp.Found((addr, port), body["name"], 1, 1, (addr, 5000), D.PONG, body)


def test_the_nodes_table_forgets_nodes_gone_quiet_and_stays_bounded():
    """Without a client pinging the relay (only --clients), nodes that stopped
    answering are forgotten all the same, and many valid ones (nodes restarted
    on new ports) can't grow the table without bound."""
    now = [0.0]
    relay = R.Relay(KEY, node_port=1, port=0, listen_port=None, interval=10,
                    clock=lambda: now[0])
    for port in range(1000, 1100):
        relay._heard(heard(port))
    now[0] = 31.0                                 # past 3 intervals: all of them gone quiet
    relay._heard(heard(2000))
    assert list(relay.nodes) == [("127.0.0.1", 2000)]
    for port in range(1, R.MAX_NODES + 500):
        relay._heard(heard(port))
    assert len(relay.nodes) == R.MAX_NODES
    assert ("127.0.0.1", R.MAX_NODES + 499) in relay.nodes     # the newest kept


def test_a_failing_ping_of_the_subnet_does_not_stop_the_later_ones(caplog):
    """The subnet's broadcast address can't be found once (e.g. --host is a
    name and DNS fails for a moment): the relay logs it and pings again at its
    next time, instead of its pinging task dying silently."""
    async def test(net):
        node = await net.node(1)
        relay = R.Relay(KEY, node_port=1, port=0, host="127.0.0.1", listen_port=0,
                        interval=60, ping_to=[("127.0.0.1", node.udp_port)])
        targets, calls = relay.targets, []

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise OSError("temporary failure in name resolution")
            return targets()
        relay.targets = flaky
        net.closing.append(await relay.start())
        await poll(lambda: [b["name"] for b in relay.known()] == ["n1"])
        assert "cannot ping" in caplog.text
    run(test)


def test_a_node_too_large_to_relay_is_dropped_with_a_log_line(caplog):
    """A verified announcement that fits MAX_DATAGRAM, but not once the relay
    adds its ``via``: dropped (logged, rate-limited) instead of raising in
    the socket's callback at every datagram and being half remembered."""
    async def test(net):
        relay = R.Relay(KEY, node_port=1, port=0, listen_port=None, name="r" * D.NAME_MAX)
        big = dict(D.node_body("n1", 4001, 1, 1, ["127.0.0.1"], 2), extra="")
        big["extra"] = "x" * (D.MAX_DATAGRAM - len(D.encode(KEY, D.ANNOUNCE, big)) - 10)
        assert len(D.encode(KEY, D.ANNOUNCE, big)) <= D.MAX_DATAGRAM    # a node may send it
        found = udp.Found(("127.0.0.1", 4001), "n1", 1, 1, ("127.0.0.1", 5000), D.ANNOUNCE,
                          big)
        relay._heard(found)
        assert not relay.nodes and relay.rejected == 1
        assert "too large to relay" in caplog.text
        relay.close()
    run(test)


def test_the_relays_own_ping_reaching_its_client_port_is_not_answered():
    """--node-port equal to --port (or a second relay on the subnet with the
    ports crossed): the relay's subnet ping reaches its own client port. It
    must not take itself for a client (answer itself, ping again: a loop)."""
    async def test(net):
        relay = await net.relay(ping_to=[])
        relay.ping([("127.0.0.1", relay.relay_port)])
        await poll(lambda: len(relay.verifier._seen) == 1)       # heard (handled at once)
        assert relay.stats.client_pings == 0 and not relay.learned
    run(test)
