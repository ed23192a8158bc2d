"""A worker serving a client's channel (node/worker.py on_channel): the
node passes the channel's socket and record state; the worker answers the
client's Runs on it with their attempts, and serves the node again
(Returned) once the client releases the channel or it ends.  The worker is
the in-process class; the client is a BlockingConnection with the mirror
record state (the hand-off itself: tests/transport/test_handoff.py)."""
import array
import os
import socket
import threading

import pytest

from dpool import protocol as P
from dpool import serialize
from dpool.node import reaper
from dpool.node.worker import Worker
from dpool.transport.blocking import BlockingConnection
from dpool.transport.frames import encode, in_stream
from dpool.transport.handoff import RecordState

pytestmark = pytest.mark.timeout(30)


def _double(x):
    return 2 * x


class Setup:
    """A worker thread with its node link, and a channel lent to it."""

    def __init__(self, fns=()):
        node_side, worker_side = socket.socketpair()
        self.node = BlockingConnection(node_side)
        self.worker = Worker(BlockingConnection(worker_side, fds=True))
        self.worker.fns.update(fns)   # (functions the node sent it before)
        ours, theirs = socket.socketpair()
        keys = os.urandom(32), os.urandom(32)
        state = RecordState(keys[0], 3, keys[1], 5)         # (as if after other records)
        self.client = BlockingConnection(ours, records=RecordState(keys[1], 5, keys[0], 3))
        self.thread = threading.Thread(target=self._serve_one, daemon=True)
        wire = b"".join(in_stream(encode([P.encode(P.Channel, ""), state.pack()])))
        node_side.sendmsg([wire], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [theirs.fileno()]))])
        theirs.close()        # (the node's copy: the worker owns the channel)
        self.error = None
        self.thread.start()

    def _serve_one(self):
        try:
            frames = self.worker.conn.recv()
            self.worker.handlers[type(P.decode(frames[0]))](P.decode(frames[0]), frames)
        except BaseException as exc:  # (reported by the test)
            self.error = exc

    def close(self):
        self.client.close()
        self.thread.join(10)
        self.node.close()
        self.worker.conn.close()


@pytest.fixture
def lent(monkeypatch):
    # (in-process: the worker's after-job sweep would kill this test run's children)
    monkeypatch.setattr(reaper, "kill_children", lambda keep: 0)
    setup = Setup()
    yield setup
    setup.close()


def _call(client, job_id, x, attempt, fn_id=1):
    payload = serialize.dumps(((x,), {}))
    client.send([P.encode(P.Run, [P.run_item(job_id, fn_id, len(payload), int(P.Call.CALL),
                                             attempt)]), *payload])
    msg, *rest = client.recv()
    [(record, frames)] = P.results(P.decode(msg), [msg, *rest])
    return record, frames


def _function_frame():
    return serialize.dumps_function(_double)


def test_a_lent_worker_serves_the_channel_then_the_node(lent):
    client = lent.client
    assert type(P.decode(lent.node.recv()[0])) is P.Channel     # taken
    ready = P.decode(client.recv()[0])
    assert type(ready) is P.Ready and ready.info["pid"] == os.getpid()
    client.send([P.encode(P.Func, 1), _function_frame()])
    for i, attempt in [(1, 1), (2, 3)]:
        record, frames = _call(client, i, 10 * i, attempt)
        assert (record.job_id, record.outcome, record.attempt) == (i, P.Outcome.OK, attempt)
        assert serialize.loads(frames) == 20 * i
    client.send([P.encode(P.Release)])
    assert type(P.decode(lent.node.recv()[0])) is P.Returned
    lent.thread.join(10)
    assert lent.error is None and not lent.thread.is_alive()
    assert client.poll(10)            # the worker closed its end
    with pytest.raises(ConnectionError):
        client.recv()


def test_a_channel_that_ends_or_breaks_returns_the_worker(lent):
    client = lent.client
    assert type(P.decode(lent.node.recv()[0])) is P.Channel
    P.decode(client.recv()[0])
    client._sock.sendall(b"\x20\x00\x00\x00" + b"x" * 32)   # a record that fails its tag
    assert type(P.decode(lent.node.recv()[0])) is P.Returned
    lent.thread.join(10)
    assert lent.error is None


def test_a_client_gone_mid_call_returns_the_worker(lent):
    client = lent.client
    assert type(P.decode(lent.node.recv()[0])) is P.Channel
    P.decode(client.recv()[0])
    client.close()
    assert type(P.decode(lent.node.recv()[0])) is P.Returned
    lent.thread.join(10)
    assert lent.error is None


def test_functions_sent_on_a_channel_are_dropped_when_it_ends(monkeypatch):
    """The node never learns of the functions a client sends on a channel
    (no Forget reaches them), and each channel the client opens again sends
    its own (up to tcpline.NODE_FUNCTIONS): kept, they piled up in the
    worker with every channel it served.  Those the node had sent it stay."""
    monkeypatch.setattr(reaper, "kill_children", lambda keep: 0)
    lent = Setup(fns={2: _function_frame()})
    try:
        client = lent.client
        assert type(P.decode(lent.node.recv()[0])) is P.Channel
        P.decode(client.recv()[0])
        for fn_id in (1, 2):
            client.send([P.encode(P.Func, fn_id), _function_frame()])
            record, frames = _call(client, fn_id, 5, 1, fn_id=fn_id)
            assert record.outcome == P.Outcome.OK and serialize.loads(frames) == 10
        client.send([P.encode(P.Release)])
        assert type(P.decode(lent.node.recv()[0])) is P.Returned
        lent.thread.join(10)
        assert lent.error is None
        assert list(lent.worker.fns) == [2]
    finally:
        lent.close()
