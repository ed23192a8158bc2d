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


class BatchingClientConn(ClientConn):
    """... and which messages went out together (Connection.send_all)."""

    def send_all(self, messages):
        self.sent.append(("together", [P.decode(frames[0]) for frames in messages]))


def _done(job_id):
    return [P.encode(P.Done, [P.result(job_id, int(P.Outcome.OK), 1, 1.0, 1.001)]), b"result"]


def test_the_node_tells_a_job_started_when_its_worker_takes_it_up():
    """notify_start: the node, not the worker, says when a job starts (the
    worker sends only its results): at once for a job given to a worker that
    had none; for a job waiting in the worker behind another, when that
    one's result comes, in one write with that result.  A job cancelled
    while it waited in the worker is never told started."""
    async def main():
        ours, theirs = inproc_pair()
        conn = BatchingClientConn()
        session = Session(node=None, conn=conn, sid=1)
        session.options = {"notify_start": True}
        worker = WorkerHandle(pid=1, conn=ours, max_tasks=None, zygote=None)
        session.dispatcher.depth = 2  # short jobs: the next one waits in the worker
        session._act(session.dispatcher.add_worker(worker))
        session.on_message([P.encode(P.Func, 7), b"the function"])
        session.on_message([P.encode(P.Run, [P.run_item(job, 7, 1, 0) for job in (1, 2, 3)]),
                            b"a", b"b", b"c"])
        assert list(worker.outstanding) == [1, 2]
        await asyncio.sleep(0)
        (started,) = conn.sent
        assert P.decode(started[0]) == P.Started([(1, started_at(started, 0))])
        conn.sent.clear()

        session.on_worker_message(worker, _done(1))  # 2 starts, 3 goes to the worker
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        (together,) = conn.sent
        assert together[0] == "together"
        started, done = together[1]
        assert [job for job, _ in started.jobs] == [2] and [r[0] for r in done.results] == [1]
        assert list(worker.outstanding) == [2, 3]
        conn.sent.clear()

        session.on_message([P.encode(P.Cancel, [3])])  # waiting in the worker: a ghost
        session.on_worker_message(worker, [P.encode(P.GiveBack, [3])])  # (ahead of 2's result)
        session.on_worker_message(worker, _done(2))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        kinds = [type(P.decode(frames[0])).__name__ if frames[0] != "together" else
                 [type(m).__name__ for m in frames[1]] for frames in conn.sent]
        assert "Started" not in str(kinds), kinds  # (3 was cancelled: no start for it)
        session.on_worker_message(worker, _done(3))  # its result is dropped
        ours.close()
        theirs.close()
        await asyncio.sleep(0)
    asyncio.run(main())


def started_at(frames, index):
    return P.decode(frames[0]).jobs[index][1]
