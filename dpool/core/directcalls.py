"""The client's side of direct calls (:mod:`dpool.core.direct` on the
embedded node, :mod:`dpool.core.tcpline` on a node's link): a lone call
started from the calling thread, its answer read there, a call the loop
thread adopts, and which line a client gets (see :mod:`dpool.core.client`)."""
import logging
import time

from .. import protocol as P
from ..errors import BrokenCluster, ProtocolError
from ..transport.frames import total_bytes
from .direct import MAX_ARGUMENT, DirectFuture, DirectLine
from .future import resolve
from .job import ABANDONED, RUNNING, Job, outcome_of
from .links import describe
from .tcpline import TcpLine

log = logging.getLogger("dpool")

class DirectCalls:
    """Direct calls for one client: ``client._direct`` is the line (None:
    none may be made), which the client reads on each submit."""

    def __init__(self, client, allowed=True):
        self.client = client
        self.ok = allowed  # the client's ``direct`` option
        self.scheduler = client.scheduler
        self.jobs = client.jobs
        self._unfinished = client._unfinished
        self._settle = client._settle

    def allowed(self):
        """Whether this client may make direct calls at all: asked to, and
        nothing needs every job to go through the loop (events, an
        extension, options a direct call does not honour).  A client whose
        event handler takes a direct call's "done" in any thread
        (``client.direct_events``: JobCluster without callbacks) may, its
        extension's messages and captured output included: both lines hand
        every message but the call's DONE to the loop thread (the call then
        goes on as a job of the loop's), and the DONE carries the output."""
        c = self.client
        if c.direct_events:
            return self.ok and not any(c.session.get(option)
                                       for option in ("max_tasks", "notify_start"))
        return self.ok and c.on_event is None and not c._extended and not any(
            c.session.get(option) for option in ("max_tasks", "capture", "notify_start"))

    def embedded(self, session, link):
        """Direct calls to the embedded node's idle workers, if allowed."""
        if self.allowed():
            self.client._direct = DirectLine(self.client, session, link)

    def submit(self, line, fn_id, blob, frames, tag):
        """Nothing else in flight: the job goes straight to the lent worker
        (see dpool.core.direct); None if it can't (the normal path then)."""
        if total_bytes(frames) > MAX_ARGUMENT:
            return None
        job = Job(next(self.client._ids), fn_id, frames, tag, 0, DirectFuture(line))
        job.blob = blob
        job.future.set_running_or_notify_cancel()
        job.sent, job.status, job.node = True, RUNNING, line.link
        try:
            self._unfinished.add(job.future)
            if line.start(job):
                if self.client._idle_waiters:  # a wait() that may have looked at the line
                    line.handoff(job.future)  # before: nobody else may read the answer
                return job
        except BaseException:  # interrupted: no call was made (a wait() may be waiting),
            if isinstance(line, TcpLine):  # (made: as start() returned)
                line.unreturned(job)
                made = line.interrupted is job
            else:  # made and on the line: the loop thread reads its answer
                made = line.job is job
                if made:
                    line.handoff(job.future)
            if not made:  # or it ends later
                self._unfinished.discard(job.future)
                self._settle()
            raise
        self._unfinished.discard(job.future)
        return None

    def done(self, job, frames, msg=None):
        """A direct call's answer (read by whichever thread waited for it;
        ``msg``: its first frame decoded, if it was)."""
        try:
            if msg is None:
                msg = P.decode(frames[0])
            ((res, payload),) = P.results(msg, frames)
            if res.job_id != job.id:
                raise ProtocolError(f"answer for job {res.job_id}")
        except Exception as exc:
            self.failed(job, ProtocolError(f"the worker sent an unexpected message "
                                           f"for a direct call: {describe(exc)}"))
            return
        if res.start is not None and res.end is not None:  # (a worker lost: no times)
            job.start_time, job.end_time, job.stdout, job.stderr = \
                res.start, res.end, res.stdout, res.stderr
            job.node.jobs_done += 1
            job.node.cpu_time += res.end - res.start
        self.finish(job, *outcome_of(res.outcome, payload))

    def failed(self, job, error):
        self.finish(job, ABANDONED, None, error)

    def finish(self, job, status, value, error):
        job.status = status
        job._frames = job.blob = None  # (the slot: no property call per job)
        job.value, job.error = value, error
        job.future._line = None
        client = self.client  # (JobCluster: the DispyJob's fields, before anyone wakes; the
        if client.on_event is not None or client.listeners:  # listener of a board attached since)
            client.emit("done", job)
        resolve(((job.future, value, error),))
        self._unfinished.discard(job.future)
        self._settle()

    def adopt(self, job, link, pinned=True):
        """(loop thread) A direct call whose worker's socket ended becomes a
        job in flight on the embedded node (which reports its outcome), or
        one the loop thread takes over on a node's link (``pinned=False``:
        rerun elsewhere if that node is lost, as any job); False if it was
        failed instead (closing)."""
        job.future._line = None
        line = self.client._direct
        if line is None or line.closed or self.scheduler.nodes.get(link) is None:  # shut down
            self.failed(job, BrokenCluster("the client was closed"))
            return False
        self.jobs[job.id] = job
        link.in_flight.add(job.id)
        self.scheduler.adopt(link, [job.id], pinned)
        return True

    def resubmit(self, job):
        """(loop thread) A direct call whose node was lost while a user
        thread held its line: a lost node's job, queued again (failed if no
        node is left, as those)."""
        job.future._line = None
        job.node = None
        self.jobs[job.id] = job
        client = self.client
        client._act(self.scheduler.submit([job.id], time.monotonic()))
        if client.broken is not None and not client.net.any_ready():
            client._act(self.scheduler.fail_queued(
                BrokenCluster(f"no node left: {describe(client.broken)}")))

    def in_flight(self):
        """(loop thread) The direct call in flight, if any (not in
        ``client.jobs``: the line's until it ends or is adopted)."""
        line = self.client._direct
        return None if line is None else line.job

    def line_for(self, link):
        """Direct calls over ``link`` (a node over TCP, the client's only
        one), when they may be made (see :mod:`dpool.core.tcpline`)."""
        line = self.client._direct
        if isinstance(line, TcpLine):
            if line.lent is None and not line.closed:
                line.link = link  # (the node re-joined: a new link)
            return
        if line is None and isinstance(link.address, tuple) \
                and not link.info.get("scheduler") and self.allowed():
            self.client._direct = TcpLine(self.client, link)
