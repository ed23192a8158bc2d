"""SharedJobCluster(exclusive=True), as dispy's: the cluster has the
scheduler's nodes to itself.  It starts once no other client uses the
scheduler, and other clients wait (Busy, up to their connect timeout) until
it closes; while it waits, new clients wait behind it."""
import subprocess
import sys
import threading
import time

import pytest

import dpool
from dpool.core.client import Client
from dpool.errors import BrokenCluster
from helpers import node_env, poll_for
from helpers_sched import NODE_CPUS, SECRET
from tasks import nap_for


def shared(sched, **kwargs):
    kwargs.setdefault("loglevel", None)
    return dpool.SharedJobCluster(nap_for, scheduler_host="127.0.0.1",
                                  scheduler_port=sched.port, secret=SECRET, **kwargs)


class Opening(threading.Thread):
    """Open a cluster in a thread; ``opened_at``: when it returned."""

    def __init__(self, make):
        super().__init__(daemon=True)
        self.make, self.cluster, self.error, self.opened_at = make, None, None, None

    def run(self):
        try:
            self.cluster = self.make()
            self.opened_at = time.monotonic()
        except BaseException as exc:
            self.error = exc

    def close(self):
        self.join(60)
        if self.cluster is not None:
            self.cluster.close()


def test_an_exclusive_cluster_keeps_the_others_waiting(scheduler, three_nodes):
    exclusive = shared(scheduler, exclusive=True)
    other = Opening(lambda: shared(scheduler, connect_timeout=60))
    try:
        jobs = [exclusive.submit(0.2) for _ in range(3 * NODE_CPUS)]
        assert [job() for job in jobs] == [0.2] * len(jobs)
        assert {job.ip_addr for job in jobs} == {n.host for n in three_nodes}  # all of them
        other.start()
        with pytest.raises(BrokenCluster, match="busy"):  # a short wait gives up
            shared(scheduler, connect_timeout=2)
        assert other.is_alive()  # still waiting
        closed_at = time.monotonic()
        exclusive.close()
        other.join(60)
        assert other.error is None and other.opened_at > closed_at
        assert other.cluster.submit(0.05)() == 0.05
    finally:
        exclusive.close()
        other.close()


def test_an_exclusive_cluster_waits_for_the_others_and_new_ones_wait_behind_it(scheduler):
    first = Client([scheduler.address], secret=SECRET).start()
    waiting = Opening(lambda: shared(scheduler, exclusive=True, connect_timeout=60))
    try:
        assert first.submit(nap_for, (0.05,)).future.result(30) == 0.05
        waiting.start()
        poll_for(lambda: "exclusive" in scheduler.stderr(), 20,
                 message="the exclusive cluster to be told to wait")
        assert waiting.is_alive()
        with pytest.raises(BrokenCluster, match="busy"):  # a newcomer queues behind it
            Client([scheduler.address], secret=SECRET, connect_timeout=2).start()
        closed_at = time.monotonic()
        first.close()
        waiting.join(60)
        assert waiting.error is None and waiting.opened_at > closed_at
        assert waiting.cluster.submit(0.05)() == 0.05
    finally:
        first.close()
        waiting.close()


DYING_EXCLUSIVE = """
import os, sys, time
import dpool as dispy
from tasks import nap_for
port, secret, recover_file, tmp = sys.argv[1:]
cluster = dispy.SharedJobCluster(nap_for, scheduler_host="127.0.0.1", scheduler_port=int(port),
                                 secret=secret, recover_file=recover_file, exclusive=True,
                                 loglevel=None)
assert cluster.submit(0.01)() == 0.01
open(os.path.join(tmp, "ready"), "w").close()
time.sleep(60)
"""


def test_a_dead_exclusive_cluster_whose_jobs_ended_lets_the_others_in(scheduler, tmp_path):
    """An exclusive cluster with a recover_file that dies is kept (its
    results wait for recover_jobs, for keep_results seconds), but once none
    of its jobs runs or waits it holds no node: the others get in."""
    recover_file = str(tmp_path / "_dispy_exclusive")
    proc = subprocess.Popen([sys.executable, "-c", DYING_EXCLUSIVE, str(scheduler.port),
                             SECRET.decode(), recover_file, str(tmp_path)],
                            env=node_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "client.err", "wb"))
    try:
        poll_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 60,
                 message="the exclusive client to run its job")
        assert proc.poll() is None, (tmp_path / "client.err").read_text()
    finally:
        proc.kill()
        proc.wait()
    poll_for(lambda: "kept for" in scheduler.stderr(), 20,
             message="the scheduler to keep the exclusive client's session")
    other = shared(scheduler, connect_timeout=20)
    try:
        assert other.submit(0.05)() == 0.05
    finally:
        other.close()
    assert "discarding" not in scheduler.stderr()  # still kept for recover_jobs
