"""Review of the node side of dispy's features and recovery: regressions."""
import os
import time

import pytest

import dpool as dispy
from dpool import protocol as P
from conftest import poll_for
from helpers_engine import dpool_node, node_secret, pid_gone  # noqa: F401 (fixtures)
import helpers_review_dispy as R

pytestmark = pytest.mark.timeout(30)


def cluster_on(node, fn, **kwargs):
    kwargs.setdefault("secret", node.secret)
    kwargs.setdefault("nodes", [node.address])
    return dispy.JobCluster(fn, **kwargs)


def test_cleanup_runs_after_close_terminate_with_every_cpu_busy(dpool_node, tmp_path):
    """close(terminate=True) kills the running jobs' workers; the cleanup
    function must still run once (in a replacement worker)."""
    marker = str(tmp_path / "cleanup-ran")
    cluster = cluster_on(dpool_node, R.hold_until, cleanup=R.cleanup_marks,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=(marker,))])
    gate = str(tmp_path / "never")
    jobs = [cluster.submit(gate, str(tmp_path / f"m{i}")) for i in range(2)]
    poll_for(lambda: all(os.path.exists(tmp_path / f"m{i}") for i in range(2)), 10,
             message="both jobs to run")
    pids = [int(open(tmp_path / f"m{i}").read()) for i in range(2)]
    # What close(terminate=True) sends, CANCEL then BYE, back to back (so the
    # node has not replaced the killed workers yet when BYE arrives).
    client = cluster._client
    link, = client.links

    def cancel_and_bye():
        link.conn.send([P.encode(P.CANCEL, [job._job.id for job in jobs])])
        link.conn.send([P.encode(P.BYE)])
    client.loop.call_soon_threadsafe(cancel_and_bye)
    assert cluster.close(terminate=True)
    poll_for(lambda: os.path.exists(marker), 5, message="cleanup to run")
    assert int(open(marker).read()) not in pids
    poll_for(lambda: all(pid_gone(p) for p in pids), 5, message="the jobs' workers to die")


def test_a_cleanup_that_kills_its_process_does_not_hold_the_session(dpool_node, tmp_path):
    """The worker running cleanup dies: the session ends then (its other
    workers are killed, its CPUs freed), not CLEANUP_TIMEOUT (10 s) later."""
    cluster = cluster_on(dpool_node, R.hold_until, cleanup=R.cleanup_dies,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=("unused",))])
    gate = tmp_path / "gate"
    jobs = [cluster.submit(str(gate), str(tmp_path / f"m{i}")) for i in range(2)]
    poll_for(lambda: all(os.path.exists(tmp_path / f"m{i}") for i in range(2)), 10,
             message="both jobs to run")
    gate.touch()
    pids = {job(timeout=10) for job in jobs}
    assert len(pids) == 2
    cluster.close()
    poll_for(lambda: all(pid_gone(p) for p in pids), 4, message="the session's workers to die")
    assert "the process running cleanup" in dpool_node.stderr()


def test_a_dependency_the_node_cannot_write_does_not_keep_a_recoverable_session(
        dpool_node, tmp_path, monkeypatch):
    """The node cannot write a dependency: the client leaves the node out.
    With recover_file the node must not keep that session (and its CPUs)
    for --keep-results seconds as if the client had died."""
    from dpool.errors import BrokenCluster

    outside, cwd = tmp_path / "outside", tmp_path / "cwd"
    (cwd / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "sub").write_text("a file named sub")
    (cwd / "sub" / "a.txt").write_text("a file under the folder sub")
    monkeypatch.chdir(cwd)
    with pytest.raises(BrokenCluster, match="cannot write"):
        cluster_on(dpool_node, R.fast, depends=[str(outside / "sub"), "sub/a.txt"],
                   recover_file=str(tmp_path / "_dispy_review"))
    with cluster_on(dpool_node, R.fast) as cluster:
        assert cluster.submit(5)(timeout=10) == 5
        assert [node.cpus for node in cluster.status().nodes] == [2]
    assert "kept for" not in dpool_node.stderr()


def test_program_in_a_subfolder_of_the_working_directory(dpool_node, tmp_path, monkeypatch):
    """JobCluster('bin/prog'): the program is sent as bin/prog (its path under
    the working directory is kept); the job must run that file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin").mkdir()
    prog = tmp_path / "bin" / "review-prog-7"
    prog.write_text("#!/bin/sh\necho \"args: $*\"\nexit 7\n")
    prog.chmod(0o755)
    with cluster_on(dpool_node, "bin/review-prog-7") as cluster:
        job = cluster.submit("a", 1)
        assert job(timeout=10) == 7, job.exception
        assert job.stdout == "args: a 1\n"
