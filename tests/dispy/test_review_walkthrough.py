"""Found by walking through README.md and docs/ as a new user: each test pins
a place where the code did not do what the docs say."""
import os
import socket
import subprocess
import sys

import dpool
from conftest import poll_for
from dpool.futures import Executor
from helpers_engine import (dpool_node, double, node_env, node_secret,  # noqa: F401 (fixtures)
                            start_node)


def test_zygote_exits_quietly_when_the_node_closed_before_the_fork_reply():
    """``Executor(max_workers=4)`` shut down at once sometimes printed a
    zygote ``BrokenPipeError`` traceback: the node had stopped reading the
    control socket while a fork request was in flight, and the b"P" reply
    raised (``_reap`` already ignored that; ``_serve_request`` did not)."""
    ours, theirs = socket.socketpair()
    worker_ours, worker_theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from dpool.node.zygote import main; main()",
             str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], env=node_env(), stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        theirs.close()
        ours.shutdown(socket.SHUT_RD)  # the zygote's replies now fail with EPIPE
        socket.send_fds(ours, [b"S"], [worker_theirs.fileno()])
        worker_theirs.close()
        try:
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert b"Traceback" not in err, err.decode(errors="replace")
        assert proc.returncode == 0, err.decode(errors="replace")
        worker_ours.settimeout(10)
        assert worker_ours.recv(1) == b""  # the forked worker was killed with it
    finally:
        ours.close()
        worker_ours.close()
        worker_theirs.close()


def test_dpool_node_refuses_a_port_out_of_range(tmp_path):
    """``dpool-node --port 99999`` used to listen on port 34463 (99999 mod
    65536, getaddrinfo's wrap-around) and say so, instead of refusing."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpool.daemons.node", "--port", "99999", "--cpus", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=node_env(b"walkthrough"), cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 2, (out, err)
    assert b"serving" not in out
    assert b"--port" in err and b"65535" in err, err


def test_fallback_to_embedded_does_not_deny_the_node_it_could_not_use(dpool_node, caplog):
    """With a wrong secret for the local dpool-node, JobCluster() warned that
    the node could not be used, then logged "no dpool-node at 127.0.0.1:PORT;
    started an embedded local node": the node was there."""
    caplog.set_level("INFO", logger="dpool")
    with dpool.JobCluster(double, node_port=dpool_node.port, secret=b"wrong") as cluster:
        assert cluster.submit(21)(timeout=10) == 42
    lines = [r.getMessage() for r in caplog.records if "embedded" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "no dpool-node at" not in lines[0], lines[0]
    assert f"127.0.0.1:{dpool_node.port}" in lines[0], lines[0]


def test_lost_node_warning_says_which_node(tmp_path, dpool_node, node_secret, caplog):
    """Two dpool-nodes on one host: killing one logged "lost node vm: node vm
    closed the connection", which does not say which of the two was lost."""
    caplog.set_level("WARNING", logger="dpool")
    doomed = start_node(tmp_path / "doomed", cpus=1, secret=node_secret)
    try:
        with Executor(nodes=[dpool_node.address, doomed.address], secret=node_secret) as ex:
            assert ex.submit(double, 2).result(10) == 4
            doomed.kill()
            lost = poll_for(lambda: [r.getMessage() for r in caplog.records
                                     if r.getMessage().startswith("lost node")], 10,
                            message="the lost node warning")
            assert f"127.0.0.1:{doomed.port}" in lost[0], lost
            assert ex.submit(double, 3).result(10) == 6
    finally:
        doomed.kill()


def test_executor_refuses_a_node_port_out_of_range():
    """``Executor(nodes="127.0.0.1:99999")`` connected to port 34463
    (getaddrinfo's wrap-around) and reported a refused connection there."""
    import pytest

    for nodes in ("127.0.0.1:99999", [("127.0.0.1", 99999)], "127.0.0.1:-1"):
        with pytest.raises(ValueError, match="65535"):
            Executor(nodes=nodes, secret="x")
        with pytest.raises(ValueError, match="65535"):
            dpool.Pool(nodes=nodes, secret="x")


def test_jobcluster_refuses_a_node_port_out_of_range():
    """``JobCluster(nodes=[("127.0.0.1", 99999)])`` (and NodeAllocate) connected
    to port 34463, getaddrinfo's wrap-around, instead of refusing the port."""
    import pytest

    for nodes in ([("127.0.0.1", 99999)], [("127.0.0.1", 70000)]):
        with pytest.raises(ValueError, match="65535"):
            dpool.JobCluster(double, nodes=nodes, secret="x")
    with pytest.raises(ValueError, match="65535"):
        dpool.NodeAllocate("127.0.0.1", port=99999)
