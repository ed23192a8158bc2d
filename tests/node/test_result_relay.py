"""A dpool-node relays a large result to its client as it arrives from the
worker (issue 15): what the client gets when the relay is cut (the worker
killed, the job cancelled), and that the connection and its other jobs go on.

The client runs in a child process so that the test can stop it (SIGSTOP):
a client that reads nothing makes the node stop reading the worker (the
relay's backpressure), so the worker stays blocked in the middle of sending
its result, with part of it already relayed.  (A node that held the result
whole before sending it on read it all at once: the worker never blocked.)"""
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from helpers import cluster_on, node_env, pid_gone, poll_for, start_node

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not sys.platform.startswith("linux")
                                 or os.uname().machine != "x86_64",
                                 reason="reads /proc/PID/syscall (x86_64 numbers)")]

SIZE = 64 * 2**20
SENDMSG = 46  # x86_64

CHILD = '''
import json, os, sys, time
import dpool, dpool.futures
from dpool import DispyJob

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)

def stalled_result(n, pid_file, gate):
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    wait_for(gate)
    return b"y" * n

def other(gate):
    wait_for(gate)
    return "other"

def make_bytes(n):
    return b"z" * n

mode, port, d, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
secret = os.environ["DPOOL_SECRET"]
out = {}
if mode == "kill":
    with dpool.futures.Executor(max_workers=2, nodes=[("127.0.0.1", port)],
                                secret=secret) as ex:
        big = ex.submit(stalled_result, n, d + "/pid", d + "/gate")
        small = ex.submit(other, d + "/gate2")
        try:
            big.result(120)
            out["big"] = "no error"
        except Exception as exc:
            out["big"] = type(exc).__name__
        out["other"] = small.result(120)
        out["after"] = ex.submit(make_bytes, n).result(120) == b"z" * n
elif mode == "stall":
    with dpool.futures.Executor(max_workers=2, nodes=[("127.0.0.1", port)],
                                secret=secret) as ex:
        big = ex.submit(stalled_result, n, d + "/pid", d + "/gate")
        small = ex.submit(other, d + "/gate2")
        out["other"] = small.result(120)
        with open(d + "/other.tmp", "w") as f:
            f.write(out["other"])
        os.rename(d + "/other.tmp", d + "/other")
        try:
            big.result(120)
            out["big"] = "no error"
        except Exception as exc:
            out["big"] = type(exc).__name__
        out["after"] = ex.submit(make_bytes, n).result(120) == b"z" * n
else:
    cluster = dpool.JobCluster(stalled_result, nodes=[("127.0.0.1", port)], secret=secret)
    try:
        job = cluster.submit(n, d + "/pid", d + "/gate")
        wait_for(d + "/cancel")
        cluster.cancel(job)
        result = job()
        out["terminated"] = job.status == DispyJob.Terminated
        out["result"] = None if result is None else len(result)
        again = cluster.submit(n, d + "/pid2", d + "/gate")
        out["after"] = again() == b"y" * n
    finally:
        cluster.close()
print(json.dumps(out))
'''


@pytest.fixture
def node2(tmp_path, node_secret):
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret)
    yield node
    assert node.terminate() == 0, node.stderr()


def _syscall(pid):
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def _stall_a_result(tmp_path, node, mode):
    """Start the child client; once its job runs, stop the client and let the
    job return: returns (child, worker pid) with the worker blocked in the
    middle of sending its result, part of it relayed."""
    script = tmp_path / "relay_child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), mode, str(node.port),
                              str(tmp_path), str(SIZE)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=node_env(node.secret),
                             cwd=tmp_path)
    try:
        poll_for((tmp_path / "pid").exists, 60, message="the job to start")
        worker = int((tmp_path / "pid").read_text())
        child.send_signal(signal.SIGSTOP)
        (tmp_path / "gate").touch()
        poll_for(lambda: _syscall(worker) == str(SENDMSG), 60,
                 message="the worker to block sending its result (the node relaying it)")
    except BaseException:
        child.kill()
        child.communicate()
        raise
    return child, worker


def _finish(child):
    out, err = child.communicate(timeout=150)
    assert child.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_worker_killed_in_the_middle_of_a_relayed_result(tmp_path, node2):
    """WorkerLost for that job, never a truncated result; the job finished
    meanwhile on the same connection gets its result, and the next large
    result arrives whole."""
    child, worker = _stall_a_result(tmp_path, node2, "kill")
    try:
        os.kill(worker, signal.SIGKILL)
        (tmp_path / "gate2").touch()
        child.send_signal(signal.SIGCONT)
        found = _finish(child)
    finally:
        child.kill()
    assert found == {"big": "WorkerLost", "other": "other", "after": True}, found


def test_job_cancelled_in_the_middle_of_a_relayed_result(tmp_path, node2):
    """dispy's cancel of a job whose result is being relayed: the job is
    Terminated (dispy's status for a running job cancelled) with no result,
    and the connection serves the next job."""
    child, worker = _stall_a_result(tmp_path, node2, "cancel")
    try:
        os.kill(worker, signal.SIGSTOP)   # it sends no more, even once the client reads
        child.send_signal(signal.SIGCONT)
        (tmp_path / "cancel").touch()
        poll_for(lambda: pid_gone(worker), 60, message="the cancel to kill the worker")
        found = _finish(child)
    finally:
        child.kill()
    assert found["terminated"] and found["result"] is None and found["after"], found


def test_worker_stalled_in_the_middle_of_a_relayed_result(tmp_path, node2):
    """A worker stopped in the middle of sending a relayed result (SIGSTOP)
    does not hold up the other results on its client's connection: after
    forward.STALL seconds with nothing from it the node cuts the relay
    (CHUNK_ABORT) and the other job's result goes out; once the worker
    goes on, its job gets WorkerLost (its result was cut), and the
    connection serves the next large result whole."""
    child, worker = _stall_a_result(tmp_path, node2, "stall")
    try:
        os.kill(worker, signal.SIGSTOP)
        child.send_signal(signal.SIGCONT)
        (tmp_path / "gate2").touch()
        poll_for((tmp_path / "other").exists, 90,
                 message="the other job's result, behind the stalled relay")
        os.kill(worker, signal.SIGCONT)
        found = _finish(child)
    finally:
        child.kill()
        if not pid_gone(worker):
            os.kill(worker, signal.SIGCONT)
    assert found == {"big": "WorkerLost", "other": "other", "after": True}, found


def ordered_job(kind, gate):
    import os
    import time
    if kind == "gated":
        with open(gate + ".pid", "w") as f:
            f.write(str(os.getpid()))
        while not os.path.exists(gate):
            time.sleep(0.01)
        return "gated"
    if kind == "big":
        return b"y" * (4 * 2**20)
    return kind


@pytest.fixture
def node1(tmp_path, node_secret):
    node = start_node(tmp_path / "node1", cpus=1, secret=node_secret)
    yield node
    assert node.terminate() == 0, node.stderr()


def test_messages_before_a_relayed_result_reach_the_client_first(tmp_path, node1, caplog):
    """A worker's Started for a job (dispy's job_status: notify_start) and
    the beginning of that job's large Done read by the node at once: the
    client gets the Started before the Done, never after it (a start for a
    job already done there makes the client distrust the node and drop its
    connection).  The node is stopped while the worker sends both."""
    caplog.set_level(logging.ERROR)
    statuses = []
    gate = str(tmp_path / "gate")
    cluster = cluster_on(node1, ordered_job, job_status=lambda job: statuses.append(job.status))
    try:
        for _ in range(5):   # short jobs: the node gives its worker the next job early
            assert cluster.submit("small", gate)() == "small"
        gated = cluster.submit("gated", gate)
        big = cluster.submit("big", gate)
        poll_for(lambda: os.path.exists(gate + ".pid"), 60, message="the gated job to run")
        worker = int((tmp_path / "gate.pid").read_text())
        os.kill(node1.pid, signal.SIGSTOP)
        try:
            open(gate, "w").close()
            poll_for(lambda: _syscall(worker) == str(SENDMSG), 60,
                     message="the worker to block sending the big result")
        finally:
            os.kill(node1.pid, signal.SIGCONT)
        assert gated() == "gated"
        assert big() == b"y" * (4 * 2**20)
        assert cluster.submit("small", gate)() == "small"
    finally:
        cluster.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
