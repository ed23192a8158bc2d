"""dpool-scheduler finding its nodes by discovery across namespaced hosts
(root; tests/cluster's LanLab: nodes a, b, c on the LAN 10.77.0.0/24 and d
behind the router on 10.78.0.0/24 with the relay host e; the scheduler on
"sched" 10.77.0.20).  Nodes listen on 51350 and the scheduler hears
announcements on UDP 51351, inside the lab's namespaces only."""
import asyncio
import os
import signal

import pytest

import dpool
from dpool.core.status import query_node
from helpers import poll_for
from helpers_netns import LAB_SECRET, needs_lab
from helpers_sched import start_scheduler
from tasks import hostname_after

pytestmark = [pytest.mark.root, pytest.mark.timeout(120), needs_lab,
              pytest.mark.lab(extra=("sched",))]
SCHED_PORT = 45351


def star_scheduler(lanlab, tmp_path, pattern="*", env=None):
    host = lanlab["sched"]
    return start_scheduler(tmp_path / "sched", [(pattern, 51350)], LAB_SECRET,
                           host=host.address, port=SCHED_PORT, prefix=host.prefix(), env=env)


def test_a_star_scheduler_finds_the_lan_nodes_and_a_shared_cluster_runs_on_them(
        lanlab, lab_nodes, lab_relay, tmp_path):
    for name in ("a", "b", "c", "d"):
        lab_nodes(name)
    sched = star_scheduler(lanlab, tmp_path)
    try:
        assert sched.cpus == 3   # a, b, c (1 CPU each); d is behind the router
        with lanlab.entered("client"):
            cluster = dpool.SharedJobCluster(hostname_after, scheduler_host=sched.host,
                                             scheduler_port=sched.port, secret=LAB_SECRET)
        try:
            jobs = [cluster.submit(0.5) for _ in range(6)]
            names = {job() for job in jobs}
            assert names == {lanlab[n].hostname for n in ("a", "b", "c")}
            # The relay on d's subnet sends d's announcements to the
            # scheduler's host: d joins the running scheduler, and its CPU
            # reaches the client (Ready again, with 4 CPUs).
            lab_relay("e", "--client", lanlab["sched"].address, "--interval", "2")
            core = cluster._client
            poll_for(lambda: core.nodes()[0].cpus == 4, 30, message="node d's CPU")
            jobs = [cluster.submit(1.0) for _ in range(8)]
            names = {job() for job in jobs}
            assert names == {lanlab[n].hostname for n in ("a", "b", "c", "d")}
        finally:
            cluster.close()
    finally:
        assert sched.terminate() == 0, sched.stderr()


def ready(lanlab, sched):
    """{node address: ready} as the scheduler's status lists its nodes."""
    with lanlab.entered("client"):
        status = asyncio.run(query_node(sched.host, sched.port, LAB_SECRET, timeout=10))
    # (a node's name is "HOSTNAME (ADDRESS:PORT)" once joined, "ADDRESS:PORT" before)
    return {node["name"].rsplit("(", 1)[-1].split(":")[0]: node["ready"]
            for node in status["nodes"]}


def test_a_vanished_node_is_dropped_by_liveness_and_found_again(lanlab, lab_nodes, tmp_path):
    """Node b goes silent (SIGSTOP): the scheduler's heartbeat deadline (2 s
    here) ends its anchor, the clients' jobs run on a; after three deadlines
    of failed re-joins it is forgotten, and once it answers pings again
    (SIGCONT) discovery joins it anew."""
    a, b = lab_nodes("a"), lab_nodes("b")
    sched = star_scheduler(lanlab, tmp_path, pattern="10.77.0.1?",
                           env={"DPOOL_HEARTBEAT": "0.2,2"})
    try:
        assert sched.cpus == 2
        os.kill(b.pid, signal.SIGSTOP)
        try:
            poll_for(lambda: ready(lanlab, sched) == {a.addr[0]: True, b.addr[0]: False}, 20,
                     message="node b to be lost")
            with lanlab.entered("client"):
                cluster = dpool.SharedJobCluster(hostname_after, scheduler_host=sched.host,
                                                 scheduler_port=sched.port, secret=LAB_SECRET)
            try:
                jobs = [cluster.submit(0.2) for _ in range(4)]
                assert {job() for job in jobs} == {lanlab["a"].hostname}
            finally:
                cluster.close()
            poll_for(lambda: ready(lanlab, sched) == {a.addr[0]: True}, 30,
                     message="node b to be forgotten")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        poll_for(lambda: ready(lanlab, sched) == {a.addr[0]: True, b.addr[0]: True}, 30,
                 message="node b to be found again")
        assert a.proc.poll() is None
    finally:
        assert sched.terminate() == 0, sched.stderr()
