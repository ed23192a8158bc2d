"""The client's links (dpool.core.links) against scripted nodes: each
connect gets an in-process connection to a fake node that answers SESSION
as told (no sockets, no handshake)."""
import time

import pytest

from dpool import protocol as P
from dpool.core import links as links_module
from dpool.core.client import Client
from dpool.transport import inproc_pair
from helpers import poll_for

pytestmark = pytest.mark.timeout(60)

READY = {"name": "fake", "cpus": 1, "free_cpus": 1, "dir": "/", "pid": 1}


class ScriptedNodes:
    """Fake nodes by address: each SESSION is answered with the next of the
    address's answers ("busy", "refused" or "ready"); the last one repeats."""

    def __init__(self, answers):
        self.answers = {address: list(script) for address, script in answers.items()}
        self.sessions = {address: 0 for address in answers}

    async def connect(self, host, port, **_):
        ours, theirs = inproc_pair()
        address = (host, port)
        theirs.set_receiver(lambda frames: self._answer(address, theirs, frames))
        return ours

    def _answer(self, address, conn, frames):
        if not isinstance(P.decode(frames[0]), P.Session):
            return
        script = self.answers[address]
        answer = script.pop(0) if len(script) > 1 else script[0]
        self.sessions[address] += 1
        if answer == "ready":
            conn.send([P.encode(P.Ready, READY)])
        elif answer == "busy":
            conn.send([P.encode(P.Busy, "no free CPUs")])
            conn.close()
        else:
            conn.send([P.encode(P.Refused, "go away")])
            conn.close()


def test_a_busy_node_that_then_refuses_is_waited_for_again_when_busy_later(monkeypatch):
    """A node answered Busy (the client waits for it up to its connect
    timeout), then Refused: the busy wait's deadline was left behind, so
    when the node, added again later, was busy again the client gave it up
    at once (that old deadline had passed) instead of waiting for it."""
    good, moody = ("127.0.0.1", 1), ("127.0.0.1", 2)
    nodes = ScriptedNodes({good: ["ready"], moody: ["busy", "refused", "busy", "ready"]})
    monkeypatch.setattr(links_module, "connect", nodes.connect)
    timeout = 1.0
    client = Client([good, moody], connect_timeout=timeout).start()
    try:
        started = time.monotonic()
        poll_for(lambda: nodes.sessions[moody] == 2, message="the busy node's refusal")
        poll_for(lambda: time.monotonic() > started + timeout + 0.2, timeout=timeout + 5,
                 message="the first busy wait's deadline to pass")
        link, = client.add_nodes([moody])  # busy again: waited for, and ready next time
        assert link.busy
        poll_for(lambda: any(other.address == moody and other.ready
                             for other in client.links), message="the node used at last")
    finally:
        client.close()
