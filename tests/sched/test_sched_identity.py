"""One node found at two addresses is one node to dpool-scheduler (issue
11): nodes are told apart by the id each sends in its session's Ready,
after the authenticated handshake, not by the address they were reached at."""
import asyncio

from dpool.core.schedfind import Joiner
from helpers import start_node
from helpers_sched import NODE_CPUS, SECRET, start_scheduler
from test_sched_tables import broker, fake_node


def test_a_node_given_at_two_addresses_is_counted_once(tmp_path):
    node = start_node(tmp_path / "node", cpus=NODE_CPUS, secret=SECRET)
    try:
        sched = start_scheduler(tmp_path / "sched",
                                [("127.0.0.1", node.port), ("localhost", node.port)], SECRET)
        try:
            assert sched.cpus == NODE_CPUS, sched.out_path.read_text()
            assert "same node" in sched.stderr()
        finally:
            assert sched.terminate() == 0, sched.stderr()
    finally:
        node.terminate()


def test_a_node_found_again_at_another_address_is_not_joined_twice():
    """Given by name, then discovered by address (or heard through a relay):
    the second link is closed, the CPUs are counted once, and discovery
    knows the address so that it does not join it again."""
    async def main():
        b = broker()
        given = fake_node(b, "hosta", node_id="n1")
        other = fake_node(b, "hostb", node_id="n2")
        b.ports.extend([given, other])
        b.node_ready(given)
        b.node_ready(other)
        found = fake_node(b, "10.0.0.7", node_id="n1")
        found.found = True
        b.ports.append(found)
        b.node_ready(found)
        other.anchor.info = dict(other.anchor.info, id="n2-restarted")  # a new process
        b.node_ready(other)
        result = (b.total_cpus(), [p.host for p in b.ports], found.closed,
                  Joiner(b).knows(found.address), sorted(b.by_id))
        b.forget(given)  # the node it stood for is gone: its other address may join
        result += (Joiner(b).knows(found.address),)
        await b.close()
        return result
    cpus, hosts, closed, known, ids, known_after = asyncio.run(main())
    assert cpus == 16 and hosts == ["hosta", "hostb"] and closed and known
    assert ids == ["n1", "n2-restarted"]  # (what a node restarted had is not kept)
    assert not known_after


def test_a_given_node_joined_late_as_the_twin_of_a_found_one_is_not_lost_for_good(
        monkeypatch):
    """A node given by name answers late (the scheduler started first) and
    discovery found it at another address meanwhile: the given link is the
    twin and is closed.  When the found address is then lost for long and
    forgotten, the given address is joined again (retried as any given
    node), not dropped with it: nothing else would ever join it."""
    from dpool.core.broker import Broker
    rejoined = []
    monkeypatch.setattr(Broker, "rejoin", lambda self, port: rejoined.append(port))

    async def main():
        b = Broker([("hosta", 51350)], secret=b"s", name="sched")  # --nodes hosta
        given = b.ports[0]
        given.anchor = fake_node(b, "hosta", node_id="n1").anchor  # not answering yet:
        given.anchor.ready = False  # (retried in the background)
        given.anchor.port = given
        found = fake_node(b, "10.0.0.7", node_id="n1")
        found.found = True
        b.ports.append(found)
        b.node_ready(found)
        given.anchor.ready, given.cpus = True, 8  # answers: the same node, another address
        b.node_ready(given)
        twin = (given.closed, [p.host for p in b.ports])
        b.forget(found)  # the found address lost for long
        after = [(p.host, p.port, p.found, p.closed) for p in b.ports]
        await b.close()
        return twin, after

    twin, after = asyncio.run(main())
    assert twin == (True, ["10.0.0.7"])
    assert after == [("hosta", 51350, False, False)]
    assert [(p.host, p.port) for p in rejoined] == [("hosta", 51350)]
