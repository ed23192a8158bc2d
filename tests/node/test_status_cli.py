"""``dpool status``: asks dpool-node subprocesses (loopback, port 0) for their
CPUs, sessions, jobs, load and version over the authenticated transport."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import dpool
from helpers import node_env, poll_for, read_marker, start_node
from tasks import hold

pytestmark = pytest.mark.timeout(60)


def run_status(*args, secret=None, env=None):
    return subprocess.run([sys.executable, "-m", "dpool.daemons.cli", "status", *args],
                          env=env or node_env(secret), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def status_json(node, secret):
    proc = run_status(f"127.0.0.1:{node.port}", "--json", secret=secret)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(proc.stdout)
    return row


def test_table_of_an_idle_node(dpool_node, node_secret):
    proc = run_status(f"127.0.0.1:{dpool_node.port}", secret=node_secret)
    assert proc.returncode == 0, proc.stderr
    header, line = proc.stdout.splitlines()
    assert header.split()[:8] == ["NODE", "ADDRESS", "STATE", "CPUS", "FREE", "SESSIONS",
                                  "RUNNING", "QUEUED"]
    words = line.split()
    assert words[1:8] == [f"127.0.0.1:{dpool_node.port}", "up", "2", "2", "0", "0", "0"]


def test_json_while_a_pool_runs_jobs(dpool_node, node_secret, tmp_path):
    row = status_json(dpool_node, node_secret)
    assert row["state"] == "up" and row["cpus"] == 2 and row["free_cpus"] == 2
    assert row["python"].startswith("%d.%d." % sys.version_info[:2])
    assert row["version"] and row["pid"] == dpool_node.pid
    assert isinstance(row["load"], float) and row["memory_free"] > 0
    gate = tmp_path / "gate"
    with dpool.Pool(nodes=[dpool_node.address], secret=node_secret) as pool:
        results = [pool.apply_async(hold, (str(tmp_path / f"m{n}"), str(gate)))
                   for n in range(3)]
        read_marker(tmp_path / "m0")
        read_marker(tmp_path / "m1")
        busy = poll_for(lambda: (lambda r: r if r["running"] == 2 and r["queued"] == 1
                                 else None)(status_json(dpool_node, node_secret)),
                        message="2 running and 1 queued")
        assert busy["sessions"] == 1 and busy["free_cpus"] == 0
        gate.touch()
        assert all(r.get(30) > 0 for r in results)  # hold() returns its pid
    idle = poll_for(lambda: (lambda r: r if r["sessions"] == 0 else None)(
        status_json(dpool_node, node_secret)), message="the session gone")
    assert idle["free_cpus"] == 2 and idle["running"] == idle["queued"] == 0


def test_wrong_secret_and_unreachable_nodes(dpool_node, node_secret):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    proc = run_status(f"127.0.0.1:{dpool_node.port}", f"127.0.0.1:{free}",
                      secret=b"not-the-secret-at-all")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert f"127.0.0.1:{dpool_node.port}: wrong secret" in proc.stdout, proc.stdout
    assert f"127.0.0.1:{free}: unreachable: connection refused" in proc.stdout
    assert any("wrong-secret" in line for line in lines)
    # the node keeps serving, and the right secret still works
    assert status_json(dpool_node, node_secret)["state"] == "up"


def test_a_silent_peer_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = run_status(f"127.0.0.1:{port}", "--timeout", "1", "--json", secret=b"x" * 32)
    assert proc.returncode == 1
    (row,) = json.loads(proc.stdout)
    assert row["state"] == "unreachable" and "no answer within 1 s" in row["error"]


def test_secret_file_env_nodes_and_local_secret(tmp_path, dpool_home):
    local = start_node(tmp_path / "local", cpus=1)  # loopback, no secret: leaves one in DPOOL_HOME
    try:
        env = node_env(None, DPOOL_NODES=f"127.0.0.1:{local.port}")
        proc = run_status("--json", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)[0]["cpus"] == 1
        secret_file = tmp_path / "secret"
        secret_file.write_bytes((dpool_home / f"node-{local.port}.secret").read_bytes())
        env = node_env(None, DPOOL_HOME=str(tmp_path / "elsewhere"))
        proc = run_status(f"127.0.0.1:{local.port}", "127.0.0.1:1", "--json", env=env)
        assert proc.returncode == 1
        up, down = json.loads(proc.stdout)
        assert up["state"] == "no-secret" and "no secret" in up["error"]
        assert down["state"] == "unreachable"  # not "no secret": nothing listens there
        proc = run_status(f"127.0.0.1:{local.port}", "--secret-file", str(secret_file), env=env)
        assert proc.returncode == 0, proc.stdout
    finally:
        assert local.terminate() == 0


def test_status_takes_no_cpu_from_a_busy_node(node1, node_secret, tmp_path):
    with dpool.Pool(nodes=[node1.address], secret=node_secret) as pool:
        assert pool.apply(os.getpid) > 0
        row = status_json(node1, node_secret)
        assert row["free_cpus"] == 0 and row["sessions"] == 1
        assert pool.apply(os.getpid) > 0  # the pool's session is untouched


@pytest.mark.parametrize("args", [["127.0.0.1:99999"], ["host:port"], []])
def test_bad_usage(args):
    proc = run_status(*args) if args else subprocess.run(
        [sys.executable, "-m", "dpool.daemons.cli"], capture_output=True, text=True, timeout=30,
        env=node_env(None))
    assert proc.returncode == 2
    assert "invalid node" in proc.stderr or "usage" in proc.stderr


@pytest.mark.skipif(shutil.which("dpool") is None, reason="the dpool script is not installed")
def test_console_script(dpool_node, node_secret):
    proc = subprocess.run(["dpool", "status", f"127.0.0.1:{dpool_node.port}"],
                          env=node_env(node_secret), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and " up " in proc.stdout


def test_over_tls_with_a_client_certificate(tmp_path, node_secret):
    trustme = pytest.importorskip("trustme")
    ca, other = trustme.CA(), trustme.CA()
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "node", "client", "other")}
    ca.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other"])
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(paths["node"])
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(paths["client"])
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret,
                      args=("--certfile", paths["node"], "--cafile", paths["ca"]))
    try:
        address = f"127.0.0.1:{node.port}"
        proc = run_status(address, "--json", "--cafile", paths["ca"], "--certfile",
                          paths["client"], secret=node_secret)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)[0]["cpus"] == 1
        proc = run_status(address, "--json", "--cafile", paths["other"], "--certfile",
                          paths["client"], secret=node_secret)
        (row,) = json.loads(proc.stdout)
        assert proc.returncode == 1 and row["state"] == "tls-error"
        assert "TLS failed" in row["error"] and "CERTIFICATE_VERIFY_FAILED" in row["error"]
    finally:
        assert node.terminate() == 0


def test_dpool_dashboard_serves_the_nodes_status(dpool_node, node_secret):
    import signal
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "dpool.daemons.cli", "dashboard", f"127.0.0.1:{dpool_node.port}",
         "127.0.0.1:1", "--port", "0", "--poll-sec", "0.5"],
        env=node_env(node_secret), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dpool dashboard: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[-1]
        with urllib.request.urlopen(url + "api/status", timeout=10) as reply:
            (src,) = json.loads(reply.read())["sources"]
        up, down = src["nodes"]
        assert up["connected"] and up["cpus"] == 2 and up["address"].endswith(
            f":{dpool_node.port}")
        assert not down["connected"] and "connection refused" in down["error"]
        assert src["jobs"] == {"queued": 0, "running": 0}
        assert [e["node"] for e in src["errors"]] == ["127.0.0.1:1"]
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert b"dpool dashboard" in reply.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        proc.stdout.close()
        proc.stderr.close()
    assert code == 0
