"""Issue 8, finding 7: nothing a job starts outlives it, not even a process
that left the worker's process group (``setsid``, a double fork)."""
import os
import signal
import subprocess
import sys
import time

import pytest

import dpool as dispy
from dpool.core.client import Client
from helpers import pid_gone, poll_for
from tasks import write_file

pytestmark = pytest.mark.timeout(60)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


def escape(how, marker, gate=None):
    """Job: start a process that leaves our process group, write its pid to
    ``marker``; then return, or wait (up to 60 s) for ``gate`` to exist."""
    if how == "setsid":
        pid = subprocess.Popen(SLEEPER, start_new_session=True).pid
    else:   # double fork: its parent exits at once, it is nobody's child
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.execv(sys.executable, SLEEPER)
            os.write(w, str(grandchild).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(child, 0)
        with os.fdopen(r) as f:
            pid = int(f.read())
    assert os.getpgid(pid) != os.getpgid(0)      # it did leave the worker's group
    write_file(marker, str(pid))
    deadline = time.monotonic() + 60
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pid


def escaped(marker, running=True):
    poll_for(lambda: os.path.exists(marker), 10, message="the job to start its escapee")
    pid = int(open(marker).read())
    assert not running or not pid_gone(pid)
    return pid


def gone(pid):
    try:
        poll_for(lambda: pid_gone(pid), 10, message=f"process {pid} to die with its job")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)    # (today's main: don't leave it behind)
        except ProcessLookupError:
            pass


HOW = ["setsid", "double-fork"]


@pytest.mark.parametrize("how", HOW)
def test_a_job_that_returns_leaves_nothing_behind(dpool_node, tmp_path, how):
    marker = str(tmp_path / "pid")
    with dispy.JobCluster(escape, nodes=[dpool_node.address], secret=dpool_node.secret,
                          loglevel=None) as cluster:
        job = cluster.submit(how, marker)
        assert job(timeout=10) is not None, job.exception
        gone(escaped(marker, running=False))


@pytest.mark.parametrize("how", HOW)
def test_a_cancelled_job_leaves_nothing_behind(dpool_node, tmp_path, how):
    marker, gate = str(tmp_path / "pid"), str(tmp_path / "gate")
    with dispy.JobCluster(escape, nodes=[dpool_node.address], secret=dpool_node.secret,
                          loglevel=None) as cluster:
        job = cluster.submit(how, marker, gate)
        pid = escaped(marker)
        cluster.cancel(job)
        gone(pid)


@pytest.mark.parametrize("how", HOW)
def test_a_closed_client_leaves_nothing_behind(dpool_node, tmp_path, how):
    marker = str(tmp_path / "pid")
    client = Client([dpool_node.address], secret=dpool_node.secret, connect_timeout=5).start()
    try:
        client.submit(escape, (how, marker, str(tmp_path / "gate")))
        pid = escaped(marker)
    finally:
        client.close(wait=False)
    gone(pid)


@pytest.mark.parametrize("how", HOW)
def test_a_stopped_node_leaves_nothing_behind(dpool_node, tmp_path, how):
    marker = str(tmp_path / "pid")
    client = Client([dpool_node.address], secret=dpool_node.secret, connect_timeout=5).start()
    try:
        client.submit(escape, (how, marker, str(tmp_path / "gate")))
        pid = escaped(marker)
        assert dpool_node.terminate() == 0
        gone(pid)
    finally:
        client.close(wait=False)


# ---------------------------------------- helpers meant to serve many jobs

_helper = None


def start_helper(marker):
    """Initializer: start a helper process (in a session of its own) that
    the worker's jobs use; its pid goes to ``marker``."""
    global _helper
    _helper = subprocess.Popen(SLEEPER, start_new_session=True)
    write_file(marker, str(_helper.pid))


def setup_helper():
    """dispy setup: the same, keeping the pid in a global."""
    global helper_pid
    helper_pid = subprocess.Popen(SLEEPER, start_new_session=True).pid
    return 0


def helper_status(_=None):
    """Job (after setup_helper): the helper's pid, and whether it runs."""
    return helper_pid, alive(helper_pid)  # (a global setup_helper made)


def alive(pid):
    """Job: whether process ``pid`` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def test_an_initializers_helper_lives_until_the_session_ends(dpool_node, tmp_path):
    marker = str(tmp_path / "helper")
    client = Client([dpool_node.address], secret=dpool_node.secret, connect_timeout=5,
                    cpus=1, initializer=start_helper, initargs=(marker,)).start()
    try:
        helper = escaped(marker)
        escapee = str(tmp_path / "escapee")
        client.submit(escape, ("setsid", escapee)).future.result(timeout=10)
        gone(escaped(escapee, running=False))               # the job's: killed
        for _ in range(3):
            assert client.submit(alive, (helper,)).future.result(timeout=10)  # kept
    finally:
        client.close()
    gone(helper)                                            # ... until the end


def test_a_setups_helper_lives_until_the_cluster_closes(dpool_node, tmp_path):
    cluster = dispy.JobCluster(helper_status, nodes=[dpool_node.address],
                               secret=dpool_node.secret, setup=setup_helper, loglevel=None)
    try:
        statuses = {cluster.submit(i)(timeout=10) for i in range(4)}
        [(helper, running)] = statuses
        assert running
    finally:
        cluster.close()
    gone(helper)


# ------------------------------------- a burst: the next Run already in hand

def test_a_jobs_escapee_dies_within_a_burst_of_jobs_that_keeps_its_worker_busy(tmp_path):
    """While its next Run is already read when a batch ends (a burst of
    short jobs), a worker looks for what its jobs left at most every
    REAP_EVERY seconds instead of after each batch: the escapee of the
    burst's first job dies while the burst still runs (dpool.node.worker.
    REAP_EVERY), not at its end."""
    from dpool import protocol as P
    from dpool import serialize
    from helpers import fork_worker

    pid, conn = fork_worker()

    def run(job_id, fn_id, *args):
        return [P.encode(P.Run, [P.run_item(job_id, fn_id, 1, 0)]), *serialize.dumps_call(args)]

    marker, escapee, job_id = str(tmp_path / "pid"), None, 3
    try:
        conn.send([P.encode(P.Init, {"cwd": str(tmp_path)})])
        conn.send([P.encode(P.Func, 1), serialize.dumps_function(escape)])
        conn.send([P.encode(P.Func, 2), serialize.dumps_function(time.sleep)])
        conn.send(run(1, 2, 0.001))   # (the worker's first look: after this one)
        conn.send(run(2, 1, "setsid", marker))
        for job_id in range(3, 19):   # in hand when jobs 1 and 2 end
            conn.send(run(job_id, 2, 0.001))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = P.decode(conn.recv()[0])   # a Done: one more Run, 16 ahead
            assert type(msg) is P.Done and msg.results[0][1] == P.Outcome.OK, msg
            job_id += 1
            conn.send(run(job_id, 2, 0.001))
            if escapee is None and os.path.exists(marker) and os.path.getsize(marker):
                escapee = int(open(marker).read())
            if escapee is not None and pid_gone(escapee):
                break
        assert escapee is not None and pid_gone(escapee)   # (the burst still going)
    finally:
        conn.close()
        os.waitpid(pid, 0)
        if escapee is not None and not pid_gone(escapee):
            os.kill(escapee, signal.SIGKILL)
