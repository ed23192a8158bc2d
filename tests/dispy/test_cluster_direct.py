"""JobCluster jobs on the direct-call path (issue 13): a lone job of a
cluster without callbacks, whose only node is a dpool-node, is written and
answered on the node's link by the calling thread (dpool/core/tcpline.py),
as Executor's lone calls are.  Every dispy property of the job, the
cluster's counts and the node calls must be what the loop-thread path gives."""
from concurrent.futures import Future
import signal
import threading

import pytest

import dpool
from dpool.core.direct import DirectFuture
from dpool.core.tcpline import TcpLine
from dpool.dispy.env import JobEnv
from dpool.dispy.recover import RecoverFile
import tasks
from helpers import cluster_on, pid_gone, poll_for, read_marker, start_node

DispyJob = dpool.DispyJob
pytestmark = pytest.mark.timeout(60)
SECRET = b"jobcluster-direct-secret"
#: No heartbeat tick during a test: a tick takes the parked link back (by
#: design), which would make "this job went direct" a matter of timing.
QUIET = (60.0, 240.0)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    warm = tmp_path_factory.mktemp("warm")
    WARM_UP[tasks.hold] = (str(warm / "marker"), str(warm))  # (the gate is open)
    node = start_node(tmp_path_factory.mktemp("node"), cpus=1, secret=SECRET)
    yield node
    node.terminate()


def cluster(node, fn, **kwargs):
    """A JobCluster on ``node`` that ran one job (its link may park now)."""
    c = cluster_on(node, fn, heartbeat=QUIET, **kwargs)
    try:
        c.submit(*WARM_UP[fn])(timeout=30)
    except BaseException:
        c.close(terminate=True)
        raise
    return c


WARM_UP = {tasks.double: (0,), tasks.echo_outputs: (0,), tasks.fails: (0,),
           tasks.provisional: (0,), tasks.nap: (0,),
           tasks.die_or_value: (0,)}


def parked(c):
    """Wait until a lone job may go direct (a job on the normal path parks
    the link again when it ends), on the link or on the node's channel
    (tests/dispy/test_cluster_channel.py: both are the direct path)."""
    line = c._client._direct
    assert isinstance(line, TcpLine)
    for _ in range(50):
        try:
            # (not while the node's channel opens: once open it takes the
            # link back from a thread reading a job on it, to lend the channel)
            poll_for(lambda: line.free() and line.chan.opening is None, timeout=1,
                     message="the link to be parked")
            return line
        except AssertionError:
            c.submit(*WARM_UP[c.computation])(timeout=30)
    raise AssertionError("the node's link was never parked")


def direct(c, *args):
    """Submit once the link is parked, and check the job went direct."""
    parked(c)
    job = c.submit(*args)
    assert type(job.core_job.future) is DirectFuture, "the job went the normal way"
    return job


def started(tmp_path, c, name="m"):
    """A direct ``hold`` job, once it runs: (job, gate path, worker pid)."""
    marker, gate = str(tmp_path / name), str(tmp_path / (name + ".gate"))
    job = direct(c, marker, gate)
    (pid,), _ = read_marker(marker)
    return job, gate, pid


# ------------------------------------------------------------------ results

def test_lone_jobs_go_direct_with_every_field(node):
    with cluster(node, tasks.echo_outputs) as c:
        for i in range(5):
            job = direct(c, i)
            job.id = f"job-{i}"
            assert job() == i
            assert job.status == DispyJob.Finished
            assert job.submit_time <= job.start_time <= job.end_time
            assert job.ip_addr == "127.0.0.1"
            assert job.stdout == f"stdout of job {i}\n"
            assert job.stderr == f"stderr of job {i}\n"
            assert job.exception is None and job.id == f"job-{i}"
            assert job.finish.is_set()


def test_an_exception_comes_back_as_dispy_gives_it(node):
    with cluster(node, tasks.fails) as c:
        normal = c.submit_node("127.0.0.1", 7)  # (pinned: the normal path)
        assert normal() is None
        job = direct(c, 7)
        assert job() is None
        assert job.status == normal.status == DispyJob.Terminated
        assert "ValueError: boom-7" in job.exception and "Traceback" in job.exception
        assert job.exception.replace("7", "") == normal.exception.replace("7", "")


def test_waiting_on_finish_alone_sees_the_end(node):
    with cluster(node, tasks.double) as c:
        job = direct(c, 21)
        assert job.finish.wait(10)  # (within the heartbeat tick that takes the link back)
        assert job.result == 42 and job.status == DispyJob.Finished


def test_polling_the_status_alone_sees_the_end(node):
    with cluster(node, tasks.double) as c:
        job = direct(c, 5)
        poll_for(lambda: job.status == DispyJob.Finished, message="status Finished")
        assert job.result == 10


def test_cluster_wait_alone_sees_the_end(node):
    with cluster(node, tasks.double) as c:
        job = direct(c, 4)
        assert c.wait(30) is True
        assert job.result == 8 and job.status == DispyJob.Finished


def test_a_job_timeout_keeps_the_answer(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        job, gate, pid = started(tmp_path, c)
        assert job(timeout=0.1) is None and job.status == DispyJob.Running
        open(gate, "w").close()
        assert job(timeout=30) == pid and job.status == DispyJob.Finished


def test_a_second_job_while_a_direct_one_runs(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        job, gate, pid = started(tmp_path, c)
        second = c.submit(str(tmp_path / "second"), gate)
        open(gate, "w").close()
        assert second(timeout=30) > 0 and job(timeout=30) == pid
        assert job.status == second.status == DispyJob.Finished


def test_a_recover_file_that_fails_to_write_loses_no_job(node, tmp_path, monkeypatch):
    """The recover file can't be written (disk full) as a job ends: the job
    still ends, direct or not (before, its DispyJob was never finished and
    job() waited forever)."""
    with cluster(node, tasks.double, recover_file=str(tmp_path / "recover")) as c:
        def full(self, core_id):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(RecoverFile, "done", full)
        job = direct(c, 4)
        assert job(timeout=10) == 8 and job.status == DispyJob.Finished
        normal = c.submit_node("127.0.0.1", 5)
        assert normal(timeout=10) == 10 and normal.status == DispyJob.Finished
        monkeypatch.undo()


# ----------------------------------------------------- counts and node calls

def test_status_counts_a_direct_job_busy_then_done(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        before = c.status().nodes[0].jobs_done
        job, gate, pid = started(tmp_path, c)
        info = c.status()
        assert info.jobs_pending == 1 and [n.busy for n in info.nodes] == [1]
        assert c.node_jobs("127.0.0.1") == [job]
        open(gate, "w").close()
        assert job(timeout=30) == pid
        info = c.status()
        assert info.jobs_pending == 0 and [n.busy for n in info.nodes] == [0]
        assert info.nodes[0].jobs_done == before + 1
        assert info.nodes[0].cpu_time > 0


def test_polling_cluster_status_alone_sees_the_end(node):
    """A program that polls status() for jobs_pending == 0 (nobody calls
    job() or wait()) sees a direct job end without waiting for the next
    heartbeat tick (none comes during the test: QUIET)."""
    with cluster(node, tasks.double) as c:
        before = c.status().nodes[0].jobs_done
        job = direct(c, 6)
        poll_for(lambda: c.status().jobs_pending == 0, message="jobs_pending 0")
        info = c.status()
        assert [n.busy for n in info.nodes] == [0] and info.nodes[0].jobs_done == before + 1
        assert job.is_done() and job.result == 12


def test_cancel_terminates_a_direct_job(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        job, gate, pid = started(tmp_path, c)
        assert c.cancel(job) == 0
        assert job(timeout=30) is None
        assert job.status == DispyJob.Terminated
        assert c.cancel(job) == -1
        poll_for(lambda: pid_gone(pid), 15, message="the job's process to end")
        after = c.submit(str(tmp_path / "after"), gate)
        open(gate, "w").close()
        assert after(timeout=30) > 0


def test_a_deallocated_node_gets_no_direct_job(node, tmp_path):
    with cluster(node, tasks.double) as c:
        parked(c)
        assert c.deallocate_node("127.0.0.1") == 0
        poll_for(lambda: not c._client._direct.free(), message="the link taken back")
        job = c.submit(3)
        assert type(job.core_job.future) is not DirectFuture
        assert job(timeout=0.3) is None and job.status == DispyJob.Created
        assert c.allocate_node("127.0.0.1") == 0
        assert job(timeout=30) == 6


def test_close_node_waits_for_a_direct_job(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        job, gate, pid = started(tmp_path, c)
        assert c.close_node("127.0.0.1") == 0
        assert job(timeout=0.3) is None  # still running: close_node lets it finish
        open(gate, "w").close()
        assert job(timeout=30) == pid and job.status == DispyJob.Finished
        poll_for(lambda: not c._client.nodes(), message="the node closed once idle")


def test_close_node_terminating_a_direct_job(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        job, gate, pid = started(tmp_path, c)
        assert c.close_node("127.0.0.1", terminate_pending=True) == 0
        assert job(timeout=30) is None and job.status == DispyJob.Terminated
        poll_for(lambda: pid_gone(pid), 15, message="the job's process to end")


def test_send_file_while_the_link_is_parked(node, tmp_path):
    """send_file on a node whose link is parked for direct calls: the loop
    thread takes the link back to write the file and read the node's
    answer (before, it wrote on the parked link and nobody read the answer
    until the next heartbeat tick: none in QUIET, so send_file timed out)."""
    path = tmp_path / "sent.txt"
    path.write_text("sent")
    with cluster(node, tasks.double) as c:
        parked(c)
        assert c.send_file(str(path), "127.0.0.1", timeout=10) == 0
        assert c.submit(7)(timeout=30) == 14


def test_send_file_while_a_thread_reads_a_direct_job(node, tmp_path):
    """send_file while a user thread holds the link (reading a direct
    job's answer): written once the thread hands the link back."""
    path = tmp_path / "sent.txt"
    path.write_text("sent")
    with cluster(node, tasks.hold) as c:
        job, gate, pid = started(tmp_path, c)
        got = []
        reader = threading.Thread(target=lambda: got.append(job(timeout=30)))
        reader.start()
        try:
            line = c._client._direct
            poll_for(lambda: line.owner == "user", message="the reader to hold the link")
            assert c.send_file(str(path), "127.0.0.1", timeout=10) == 0
        finally:
            open(gate, "w").close()
            reader.join(30)
        assert got == [pid] and job.status == DispyJob.Finished


def test_send_file_unanswered_returns_minus_one(node, tmp_path, monkeypatch):
    """send_file's node not answering within ``timeout``: -1, as for any
    file not written (dispy's send_file returns 0 or -1), not TimeoutError."""
    path = tmp_path / "sent.txt"
    path.write_text("sent")
    with cluster(node, tasks.double) as c:
        monkeypatch.setattr(JobEnv, "send_file", lambda *args, **kwargs: Future())
        assert c.send_file(str(path), "127.0.0.1", timeout=0.1) == -1
        monkeypatch.undo()


def test_submit_node_takes_the_normal_path(node, tmp_path):
    with cluster(node, tasks.hold) as c:
        parked(c)
        marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
        job = c.submit_node("127.0.0.1", marker, gate)
        assert type(job.core_job.future) is not DirectFuture
        (pid,), _ = read_marker(marker)
        open(gate, "w").close()
        assert job(timeout=30) == pid and job.ip_addr == "127.0.0.1"


def test_provisional_results_of_a_direct_job(node):
    with cluster(node, tasks.provisional) as c:
        job = direct(c, 3)
        assert job(timeout=30) == ("final", 3) and job.status == DispyJob.Finished


def submit_and_wait_in_threads(c):
    """Three threads submit 30 jobs each to ``c`` (tasks.double), each
    waiting for its job: every result is its own."""
    out, errors = {}, []

    def run(k):
        try:
            for i in range(30):
                out[(k, i)] = c.submit(i)(timeout=30)
        except BaseException as exc:  # (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert out == {(k, i): 2 * i for k in range(3) for i in range(30)}


def test_threads_submitting_and_waiting(node):
    with cluster(node, tasks.double) as c:
        submit_and_wait_in_threads(c)


# ------------------------------------------------------------------ liveness

def test_a_worker_dying_under_a_direct_job(node):
    with cluster(node, tasks.die_or_value) as c:
        job = direct(c, "die")
        assert job(timeout=30) is None
        assert job.status in (DispyJob.Terminated, DispyJob.Abandoned)
        assert job.exception
        assert c.submit(5)(timeout=30) == 5


def test_close_terminate_with_a_direct_job_running(node, tmp_path):
    c = cluster(node, tasks.hold)
    job, gate, pid = started(tmp_path, c)
    assert c.close(terminate=True) is True
    assert job(timeout=10) is None and job.status == DispyJob.Terminated
    poll_for(lambda: pid_gone(pid), 15, message="the job's process to end")


def test_a_node_dying_under_a_direct_job(node, tmp_path):
    doomed = start_node(tmp_path / "doomed", cpus=1, secret=SECRET)
    try:
        c = cluster(doomed, tasks.hold)
        try:
            job, gate, pid = started(tmp_path, c)
            doomed.kill()
            assert job(timeout=30) is None
            assert job.status == DispyJob.Abandoned and job.exception
        finally:
            c.close(terminate=True)
    finally:
        doomed.kill()


def test_ctrl_c_while_job_waits_keeps_the_answer(node, monkeypatch):
    """Ctrl-C while job() reads a direct job's answer: job() raises, the
    loop thread reads the answer, the next job() returns it."""
    with cluster(node, tasks.double) as c:
        job = direct(c, 8)

        def interrupted(self, job, events, timed_out):  # (as if in poll: nothing read)
            raise KeyboardInterrupt
        monkeypatch.setattr(TcpLine, "_handle", interrupted)
        with pytest.raises(KeyboardInterrupt):
            job()
        monkeypatch.undo()
        assert job(timeout=30) == 16 and job.status == DispyJob.Finished
        assert direct(c, 9)(timeout=30) == 18


def test_ctrl_c_as_the_job_is_filled_in_loses_nothing(node):
    """Ctrl-C landing while the reading thread fills in the DispyJob (the
    cluster's done event, run in the main thread): delivered once the job
    is finished, its fields whole."""
    assert threading.current_thread() is threading.main_thread()
    with cluster(node, tasks.echo_outputs) as c:
        handler = c._client.on_event

        def on_event(kind, obj):
            if kind == "done":
                signal.raise_signal(signal.SIGINT)
            handler(kind, obj)
        c._client.on_event = on_event
        job = direct(c, 3)
        try:
            with pytest.raises(KeyboardInterrupt):
                job()
        finally:
            c._client.on_event = handler
        assert job.is_done() and job.finish.is_set()
        assert job.result == 3 and job.status == DispyJob.Finished
        assert job.stdout == "stdout of job 3\n" and c.status().jobs_pending == 0
        assert direct(c, 4)(timeout=30) == 4


# ------------------------------------------------------------- not direct

def test_a_cluster_with_callbacks_keeps_the_loop_path(node, tmp_path):
    seen = []
    with cluster(node, tasks.hold, job_status=lambda job: seen.append(job.status)) as c:
        assert c._client._direct is None
        gate = str(tmp_path / "gate")
        job = c.submit(str(tmp_path / "m"), gate)  # (held: core_job is there until the gate)
        assert type(job.core_job.future) is not DirectFuture
        open(gate, "w").close()
        assert job(timeout=30) > 0
    assert seen.count(DispyJob.Finished) == 2  # (the warm-up job's and this one's)
