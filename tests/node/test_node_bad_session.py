"""A Session with a bad option value is refused by the node with a clear
error, before any CPU is granted: the node's CPUs stay whole for the
next client."""
import asyncio

import pytest

from dpool import protocol as P
from dpool.core.client import client_hello
from dpool.transport import connect

pytestmark = pytest.mark.timeout(60)

BAD_OPTIONS = [{"cpus": 1.5}, {"cpus": float("nan")}, {"cpus": float("inf")},
               {"cpus": "many"}, {"cpus": -1}, {"pulse_interval": "often"},
               {"pulse_interval": float("nan")}, {"pulse_interval": float("inf")},
               {"heartbeat": (float("nan"), 10.0)}, {"heartbeat": (1.0, float("nan"))},
               {"heartbeat": (float("inf"), 10.0)}, {"heartbeat": (1.0, float("inf"))}]


async def first_reply(port, secret, options):
    conn = await connect("127.0.0.1", port, secret=secret, hello=client_hello(), timeout=10)
    got: asyncio.Queue = asyncio.Queue()
    conn.set_receiver(got.put_nowait, lambda exc=None: got.put_nowait(None))
    conn.send([P.encode(P.Session, options)])
    try:
        frames = await asyncio.wait_for(got.get(), 10)
        return frames and P.decode(frames[0])
    finally:
        conn.abort()


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=repr)
def test_a_bad_session_option_is_refused_and_costs_no_cpu(dpool_node, node_secret, options):
    reply = asyncio.run(first_reply(dpool_node.port, node_secret, options))
    assert type(reply) is P.Refused and next(iter(options)) in reply.reason, reply
    reply = asyncio.run(first_reply(dpool_node.port, node_secret, {}))
    assert type(reply) is P.Ready and reply.info["cpus"] == 2, reply
    assert dpool_node.proc.poll() is None
