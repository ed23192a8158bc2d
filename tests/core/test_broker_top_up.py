"""A scheduler's jobs ahead on a node (one client alone: a second job per
CPU waits there) are topped up in batches, not one per result: one Run for
several jobs (issue 11: fewer messages and wake-ups per job).  A CPU free
to run a job now is filled at once.  In-process fakes: Broker.place only."""
import types

import pytest

from dpool.core import broker as B

pytestmark = pytest.mark.timeout(10)


class FakeClient:
    placed: dict = {}

    def __init__(self):
        self.pending = [1]

    def stranded(self):
        return False


class FakePort:
    draining = False
    ready = True

    def __init__(self, cpus):
        self.cpus, self.busy = cpus, 0

    free = B.NodePort.free


def broker_with(port):
    """A Broker over ``port`` with one client that always has work; its
    ``_fill`` records what it is asked and makes the node that much busier."""
    broker = B.Broker([], secret=b"s" * 16)
    broker.ports = [port]
    broker.open_ports = {port: None}
    broker.clients = {FakeClient()}
    broker.fair = types.SimpleNamespace(backlogged=lambda: True)
    broker.fills = []

    def fill(port, free):
        if free > 0:
            broker.fills.append(free)
            port.busy += free
    broker._fill = fill
    return broker


def results(broker, port, n):
    """``n`` of the node's jobs end, each followed by a placement pass."""
    placed = []
    for _ in range(n):
        port.busy -= 1
        broker.open_ports[port] = None
        del broker.fills[:]
        broker.place()
        placed.append(sum(broker.fills))
    return placed


def test_jobs_ahead_are_topped_up_once_a_quarter_of_the_cpus_has_room():
    port = FakePort(8)
    broker = broker_with(port)
    broker.place()
    assert port.busy == 16  # one per CPU, then one more ahead
    # Two results (a quarter of 8 CPUs) make one Run of two jobs, not two of one.
    assert results(broker, port, 6) == [0, 2, 0, 2, 0, 2]
    assert port.busy in (15, 16)


def test_a_node_waiting_for_its_top_up_is_not_looked_at_again_until_a_job_ends_there():
    """(Placement looks at the nodes that may have room only: a node one
    job short of its jobs ahead leaves that set until a job ends there.)"""
    port = FakePort(8)
    broker = broker_with(port)
    broker.place()
    results(broker, port, 1)
    assert port.busy == 15 and port not in broker.open_ports


def test_a_free_cpu_is_filled_at_once():
    port = FakePort(8)
    broker = broker_with(port)
    port.busy = 6  # two CPUs have nothing to run (e.g. jobs given back)
    broker.place()
    assert broker.fills[0] == 2 and port.busy == 16


@pytest.mark.parametrize("cpus", [1, 2, 3])
def test_small_nodes_are_topped_up_at_each_result(cpus):
    port = FakePort(cpus)
    broker = broker_with(port)
    broker.place()
    assert results(broker, port, 3) == [1, 1, 1]


def test_several_clients_have_nothing_ahead():
    port = FakePort(8)
    broker = broker_with(port)
    broker.clients.add(FakeClient())
    broker.place()
    assert port.busy == 8
    assert results(broker, port, 2) == [1, 1]
