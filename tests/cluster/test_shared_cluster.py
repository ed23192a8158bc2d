"""dpool-scheduler across hosts (root): two clients on two hosts share three
nodes through a scheduler on a fourth.

Hosts (a :class:`helpers_netns.LanLab`, each with its own host name):
client 10.77.0.10 and other 10.77.0.20 (the clients), a b c 10.77.0.11-13
(dpool-node, 2 CPUs each), sched 10.77.0.21 (dpool-scheduler).
"""
import os
import re
import signal
import subprocess
import sys

import pytest

import dpool
from dpool.core.client import Client
from dpool.errors import BrokenCluster
from helpers import REPO_ROOT, node_env, pid_gone, poll_for, read_marker, start_node
from helpers_netns import LAB_SECRET, needs_lab
from helpers_sched import holding_client, resubmit, share, start_scheduler
from tasks import hold, hostname_after, nap, nap_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(120), needs_lab,
              pytest.mark.lab(remote=(), extra=("other", "sched"))]

NODES = ("a", "b", "c")
CPUS = 2
HEARTBEAT = (0.2, 2.0)  # the clients' (interval, deadline): the scheduler's lease on them
SCHED_PORT = 45351


@pytest.fixture
def shared(lanlab, tmp_path):
    """Three nodes and a scheduler on the lab's hosts; yields the scheduler
    (``.nodes``: the node processes; ``.restart()``: kill it and start anew)."""
    nodes = []
    sched = None
    try:
        for name in NODES:
            host = lanlab[name]
            node = start_node(tmp_path / f"node-{name}", cpus=CPUS, secret=LAB_SECRET,
                              prefix=host.prefix(), args=["--host", host.address])
            node.addr = (host.address, node.port)
            nodes.append(node)
        sched = _scheduler(lanlab, tmp_path / "sched", nodes)
        sched.nodes = nodes
        yield sched
    finally:
        if sched is not None:
            sched.kill()
        for node in nodes:
            node.kill()


def _scheduler(lab, workdir, nodes):
    host = lab["sched"]
    return start_scheduler(workdir, [node.addr for node in nodes], LAB_SECRET,
                           host=host.address, port=SCHED_PORT, prefix=host.prefix())


def client_on(lab, name, sched, **kwargs):
    """A core Client made on host ``name`` (its loop thread, hence its
    connection, lives in that host's network namespace)."""
    kwargs.setdefault("heartbeat", HEARTBEAT)
    with lab.entered(name):
        return Client([sched.address], secret=LAB_SECRET, **kwargs).start()


def test_two_clients_on_two_hosts_share_three_nodes_equally(lanlab, shared):
    a = client_on(lanlab, "client", shared, session={"notify_start": True})
    b = client_on(lanlab, "other", shared, session={"notify_start": True})
    try:
        assert a.nodes()[0].cpus == b.nodes()[0].cpus == len(NODES) * CPUS
        jobs_a = [a.submit(nap, (0.3,)) for _ in range(40)]
        poll_for(lambda: any(j.start_time for j in jobs_a), 30, message="A's jobs to start")
        jobs_b = [b.submit(nap, (0.3,)) for _ in range(40)]
        for job in jobs_a + jobs_b:
            job.future.result(90)
        # While both had work, each got its half of the CPUs, within 20%.
        assert 0.4 <= share(jobs_a, jobs_b) <= 0.6
        nodes = {lanlab[name].address for name in NODES}
        assert {j.where for j in jobs_a} == nodes and {j.where for j in jobs_b} == nodes
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_silent_client_hands_its_cpus_to_the_other(lanlab, shared, tmp_path, how):
    """The client on "other" holds every CPU; the one on "client" waits.  The
    first is killed (its connection closes) or stopped (silent: the lease,
    its heartbeat deadline, ends): its jobs are killed on the nodes, and the
    waiting client gets every CPU within the deadline."""
    markers = [str(tmp_path / f"held{i}") for i in range(len(NODES) * CPUS)]
    proc = holding_client(shared.address, LAB_SECRET, HEARTBEAT, markers,
                          prefix=lanlab["other"].prefix())
    b = client_on(lanlab, "client", shared)
    try:
        pids = [read_marker(m, 60)[0][0] for m in markers]
        jobs = [b.submit(nap_for, (0.1,)) for _ in range(len(NODES) * CPUS)]
        os.kill(proc.pid, how)
        assert [j.future.result(HEARTBEAT[1] + 10) for j in jobs] == [0.1] * len(jobs)
        poll_for(lambda: all(pid_gone(pid) for pid in pids), 10,
                 message="the dead client's jobs to be killed on the nodes")
    finally:
        proc.kill()
        proc.wait(10)
        b.close()


def test_the_seed_program_through_shared_job_cluster(lanlab, shared, tmp_path):
    """examples/seed.py with SharedJobCluster (the scheduler from
    DPOOL_SCHEDULER), its jobs 1-2 s: every node's host name is printed."""
    text = (REPO_ROOT / "examples" / "seed.py").read_text()
    assert text.count("dispy.JobCluster(compute)") == 1
    text = text.replace("dispy.JobCluster(compute)", "dispy.SharedJobCluster(compute)")
    text = text.replace("random.randint(5,10)", "random.randint(1,2)")
    seed = tmp_path / "seed_shared.py"
    seed.write_text(text)
    env = node_env(LAB_SECRET, DPOOL_SCHEDULER="%s:%d" % shared.address)
    proc = subprocess.run([*lanlab["client"].prefix(), sys.executable, str(seed)], env=env,
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"^(\S+) executed job (\d+) at [\d.]+ with [12]$", proc.stdout, re.M)
    assert sorted(int(n) for _, n in lines) == list(range(10)), proc.stdout
    assert {host for host, _ in lines} == {lanlab[name].hostname for name in NODES}


def test_a_scheduler_restart_hangs_nothing(lanlab, shared, tmp_path):
    """The scheduler is killed under running jobs: the client's jobs fail at
    once with BrokenCluster and the nodes kill them; a scheduler started
    again on the same address takes the client back (it re-joins with
    backoff) and runs its new jobs."""
    c = client_on(lanlab, "client", shared)
    try:
        markers = [str(tmp_path / f"m{i}") for i in range(3)]
        jobs = [c.submit(hold, (m,)) for m in markers]
        pids = [read_marker(m, 60)[0][0] for m in markers]
        shared.kill()
        for job in jobs:
            with pytest.raises(BrokenCluster):
                job.future.result(HEARTBEAT[1] + 10)
        poll_for(lambda: all(pid_gone(pid) for pid in pids), 10,
                 message="the jobs to be killed on the nodes")
        again = _scheduler(lanlab, tmp_path / "sched2", shared.nodes)
        try:
            job = resubmit(c, hostname_after, (0.1,))
            assert job.future.result(30) in {lanlab[name].hostname for name in NODES}
        finally:
            again.kill()
    finally:
        c.close()


def test_shared_job_cluster_jobs_name_their_nodes(lanlab, shared):
    with lanlab.entered("client"):
        cluster = dpool.SharedJobCluster(hostname_after, scheduler_host=shared.address[0],
                                         scheduler_port=shared.address[1], secret=LAB_SECRET)
    try:
        jobs = [cluster.submit(0.5) for _ in range(len(NODES) * CPUS)]
        names = [job() for job in jobs]
        by_ip = {lanlab[name].address: lanlab[name].hostname for name in NODES}
        assert all(by_ip[job.ip_addr] == name for job, name in zip(jobs, names))
        assert set(names) == set(by_ip.values())
    finally:
        cluster.close()
