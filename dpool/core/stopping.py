"""Stopping a client's jobs (one, those a dpool-scheduler queues, or all)
and the client itself (see :mod:`dpool.core.client`)."""
import asyncio
import itertools
import logging

from .. import protocol as P
from ..errors import BrokenCluster, ConnectionClosed, JobCancelled
from .job import ABANDONED, TERMINATED
from .tcpline import TcpLine

log = logging.getLogger("dpool")


class Stopping:
    """Cancelling a client's jobs, and closing it."""

    def __init__(self, client):
        self.client = client
        self.scheduler = client.scheduler
        self.jobs = client.jobs
        self.thread = client._thread
        self.loop = client.loop

    def cancel(self, job):
        """Cancel a queued or running job; its future fails with JobCancelled.
        From any thread (from the loop thread it takes effect at once)."""
        if job.future.done():
            return
        if self.client.in_loop_thread():
            self.cancel_in_loop(job)
        else:
            self.loop.call_soon_threadsafe(self.cancel_in_loop, job)

    def close(self, wait=True, cancel=False, timeout=None):
        """Stop taking jobs; optionally wait for or cancel the rest; release all."""
        if self.client.closed and not self.thread.thread.is_alive():
            return
        if self.client.in_loop_thread():
            raise RuntimeError("a dpool client can't be closed from its own loop thread "
                               "(a done-callback or event handler runs there): close it "
                               "from another thread")
        self.client.closed = True
        if cancel:
            for future in list(self.client._unfinished):
                future.cancel()
            self.loop.call_soon_threadsafe(self.cancel_all)
        if wait:
            self.client.wait(timeout)
        if self.thread.thread.is_alive():
            try:
                # A caller that gave a timeout gets at most half a second more.
                self.thread.run(self._shutdown(2.0 if timeout is None else 0.5), 30)
            except (TimeoutError, RuntimeError) as exc:
                log.warning("client shutdown did not finish cleanly: %s", exc)
            self.thread.stop()
        self.fail_leftovers()

    def fail_leftovers(self):
        """Jobs a submit racing close() queued after the loop's last drain."""
        error = BrokenCluster("the client was closed")
        while self.client._incoming:
            job = self.client._incoming.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
            self.client._unfinished.discard(job.future)
        self.client._settle()

    def cancel_queued(self):
        """Cancel the jobs a dpool-scheduler still queues for this client
        (sent, but on no node yet: SCHEDULER_DEPTH per CPU), as those
        queued here are: the scheduler gives them back
        (Reclaim) and their futures are cancelled; from any thread.  So
        are those sent to a node beyond one per CPU (its futures run from
        the send, and up to cpus x (2 + read-ahead) are in flight there):
        the node keeps the first ones, the running ones among them, and
        gives back the others it queues, and those a worker holds behind
        its running job as that job ends (``held``).  At most one job per
        CPU runs after the call beyond those running (the stdlib's
        ProcessPoolExecutor: max_workers + 1)."""
        try:
            self.loop.call_soon_threadsafe(self._reclaim_queued)
        except RuntimeError:
            pass  # closed already: nothing is queued anywhere

    def _reclaim_queued(self):
        self.client._cancel_queued = True
        for link in self.client.links:
            count = len(link.in_flight) - (0 if link.info.get("scheduler") else link.cpus)
            if link.ready and count > 0:
                try:
                    link.conn.send([P.encode(P.Reclaim, count, True)])
                except ConnectionClosed:
                    pass  # its close callback settles its jobs

    def revoke(self, futures):
        """(any thread) Cancel these futures' jobs that a node holds unstarted
        (sent ahead: their futures run from the send), as closing
        Executor.map's iterator cancels the calls not started: each node
        holding some gives back those beyond one per CPU (Reclaim, with
        those waiting in workers); these are cancelled as they come back,
        the others go out again.  Those started finish."""
        try:
            self.loop.call_soon_threadsafe(self._revoke, {id(future) for future in futures})
        except RuntimeError:
            pass  # closed already: nothing runs them any more

    def _revoke(self, wanted):
        jobs = self.jobs
        for link in self.client.links:
            if not link.ready or link.info.get("scheduler"):  # (its futures start on a start)
                continue
            ids = [job_id for job_id in link.in_flight
                   if job_id in jobs and id(jobs[job_id].future) in wanted]
            count = len(link.in_flight) - link.cpus
            if ids and count > 0:
                self.client._revoked.update(ids)
                try:
                    link.conn.send([P.encode(P.Reclaim, count, True)])
                except ConnectionClosed:
                    pass  # its close callback moves its jobs

    def cancel_in_loop(self, job):
        direct = self.client._direct
        if direct is not None and (direct.job is job or getattr(direct, "passing", None) is job):
            direct.cancel()  # (passing: handed to the session meanwhile, see DirectLine)
            return
        incoming = self.client._incoming
        if job.id not in self.jobs and incoming \
                and incoming[0].id <= job.id <= incoming[-1].id:
            # Not taken in yet (ids grow in submit order): cancelled as it is,
            # not by taking the whole queue in now (DRAIN_BATCH's point).
            self.client._cancel_early.add(job.id)
            return
        self.client._act(self.scheduler.cancel(job.id))
        if isinstance(self.client._direct, TcpLine):  # (on the node's channel: stopped there)
            self.client._direct.chan.halt(job)

    def on_cancelled(self, job):
        """(any thread) The user cancelled the future of a job a scheduler
        queues: the scheduler drops it (or stops it, if it started meanwhile)."""
        try:
            self.loop.call_soon_threadsafe(self.cancel_in_loop, job)
        except RuntimeError:
            pass  # closed: nothing runs it any more

    def cancel_all(self):
        """(loop thread) Cancel every job: the queue taken in, then the jobs
        cancelled, DRAIN_BATCH at a time with the loop's other work in
        between (a million queued jobs never block it for long)."""
        client = self.client
        if client._direct is not None:
            client._direct.cancel()
        incoming = client._incoming
        if incoming:
            if not client._drain(_batch()):  # a user thread holds the node's link: once it is back
                client._direct.defer(self.cancel_all)
            else:
                self.loop.call_soon(self.cancel_all)
            return
        self._cancel_some(list(self.jobs))

    def _cancel_some(self, job_ids, start=0):
        """(loop thread) Cancel DRAIN_BATCH of ``job_ids`` from ``start``,
        then come back for the rest."""
        client, cancel, end = self.client, self.scheduler.cancel, start + _batch()
        for job_id in job_ids[start:end]:
            client._act(cancel(job_id))
        if end < len(job_ids):
            self.loop.call_soon(self._cancel_some, job_ids, end)

    def _abandon(self, job, error):
        """(closing) ``job`` ends unfinished."""
        state = self.scheduler.jobs.get(job.id)
        if state is not None and state.cancelling:  # its node did not answer in time
            self.client._finish(job, TERMINATED, error=JobCancelled(
                "job cancelled; its node did not confirm before the client closed"))
        else:
            self.client._finish(job, ABANDONED, error=error)

    async def _shutdown(self, grace=2.0):
        if self.client._direct is not None:
            self.client._direct.close()
            if isinstance(self.client._direct, TcpLine):
                await self.client._direct.settle()
        incoming = self.client._incoming
        while incoming:  # (the loop's other work between batches)
            if not self.client._drain(_batch()):  # (a link never handed back: fail_leftovers)
                break
            await asyncio.sleep(0)
        self.client.net.stop()
        if self.client._zygote is not None:  # forked, never handed to a node (not started)
            zygote, self.client._zygote = self.client._zygote, None
            await zygote.start()
            await zygote.close()
        error = BrokenCluster("the client was closed")
        failed, batch = self.scheduler.fail_queued(error), _batch()
        for start in range(0, len(failed), batch):
            self.client._act(failed[start:start + batch])
            await asyncio.sleep(0)
        self.client.net.close_all()
        jobs = self.jobs
        while jobs:  # (until none is left: a racing submit's may be taken in meanwhile)
            for job in list(itertools.islice(jobs.values(), batch)):
                self._abandon(job, error)
                jobs.pop(job.id, None)
            await asyncio.sleep(0)
        if self.client.embedded is not None:
            await self.client.embedded.close()
        await self.client.net.wait_closed(grace)
        await asyncio.sleep(0)


def _batch():
    """How many queued jobs the loop thread handles per turn (the client's
    DRAIN_BATCH, read when used)."""
    from . import client

    return client.DRAIN_BATCH
