"""``dpool-node``: command line, CPU counts, signals and clean exit."""
import os
import pathlib
import re
import shutil
import socket
import signal
import subprocess
import sys

import pytest

import dpool
from helpers import node_env, pid_gone, poll_for, read_marker, start_node
from tasks import count_and_hold, double, getpid, hold

DispyJob = dpool.DispyJob
pytestmark = pytest.mark.timeout(30)


def run_node(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpool.daemons.node", *args],
                          env=env or node_env(None), capture_output=True, text=True,
                          timeout=15, cwd=cwd)


def test_help():
    proc = run_node("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--host", "--port", "--cpus", "--secret-file", "--certfile", "--keyfile",
                   "--cafile", "--dest-path"):
        assert option in proc.stdout
    assert "DPOOL_SECRET" in proc.stdout and "51350" in proc.stdout
    assert "--grace" in proc.stdout and "--logfile" in proc.stdout
    assert "``" not in proc.stdout  # no raw markup (issue 14)


def test_version():
    proc = run_node("--version")
    assert proc.returncode == 0, proc.stderr
    versions = dpool.serialize.runtime_versions()
    assert proc.stdout.strip() == (f"dpool-node {dpool.__version__} (Python "
                                   f"{versions['python']}, cloudpickle {versions['cloudpickle']})")


@pytest.mark.skipif(shutil.which("dpool-node") is None, reason="dpool-node script not installed")
def test_console_script_help():
    proc = subprocess.run(["dpool-node", "--help"], capture_output=True, text=True, timeout=15,
                          env=node_env(None))
    assert proc.returncode == 0 and "--cpus" in proc.stdout


@pytest.mark.parametrize("cpus,expected", [
    (-1, max(1, (os.cpu_count() or 1) - 1)),
    (-1000, 1),
    (0, os.cpu_count()),
    (1, 1),
])
def test_cpus_option(tmp_path, node_secret, cpus, expected):
    node = start_node(tmp_path / "node", cpus=cpus, secret=node_secret)
    try:
        assert node.cpus == expected
        with dpool.JobCluster(double, nodes=[node.address], secret=node_secret) as cluster:
            assert cluster._client.nodes()[0].cpus == expected
            assert cluster.submit(2)(timeout=10) == 4
    finally:
        assert node.terminate() == 0


def test_secret_file_name_and_dest_path(tmp_path, dpool_home):
    secret_file = tmp_path / "secret"
    secret_file.write_text("file secret\n")
    dest = tmp_path / "jobs"
    node = start_node(tmp_path / "node", cpus=1, secret=None,
                      args=("--secret-file", str(secret_file), "--dest-path", str(dest),
                            "--name", "test-node-name"))
    try:
        with dpool.JobCluster(getpid, nodes=[node.address], secret="file secret") as cluster:
            link = cluster._client.nodes()[0]
            assert link.name == "test-node-name"
            assert os.path.dirname(link.info["dir"]) == str(dest)
            assert os.path.isdir(link.info["dir"])
            assert cluster.submit()(timeout=10) > 0
        poll_for(lambda: os.listdir(dest) == [], 10, message="the session folder to go")
        # The node has a secret, so it leaves none for local clients.
        assert not list(dpool_home.glob("*.secret"))
    finally:
        assert node.terminate() == 0


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,)],
                         ids=["SIGTERM-twice", "SIGINT"])
def test_signal_exits_cleanly_and_kills_workers(tmp_path, node_secret, signals):
    """SIGINT, or a second SIGTERM while draining, stops the node at once:
    running jobs are killed (with their children), the folder removed."""
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret)
    marker = str(tmp_path / "marker")
    try:
        with dpool.JobCluster(hold, nodes=[node.address], secret=node_secret) as cluster:
            job = cluster.submit(marker, None, True)
            (worker, grandchild), session_dir = read_marker(marker)
            descendants = node.descendants()
            assert worker in {p.pid for p in descendants}
            assert len(descendants) >= 4  # zygote, 2 workers, the job's child
            for i, sig in enumerate(signals):
                node.proc.send_signal(sig)
                if i < len(signals) - 1:  # a first SIGTERM drains: the job goes on
                    poll_for(lambda: "draining" in node.stderr(), message="the node to drain")
                    assert node.proc.poll() is None
            assert node.proc.wait(5) == 0, node.stderr()
            for proc in descendants:
                poll_for(lambda: pid_gone(proc.pid), 5, message=f"{proc.pid} to die")
            assert pid_gone(grandchild)
            assert not os.path.exists(session_dir)
            # The client learns that its only node is gone: the job fails, no hang.
            job(timeout=10)
            assert job.finish.is_set()
            assert job.status == DispyJob.Abandoned
            assert "lost" in job.exception or "no node" in job.exception
    finally:
        node.kill()
    assert "Traceback" not in node.stderr()


def test_importing_the_worker_starts_no_process():
    """The zygote imports the worker code after the node says it serves:
    that import ran ``ldconfig -p`` (ctypes.util.find_library), a second
    descendant that an idle node's test sometimes saw under load."""
    code = ("import subprocess\n"
            "def refuse(*a, **k): raise SystemExit('a process was started')\n"
            "subprocess.Popen.__init__ = refuse\n"
            "import dpool.node.worker, dpool.transport.spool as s\n"
            "assert s.AVAILABLE\n")
    proc = subprocess.run([sys.executable, "-c", code], env=node_env(None),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_sigterm_idle_node(tmp_path, node_secret):
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret)
    descendants = node.descendants()
    assert len(descendants) == 1  # the zygote
    assert node.terminate(timeout=5, sig=signal.SIGTERM) == 0  # nothing to drain
    poll_for(lambda: pid_gone(descendants[0].pid), 5, message="the zygote to exit")


def test_port_in_use_gives_a_clear_message(dpool_node, tmp_path):
    proc = run_node("--port", str(dpool_node.port), "--cpus", "1",
                    env=node_env(dpool_node.secret), cwd=tmp_path)
    assert proc.returncode != 0
    assert "already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_node_daemon_names_the_folder_it_cannot_write_not_the_port(tmp_path):
    import subprocess
    import sys

    from helpers import node_env

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    home = not_a_folder / "home"      # the node can't make its secret folder here
    proc = subprocess.run([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                           "--cpus", "1"], env=node_env(None, DPOOL_HOME=str(home)),
                          capture_output=True, text=True, timeout=15)
    assert proc.returncode == 1
    assert "cannot listen" not in proc.stderr, proc.stderr
    assert str(home) in proc.stderr, proc.stderr


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


def test_sigterm_drains(tmp_path, node_secret):
    """SIGTERM: the node takes no new clients, tells its clients, which move
    its queued jobs to another node; its running job finishes there (run
    once, its result delivered); then it logs its end and exits 0."""
    from dpool.core.client import Client

    a = start_node(tmp_path / "a", cpus=1, secret=node_secret, args=["--grace", "20"])
    b = start_node(tmp_path / "b", cpus=1, secret=node_secret)
    runs, gate = str(tmp_path / "runs"), str(tmp_path / "gate")
    client = Client([a.address, b.address], secret=node_secret).start()
    try:
        # one job runs on each node, one more waits on each
        jobs = client.call(lambda: [client.submit(count_and_hold, (runs, gate, i))
                                    for i in range(4)])
        def executions():
            return len(pathlib.Path(runs).read_text().splitlines()) if os.path.exists(runs) else 0
        poll_for(lambda: executions() == 2, message="two jobs running")
        on_a = [job for job in jobs if job.node.address == a.address]
        assert len(on_a) == 2
        a.proc.send_signal(signal.SIGTERM)
        poll_for(lambda: "draining" in a.stderr(), message="node a to drain")
        with pytest.raises(ConnectionRefusedError):  # it takes no new clients
            socket.create_connection(a.address, timeout=2).close()
        open(gate, "w").close()
        assert [job.future.result(20) for job in jobs] == [0, 1, 2, 3]
        assert a.proc.wait(10) == 0, a.stderr()
        assert executions() == 4  # each job ran once
        ran_on_a = [job for job in jobs if job.node.address == a.address]
        assert len(ran_on_a) == 1  # the running one; the waiting one moved to b
        log = a.stderr()
        assert "1 given back" in log and "1 done" in log, log
        assert "shut down" in log, log
    finally:
        client.close()
        b.terminate()
        a.kill()


def test_grace_over_kills_the_running_jobs(tmp_path, node_secret):
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret,
                      args=["--grace", "0.5", "--logfile", str(tmp_path / "node.log")])
    marker = str(tmp_path / "marker")
    try:
        with dpool.JobCluster(hold, nodes=[node.address], secret=node_secret) as cluster:
            job = cluster.submit(marker)
            (worker,), _ = read_marker(marker)
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(10) == 0
            poll_for(lambda: pid_gone(worker), 5, message="the job's worker to die")
            job(timeout=10)
            assert job.status == DispyJob.Abandoned
    finally:
        node.kill()
    log = (tmp_path / "node.log").read_text()
    assert "grace period of 0.5s over: killing 1 running jobs" in log, log
    assert re.search(r"session 1: client 127\.0\.0\.1:\d+, 1 CPUs", log), log
    assert "session 1 ended (node shutting down)" in log, log
    assert "shut down" in log and node.stderr() == "", node.stderr()
