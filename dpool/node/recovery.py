"""Recovery on the node (dispy's ``recover_jobs``): sessions kept for a
client that went away.

A session opened with the option ``recover_token`` whose client goes away
without BYE is *detached* (:class:`Kept`): its jobs go on, their results are
kept, and its CPUs stay allocated, for the node's ``keep_results`` seconds.
The node keeps at most KEEP_MAX_RESULTS results and KEEP_MAX_BYTES bytes
for all its detached sessions together (:class:`Keeping`), so a client
opening many sessions keeps no more than one may.  A new
connection sending ``RECOVER token`` takes the session over
(:func:`take_over`): it gets the kept results, then the others as they come,
and ends it with BYE.  When the time passes (or the limits are exceeded) the
session ends, its results and unfinished jobs are discarded, with one log
line.
"""
import asyncio
import logging

from .. import protocol as P
from ..transport.frames import total_bytes

log = logging.getLogger("dpool.node")

KEEP_RESULTS = 3600.0  # seconds a detached (recoverable) session is kept
KEEP_MAX_RESULTS = 100_000  # results kept for the detached sessions together, at most
KEEP_MAX_BYTES = 1 << 30  # bytes of results kept for them together, at most


class Keeping:
    """What the detached sessions of one node (or one dpool-scheduler,
    core/keep.py) keep, together: past the limits, the session whose
    result passed them is discarded."""

    def __init__(self):
        self.results = 0
        self.bytes = 0

    def within(self):
        return self.results <= KEEP_MAX_RESULTS and self.bytes <= KEEP_MAX_BYTES


def recoverable(session):
    """Whether ``session`` is kept (detached) when its client goes away."""
    return session.cpus > 0 and bool(session.options.get("recover_token")) \
        and not session.node.embedded


class Kept:
    """A detached session's stay on the node: its results pile up (within
    limits) until its client's RECOVER, or until it is discarded."""

    def __init__(self, session, exc):
        self.session = session
        node = session.node
        loop = asyncio.get_running_loop()
        keep = node.keep_results
        log.info("session %s: client %s disconnected%s; its jobs go on and their results "
                 "are kept for %ss (recover_jobs)", session.sid, session.conn.peer,
                 f" ({exc})" if exc else "", keep)
        self.token = session.options["recover_token"]
        self.bytes = self.counted = 0  # bytes of the first ``counted`` result frames
        self.results = 0  # results counted in node.keeping
        node.detached[self.token] = session
        self.expiry = loop.call_later(keep, self.discard,
                                      f"the client did not come back within {keep}s")

    def check(self):
        """Results are kept (no client to flush them to), within limits."""
        session = self.session
        session.started = []
        frames = session.out_frames
        added = total_bytes(frames[self.counted:])
        self.counted = len(frames)
        together = session.node.keeping
        together.bytes += added
        together.results += len(session.out) - self.results
        self.bytes += added
        self.results = len(session.out)
        if not together.within():
            self.discard(f"more results than the node keeps for the clients gone "
                         f"({KEEP_MAX_RESULTS} results, {KEEP_MAX_BYTES} bytes, all "
                         f"sessions together)")

    def discard(self, why):
        """The time or the limits passed: the session ends, its results lost."""
        session = self.session
        if session.kept is not self or session.ended:
            return
        log.warning("session %s: %s; discarding %d kept results and %d unfinished jobs",
                    session.sid, why, len(session.out), len(session.dispatcher.pending()))
        session.end(why)

    def stop(self):
        """The session ended or was recovered: it is kept no more."""
        self.expiry.cancel()
        node = self.session.node
        node.detached.pop(self.token, None)
        node.keeping.results -= self.results
        node.keeping.bytes -= self.bytes
        self.results = self.bytes = 0


def take_over(new, msg):
    """RECOVER on a new connection (the session ``new``, which took no
    CPUs): the detached session named by the token gets that connection."""
    node = new.node
    old = node.detached.pop(msg.token, None) if new.cpus == 0 else None
    if old is None or old.ended:
        new.conn.send([P.encode(P.Refused, f"node {node.name} keeps no results for that "
                                           f"session (unknown, or the time to recover it "
                                           f"has passed)")])
        new.end("refused")
        return
    new.ended = True  # this session only hands its connection over
    node.release(new)
    settings = new.liveness.settings
    new.liveness.unwatch()
    _reattach(old, new.conn, msg.terminate, settings)


def _reattach(session, conn, terminate, settings=None):
    """``session`` (detached) goes on with the client on ``conn``."""
    session.kept.stop()
    session.kept = None
    session.conn = conn
    conn.set_receiver(session.on_message, session.on_close)
    if settings is not None:
        session.liveness.watch(settings)
    pending = session.dispatcher.pending()
    kept = [record[0] for record in session.out]
    log.info("session %s: recovered by %s: %d results kept, %d jobs unfinished%s",
             session.sid, conn.peer, len(kept), len(pending),
             " (terminated)" if terminate and pending else "")
    conn.send([P.encode(P.Ready, dict(session.node.info(), recovered=True, kept=kept,
                                      pending=pending))])
    session._schedule_flush()
    if terminate and pending:
        session.on_cancel(P.Cancel(pending), ())
