"""The fault matrix across network-namespace hosts (root): a node cut off
(partition), its link down, 5% packet loss, a client killed, a client cut
off.  Node SIGKILL/SIGSTOP, restart and re-join, the poison job and silent
clients on loopback are in test_faults.py.

Each row asserts a detection bound (generous: the heartbeat deadline plus
2 s), executions vs deliveries, no hang (every wait has a timeout) and
nothing leaked (conftest; the lab is always torn down).  ``pytest -s``
prints the measured times (docs/failures.md).
"""
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dpool.futures import Executor
from helpers import node_env, poll_for
from helpers_faults import (HEARTBEAT, check_deliveries, executions, link_for, measure,
                            pids_running, rerun_elsewhere, times_of)
from helpers_netns import entered, lab_nodes, lab_up
from tasks import counted

pytestmark = [pytest.mark.root, pytest.mark.timeout(90),
              pytest.mark.skipif(not (shutil.which("nft") and shutil.which("ip")),
                                 reason="needs ip (iproute2) and nft (nftables)")]
DEADLINE = HEARTBEAT[1]
BOUND = DEADLINE + 2.0
SECRET = b"fault-matrix-secret"


@pytest.fixture
def lab():
    with lab_up(nodes=2) as lab:
        yield lab


@pytest.fixture
def nodes(lab, tmp_path):
    """start(k): dpool-node in the lab's node namespace k, on 10.210.k.2."""
    with lab_nodes(lab, tmp_path, SECRET, cpus=2, stop=lambda node: node.kill()) as start_in:
        def start(k, port=0):
            jobs = tmp_path / f"n{k}-jobs"
            jobs.mkdir(exist_ok=True)
            node = start_in(k, port, ["--dest-path", str(jobs)])
            node.jobs = jobs
            return node
        yield start


def ran_on(node, out, n, pids):
    return {i for i in range(n) if set(pids_running(out, i)) & pids}


def node_row(lab, nodes, out, row, cut, heal):
    """Jobs on two nodes; ``cut()`` node 1 while it runs some; its jobs must
    rerun on node 2 and node 1 re-join after ``heal()``."""
    n1, n2 = nodes(1), nodes(2)
    with entered(lab.client):
        ex = Executor(nodes=[n1.addr, n2.addr], secret=SECRET, heartbeat=HEARTBEAT)
    with ex:
        client = ex._client
        futures = [ex.submit(counted, out, i, 1.0) for i in range(8)]
        poll_for(lambda: ran_on(n1, out, 8, {p.pid for p in n1.descendants()}),
                 message="a job running on node 1")
        pids = {p.pid for p in n1.descendants()}
        cut()
        t0 = time.monotonic()
        link = link_for(client, n1.addr)
        seen = times_of({
            "detect": lambda: not link.ready,  # the client declared node 1 lost
            "rerun": lambda: rerun_elsewhere(out, pids, range(8)),  # its jobs restarted
            # node 1 ends the session of the client it no longer hears, too
            "node_detect": lambda: len(n1.descendants()) == 1}, t0, timeout=30)
        detect = seen["detect"]
        results = [f.result(timeout=30) for f in futures]
        recover = time.monotonic() - t0
        total = check_deliveries(results, out, 8, ran_on(n1, out, 8, pids))
        heal()
        t1 = time.monotonic()
        poll_for(lambda: (link_for(client, n1.addr) or link).ready, timeout=20,
                 message="node 1 to re-join")
        rejoin = time.monotonic() - t1
    assert detect <= BOUND and seen["node_detect"] <= BOUND, seen
    measure(row, **seen, recover=recover, rejoin=rejoin)
    print(f"executions={total} deliveries=8 late={client.late_results}")


def test_partitioned_node(lab, nodes, out):
    ns = lab.nodes[0]
    node_row(lab, nodes, out, "node partitioned (nft drop)",
             lambda: lab.partition(ns), lambda: lab.partition(ns, on=False))


def test_node_link_down(lab, nodes, out):
    node_row(lab, nodes, out, "node link down", lambda: lab.link(1, False),
             lambda: lab.link(1, True))


def test_five_percent_packet_loss_on_200_jobs(lab, nodes, out):
    n1, n2 = nodes(1), nodes(2)
    lab.loss(5.0)
    t0 = time.monotonic()
    with entered(lab.client):
        ex = Executor(nodes=[n1.addr, n2.addr], secret=SECRET, heartbeat=(0.5, 5.0))
    with ex:
        futures = [ex.submit(counted, out, i, 0.01) for i in range(200)]
        results = [f.result(timeout=60) for f in futures]
        lost = [link for link in ex._client.links if link.error is not None]
    took = time.monotonic() - t0
    assert sorted(results) == list(range(200))
    runs = executions(out)
    assert sum(runs.values()) >= 200 and set(runs) == set(range(200))
    if not lost:  # no node was declared lost: nothing ran twice
        assert sum(runs.values()) == 200, runs
    assert sum(lab.dropped(ns) for ns in [lab.client, *lab.nodes]) > 0
    measure("5% packet loss, 200 jobs", total=took)
    print(f"executions={sum(runs.values())} deliveries=200 nodes lost={len(lost)}")


# ----------------------------------------------------------------- client faults

CLIENT = """
import sys
from dpool.futures import Executor
from tasks import counted

out, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ex = Executor(nodes=[(host, port)])
futures = [ex.submit(counted, out, i, 60.0) for i in range(2)]
print("submitted", flush=True)
for f in futures:
    try:
        f.result(timeout=60)
        print("result", flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, exc, flush=True)
ex.shutdown(wait=True)
print("done", flush=True)
"""


@pytest.fixture
def client_proc(lab, tmp_path):
    """start(out, node): the CLIENT script in the lab's client namespace."""
    procs = []
    script = tmp_path / "client.py"
    script.write_text(CLIENT)

    def start(out, node):
        env = node_env(SECRET, DPOOL_HEARTBEAT="%s,%s" % HEARTBEAT)
        log = open(tmp_path / "client.out", "wb")
        proc = subprocess.Popen([*lab.exec_prefix(lab.client), sys.executable, str(script),
                                 out, node.addr[0], str(node.addr[1])],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        proc.out = tmp_path / "client.out"
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def sessions_left(node):
    return [p for p in pathlib.Path(node.jobs).iterdir() if p.name.startswith("dpool-session")]


def test_killed_client(lab, nodes, out, client_proc):
    n1 = nodes(1)
    proc = client_proc(out, n1)
    poll_for(lambda: sum(executions(out).values()) == 2, timeout=30, message="both jobs running")
    assert sessions_left(n1)
    proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    poll_for(lambda: len(n1.descendants()) == 1, timeout=BOUND, message="its workers killed")
    detect = time.monotonic() - t0
    poll_for(lambda: not sessions_left(n1), timeout=5, message="its session folder removed")
    assert sum(executions(out).values()) == 2  # ran once each, delivered to nobody
    measure("client SIGKILL", detect=detect)


def test_partitioned_client(lab, nodes, out, client_proc):
    n1 = nodes(1)
    proc = client_proc(out, n1)
    poll_for(lambda: sum(executions(out).values()) == 2, timeout=30, message="both jobs running")
    lab.partition(lab.client)
    t0 = time.monotonic()
    poll_for(lambda: len(n1.descendants()) == 1, timeout=BOUND + 5,
             message="the node to end the silent client's session")
    detect = time.monotonic() - t0
    poll_for(lambda: not sessions_left(n1), timeout=5, message="its session folder removed")
    # The client, cut off too, gives up on its node instead of waiting forever.
    proc.wait(BOUND + 10)
    client_done = time.monotonic() - t0
    text = proc.out.read_text()
    assert text.count("error BrokenCluster") == 2 and "done" in text, text
    lab.partition(lab.client, on=False)
    with entered(lab.client):
        ex = Executor(nodes=[n1.addr], secret=SECRET, heartbeat=HEARTBEAT)
    with ex:  # all its CPUs are free again
        assert ex._max_workers == 2
    assert detect <= BOUND + 1, detect
    measure("client partitioned", node_detect=detect, client_gives_up=client_done)
