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
