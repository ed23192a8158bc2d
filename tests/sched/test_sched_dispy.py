"""SharedJobCluster through dpool-scheduler as dispy's: the nodes behind the
scheduler are the cluster's nodes (submit_node, status, node_jobs,
cluster_status callbacks), on loopback (three dpool-nodes on 127.0.0.2-4)."""
import collections
import os
import threading

import pytest

import dpool
from helpers import poll_for, read_marker, start_node
from helpers_sched import NODE_CPUS, SECRET, start_scheduler
from tasks import hold, nap_for, write_file


def shared(sched, fn=nap_for, **kwargs):
    return dpool.SharedJobCluster(fn, scheduler_host="127.0.0.1", scheduler_port=sched.port,
                                  secret=SECRET, loglevel=None, **kwargs)


def test_submit_node_runs_on_the_named_node(scheduler, three_nodes):
    cluster = shared(scheduler)
    try:
        for node in three_nodes:  # by address
            jobs = [cluster.submit_node(node.host, 0.05) for _ in range(2 * NODE_CPUS)]
            assert [job() for job in jobs] == [0.05] * len(jobs)
            assert {job.ip_addr for job in jobs} == {node.host}
        by_status = {n.ip_addr: n for n in cluster.status().nodes}
        job = cluster.submit_node(by_status[three_nodes[1].host], 0.05)  # by DispyNode
        assert job() == 0.05 and job.ip_addr == three_nodes[1].host
        job = cluster.submit_job_id_node("mine", three_nodes[2].host, 0.05)
        assert job() == 0.05 and job.ip_addr == three_nodes[2].host and job.id == "mine"
    finally:
        cluster.close()


def test_submit_node_to_a_node_the_scheduler_does_not_have_raises(scheduler):
    cluster = shared(scheduler)
    try:
        with pytest.raises(ValueError):
            cluster.submit_node("127.0.0.9", 0.05)
        with pytest.raises(ValueError):  # not a node of this cluster (nodes=)
            limited = shared(scheduler, nodes=["127.0.0.2"])
            try:
                limited.submit_node("127.0.0.3", 0.05)
            finally:
                limited.close()
    finally:
        cluster.close()


def test_status_lists_the_nodes_behind_the_scheduler(scheduler, three_nodes, tmp_path):
    cluster = shared(scheduler, fn=hold)
    gate = str(tmp_path / "gate")
    try:
        nodes = cluster.status().nodes
        assert sorted(n.ip_addr for n in nodes) == [n.host for n in three_nodes]
        assert all(n.cpus == NODE_CPUS and n.busy == 0 and n.jobs_done == 0 for n in nodes)
        target = three_nodes[0].host
        markers = [str(tmp_path / f"m{i}") for i in range(NODE_CPUS)]
        jobs = [cluster.submit_node(target, m, gate) for m in markers]
        for m in markers:
            read_marker(m, 30)
        # (the jobs' starts reach the client shortly after they start)
        poll_for(lambda: {n.ip_addr: n.busy for n in cluster.status().nodes
                          if n.busy} == {target: NODE_CPUS}, 10,
                 message="status() to show the busy node")
        assert set(cluster.node_jobs(target)) == set(jobs)
        assert cluster.node_jobs(three_nodes[1].host) == []
        write_file(gate, "")
        assert all(job() for job in jobs)
        more = [cluster.submit(str(tmp_path / f"n{i}"), gate) for i in range(6)]
        assert all(job() for job in more)
        done = {n.ip_addr: n.jobs_done for n in cluster.status().nodes}
        ran = collections.Counter(job.ip_addr for job in jobs + more)
        assert done == {n.host: ran[n.host] for n in three_nodes}
        assert all(n.busy == 0 for n in cluster.status().nodes)
    finally:
        write_file(gate, "")
        cluster.close()


def test_cluster_status_callbacks_name_the_nodes_behind_the_scheduler(scheduler, three_nodes):
    events, lock = [], threading.Lock()

    def cluster_status(status, node, job):
        with lock:
            events.append((status, node.ip_addr if node is not None else None,
                           job.ip_addr if job is not None else None))

    cluster = shared(scheduler, cluster_status=cluster_status)
    try:
        jobs = [cluster.submit(0.1) for _ in range(3 * NODE_CPUS)]
        assert all(job() == 0.1 for job in jobs)
    finally:
        cluster.close()
    hosts = sorted(n.host for n in three_nodes)
    initialized = sorted(ip for status, ip, _ in events if status == dpool.DispyNode.Initialized)
    assert initialized == hosts
    finished = [(ip, job_ip) for status, ip, job_ip in events
                if status == dpool.DispyJob.Finished]
    assert len(finished) == len(jobs) and all(ip == job_ip for ip, job_ip in finished)
    assert {ip for ip, _ in finished} == set(hosts)
    closed = sorted(ip for status, ip, _ in events if status == dpool.DispyNode.Closed)
    assert closed == hosts


def test_a_job_pinned_to_a_busy_node_waits_for_it_and_can_be_cancelled(scheduler, three_nodes,
                                                                        tmp_path):
    cluster = shared(scheduler, fn=hold)
    gate = str(tmp_path / "gate")
    target = three_nodes[2].host
    try:
        # 2 run, 2 wait on the node (one more per CPU), the rest wait in the scheduler
        jobs = [cluster.submit_node(target, str(tmp_path / f"m{i}"), gate) for i in range(6)]
        for i in range(NODE_CPUS):
            read_marker(str(tmp_path / f"m{i}"), 30)
        assert cluster.cancel(jobs[-1]) == 0
        jobs[-1].finish.wait(30)
        assert jobs[-1].status == dpool.DispyJob.Cancelled
        write_file(gate, "")
        assert all(job() for job in jobs[:-1])
        assert {job.ip_addr for job in jobs[:-1]} == {target}
    finally:
        write_file(gate, "")
        cluster.close()


def test_a_job_pinned_to_a_node_that_is_lost_fails(tmp_path, three_nodes):
    """It is not run elsewhere: Abandoned with NodeLost (as a JobCluster's)."""
    extra = start_node(tmp_path / "extra", cpus=1, secret=SECRET, args=("--host", "127.0.0.5"))
    sched = start_scheduler(tmp_path / "scheduler", [("127.0.0.5", extra.port)]
                            + [(n.host, n.port) for n in three_nodes], SECRET)
    try:
        cluster = shared(sched, fn=hold)
        try:
            job = cluster.submit_node("127.0.0.5", str(tmp_path / "m"), str(tmp_path / "never"))
            read_marker(str(tmp_path / "m"), 30)
            extra.kill()
            job.finish.wait(30)
            assert job.status == dpool.DispyJob.Abandoned and "lost" in job.exception
            with pytest.raises(ValueError):  # no longer a node of the cluster
                poll_for(lambda: "127.0.0.5" not in {n.ip_addr for n in cluster.status().nodes},
                         20, message="the lost node to leave status()")
                cluster.submit_node("127.0.0.5", str(tmp_path / "m2"), str(tmp_path / "never"))
        finally:
            cluster.close()
    finally:
        extra.kill()
        assert sched.terminate() == 0, sched.stderr()


def test_a_job_started_then_lost_with_its_scheduler_is_let_go(tmp_path, three_nodes):
    """A SharedJobCluster without callbacks: a job started behind the
    scheduler, then the scheduler is lost.  The job ends, and once the
    program drops it, nothing of the cluster keeps it (with its result)."""
    import gc
    import weakref

    sched = start_scheduler(tmp_path / "scheduler", [(n.host, n.port) for n in three_nodes],
                            SECRET)
    try:
        cluster = shared(sched, fn=hold)
        try:
            job = cluster.submit(str(tmp_path / "m"), str(tmp_path / "never"))
            read_marker(str(tmp_path / "m"), 30)
            poll_for(lambda job=job: job.status == dpool.DispyJob.Running, 30,
                     message="the job's start to be known")
            sched.kill()
            job.finish.wait(60)
            assert job.status in (dpool.DispyJob.Abandoned, dpool.DispyJob.Terminated)
            ref = weakref.ref(job)
            del job
            gc.collect()
            assert ref() is None
        finally:
            cluster.close(timeout=5, terminate=True)
    finally:
        sched.kill()


def working_folder(_):
    import os

    return os.getcwd()


def test_arguments_by_position_are_dispys(scheduler):
    # dispy 4.15's SharedJobCluster(computation, nodes, depends, job_status,
    # cluster_status, host, dispy_port, client_port, scheduler_host, ext_host,
    # ip_addr, ext_ip_addr, loglevel, callback, setup, cleanup, dest_path,
    # poll_interval, reentrant, exclusive, secret, keyfile, certfile,
    # recover_file): past cluster_status they were taken in an older order
    # (ip_addr, port, scheduler_host, scheduler_port, ...: the ninth,
    # scheduler_host, as the scheduler's port), and client_port was refused.
    seen = []
    args = [None, None, 9700, "127.0.0.1", None, None, None, None, None, None, True,
            "dpool-test/shared-positional", None, False, False, SECRET]
    cluster = dpool.SharedJobCluster(working_folder, None, [],
                                     lambda job: seen.append(job.status), None, *args,
                                     scheduler_port=scheduler.port)
    try:
        job = cluster.submit(0)
        cwd = job(timeout=30)
        assert cwd and cwd.endswith(os.path.join("dpool-test", "shared-positional")), job.exception
        poll_for(lambda: dpool.DispyJob.Finished in seen, message="job_status called")
    finally:
        cluster.close()
    with pytest.raises(TypeError, match="multiple values for argument 'secret'"):
        dpool.SharedJobCluster(working_folder, None, [], None, None, *args, secret=SECRET,
                               scheduler_port=scheduler.port)
    with pytest.raises(TypeError, match="at most 24 positional"):
        dpool.SharedJobCluster(working_folder, None, [], None, None, *args, None, None, None,
                               None, scheduler_port=scheduler.port)
    cluster = dpool.SharedJobCluster(nap_for, scheduler_host="127.0.0.1", client_port=9700,
                                     scheduler_port=scheduler.port, secret=SECRET, loglevel=None)
    try:
        assert cluster.submit(0.01)(timeout=30) == 0.01
    finally:
        cluster.close()
