"""Stopping a client's jobs (one, those a dpool-scheduler queues, or all)
and the client itself (see :mod:`dpool.core.client`)."""
import asyncio
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
        (Reclaim) and their futures are cancelled; from any thread."""
        try:
            self.loop.call_soon_threadsafe(self._reclaim_queued)
        except RuntimeError:
            pass  # closed already: nothing is queued anywhere

    def _reclaim_queued(self):
        self.client._cancel_queued = True
        for link in self.client.links:
            if link.ready and link.in_flight and link.info.get("scheduler"):
                try:
                    link.conn.send([P.encode(P.Reclaim, len(link.in_flight))])
                except ConnectionClosed:
                    pass  # its close callback settles its jobs

    def cancel_in_loop(self, job):
        if self.client._direct is not None and self.client._direct.job is job:
            self.client._direct.cancel()
            return
        incoming = self.client._incoming
        if job.id not in self.jobs and incoming \
                and incoming[0].id <= job.id <= incoming[-1].id:
            # Not taken in yet (ids grow in submit order): cancelled as it is,
            # not by taking the whole queue in now (DRAIN_BATCH's point).
            self.client._cancel_early.add(job.id)
            return
        self.client._act(self.scheduler.cancel(job.id))

    def on_cancelled(self, job):
        """(any thread) The user cancelled the future of a job a scheduler
        queues: the scheduler drops it (or stops it, if it started meanwhile)."""
        try:
            self.loop.call_soon_threadsafe(self.cancel_in_loop, job)
        except RuntimeError:
            pass  # closed: nothing runs it any more

    def cancel_all(self):
        if self.client._direct is not None:
            self.client._direct.cancel()
        self.client._drain()
        for job_id in list(self.jobs):
            self.client._act(self.scheduler.cancel(job_id))

    async def _shutdown(self, grace=2.0):
        if self.client._direct is not None:
            self.client._direct.close()
            if isinstance(self.client._direct, TcpLine):
                await self.client._direct.settle()
        self.client._drain()
        self.client.net.stop()
        if self.client._zygote is not None:  # forked, never handed to a node (not started)
            zygote, self.client._zygote = self.client._zygote, None
            await zygote.start()
            await zygote.close()
        error = BrokenCluster("the client was closed")
        self.client._act(self.scheduler.fail_queued(error))
        self.client.net.close_all()
        for job in list(self.jobs.values()):
            state = self.scheduler.jobs.get(job.id)
            if state is not None and state.cancelling:  # its node did not answer in time
                self.client._finish(job, TERMINATED, error=JobCancelled(
                    "job cancelled; its node did not confirm before the client closed"))
            else:
                self.client._finish(job, ABANDONED, error=error)
        self.jobs.clear()
        if self.client.embedded is not None:
            await self.client.embedded.close()
        await self.client.net.wait_closed(grace)
        await asyncio.sleep(0)
