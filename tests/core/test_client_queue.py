"""The core Client with big queues (issue 16): many queued jobs cancelled
at once, and wait() over many unfinished jobs."""
import concurrent.futures as cf
import threading

from dpool.core import client as core
from dpool.core.client import Client
from dpool.errors import JobCancelled
from helpers import read_marker
from tasks import double, hold


def test_cancelling_a_big_queue_at_once_keeps_the_client_working(tmp_path):
    """20,000 queued jobs cancelled by their futures while one job holds the
    only CPU: when it ends, the scheduler hands the cancelled jobs out batch
    after batch and each is dropped.  That used to recurse once per batch
    (RecursionError in the loop thread: the embedded node was 'lost' and
    every later job failed)."""
    client = Client(None, cpus=1).start()
    try:
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        first = client.submit(hold, (marker, gate))
        read_marker(marker)
        queued = [client.submit(double, (i,)) for i in range(20_000)]
        cancelled = sum(job.future.cancel() for job in queued)  # (not those sent already)
        assert cancelled > 19_000
        open(gate, "w").close()
        assert isinstance(first.future.result(30), int)
        assert client.submit(double, (21,)).future.result(30) == 42
        assert sum(job.future.cancelled() for job in queued) == cancelled
        assert client.wait(30)
    finally:
        open(gate, "a").close()
        client.close()


def test_wait_over_many_jobs_makes_no_condition_per_job():
    """Client.wait() (every close(wait=True)) waits on one condition, not
    on each future (a million Conditions would cost 1.3 GB)."""
    client = Client(None, cpus=2).start()
    try:
        jobs = [client.submit(double, (i,)) for i in range(5000)]
        assert client.wait(60)
        assert [job.future.result(0) for job in jobs[:3]] == [0, 2, 4]
        assert all(job.future._cond is None for job in jobs[3:])
        assert all(isinstance(job.future, cf.Future) for job in jobs)
    finally:
        client.close()


def test_wait_returns_only_once_the_futures_are_resolved():
    """wait() entered while the loop thread is finishing the last job (its
    'done' event runs before the future resolves) must not return True with
    that future still pending: it returned as soon as the job left the
    unfinished set, before its future (and a DispyJob's fields) were set."""
    seen, returned, threads = [], threading.Event(), []

    def waiter(client, future):
        ok = client.wait(30)
        seen.append((ok, future.done()))
        returned.set()

    def on_event(kind, job):
        if kind == "done" and not threads:
            thread = threading.Thread(target=waiter, args=(client, job.future))
            threads.append(thread)
            thread.start()
            returned.wait(2)  # (the bug: wait() returns at once, here)
    client = Client(None, cpus=1, on_event=on_event).start()
    try:
        job = client.submit(double, (4,))
        assert job.future.result(30) == 8
        threads[0].join(30)
        assert seen == [(True, True)]
    finally:
        client.close()
        for thread in threads:
            thread.join(30)


def queued_behind_a_held_loop(client, count):
    """``count`` jobs submitted while the loop thread is held, and the event
    that lets it go."""
    let_go, held = threading.Event(), threading.Event()
    client.loop.call_soon_threadsafe(lambda: (held.set(), let_go.wait(30)))
    assert held.wait(30)
    return [client.submit(double, (i,)) for i in range(count)], let_go


def let_go_counting(client, let_go):
    """Let the held loop thread go; returns a list that gets the number of
    jobs not taken in yet when a callback queued behind its first drain runs."""
    seen: list[int] = []
    client.loop.call_soon_threadsafe(lambda: seen.append(len(client._incoming)))
    let_go.set()
    return seen


def test_the_loop_thread_takes_a_big_queue_in_batches():
    """A user thread that submits faster than the loop thread takes the jobs
    in must not keep the loop in one drain for the whole queue: nothing else
    runs meanwhile (no RUN sent, no heartbeat; a dpool-node took a client
    submitting a million jobs at load average 26 for gone, "sent nothing for
    10.4 s", which this explains).  Here the loop is held while 20,000 jobs
    queue up; once let go, a callback queued behind the drain finds jobs
    still waiting."""
    client = Client(None, cpus=1).start()
    try:
        jobs, let_go = queued_behind_a_held_loop(client, 20_000)
        seen = let_go_counting(client, let_go)
        assert jobs[-1].future.result(60) == 2 * 19_999
        assert seen and 0 < seen[0] <= 20_000 - core.DRAIN_BATCH, seen
    finally:
        client.close()


def test_a_cancel_behind_a_big_queue_keeps_the_batches():
    """Cancelling a job the loop thread has not taken in yet must not take
    the whole queue in at once (the one long drain that batches avoid): the
    job is cancelled as it is taken in, never run, and the others run."""
    client = Client(None, cpus=1).start()
    try:
        jobs, let_go = queued_behind_a_held_loop(client, 20_000)
        client.cancel(jobs[-2])
        seen = let_go_counting(client, let_go)
        assert jobs[-1].future.result(60) == 2 * 19_999
        assert jobs[-2].future.cancelled() or isinstance(jobs[-2].future.exception(60),
                                                         JobCancelled)
        assert seen and 0 < seen[0] <= 20_000 - core.DRAIN_BATCH, seen
        assert client.wait(60)
    finally:
        client.close()
