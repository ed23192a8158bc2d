"""recover_jobs leftovers (issue 12): jobs still queued in the client when
it died, ids set after submit and of any type, a node's refusal logged as a
warning; and dispy_send_file names relative to the job folder."""
import logging
import os
import sys

import pytest

import dpool as dispy
from helpers import cluster_on, kill_once_ready, poll_for, start_node

pytestmark = pytest.mark.timeout(60)

CLIENT = """
import os, sys, time
import dpool as dispy
from tasks import hold
port, secret, recover_file, tmp = sys.argv[1:]
cluster = dispy.JobCluster(hold, nodes=[("127.0.0.1", int(port))], secret=secret,
                           recover_file=recover_file)
for i in range(6):  # 2 CPUs: 4 jobs go to the node (2 run), 2 wait in the client
    job = cluster.submit(os.path.join(tmp, f"m-{i}"), os.path.join(tmp, "never"))
    job.id = ("job", i)  # set after submit, as dispy's programs do; a tuple
while not (os.path.exists(os.path.join(tmp, "m-0")) and os.path.exists(os.path.join(tmp, "m-1"))):
    time.sleep(0.01)
open(os.path.join(tmp, "ready"), "w").close()
time.sleep(60)
"""


def killed_client(node, tmp_path):
    recover_file = str(tmp_path / "_dispy_dropin")
    kill_once_ready([sys.executable, "-c", CLIENT, str(node.port), node.secret.decode(),
                     recover_file, str(tmp_path)], tmp_path, 30)
    return recover_file


def test_recover_jobs_returns_every_job_with_its_id(tmp_path, node_secret, caplog):
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret)
    try:
        recover_file = killed_client(node, tmp_path)
        poll_for(lambda: "kept for" in node.stderr(), 10, message="the node to detach")
        with caplog.at_level(logging.WARNING, logger="dpool"):
            jobs = dispy.recover_jobs(recover_file, timeout=20, terminate_pending=True)
    finally:
        assert node.terminate() == 0, node.stderr()
    by_id = {job.id: job for job in jobs}
    assert sorted(by_id) == [("job", i) for i in range(6)]  # tuples, as set after submit
    statuses = sorted(job.status for job in jobs)
    assert statuses.count(dispy.DispyJob.Abandoned) == 2  # queued in the client
    for job in jobs:
        assert job.finish.is_set()
        if job.status == dispy.DispyJob.Abandoned:
            assert "queued in the client" in job.exception
    assert "no node kept them" in caplog.text
    assert not os.path.exists(recover_file)


def test_a_nodes_refusal_is_a_warning_and_its_jobs_come_back(tmp_path, node_secret, caplog):
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret,
                      args=["--keep-results", "0.3"])
    try:
        recover_file = killed_client(node, tmp_path)
        poll_for(lambda: "did not come back within 0.3s" in node.stderr(), 10,
                 message="the node to discard the session")
        with caplog.at_level(logging.WARNING, logger="dpool"):
            jobs = dispy.recover_jobs(recover_file, timeout=5)
    finally:
        assert node.terminate() == 0, node.stderr()
    assert "refused" in caplog.text and "keeps no results" in caplog.text
    assert sorted(job.id for job in jobs) == [("job", i) for i in range(6)]
    assert {job.status for job in jobs} == {dispy.DispyJob.Abandoned}


def sends_from_a_subfolder(text):
    os.makedirs("sub", exist_ok=True)
    os.chdir("sub")
    with open("out.txt", "w") as f:
        f.write(text)
    return dispy_send_file("out.txt")  # noqa: F821 (injected on the node)


def test_dispy_send_file_names_are_relative_to_the_job_folder(dpool_node, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    with cluster_on(dpool_node, sends_from_a_subfolder) as cluster:
        job = cluster.submit("hello")
        assert job(timeout=30) == 0, job.exception
    assert (tmp_path / "sub" / "out.txt").read_text() == "hello"


def test_a_job_whose_connection_dropped_is_not_recovered_again(dpool_node, tmp_path):
    """The connection drops while the node stays up: the node keeps the
    session (the job runs on there), the client ends the job (node lost).
    recover_jobs must not hand that job back a second time."""
    from tasks import hold

    recover_file = str(tmp_path / "_dispy_dropped")
    marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
    cluster = cluster_on(dpool_node, hold, recover_file=recover_file)
    try:
        job = cluster.submit(marker, gate)
        poll_for(lambda: os.path.exists(marker), 20, message="the job to start")
        cluster._client.links[0].conn.abort()  # fault injection: the link is cut
        poll_for(lambda: not cluster.status().nodes, 10, message="the node to be lost")
        cluster.cancel(job)  # (with no node left it would wait for one)
        job(timeout=20)
        assert job.finish.is_set()  # the client saw it end
        poll_for(lambda: "kept for" in dpool_node.stderr(), 10, message="the node to keep it")
        open(gate, "w").close()  # it finishes on the node: kept there
        poll_for(lambda: os.path.exists(marker + ".done"), 10, message="the job to finish")
        assert dispy.recover_jobs(recover_file, timeout=10) == []
    finally:
        cluster.close(terminate=True)


def test_an_id_set_on_a_job_that_ended_before_submit_returned(tmp_path, monkeypatch):
    """``job = cluster.submit(x); job.id = x`` (dispy's seed program) with a
    recover file, when the job ends before submit returns (the user thread
    descheduled a moment; 8 in 3,000 instant jobs here): the id is set, no
    AttributeError from the recover file's record of it."""
    with dispy.JobCluster(abs, cpus=1, recover_file=str(tmp_path / "rec"),
                          loglevel=None) as cluster:
        core_submit = cluster._client.submit

        def submit_and_end(*args, **kwargs):  # the job ends before submit returns
            core_job = core_submit(*args, **kwargs)
            core_job.future.exception(30)
            poll_for(lambda: args[3].is_done(), 30, message="the job's end to be taken")
            return core_job

        monkeypatch.setattr(cluster._client, "submit", submit_and_end)
        job = cluster.submit(-3)
        job.id = "mine"
        assert job() == 3 and job.id == "mine" and job.status == dispy.DispyJob.Finished
