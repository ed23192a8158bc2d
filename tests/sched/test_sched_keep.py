"""What a dpool-scheduler keeps for clients that went away (core/keep.py):
within the limits of one session for all of them together, so N dead
clients do not keep N x KEEP_MAX_BYTES."""
import asyncio

from dpool import protocol as P
from dpool.core import keep
from dpool.node import recovery


def done(job_id, size):
    return [P.encode(P.Done, [P.result(job_id, 0, 1)]), b"x" * size]


def test_the_detached_sessions_together_keep_within_one_sessions_limits(monkeypatch):
    monkeypatch.setattr(recovery, "KEEP_MAX_BYTES", 1000)

    async def main():
        together = keep.Keeping()  # a scheduler's
        sessions = [keep.Kept(60, lambda: None, together) for _ in range(5)]
        within = [session.add(done(i, 400)) for i, session in enumerate(sessions)]
        for session in sessions:
            session.cancel()  # ended or recovered: what it kept is released
        return within, together.bytes, together.results

    within, kept_bytes, kept_results = asyncio.run(main())
    assert within[:2] == [True, True] and not any(within[2:])  # 5 x 400 > 1000
    assert (kept_bytes, kept_results) == (0, 0)
