"""The node session's I/O towards its workers, without processes: a
worker's connection that is closing when the session sends to it."""
import asyncio

from dpool import protocol as P
from dpool.node.runtime import Session, WorkerHandle
from dpool.transport import inproc_pair


class ClientConn:
    """The client's side as the session sees it: what was sent."""
    closed = False
    peer = "client"

    def __init__(self):
        self.sent = []

    def send(self, frames):
        self.sent.append(frames)


def test_a_run_for_a_worker_whose_connection_is_closing_does_not_fail_the_clients_message():
    """The worker's connection closed (it died, or it is being killed) and
    its close callback has not run yet: the session's RUN to it raised
    ConnectionClosed out of the client's RUN handler (the client's
    connection is then closed with it).  Its close callback moves the job."""
    async def main():
        ours, theirs = inproc_pair()
        session = Session(node=None, conn=ClientConn(), sid=1)
        worker = WorkerHandle(pid=1, conn=ours, max_tasks=None, zygote=None)
        session._act(session.dispatcher.add_worker(worker))
        ours.close()  # closing: its close callback runs on a later loop pass
        session.on_message([P.encode(P.Func, 7), b"the function"])
        session.on_message([P.encode(P.Run, [P.run_item(1, 7, 1, 0)]), b"its arguments"])
        assert list(worker.outstanding) == [1]  # the dispatcher gave it that job
        session.on_message([P.encode(P.Forget, [7])])  # and the next sends are skipped too
        theirs.close()
        await asyncio.sleep(0)
    asyncio.run(main())


def test_results_are_held_while_jobs_wait_and_go_out_together(monkeypatch):
    """While jobs wait in the session's queue a worker's result is held
    (Dispatcher.hold, here made long), so that the next results go out in
    the same Done; it goes out at once when no other job is left here."""
    from dpool.node import dispatch

    monkeypatch.setattr(dispatch, "HOLD_FRACTION", 100.0)
    monkeypatch.setattr(dispatch, "HOLD_MAX", 60.0)

    def result(job_id):
        return [P.encode(P.Done, [P.result(job_id, P.Outcome.OK, 1, 10.0, 11.0)]),
                b"result %d" % job_id]

    def dones(conn):
        return [[r[0] for r in P.decode(frames[0]).results] for frames in conn.sent]

    async def main():
        pairs = [inproc_pair() for _ in range(2)]
        client = ClientConn()
        session = Session(node=None, conn=client, sid=1)
        a, b = [WorkerHandle(pid=i, conn=ours, max_tasks=None, zygote=None)
                for i, (ours, _) in enumerate(pairs)]
        session._act(session.dispatcher.add_worker(a))
        session._act(session.dispatcher.add_worker(b))
        session.on_message([P.encode(P.Func, 7), b"the function"])
        session.on_message([P.encode(P.Run, [P.run_item(i, 7, 1, 0) for i in (1, 2, 3, 4)]),
                            b"a1", b"a2", b"a3", b"a4"])
        session.on_worker_message(a, result(1))  # jobs 3 and 4 wait in the queue
        for _ in range(5):
            await asyncio.sleep(0)
        assert dones(client) == []  # held
        assert list(a.outstanding) == [3]
        session.on_worker_message(b, result(2))  # job 4 still waits: held too
        for _ in range(5):
            await asyncio.sleep(0)
        assert dones(client) == [] and list(b.outstanding) == [4]
        session.on_worker_message(a, result(3))  # nothing waits now: out in the next pass
        assert dones(client) == []
        for _ in range(3):
            await asyncio.sleep(0)
        assert dones(client) == [[1, 2, 3]]
        assert [bytes(f) for f in client.sent[0][1:]] == [b"result 1", b"result 2", b"result 3"]
        session.on_worker_message(b, result(4))  # the last job here: out at once
        assert dones(client) == [[1, 2, 3], [4]]
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        await asyncio.sleep(0)
    asyncio.run(main())
