"""An Executor's futures through a dpool-scheduler follow concurrent.futures:
a future runs once its job started on a node, not while the job is queued
at the scheduler; ``cancel()`` of such a queued job succeeds and takes the
job out of the scheduler's queue (it never runs)."""
import asyncio
import concurrent.futures as cf
import os

import pytest

from dpool.core.status import query_node
from dpool.futures import Executor
from helpers import poll_for, start_node
from helpers_sched import SECRET, start_scheduler
from tasks import hold

pytestmark = pytest.mark.timeout(90)


def scheduler_jobs(sched):
    """(jobs placed on nodes, jobs queued in the scheduler), all clients."""
    info = asyncio.run(query_node(*sched.address, SECRET))
    return info["running"], info["queued"]


@pytest.fixture
def sched(tmp_path):
    """A dpool-scheduler over one node of one CPU."""
    node = start_node(tmp_path / "node", cpus=1, secret=SECRET, args=("--host", "127.0.0.5"))
    try:
        sched = start_scheduler(tmp_path / "sched", [("127.0.0.5", node.port)], SECRET)
        yield sched
        sched.terminate()
    finally:
        node.kill()


def first_job_running(ex, tmp_path, gate):
    """A job held by ``gate``, once it started on the node (its one CPU)."""
    first = ex.submit(hold, str(tmp_path / "m0"), gate)
    poll_for(lambda: first.running() and os.path.exists(tmp_path / "m0"), 30,
             message="the first job to start on the node")
    return first


def test_a_future_runs_once_its_job_started_and_cancels_while_queued(tmp_path, sched):
    gate = str(tmp_path / "gate")
    with Executor(scheduler=sched.address, secret=SECRET) as ex:
        first = first_job_running(ex, tmp_path, gate)
        queued = [ex.submit(hold, str(tmp_path / f"m{i}"), gate) for i in range(1, 5)]
        poll_for(lambda: sum(scheduler_jobs(sched)) == 5, 30,
                 message="the four jobs to reach the scheduler")
        assert not any(f.running() or f.done() for f in queued), \
            "a future runs while its job is only queued at the scheduler"
        last = queued[-1]
        assert last.cancel() and last.cancelled()
        poll_for(lambda: sum(scheduler_jobs(sched)) == 4, 30,
                 message="the cancelled job to leave the scheduler")
        open(gate, "w").close()
        assert [f.result(30) for f in (first, *queued[:-1])] and last.cancelled()
        assert not os.path.exists(tmp_path / "m4"), "the cancelled job ran"
        assert not last.running()


def test_a_pending_future_whose_job_is_placed_on_a_node_cancels_it_there(tmp_path, sched):
    """The scheduler's read-ahead places a job on a node before it starts:
    its future is still pending, and ``cancel()`` stops the job on the node
    (it never runs), as docs/scheduler.md says."""
    gate = str(tmp_path / "gate")
    with Executor(scheduler=sched.address, secret=SECRET) as ex:
        first = first_job_running(ex, tmp_path, gate)
        placed = ex.submit(hold, str(tmp_path / "m1"), gate)
        poll_for(lambda: scheduler_jobs(sched) == (2, 0), 30,
                 message="the second job placed on the node behind the first")
        assert not placed.running() and placed.cancel() and placed.cancelled()
        poll_for(lambda: scheduler_jobs(sched) == (1, 0), 30,
                 message="the cancelled job to leave the node")
        open(gate, "w").close()
        assert first.result(30)
        after = ex.submit(hold, str(tmp_path / "m2"), gate)
        after.result(30)
        assert not os.path.exists(tmp_path / "m1"), "the cancelled job ran on the node"


def test_a_future_cancelled_while_queued_at_the_scheduler_wakes_wait_and_as_completed(
        tmp_path, sched):
    """The stdlib's state machine: a future the user cancelled is notified
    (CANCELLED_AND_NOTIFIED) once its executor drops the work, which is what
    ``concurrent.futures.wait`` and ``as_completed`` wait for; a job taken
    out of the scheduler's queue left it CANCELLED for good (both hung)."""
    gate = str(tmp_path / "gate")
    with Executor(scheduler=sched.address, secret=SECRET) as ex:
        try:
            first = first_job_running(ex, tmp_path, gate)
            queued = [ex.submit(hold, str(tmp_path / f"m{i}"), gate) for i in range(1, 3)]
            poll_for(lambda: sum(scheduler_jobs(sched)) == 3, 30,
                     message="the two jobs to reach the scheduler")
            last = queued[-1]
            assert last.cancel()
            client = ex._client
            poll_for(lambda: client.call(lambda: all(job.future is not last
                                                     for job in client.jobs.values())), 30,
                     message="the client to drop the cancelled job")
            done, _ = cf.wait([last], timeout=0)
            assert last in done, "wait() does not see the cancelled future as done"
            assert list(cf.as_completed([last], timeout=0)) == [last]
        finally:
            open(gate, "w").close()
        assert first.result(30) and queued[0].result(30)
