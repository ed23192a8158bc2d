"""The scheduler's tables over a long run (issue 11): what a gone client or
node leaves behind is bounded, and what the clients are told of the nodes
grows with the changes, not with the nodes times the changes.  In-process:
a Broker with fake client connections, no sockets."""
import asyncio

import pytest

from dpool import protocol as P
from dpool.core.broker import Broker, ClientSession
from dpool.core.client import ready_info
from dpool.core.nodeport import Link, NodePort


class FakeConn:
    """What a ClientSession uses of its client's Connection."""

    def __init__(self, peer="client"):
        self.peer = peer
        self.closed = False
        self.sent = []
        self.bytes_received = self.bytes_sent = 0

    def send(self, frames):
        self.sent.append(list(frames))

    def set_receiver(self, on_message, on_close):
        self.on_message, self.on_close = on_message, on_close

    def set_deadline(self, deadline):
        pass

    def close(self):
        self.closed = True

    abort = close


def broker():
    return Broker([], secret=b"s", name="sched")


def client(b, token=None):
    session = ClientSession(b, FakeConn(), next(b._sids))
    b.clients.add(session)
    session.options = {"recover_token": token} if token else {"x": 1}
    b.fair.add_client(session, 1.0, nodes=())
    return session


def connect(b, options=None):
    """A client connects (as the transport's server hands it over) and
    sends Session; its ClientSession."""
    conn = FakeConn()
    b.accept(conn)
    conn.on_message([P.encode(P.Session, options or {"weight": 1})])
    return next(c for c in b.clients if c.conn is conn)


def done(job_id):
    return [P.encode(P.Done, [P.result(job_id, 0, 1)]), b"result"]


def test_status_counts_the_sessions_kept_for_recover_jobs():
    async def main():
        b = broker()
        gone = client(b, token="t1")
        gone.on_close(None)  # went away without Bye: detached, its results kept
        gone.tell(done(1))
        gone.tell(done(2))
        status = b.status()
        await b.close()
        return status
    status = asyncio.run(main())
    assert status["kept"] == 1 and status["kept_results"] == 2


# ----------------------------------------------------------------- fake nodes

def fake_node(b, host, cpus=8, node_id=None):
    """A NodePort whose anchor is ready, without a socket."""
    port = NodePort(host, 51350, **b._port_options)
    port.anchor = Link(port)
    port.anchor.ready = True
    port.anchor.info = {"name": f"name-{host}", "cpus": cpus, "id": node_id or host}
    port.cpus = cpus
    return port


@pytest.fixture
def fake_legs(monkeypatch):
    """Clients' legs open at once, ready, without a socket."""
    def open_leg(self, port):
        if self.ended or port in self.legs or not self.wants(port):
            return None
        leg = self.legs[port] = Link(port)
        leg.ready, leg.conn = True, FakeConn(f"leg {port}")
        self.sync()
        self.broker.place_soon()
        return self.broker.spawn(asyncio.sleep(0))
    monkeypatch.setattr(ClientSession, "open_leg", open_leg)


def readies(conn):
    """The Ready messages sent on ``conn``: (info, bytes)."""
    out = []
    for frames in conn.sent:
        msg = P.decode(frames[0])
        if type(msg) is P.Ready:
            out.append((msg.info, sum(len(bytes(f)) for f in frames)))
    return out


def nodes_told(infos):
    """The nodes a client knows from its Ready messages (the full list,
    then what changed), as the client's core keeps them."""
    info = {}
    for each in infos:
        info = ready_info(info, each)
    return {(e["host"], e["port"]): e for e in info.get("nodes", ())}


def test_nodes_joining_reach_a_client_as_a_few_small_messages(fake_legs):
    """1,000 nodes joining one after the other: the client hears of them
    in a few coalesced messages carrying what changed, not 1,000 Ready
    messages each listing every node (quadratic in bytes)."""
    joining = 1000

    async def main():
        b = broker()
        first = fake_node(b, "10.0.0.1")
        b.ports.append(first)
        new = connect(b)
        await poll(lambda: new.told_cpus)
        for i in range(joining):
            port = fake_node(b, f"10.1.{i // 250}.{i % 250}")
            b.ports.append(port)
            b.node_ready(port)
        total = b.total_cpus()
        await poll(lambda: nodes_told(info for info, _ in readies(new.conn)).keys()
                   == {(p.host, p.port) for p in b.ports})
        sent = readies(new.conn)
        lost = b.ports[5]  # a node lost: the client hears of it too
        new.on_leg_closed(new.legs[lost], None)
        await poll(lambda: (lost.host, lost.port)
                   not in nodes_told(info for info, _ in readies(new.conn)))
        await b.close()
        return sent, total

    sent, total = asyncio.run(main())
    assert max(info["cpus"] for info, _ in sent) == total == 8 * (joining + 1)
    assert len(sent) <= 10, f"{len(sent)} Ready messages for {joining} nodes joining"
    size = sum(n for _, n in sent)
    print(f"{joining} nodes joining: {len(sent)} Ready messages, {size} bytes")
    assert size < 200 * (joining + 1), f"{size} bytes for {joining} nodes"


async def poll(condition, timeout=10.0):
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while not condition():
        assert loop.time() < until, "condition not met in time"
        await asyncio.sleep(0.01)
