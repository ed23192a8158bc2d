"""dispy compatibility, continued: DispyNode.tx/rx, AvailInfo updates,
recover_jobs.  Through the public API, against dpool-node subprocesses."""
import logging
import os
import subprocess
import sys
import threading

import pytest

import dpool as dispy
from helpers import cluster_on, node_env, pid_gone, poll_for, read_marker, start_node
from tasks import make_bytes, size_of

DispyNode = dispy.DispyNode
pytestmark = pytest.mark.timeout(30)
MB = 2**20


# ------------------------------------------------------------------ tx / rx

def test_tx_rx_count_the_bytes_sent_and_received(dpool_node, capsys):
    with cluster_on(dpool_node, size_of) as cluster:
        (node,) = cluster.status().nodes
        tx0, rx0 = node.tx, node.rx
        assert tx0 > 0 and rx0 > 0  # handshake, session, depends
        assert cluster.submit(b"a" * MB)(timeout=10) == MB
        (node,) = cluster.status().nodes
        assert node.tx - tx0 >= MB
        assert node.rx - rx0 < MB
    with cluster_on(dpool_node, make_bytes) as cluster:
        (node,) = cluster.status().nodes
        tx0, rx0 = node.tx, node.rx
        assert cluster.submit(MB)(timeout=10) == b"x" * MB
        (node,) = cluster.status().nodes
        assert node.rx - rx0 >= MB
        assert node.tx - tx0 < MB
        cluster.print_status()
    out = capsys.readouterr().out
    assert "Sent" in out and "Rcvd" in out
    assert "1.0 M" in out  # the 1 MB result, in dispy's units


# ------------------------------------------------------- AvailInfo (pulse_interval)

def test_pulse_interval_refreshes_avail_info(dpool_node):
    events = []

    def cluster_status(status, node, job):
        if status == DispyNode.AvailInfo:
            events.append((node.update_time, node.avail_info))

    with cluster_on(dpool_node, size_of, pulse_interval=0.1,
                    cluster_status=cluster_status) as cluster:
        (node,) = cluster.status().nodes
        first = node.update_time
        poll_for(lambda: len(events) >= 2, 5, message="two AvailInfo updates")
        (t1, info1), (t2, info2) = events[:2]
        assert first <= t1 <= t2
        for info in (info1, info2):
            assert isinstance(info, dispy.DispyNodeAvailInfo)
            assert info.memory > 0 and info.disk > 0
        assert node.avail_info is not None and node.update_time >= t2
    with pytest.raises(ValueError, match="pulse_interval"):
        cluster_on(dpool_node, size_of, pulse_interval=0.01)


def test_no_pulse_unless_asked(dpool_node):
    events = []
    with cluster_on(dpool_node, size_of,
                    cluster_status=lambda s, n, j: events.append(s)) as cluster:
        assert cluster.submit(b"abc")(timeout=10) == 3
    assert DispyNode.AvailInfo not in events


# ------------------------------------------------------------------ recover_jobs

CLIENT = """
import os, sys, time
import dpool as dispy
from tasks import hold
port, secret, recover_file, gate, tmp = sys.argv[1:]
cluster = dispy.JobCluster(hold, nodes=[("127.0.0.1", int(port))], secret=secret,
                           recover_file=recover_file)
done_gate = os.path.join(tmp, "open")
open(done_gate, "w").close()
quick = cluster.submit_job_id("quick", os.path.join(tmp, "m-quick"), done_gate)
slow = cluster.submit_job_id("slow", os.path.join(tmp, "m-slow"), gate)
later = cluster.submit_job_id("later", os.path.join(tmp, "m-later"), gate + "2")
quick()
while not all(os.path.exists(os.path.join(tmp, m)) for m in ("m-slow", "m-later")):
    time.sleep(0.01)
open(os.path.join(tmp, "ready"), "w").close()
time.sleep(60)
"""


def client_killed_with_jobs(node, tmp_path):
    """Run a JobCluster client in a subprocess, SIGKILL it once job "quick"
    has finished (and been received) and jobs "slow" and "later" are
    running, waiting for files ``gate`` and ``gate + "2"``; return
    (recover_file, gate, marker of "slow")."""
    recover_file, gate = str(tmp_path / "_dispy_test"), str(tmp_path / "gate")
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(node.port), node.secret.decode(),
                             recover_file, gate, str(tmp_path)],
                            env=node_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "client.err", "wb"))
    try:
        poll_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 30,
                 message="the client to submit its jobs")
        assert proc.poll() is None, (tmp_path / "client.err").read_text()
        assert oct(os.stat(recover_file).st_mode & 0o777) == "0o600"
    finally:
        proc.kill()
        proc.wait()
    return recover_file, gate, str(tmp_path / "m-slow")


def test_recover_jobs_collects_results_of_a_killed_client(dpool_node, tmp_path):
    recover_file, gate, marker = client_killed_with_jobs(dpool_node, tmp_path)
    poll_for(lambda: "kept for" in dpool_node.stderr(), 5, message="the node to detach")
    open(gate, "w").close()  # "slow" finishes while the client is gone: kept
    poll_for(lambda: os.path.exists(marker + ".done"), 5, message="job slow to finish")

    def finish_later():  # "later" finishes after recover_jobs has taken over
        poll_for(lambda: "recovered by" in dpool_node.stderr(), 5, message="recovery")
        open(gate + "2", "w").close()
    opener = threading.Thread(target=finish_later)
    opener.start()
    jobs = dispy.recover_jobs(recover_file, timeout=10)
    opener.join()
    # "quick" reached the client before it died: it is not kept.
    assert sorted(job.id for job in jobs) == ["later", "slow"]
    for job in jobs:
        assert job.status == dispy.DispyJob.Finished and isinstance(job.result, int), job.exception
        assert job.ip_addr == "127.0.0.1" and job.finish.is_set()
    assert "1 results kept, 1 jobs unfinished" in dpool_node.stderr()
    assert not os.path.exists(recover_file)  # all collected, the session ended (BYE)
    assert dispy.recover_jobs(recover_file) == []


def test_recover_jobs_terminate_pending(dpool_node, tmp_path):
    recover_file, gate, marker = client_killed_with_jobs(dpool_node, tmp_path)
    (pid,), _ = read_marker(marker)
    jobs = {job.id: job for job in dispy.recover_jobs(recover_file, timeout=10,
                                                       terminate_pending=True)}
    assert set(jobs) == {"slow", "later"}
    assert {job.status for job in jobs.values()} == {dispy.DispyJob.Terminated}
    poll_for(lambda: pid_gone(pid), 5, message="the pending job's process to be killed")


def test_kept_results_are_discarded_after_keep_results(tmp_path, node_secret, caplog):
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret,
                      args=["--keep-results", "0.3"])
    try:
        recover_file, gate, marker = client_killed_with_jobs(node, tmp_path)
        open(gate, "w").close()
        poll_for(lambda: "did not come back within 0.3s" in node.stderr(), 5,
                 message="the node to discard the session")
        assert "discarding 1 kept results and 1 unfinished jobs" in node.stderr()
        with caplog.at_level(logging.WARNING, logger="dpool"):
            jobs = dispy.recover_jobs(recover_file, timeout=5)
        # The node refused (a warning); its jobs come back Abandoned, not dropped.
        assert "keeps no results" in caplog.text
        assert sorted(job.id for job in jobs) == ["later", "slow"]
        assert {job.status for job in jobs} == {dispy.DispyJob.Abandoned}
    finally:
        assert node.terminate() == 0, node.stderr()


def test_closed_cluster_leaves_nothing_to_recover(dpool_node, tmp_path):
    recover_file = str(tmp_path / "_dispy_closed")
    with cluster_on(dpool_node, size_of, recover_file=recover_file) as cluster:
        assert cluster.submit(b"ab")(timeout=10) == 2
        assert os.path.exists(recover_file)
    assert not os.path.exists(recover_file)
    assert dispy.recover_jobs(recover_file) == []


def test_recover_jobs_timeout_zero_does_not_wait_for_a_silent_node(tmp_path):
    # timeout=0 ("collect what is there now") waited the full 10 s connect
    # timeout for a node that accepts but does not answer (0.0 or 10.0 == 10.0).
    import json
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        path = tmp_path / "_dispy_recover"
        path.write_text(json.dumps({"dpool_recover": 1}) + "\n" + json.dumps(
            {"node": ["127.0.0.1", server.getsockname()[1]], "token": "ab",
             "secret": b"s".hex()}) + "\n")
        start = time.monotonic()
        assert dispy.recover_jobs(str(path), timeout=0) == []
        assert time.monotonic() - start < 3
        assert path.exists()  # not collected: a later call may try again
