"""A detached session's stay (dpool.node.recovery.Kept), without processes:
its results are kept within limits, and it is discarded past them."""
import asyncio
from types import SimpleNamespace

from dpool.node import recovery


def fake_node():
    return SimpleNamespace(keep_results=60.0, detached={}, embedded=False,
                           keeping=recovery.Keeping())


class Session:
    """What Kept uses of a node session."""
    sid, cpus, ended, kept, why = 1, 1, False, None, None

    def __init__(self, node=None, token="token"):
        self.node = node or fake_node()
        self.options = {"recover_token": token}
        self.conn = SimpleNamespace(peer="client")
        self.out, self.out_frames, self.started = [], [], []
        self.dispatcher = SimpleNamespace(pending=lambda: [7])

    def end(self, why):
        self.why, self.ended = why, True
        self.kept.stop()
        self.kept = None


def kept_session(node=None, token="token"):
    session = Session(node, token)
    assert recovery.recoverable(session)
    session.kept = recovery.Kept(session, None)
    assert session.node.detached[token] is session
    return session


def test_results_past_keep_max_results_discard_the_session(monkeypatch):
    monkeypatch.setattr(recovery, "KEEP_MAX_RESULTS", 2)

    async def main():
        session = kept_session()
        session.out = [(1,), (2,)]
        session.kept.check()
        assert session.kept is not None
        session.out.append((3,))
        session.kept.check()
        assert "more results than the node keeps" in session.why
        assert session.node.detached == {}
    asyncio.run(main())


def test_result_bytes_past_keep_max_bytes_discard_the_session(monkeypatch):
    monkeypatch.setattr(recovery, "KEEP_MAX_BYTES", 10)

    async def main():
        session = kept_session()
        session.out_frames = [b"12345"]
        session.kept.check()
        session.out_frames.append(b"12345")
        session.kept.check()   # 10 bytes counted once each: within the limit
        assert session.kept is not None and session.kept.bytes == 10
        session.out_frames.append(b"!")
        session.kept.check()
        assert session.why is not None and session.node.detached == {}
    asyncio.run(main())


def test_a_session_not_recovered_in_time_is_discarded():
    async def main():
        session = kept_session()
        session.kept.discard("the client did not come back within 60s")  # (its expiry)
        assert session.why.startswith("the client did not come back")
        assert session.node.detached == {}
    asyncio.run(main())


def test_the_limits_hold_for_all_the_sessions_of_a_node_together(monkeypatch):
    """A client opening many recoverable sessions (or many clients) can't
    make a node keep more than the limits: they bound all its detached
    sessions together, and the one whose results pass them is discarded."""
    monkeypatch.setattr(recovery, "KEEP_MAX_RESULTS", 3)
    monkeypatch.setattr(recovery, "KEEP_MAX_BYTES", 10)

    async def main():
        node = fake_node()
        first, second = kept_session(node, "a"), kept_session(node, "b")
        first.out, first.out_frames = [(1,), (2,)], [b"1234"]
        first.kept.check()
        second.out, second.out_frames = [(3,)], [b"1234"]
        second.kept.check()   # 3 results, 8 bytes: within
        assert first.kept is not None and second.kept is not None
        second.out.append((4,))
        second.kept.check()   # 4 results together: the second is discarded
        assert second.why is not None and first.kept is not None
        assert (node.keeping.results, node.keeping.bytes) == (2, 4)  # the first's
        first.out_frames.append(b"1234567")
        first.kept.check()    # 11 bytes
        assert first.why is not None and node.detached == {}
        assert (node.keeping.results, node.keeping.bytes) == (0, 0)
    asyncio.run(main())
