"""What a client does as its nodes' sessions open, change and end, and
with the notices a node sends that are not results (see
:mod:`dpool.core.client`, whose :class:`~dpool.core.client.Client` owns
one :class:`NodeEvents` and hands it the links' events)."""
import logging
import time
from operator import itemgetter
from typing import Any

from .. import protocol as P
from .. import serialize
from ..errors import BrokenCluster, DpoolError, ProtocolError
from .job import RUNNING, Job
from .links import describe

log = logging.getLogger("dpool")
_first = itemgetter(0)
#: Jobs per CPU a client keeps at a dpool-scheduler (2 at a node): the
#: scheduler keeps 2 per CPU on its nodes and queues the rest, so that it
#: refills a node the moment a job ends there instead of waiting for the
#: client's next job, a round trip that on a loaded host took 63-160 ms
#: (median; docs/performance.md, "Through dpool-scheduler"). The queue is
#: the scheduler's: fair shares are unchanged.
SCHEDULER_DEPTH = 8


def ready_info(info, ready):
    """A node's info after it said Ready again with ``ready``: a
    dpool-scheduler's first Ready lists its nodes (``nodes``: host, port,
    name, cpus of each), later ones say what changed (``nodes_added``,
    entries new or changed; ``nodes_removed``, [host, port] pairs)."""
    added, removed = ready.get("nodes_added"), ready.get("nodes_removed")
    merged = {key: value for key, value in {**info, **ready}.items()
              if key not in ("nodes_added", "nodes_removed")}
    if added is None and removed is None:
        return merged
    nodes = {(entry["host"], entry["port"]): entry for entry in info.get("nodes", ())}
    for host, port in removed or ():
        nodes.pop((host, port), None)
    for entry in added or ():
        nodes[(entry["host"], entry["port"])] = entry
    merged["nodes"] = list(nodes.values())
    return merged


class NodeEvents:
    """A client's nodes coming, changing and going: the session's opening
    messages, admitting a ready node to the scheduler (or adopting a
    recovered session's jobs), a scheduler's CPUs changing, a node lost or
    back, jobs given back, a node draining or left out, and whether a
    node's notices are about jobs it was given."""

    def __init__(self, client):
        self.client = client
        self.scheduler = client.scheduler
        self.jobs = client.jobs

    def opening(self, link):
        """The messages that open a session: SESSION (its options from
        ``prepare``, if any) and what ``prepare`` adds, or RECOVER."""
        if link.recover is not None:
            return [[P.encode(P.Recover, *link.recover)]]
        session: Any = self.client.session
        preamble: Any = ()
        if self.client.prepare is not None:
            plan = self.client.prepare(link)
            if plan is None:
                link.ready_future.cancel()  # nobody waits for it
                link.retry = False
                raise DpoolError("not used: the cluster's allocation gave it no CPUs")
            session, preamble = plan
        if link.address != "embedded":
            session = dict(session, heartbeat=self.client.liveness.as_option())
        if (getattr(link.conn, "hello", None) or {}).get("scheduler"):
            session = dict(session, notify_start=True)  # futures run once their job starts
        return [[P.encode(P.Session, session), *self.client.init_frames], *preamble]

    def trusted(self, link, job_ids, what):
        """True if every job in ``job_ids`` is in flight on ``link``; else a
        node reports on jobs it was not given (another node's, or none):
        its link is closed, with one log line, and nothing of it is taken."""
        strangers = [job_id for job_id in job_ids if job_id not in link.in_flight]
        if not strangers:
            return True
        shown = ", ".join(map(str, strangers[:5])) + (" ..." if len(strangers) > 5 else "")
        self.distrust(link, f"{what} for job {shown}, not given to it (or done there "
                             f"already)")
        return False

    def trusted_items(self, link, items, what):
        """:meth:`trusted` for a message's items (tuples, the job id first),
        without a list of their ids when all are in flight (once per Done)."""
        return link.in_flight.issuperset(map(_first, items)) or \
            self.trusted(link, [item[0] for item in items], what)

    def distrust(self, link, what):
        """``link``'s node sent ``what`` (not its own to answer): log, close."""
        link.error = ProtocolError(f"node {link.name} sent {what}: closing its connection")
        log.error("%s", link.error)
        link.conn.abort()

    def link_ready(self, link):
        """A session opened (READY): its node takes jobs, or its recovered
        jobs are adopted."""
        if link.recover is not None:
            self._adopt(link, [*link.info.get("kept", ()), *link.info.get("pending", ())])
        elif not link.hold:
            self.admit(link)

    def _adopt(self, link, job_ids):
        """A recovered session's jobs: in flight on ``link``, which gets no
        new ones.  A job two nodes kept (its first node was cut off, not
        stopped) is one Job, resolved by the first outcome."""
        self.client.emit("node", link)
        self.client._act(self.scheduler.add_node(link, 0, time.monotonic()))
        fresh = [job_id for job_id in job_ids if job_id not in self.jobs]
        for job_id in fresh:
            job = self.jobs[job_id] = Job(job_id, None, None)
            job.future.set_running_or_notify_cancel()
            job.sent, job.status, job.node = True, RUNNING, link
            self.client._unfinished.add(job.future)
        self.scheduler.adopt(link, fresh)
        link.in_flight.update(job_ids)
        link.adopted = [self.jobs[job_id] for job_id in job_ids]

    def admit(self, link):
        self.client.emit("node", link)
        # A dpool-scheduler gets more jobs per CPU than a node: queued in
        # it, ready to go the moment a job ends on one of its nodes.
        depth = SCHEDULER_DEPTH if link.info.get("scheduler") else 2
        self.client._act(self.scheduler.add_node(link, link.cpus, time.monotonic(), depth))
        self.client.directs.line_for(link)  # (an extension's node: once its setup is done)

    def cpus_changed(self, link, info):
        """READY again: a scheduler whose CPUs changed (nodes joined)."""
        old, link.info = link.cpus, ready_info(link.info, info)
        state = self.scheduler.nodes.get(link)
        if state is not None and state.cpus == old:  # (not limited by set_cpus)
            self.client._act(self.scheduler.set_cpus(link, link.cpus))
        self.client.emit("ready", link)

    def link_lost(self, link):
        """A ready link closed: its jobs move on (the cluster is broken if
        it was the last node)."""
        self.client.emit("node", link)
        if not self.client.closed or self.client._unfinished:
            if link.draining:
                log.info("node %s (%s) has shut down", link.name, link.where)
            else:
                log.warning("lost node %s (%s): %s", link.name, link.where,
                            describe(link.error))
        self.client._act(self.scheduler.remove_node(link, time.monotonic(), describe(link.error)))
        if not self.client.net.any_ready():
            self.client.broken = link.error
            error = link.error if isinstance(link.error, BrokenCluster) else \
                BrokenCluster(f"no node left to run jobs (last error: {describe(link.error)})")
            self.client._act(self.scheduler.fail_queued(error))

    def link_back(self, link):
        """A lost (or busy) node re-joined."""
        self.client.broken = None

    def on_giveback(self, link, msg, frames):
        """Jobs the node did not run (we reclaimed them, or it is draining)."""
        revoked = self.client._revoked
        for job_id in msg.job_ids:
            job = self.jobs.get(job_id)
            if job is None or not self.scheduler.current(link, job_id):
                continue  # not in flight there: the scheduler ignores it too
            link.in_flight.discard(job_id)
            if link.fns.get(job.fn_id):
                link.fns[job.fn_id] -= 1
            if self.client._cancel_queued or job_id in revoked:  # never started
                job.future._unstart()  # (shutdown(cancel_futures=True), Stopping.revoke)
        self.client._act(self.scheduler.given_back(link, msg.job_ids, time.monotonic(),
                                            cancel=self.client._cancel_queued,
                                            cancelled=revoked))

    def on_draining(self, link, msg, frames):
        log.info("node %s is shutting down: no new jobs go there (its running jobs have "
                 "%ss to finish)", link.name, msg.grace)
        link.draining = True
        self.client._act(self.scheduler.drain(link, time.monotonic()))

    def on_initfail(self, link, msg, frames):
        self.leave_out(link, "the initializer failed", frames)

    def leave_out(self, link, what, frames):
        """The node reported a failure (frames[1:]) that makes it unusable:
        record it as the link's error and drop the link (its jobs move on)."""
        exc = serialize.load_exception(frames[1:])
        link.error = BrokenCluster(f"{what} on node {link.name}: {exc!r}")
        link.retry = False
        link.error.__cause__ = exc
        log.error("node %s: %s (the node is left out)", link.name, link.error)
        link.conn.abort()
