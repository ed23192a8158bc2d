"""Nodes joining a running dpool-scheduler, at a scale this machine can't host.

    python bench/bench_sched_join.py [--nodes 1000 10000] [--clients 4]

The real Broker (dpool/core/broker.py) with fake node and client
connections (tests/sched/test_sched_tables.py's, no sockets): ``--clients``
clients have sessions open on one node, then nodes join one per event-loop
iteration (as their handshakes end, one by one), each opening a leg for
every client.  Printed for each count of nodes: the scheduler's CPU time per
node joining (``time.process_time``), and the Ready messages and bytes each
client got.  The first count is the reference of the run: a per-node cost
that stays the same at 10x the nodes is linear.  (Before issue 11's changes
each join cost O(nodes) per client and each client got one Ready per node
listing every node: 4,000 nodes took 5.6 s of CPU for one client, 18.9 s
with a placement pass per join.)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests", "sched"), os.path.join(HERE, "..", "tests")]

import test_sched_tables as T  # noqa: E402  (the fakes)
from dpool.core.broker import ClientSession  # noqa: E402
from dpool.core.nodeport import Link  # noqa: E402


def fake_open_leg(self, port):
    if self.ended or port in self.legs or not self.wants(port):
        return None
    leg = self.legs[port] = Link(port)
    leg.ready, leg.conn = True, T.FakeConn(f"leg {port}")
    self.recheck(port)
    self.sync_soon()
    return self.broker.spawn(asyncio.sleep(0))


async def join(nodes: int, clients: int) -> tuple[float, int, int]:
    b = T.broker()
    b.ports.append(T.fake_node(b, "10.0.0.1"))
    b.node_ready(b.ports[0])
    sessions = [T.connect(b) for _ in range(clients)]
    await T.poll(lambda: all(s.told_cpus for s in sessions))
    before = [len(s.conn.sent) for s in sessions]
    start = time.process_time()
    for i in range(nodes):
        port = T.fake_node(b, f"10.{1 + i // 62500}.{i // 250 % 250}.{i % 250}")
        b.ports.append(port)
        b.node_ready(port)
        await asyncio.sleep(0)  # one join per loop iteration
    await T.poll(lambda: all(s.told_cpus == 8 * (nodes + 1) for s in sessions), 600)
    cpu = time.process_time() - start
    readies = [T.readies(_Sent(s.conn.sent[n:])) for s, n in zip(sessions, before)]
    await b.close()
    return cpu, max(len(r) for r in readies), max(sum(size for _, size in r) for r in readies)


class _Sent:
    def __init__(self, sent: list) -> None:
        self.sent = sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    ClientSession.open_leg = fake_open_leg  # type: ignore[method-assign]
    print(f"# {' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}; load "
          f"{os.getloadavg()[0]:.1f}")
    reference = None
    for nodes in args.nodes:
        cpu, messages, size = asyncio.run(join(nodes, args.clients))
        per_node = cpu / nodes
        reference = reference or per_node
        print(f"{nodes:>6} nodes, {args.clients} clients: {per_node * 1e6:7.1f} us of CPU per "
              f"node joining ({per_node / reference:.2f}x the first), {messages} Ready "
              f"messages and {size} bytes per client")


if __name__ == "__main__":
    main()
