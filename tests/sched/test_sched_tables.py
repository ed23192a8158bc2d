"""The scheduler's tables over a long run (issue 11): what a gone client or
node leaves behind is bounded, and what the clients are told of the nodes
grows with the changes, not with the nodes times the changes.  In-process:
a Broker with fake client connections, no sockets."""
import asyncio

from dpool import protocol as P
from dpool.core.broker import Broker, ClientSession


class FakeConn:
    """What a ClientSession uses of its client's Connection."""

    def __init__(self, peer="client"):
        self.peer = peer
        self.closed = False
        self.sent = []
        self.bytes_received = self.bytes_sent = 0

    def send(self, frames):
        self.sent.append(list(frames))

    def set_receiver(self, on_message, on_close):
        self.on_message, self.on_close = on_message, on_close

    def set_deadline(self, deadline):
        pass

    def close(self):
        self.closed = True

    abort = close


def broker():
    return Broker([], secret=b"s", name="sched")


def client(b, token=None):
    session = ClientSession(b, FakeConn(), next(b._sids))
    b.clients.add(session)
    session.options = {"recover_token": token} if token else {"x": 1}
    b.fair.add_client(session, 1.0, nodes=())
    return session


def done(job_id):
    return [P.encode(P.Done, [P.result(job_id, 0, 1)]), b"result"]


def test_status_counts_the_sessions_kept_for_recover_jobs():
    async def main():
        b = broker()
        gone = client(b, token="t1")
        gone.on_close(None)  # went away without Bye: detached, its results kept
        gone.tell(done(1))
        gone.tell(done(2))
        status = b.status()
        await b.close()
        return status
    status = asyncio.run(main())
    assert status["kept"] == 1 and status["kept_results"] == 2
