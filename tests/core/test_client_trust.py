"""Issue 8, finding 9: the client trusts a node only with the jobs it gave it.

A node that knows the secret may answer for jobs it was never given (ones
running on another node, or that don't exist): the client must not take
those results, provisional results or files, and closes that node's link.
"""
import asyncio
import logging
import sys
import threading

import cloudpickle
import pytest

from dpool import protocol as P
from dpool import serialize
from dpool.core.client import Client
from dpool.dispy.env import JobEnv
from dpool.errors import ConnectionClosed
from dpool.transport import PROTOCOL_VERSION, start_server
from helpers import poll_for, read_marker
from tasks import hold

pytestmark = pytest.mark.timeout(60)


class RogueNode:
    """A node that knows the secret and lies: in a thread of its own."""

    def __init__(self, secret):
        self.secret = secret
        self.conn = None
        self.closed = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rogue-node")

    def __enter__(self):
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.address = ("127.0.0.1", self.server.port)
        return self

    def __exit__(self, *exc):
        async def stop():
            self.server.close(abort_connections=True)
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self):
        hello = {"protocol": PROTOCOL_VERSION, "role": "node", "name": "rogue", "cpus": 1,
                 "free_cpus": 1, "python": "%d.%d" % sys.version_info[:2],
                 "cloudpickle": cloudpickle.__version__}
        return await start_server(self._serve, "127.0.0.1", 0, secret=self.secret,
                                  hello=hello)

    async def _serve(self, conn):
        self.conn = conn
        try:
            while True:
                msg = P.decode((await conn.recv())[0])
                if isinstance(msg, P.Session):
                    conn.send([P.encode(P.Ready, {"name": "rogue", "cpus": 1, "free_cpus": 0,
                                                "dir": "/", "pid": 1})])
        except ConnectionClosed:
            self.closed.set()

    def send(self, *messages):
        def send():
            for message in messages:
                self.conn.send(message)
        self.loop.call_soon_threadsafe(send)


def forged_result(job_id, value):
    payload = serialize.dumps(value)
    record = P.result(job_id, P.Outcome.OK, len(payload), 1.0, 2.0, "", "")
    return [P.encode(P.Done, [record]), *payload]


@pytest.fixture
def rogue(dpool_node):
    with RogueNode(dpool_node.secret) as node:
        yield node


def connect_both(dpool_node, rogue, events, env=True):
    client = Client([dpool_node.address, rogue.address], secret=dpool_node.secret,
                    connect_timeout=5, on_event=lambda kind, obj: events.append((kind, obj)))
    if env:
        JobEnv(client)  # files and provisional results are the job environment's
    client.start()
    poll_for(lambda: rogue.conn is not None, 5, message="the rogue's session")
    real = [link for link in client.nodes() if link.name != "rogue"]
    return client, real[0]


def test_a_node_cannot_answer_for_a_job_another_node_runs(dpool_node, rogue, tmp_path,
                                                         caplog):
    caplog.set_level(logging.WARNING, "dpool")
    marker, gate = str(tmp_path / "marker"), str(tmp_path / "gate")
    events = []
    client, real = connect_both(dpool_node, rogue, events)
    try:
        job = client.submit(hold, (marker, gate), pin=real)
        (pid,), _ = read_marker(marker)
        payload = serialize.dumps("provisional")
        rogue.send([P.encode(P.SendFile, job.id, "evil.txt"), b"evil"],
                   [P.encode(P.Provisional, job.id), *payload],
                   forged_result(job.id, "forged"))
        assert rogue.closed.wait(10), "the client kept the lying node's link open"
        open(gate, "w").close()
        assert job.future.result(timeout=10) == pid       # the real node's result
    finally:
        client.close()
    assert not [kind for kind, _ in events if kind in ("file", "provisional")]
    assert any("rogue" in r.getMessage() and f"job {job.id}" in r.getMessage()
               and "not given to it" in r.getMessage() for r in caplog.records), caplog.text


def test_a_message_the_client_does_not_expect_closes_the_link(dpool_node, rogue, caplog):
    """A job-environment message to a client without the JobEnv extension
    (an Executor's, a Pool's): one clear log line, the link closed."""
    caplog.set_level(logging.WARNING, "dpool")
    client, _ = connect_both(dpool_node, rogue, [], env=False)
    try:
        rogue.send([P.encode(P.AvailInfo, {})])
        assert rogue.closed.wait(10), "the client kept the link open"
        assert [link.name for link in client.nodes()] != ["rogue"]
    finally:
        client.close()
    assert "rogue sent AVAILINFO, which this client does not expect" in caplog.text


def test_a_result_for_a_job_never_sent_closes_the_link(dpool_node, rogue, caplog):
    caplog.set_level(logging.WARNING, "dpool")
    client, _ = connect_both(dpool_node, rogue, [])
    try:
        rogue.send(forged_result(999, "forged"))
        assert rogue.closed.wait(10), "the client kept the lying node's link open"
        assert client.submit(abs, (-4,)).future.result(timeout=10) == 4
    finally:
        client.close()
    assert any("rogue" in r.getMessage() and "job 999" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_node_cannot_answer_for_a_file_sent_to_another_node(dpool_node, caplog):
    """File requests are numbered by the client (1, 2, ...), so a lying node
    can guess the number of one sent to another node: its FileDone must not
    settle that request."""
    caplog.set_level(logging.WARNING, "dpool")
    with RogueNode(dpool_node.secret) as silent, RogueNode(dpool_node.secret) as liar:
        client = Client([silent.address, liar.address], secret=dpool_node.secret,
                        connect_timeout=5)
        env = JobEnv(client)  # send_file is the job environment's
        client.start()
        try:
            poll_for(lambda: silent.conn is not None and liar.conn is not None, 5,
                     message="both sessions")
            to_silent = [link for link in client.nodes() if link.address[1] == silent.address[1]]
            waiter = env.send_file(to_silent[0], "data.txt", b"data")
            liar.send([P.encode(P.FileDone, 1, None)])        # the first request's number
            assert liar.closed.wait(10), "the client kept the lying node's link open"
            assert not waiter.done(), "a node settled a file request sent to another node"
        finally:
            client.close()
    assert any("file request" in r.getMessage() and "not sent to it" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_file_request_fails_when_its_node_goes_away(dpool_node):
    """A file sent to a node whose connection then closes, before it
    answered, must fail its waiter with a reason instead of waiting forever
    (``JobCluster.send_file(..., timeout=None)`` hung)."""
    with RogueNode(dpool_node.secret) as silent:
        client = Client([silent.address], secret=dpool_node.secret, connect_timeout=5)
        env = JobEnv(client)
        client.start()
        try:
            poll_for(lambda: silent.conn is not None, 5, message="the session")
            waiter = env.send_file(client.nodes()[0], "data.txt", b"data")
            silent.loop.call_soon_threadsafe(silent.conn.abort)
            error = waiter.result(timeout=10)
            assert error and "rogue" in error, error
        finally:
            client.close()
