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
    peer = "client"

    def __init__(self):
        self.sent = []

    def send(self, frames):
        self.sent.append(list(frames))

    def send_all(self, messages):  # (in one write: the order is what counts here)
        for frames in messages:
            self.send(frames)


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


def test_results_waiting_when_the_scheduler_ends_the_session_go_first():
    # (Broker.close after drain: a result read in the pass that ends the
    # session is the client's, not dropped: it ran once, it is not run again)
    a = leg()
    session = session_with_jobs_on({a: [1]})
    session.broker.fair.remove_client = lambda client: None
    session.broker.clients, session.broker.exclusive = set(), None
    session.broker.watch = types.SimpleNamespace(discard=lambda conn: None)
    session.broker.pinned = 0
    session.conn.close = lambda: setattr(session.conn, "closed", True)
    deliver(session, [(a, done_message(1))], then=lambda: session.end("scheduler shutting down"))
    assert received(session) == [("Done", [1], [b"result 1"])]
    assert session.conn.closed


class FakeKeeping:
    results = bytes = 0

    def within(self):
        return True


def test_results_read_in_the_pass_of_a_recover_come_after_ready_and_the_kept_ones():
    # The client trusts a Done only for the jobs Ready(recovered) listed: a
    # result sent before it would close the recovered session (client._on_done)
    a = leg()
    session = session_with_jobs_on({a: [1, 2]})
    broker = session.broker
    broker.watch = types.SimpleNamespace(discard=lambda conn: None)
    broker.keep_results, broker.keeping, broker.detached = 60.0, FakeKeeping(), {}
    broker.clients, broker.info = set(), lambda: {"cpus": 1, "name": "sched"}
    session.options = {"recover_token": "tok"}

    async def run():
        session.detach(None)
        session.on_leg_message(a, P.decode(done_message(1)[0]), done_message(1))
        await asyncio.sleep(0)  # kept
        session.on_leg_message(a, P.decode(done_message(2)[0]), done_message(2))
        new = ClientSession(broker, FakeConn(), 2)  # Recover read in the same pass
        new.conn.set_receiver = lambda *handlers: None
        new.on_recover(P.Recover("tok", False), [])
        for _ in range(3):
            await asyncio.sleep(0)
        return new.conn
    session.conn = asyncio.run(run())
    got = received(session)
    assert got[0][0] == "Ready" and got[0][1][0]["kept"] == [1, 2]
    assert got[1:] == [("Done", [1], [b"result 1"]), ("Done", [2], [b"result 2"])]


def test_a_merged_message_stays_within_what_the_client_receives():
    # The client's Limits (transport.frames) close a connection whose message
    # declares more frames than max_frames: merging many nodes' results must
    # not make one from messages each within it
    from dpool.transport.frames import Limits
    limit = Limits().max_frames
    each = limit // 4
    legs = [leg() for _ in range(6)]
    ids = iter(range(1, 6 * each + 1))
    jobs = {where: [next(ids) for _ in range(each)] for where in legs}
    session = session_with_jobs_on(jobs)
    deliver(session, [(where, done_message(*job_ids)) for where, job_ids in jobs.items()])
    assert all(len(frames) <= limit for frames in session.conn.sent)
    got = [job_id for _, job_ids, _ in received(session) for job_id in job_ids]
    assert got == list(range(1, 6 * each + 1))  # each once, in order


def test_large_results_are_not_merged_past_the_bytes_limit(monkeypatch):
    # (bytes: max_message_bytes is 8 GiB; a smaller bound stands in for it)
    from dpool.core import resultmerge
    monkeypatch.setattr(resultmerge, "MERGE_MAX_BYTES", 100)
    a, b, c = leg(), leg(), leg()
    session = session_with_jobs_on({a: [1], b: [2], c: [3]})
    big = [P.encode(P.Done, [P.result(1, P.Outcome.OK, 1)]), b"x" * 150]
    deliver(session, [(a, big), (b, done_message(2)), (c, done_message(3))])
    assert session.conn.sent[0] == big  # as it came
    assert received(session)[1:] == [("Done", [2, 3], [b"result 2", b"result 3"])]


def test_starts_of_a_pass_go_as_one_message_ahead_of_its_results():
    """A client's futures run once their job starts (notify_start): the
    nodes' Started notices of one pass reach it as one message, before the
    pass's Done, which they no longer split."""
    a, b = leg(), leg()
    session = session_with_jobs_on({a: [1, 2], b: [3]})
    session.options = {"notify_start": True}
    deliver(session, [(a, [P.encode(P.Started, [(2, 10.0)])]), (a, done_message(1)),
                      (b, [P.encode(P.Started, [(3, 11.0)])]), (a, done_message(2))])
    assert received(session) == [("Started", ([(2, 10.0, "node"), (3, 11.0, "node")],), []),
                                 ("Done", [1, 2], [b"result 1", b"result 2"])]


# A node is trusted with its own jobs only (a confused or compromised node
# knows the secret): what it says of another node's jobs, or of none, is
# dropped with one log line, and the rightful node's job goes on.

def test_a_node_cannot_answer_for_a_job_placed_on_another_node(caplog):
    a, b = leg(), leg()
    session = session_with_jobs_on({a: [1], b: [2]})
    deliver(session, [(b, done_message(1, 2)), (b, done_message(1))])
    assert received(session) == [("Done", [2], [b"result 2"])]
    assert session.placed[1][0] is a and a.port.busy == 1 and b.port.busy == 0
    assert session.running == 1 and session.broker.fair.ended == [2]
    assert [r.getMessage().count("not placed there") for r in caplog.records] == [1]
    deliver(session, [(a, done_message(1))])  # the rightful node's result still counts
    assert received(session)[1:] == [("Done", [1], [b"result 1"])]
    assert not session.placed and a.port.busy == 0


def test_a_node_cannot_start_or_give_back_another_nodes_job(caplog):
    a, b = leg(), leg()
    session = session_with_jobs_on({a: [1], b: [2]})
    session.options = {"notify_start": True}
    fair = session.broker.fair
    session.broker.draining = False
    fair.requeue = lambda job: fair.ended.append(("requeued", job[1]))
    fair.use_nodes = lambda session, nodes: None
    deliver(session, [(b, [P.encode(P.Started, [(1, 10.0), (2, 11.0)])]),
                      (b, [P.encode(P.GiveBack, [1])]),
                      (b, [P.encode(P.Provisional, 1), b"partial"]),
                      (a, done_message(1))])
    assert received(session) == [("Started", ([(2, 11.0, "node")],), []),
                                 ("Done", [1], [b"result 1"])]
    assert session.broker.fair.ended == [1] and 1 not in session.pending


def test_a_result_sent_twice_in_one_done_still_reaches_the_client_once(caplog):
    # The first record is the node's own job's result: the second one (the
    # same id, done there already) is refused, not the first with it (the
    # job was counted done, never told: the client waited for it forever).
    a = leg()
    session = session_with_jobs_on({a: [1, 2]})
    deliver(session, [(a, done_message(1, 2, 1))])
    assert received(session) == [("Done", [1, 2], [b"result 1", b"result 2"])]
    assert not session.placed and a.port.busy == 0 and session.running == 0
    assert [r.getMessage().count("not placed there") for r in caplog.records] == [1]
