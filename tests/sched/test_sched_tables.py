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
from helpers import apoll as poll


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
        self.recheck(port)
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
        b.node_ready(first)
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


def test_a_ready_costs_the_changes_not_all_the_nodes(fake_legs, monkeypatch):
    """A coalesced Ready after a few nodes joined looks at those nodes
    only: with N nodes known, neither the client's entries nor the ready
    nodes are all gone over again for it.  (Each Ready going over every
    node made a join burst quadratic: Readies come every READY_COALESCE s,
    as many as the burst lasts, bench/bench_sched_join.py.)"""
    from dpool.core import broker as broker_module, nodelist
    known = 500

    async def main():
        b = broker()
        b.ports.append(fake_node(b, "10.0.0.1"))
        b.node_ready(b.ports[0])
        new = connect(b)
        await poll(lambda: new.told_cpus)
        for i in range(known):
            port = fake_node(b, f"10.1.{i // 250}.{i % 250}")
            b.ports.append(port)
            b.node_ready(port)
        await poll(lambda: new.told_cpus == 8 * (known + 1))
        await poll(lambda: new._ready_timer is None)
        entries, scans = [], []
        real_entry, real_ready = nodelist._node_entry, broker_module.Broker.ready_nodes
        monkeypatch.setattr(nodelist, "_node_entry",
                            lambda port: entries.append(port) or real_entry(port))
        monkeypatch.setattr(broker_module.Broker, "ready_nodes",
                            lambda self: scans.append(1) or real_ready(self))
        for i in range(3):
            port = fake_node(b, f"10.2.0.{i}")
            b.ports.append(port)
            b.node_ready(port)
        await poll(lambda: new.told_cpus == 8 * (known + 4))
        infos = [info for info, _ in readies(new.conn)]
        await b.close()
        return entries, scans, infos

    entries, scans, infos = asyncio.run(main())
    assert len(nodes_told(infos)) == known + 4
    assert len(entries) <= 3, f"a Ready built {len(entries)} entries for 3 nodes joining"
    assert not scans, f"{len(scans)} passes over all the nodes for 3 nodes joining"


def test_a_recovered_client_hears_the_recovered_ready_first(fake_legs):
    """A node joins while a client is away (its Ready with more CPUs
    waiting out READY_COALESCE) and the client recovers in that window:
    the first message on its new connection is the Ready of the recovery
    (kept and unfinished jobs, nodes), not a Ready of the change, which the
    client would take for the session's (and adopt none of its jobs)."""
    async def main():
        b = broker()
        b.ports.append(fake_node(b, "10.0.0.1"))
        b.node_ready(b.ports[0])
        gone = connect(b, {"weight": 1, "recover_token": "t"})
        await poll(lambda: gone.told_cpus)
        gone.conn.on_message([P.encode(P.Func, 1), b"fn"])
        gone.conn.on_message(run(1, 2))
        await poll(lambda: len(gone.placed) == 2)
        gone.conn.closed = True
        gone.conn.on_close(ConnectionResetError("gone"))
        port = fake_node(b, "10.0.0.2")
        b.ports.append(port)
        b.node_ready(port)
        await poll(lambda: port in gone.node_list.usable)
        waiting = gone._ready_timer is not None
        conn = FakeConn()
        b.accept(conn)
        conn.on_message([P.encode(P.Recover, "t", False)])
        first = P.decode(conn.sent[0][0])
        infos = [info for info, _ in readies(conn)]
        await b.close()
        return waiting, first, infos

    waiting, first, infos = asyncio.run(main())
    assert waiting and type(first) is P.Ready, first
    assert infos[0].get("recovered"), infos[0]
    assert sorted(infos[0]["pending"]) == [1, 2]
    assert len(nodes_told(infos)) == 2 and max(info["cpus"] for info in infos) == 16


def run(*job_ids):
    """A Run message of jobs of function 1, one payload frame each."""
    return [P.encode(P.Run, [(job_id, 1, 1, 0, 1) for job_id in job_ids]),
            *(b"args" for _ in job_ids)]


def table_sizes(b):
    """Every table of the broker that grows with clients or nodes."""
    return {"clients": len(b.clients), "detached": len(b.detached),
            "fair clients": len(b.fair.clients), "fair jobs": len(b.fair._jobs),
            "watched": len(b.watch.beats), "tasks": len(b.tasks), "ports": len(b.ports),
            "forgotten": len(b.forgotten), "kept results": b.keeping.results,
            "busy": sum(port.busy for port in b.ports)}


def test_a_churn_of_clients_and_found_nodes_leaves_the_tables_at_a_fixed_size(
        fake_legs, monkeypatch):
    """A scheduler runs for days: clients come (with jobs) and go (Bye,
    closed, or gone with a recover_file), found nodes are lost and
    forgotten; what it holds for them stops growing at its bounds."""
    from dpool.core import broker as broker_module
    monkeypatch.setattr(broker_module, "MAX_DETACHED", 8)
    monkeypatch.setattr(broker_module, "MAX_FORGOTTEN", 16)

    async def churn(b, n, round_):
        for i in range(n):
            recoverable = i % 3 == 2
            options = {"weight": 1, **({"recover_token": f"{round_}-{i}"} if recoverable
                                        else {})}
            session = connect(b, options)
            await poll(lambda: session.told_cpus)
            session.conn.on_message([P.encode(P.Func, 1), b"fn"])
            session.conn.on_message(run(1, 2, 3))
            await poll(lambda: session.placed)
            if i % 3 == 0:
                session.conn.on_message([P.encode(P.Bye)])
            else:  # closed without Bye; a recoverable one is kept
                session.conn.closed = True
                session.conn.on_close(ConnectionResetError("gone"))
                while recoverable and session.placed:  # its jobs end while it is away
                    leg = next(iter(session.placed.values()))[0]
                    session.on_leg_message(leg, *done_from_node(session, leg))
        for i in range(3 * n // 10):  # found nodes, lost for long: forgotten
            port = fake_node(b, f"10.9.{round_}.{i}")
            port.found = True
            b.ports.append(port)
            b.forget(port)
        await poll(lambda: not b.tasks)

    async def main():
        b = broker()
        b.ports.extend(fake_node(b, f"10.0.0.{i}") for i in range(3))
        for port in b.ports:
            b.node_ready(port)
        await churn(b, 60, 0)
        first = table_sizes(b)
        await churn(b, 300, 1)
        second = table_sizes(b)
        await b.close()
        return first, second

    first, second = asyncio.run(main())
    assert first == second, (first, second)
    assert second["detached"] == 8 and second["forgotten"] == 16
    assert second["clients"] == second["fair clients"] == 8  # the detached ones
    assert second["watched"] == second["tasks"] == 0 and second["ports"] == 3


def done_from_node(session, leg):
    """A Done for one of ``session``'s jobs on ``leg``, as its node sends it."""
    job_id = next(job for job, where in session.placed.items() if where[0] is leg)
    frames = done(job_id)
    return P.decode(frames[0]), frames
