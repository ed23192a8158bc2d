"""How the scheduler passes the nodes' results on to a client (broker.py):
the Done messages of several nodes read in one pass of the loop go to the
client as one message, in order, before anything sent to it after them.
In-process fakes: no sockets, no nodes."""
import asyncio
import types

import pytest

from dpool import protocol as P
from dpool.core.broker import ClientSession

pytestmark = pytest.mark.timeout(10)


class FakeConn:
    closed = False

    def __init__(self):
        self.sent = []

    def send(self, frames):
        self.sent.append(list(frames))


class FakeFair:
    def __init__(self):
        self.ended = []

    def done(self, job):
        self.ended.append(job[1])


def session_with_jobs_on(legs_jobs):
    """A ClientSession whose jobs ``{leg: [job ids]}`` are placed on fake legs."""
    broker = types.SimpleNamespace(fair=FakeFair(), place_soon=lambda: None,
                                   reopen=lambda port: None)
    session = ClientSession(broker, FakeConn(), 1)
    for leg, job_ids in legs_jobs.items():
        for job_id in job_ids:
            leg.port.busy += 1
            session.running += 1
            session.placed[job_id] = (leg, (job_id, 0, 1, 0, 0), [])
    return session


class FakeLeg:
    def __init__(self):
        self.port = types.SimpleNamespace(busy=0, host="node")


def leg():
    return FakeLeg()


def done_message(*job_ids):
    """A node's Done for ``job_ids``, one payload frame each."""
    results = [P.result(job_id, P.Outcome.OK, 1) for job_id in job_ids]
    return [P.encode(P.Done, results), *(b"result %d" % job_id for job_id in job_ids)]


def deliver(session, messages, then=None):
    """Each (leg, frames) reaches the session in one pass of the loop; then
    ``then()`` in the same pass; then the loop runs on."""
    async def run():
        for where, frames in messages:
            session.on_leg_message(where, P.decode(frames[0]), frames)
        if then is not None:
            then()
        for _ in range(3):
            await asyncio.sleep(0)
    asyncio.run(run())


def received(session):
    """The messages the client got: (kind, job ids or fields, payload frames)."""
    out = []
    for frames in session.conn.sent:
        msg = P.decode(frames[0])
        if type(msg) is P.Done:
            out.append(("Done", [r[0] for r in msg.results], [bytes(f) for f in frames[1:]]))
        else:
            out.append((type(msg).__name__, tuple(msg), []))
    return out


def test_results_of_several_nodes_in_one_pass_reach_the_client_as_one_message():
    a, b = leg(), leg()
    session = session_with_jobs_on({a: [1, 2], b: [3]})
    deliver(session, [(a, done_message(1, 2)), (b, done_message(3))])
    assert received(session) == [("Done", [1, 2, 3], [b"result 1", b"result 2", b"result 3"])]
    assert session.broker.fair.ended == [1, 2, 3]
    assert a.port.busy == b.port.busy == 0 and not session.placed and session.running == 0


def test_a_lone_done_is_passed_on_as_the_node_sent_it():
    a = leg()
    session = session_with_jobs_on({a: [7]})
    frames = done_message(7)
    deliver(session, [(a, frames)])
    assert session.conn.sent == [frames]


def test_what_is_told_the_client_after_results_comes_after_them():
    a, b = leg(), leg()
    session = session_with_jobs_on({a: [1], b: [2]})
    deliver(session, [(a, done_message(1)), (b, done_message(2))],
            then=lambda: session.tell([P.encode(P.GiveBack, [5])]))
    assert received(session) == [("Done", [1, 2], [b"result 1", b"result 2"]),
                                 ("GiveBack", ([5],), [])]


def test_results_waiting_when_the_session_ends_are_not_sent():
    a = leg()
    session = session_with_jobs_on({a: [1]})
    deliver(session, [(a, done_message(1))], then=lambda: setattr(session, "ended", True))
    assert session.conn.sent == []
