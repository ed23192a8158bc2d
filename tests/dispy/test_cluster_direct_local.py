"""A local JobCluster's lone jobs on the direct-call path (issue 13): with
no callbacks, the embedded node lends the cluster an idle worker as it
does an Executor (dpool/core/direct.py), and the calling thread writes
the job to it and reads its answer.  Every dispy property of the job and
the cluster's counts are what the loop-thread path gives; a job that sends
its session something first (a provisional result) goes on as a job of
the loop's.  (tests/dispy/test_cluster_direct.py: the same over TCP.)"""
import functools
import threading

import pytest

import dpool
from dpool.core.direct import DirectFuture, DirectLine
import tasks
from helpers import pid_gone, poll_for, read_marker
from test_cluster_direct import submit_and_wait_in_threads

DispyJob = dpool.DispyJob
pytestmark = pytest.mark.timeout(60)

WARM_UP = {tasks.double: (0,), tasks.echo_outputs: (0,), tasks.fails: (0,),
           tasks.provisional: (0,), tasks.die_or_value: (0,)}
HOLDING = (tasks.hold, tasks.hold_through_interrupt, tasks.provisional_then_hold)


@pytest.fixture(scope="module", autouse=True)
def _warm_hold(tmp_path_factory):
    warm = tmp_path_factory.mktemp("warm")
    for fn in HOLDING:
        WARM_UP[fn] = (str(warm / "marker"), str(warm))  # (the gate is open)


def cluster(fn, **kwargs):
    """A local JobCluster that ran one job (a worker may be lent now)."""
    c = dpool.JobCluster(fn, cpus=1, loglevel=40, **kwargs)
    try:
        c.submit(*WARM_UP[fn])(timeout=30)
    except BaseException:
        c.close(terminate=True)
        raise
    return c


def lent(c):
    """Wait until a lone job may go direct (a worker lent to the line)."""
    line = c._client._direct
    assert isinstance(line, DirectLine)
    poll_for(line.free, timeout=30, message="a worker lent to the line")
    return line


def direct(c, *args):
    """Submit once a worker is lent, and check the job went direct."""
    lent(c)
    job = c.submit(*args)
    assert type(job.core_job.future) is DirectFuture, "the job went the normal way"
    return job


def test_lone_jobs_go_direct_with_every_field():
    with cluster(tasks.echo_outputs) as c:
        for i in range(5):
            job = direct(c, i)
            job.id = f"job-{i}"
            assert job() == i
            assert job.status == DispyJob.Finished
            assert job.submit_time <= job.start_time <= job.end_time
            assert job.ip_addr
            assert job.stdout == f"stdout of job {i}\n"
            assert job.stderr == f"stderr of job {i}\n"
            assert job.exception is None and job.id == f"job-{i}"
            assert job.finish.is_set()


def test_an_exception_comes_back_as_on_the_loop_path():
    with cluster(tasks.fails) as c:
        lent(c)
        first = c.submit(7)
        second = c.submit(7)  # (two at once: the second takes the loop path)
        assert type(first.core_job.future) is DirectFuture
        assert second.core_job is None or type(second.core_job.future) is not DirectFuture
        assert first() is None and second() is None
        job = direct(c, 7)
        assert job() is None
        assert job.status == second.status == DispyJob.Terminated
        assert "ValueError: boom-7" in job.exception and "Traceback" in job.exception
        assert job.exception == second.exception


def test_provisional_results_of_a_direct_job_reach_the_client():
    """The job's provisional results come on the lent worker's socket before
    its answer: the job goes on as the session's, which passes them on."""
    seen = []
    with cluster(tasks.provisional) as c:
        emit = c._client.emit

        def seeing(kind, obj):
            if kind == "provisional":
                seen.append(obj[1])
            return emit(kind, obj)
        c._client.emit = seeing  # (a listener would keep jobs off the direct path)
        job = direct(c, 3)
        assert job(timeout=30) == ("final", 3) and job.status == DispyJob.Finished
        assert direct(c, 2)(timeout=30) == ("final", 2)
    assert seen == [("step", i) for i in range(3)] + [("step", i) for i in range(2)]


def test_status_counts_a_direct_job_busy_then_done(tmp_path):
    with cluster(tasks.hold) as c:
        before = c.status().nodes[0].jobs_done if c.status().nodes else 0
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        job = direct(c, marker, gate)
        (pid,), _ = read_marker(marker)
        info = c.status()
        assert info.jobs_pending == 1 and [n.busy for n in info.nodes] == [1]
        open(gate, "w").close()
        assert job(timeout=30) == pid
        info = c.status()
        assert info.jobs_pending == 0 and [n.busy for n in info.nodes] == [0]
        assert info.nodes[0].jobs_done == before + 1


def test_cancel_terminates_a_direct_job(tmp_path):
    with cluster(tasks.hold) as c:
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        job = direct(c, marker, gate)
        (pid,), _ = read_marker(marker)
        assert c.cancel(job) == 0
        assert job(timeout=30) is None
        assert job.status == DispyJob.Terminated
        poll_for(lambda: pid_gone(pid), 15, message="the job's process to end")
        open(gate, "w").close()
        assert c.submit(str(tmp_path / "m2"), gate)(timeout=30) > 0


@pytest.mark.parametrize("fn", HOLDING[:2], ids=["raises", "returns"])
def test_a_cancelled_direct_job_is_terminated_as_on_the_loop_path(tmp_path, fn):
    """The cancel's KeyboardInterrupt ends the job, whose answer comes on
    the lent worker's socket: it is dropped (the node drops it so on the
    loop path), the job is Terminated by the cancel with no result, not
    Finished with what it returned (nor failed with its KeyboardInterrupt)."""
    with cluster(fn) as c:
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        job = direct(c, marker, gate)
        read_marker(marker)
        assert c.cancel(job) == 0
        assert job(timeout=30) is None
        assert job.status == DispyJob.Terminated
        assert "JobCancelled" in job.exception
        open(gate, "w").close()
        assert c.submit(str(tmp_path / "m2"), gate)(timeout=30) > 0


class _HookedLock:
    """A line's lock that runs ``hook`` once, as the loop thread first
    releases it after ``arm``: a controlled interleaving of a cancel (loop
    thread) and the answer read in a user thread."""

    def __init__(self, lock, client):
        self.lock, self.client, self.hook = lock, client, None

    def __enter__(self):
        return self.lock.__enter__()

    def __exit__(self, *exc):
        self.lock.__exit__(*exc)
        hook = self.hook
        if hook is not None and self.client.in_loop_thread():
            self.hook = None
            hook()


def test_a_direct_job_answered_as_its_cancel_comes_leaves_no_worker_to_be_killed_on_the_line(
        tmp_path):
    """The answer is read in the user thread just as the loop thread
    cancels the call (between the cancel's look at the line and its kill):
    whichever wins, the line takes no other call on the worker the cancel
    kills (there a later lone job was lost, WORKER_LOST)."""
    with cluster(tasks.hold) as c:
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        line = lent(c)
        job = direct(c, marker, gate)
        read_marker(marker)
        reader = threading.Thread(target=job, kwargs={"timeout": 30})
        reader.start()
        poll_for(lambda: line.owner == "user", timeout=30, message="the answer read in a thread")
        hooked = line.lock = _HookedLock(line.lock, c._client)

        def answer_read_now():
            open(gate, "w").close()
            poll_for(lambda: line.job is None, timeout=30, message="the answer read")
        hooked.hook = answer_read_now
        assert c.cancel(job) == 0
        reader.join(30)
        job(timeout=30)
        c._client.call(lambda: None)  # (the loop thread's part of the cancel is over)
        assert hooked.hook is None, "the interleaving did not happen"
        assert job.status in (DispyJob.Finished, DispyJob.Terminated)
        worker = line.worker
        assert not (line.free() and worker.killing is not None), \
            "the line's next call goes to a worker being killed"
        assert c.submit(str(tmp_path / "m2"), gate)(timeout=30) > 0


def test_a_cancel_that_comes_as_a_direct_job_becomes_the_sessions_is_not_lost(tmp_path):
    """The job's provisional result makes it the session's (_pass_on): a
    cancel the loop thread takes between the line letting the call go and
    the session taking it (_hand_over) finds it on neither; it still
    stops the job (it ran on to its end, reported Finished)."""
    with cluster(tasks.provisional_then_hold) as c:
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        line = lent(c)
        hand_over, handed = line._hand_over, []

        def cancelled_meanwhile(job, *rest):
            c._client.cancel(job)  # (loop thread: takes effect at once)
            hand_over(job, *rest)
            handed.append(job)
        line._hand_over = cancelled_meanwhile
        job = direct(c, marker, gate)
        (pid,), _ = read_marker(marker)
        reader = threading.Thread(target=job, kwargs={"timeout": 30})
        reader.start()
        poll_for(lambda: handed, timeout=30, message="the call handed to the session")
        stopped = _polled(lambda: pid_gone(pid), timeout=10)  # (else it waits for the gate)
        open(gate, "w").close()
        reader.join(30)
        job(timeout=30)
        assert stopped and job.status == DispyJob.Terminated and job.result is None


def _polled(condition, timeout):
    try:
        poll_for(condition, timeout=timeout)
    except AssertionError:
        return False
    return True


def test_a_worker_dying_under_a_direct_job():
    with cluster(tasks.die_or_value) as c:
        job = direct(c, "die")
        assert job(timeout=30) is None
        assert job.status in (DispyJob.Terminated, DispyJob.Abandoned)
        assert job.exception
        assert c.submit(5)(timeout=30) == 5


def test_threads_submitting_and_waiting():
    with cluster(tasks.double) as c:
        submit_and_wait_in_threads(c)


def test_a_cluster_with_callbacks_keeps_the_loop_path():
    seen = []
    with cluster(tasks.double, job_status=lambda job: seen.append(job.status)) as c:
        assert c._client._direct is None
        job = c.submit(4)
        assert type(job.core_job.future) is not DirectFuture
        assert job(timeout=30) == 8
    assert seen.count(DispyJob.Finished) == 2  # (the warm-up job's and this one's)


def test_a_cluster_with_a_cleanup_keeps_the_loop_path(tmp_path):
    """The user's cleanup runs in one of the session's workers: none is
    lent (a lent one is the session's end's to kill)."""
    marker = str(tmp_path / "cleaned")
    with cluster(tasks.double, cleanup=functools.partial(tasks.cleanup_marks, marker)) as c:
        for i in range(3):
            job = c.submit(i)
            assert type(job.core_job.future) is not DirectFuture
            assert job(timeout=30) == 2 * i
