"""dpool-scheduler on loopback: two clients share three nodes (127.0.0.2-4)."""
import functools
import os
import signal
import socket

import pytest

import dpool
from dpool.core.client import Client
from dpool.errors import BrokenCluster, JobCancelled
from dpool.futures import Executor
from helpers import pid_gone, poll_for, read_marker, start_node
from helpers_sched import NODE_CPUS, SECRET, holding_client, resubmit, share, start_scheduler
from tasks import hold, nap, nap_for

HEARTBEAT = (0.2, 2.0)  # the clients' (interval, deadline): the scheduler's lease on them


def client(sched, **kwargs):
    kwargs.setdefault("heartbeat", HEARTBEAT)
    return Client([sched.address], secret=SECRET, **kwargs).start()


def test_a_job_runs_through_the_scheduler_on_a_named_node(scheduler, three_nodes):
    c = client(scheduler, session={"notify_start": True})
    try:
        assert c.nodes()[0].cpus == 3 * NODE_CPUS
        jobs = [c.submit(nap_for, (0.2,)) for _ in range(3 * NODE_CPUS)]
        assert [j.future.result(30) for j in jobs] == [0.2] * len(jobs)
        # Each job's start names the node that ran it: all three ran some.
        assert {j.where for j in jobs} == {n.host for n in three_nodes}
    finally:
        c.close()


def test_two_clients_share_the_cpus_equally(scheduler):
    a, b = client(scheduler), client(scheduler)
    try:
        jobs_a = [a.submit(nap, (0.3,)) for _ in range(40)]
        poll_for(lambda: any(j.start_time for j in jobs_a) or any(j.future.done() for j in jobs_a),
                 20, message="client A's jobs to start")
        jobs_b = [b.submit(nap, (0.3,)) for _ in range(40)]
        for job in jobs_a + jobs_b:
            job.future.result(60)
        assert 0.4 <= share(jobs_a, jobs_b) <= 0.6
    finally:
        a.close()
        b.close()


def test_two_clients_share_the_cpus_equally_with_jobs_held_in_the_workers(scheduler):
    """Jobs of 60 ms: each worker holds the next one behind the one it runs
    (dispatch.PREFETCH_JOB); the scheduler's Reclaim, as B comes, has the
    held ones of A back unstarted, so B gets its share as A's jobs end."""
    a, b = client(scheduler), client(scheduler)
    try:
        jobs_a = [a.submit(nap, (0.06,)) for _ in range(300)]
        poll_for(lambda: sum(j.future.done() for j in jobs_a) >= 20, 30,
                 message="client A's jobs to run")
        jobs_b = [b.submit(nap, (0.06,)) for _ in range(150)]
        for job in jobs_a + jobs_b:
            job.future.result(120)
        assert 0.4 <= share(jobs_a, jobs_b) <= 0.6
    finally:
        a.close()
        b.close()


def test_executor_through_the_scheduler(scheduler):
    with Executor(scheduler=f"127.0.0.1:{scheduler.port}", secret=SECRET) as ex:
        assert list(ex.map(abs, range(-5, 5))) == [abs(x) for x in range(-5, 5)]
        assert ex._max_workers == 3 * NODE_CPUS


def test_shared_job_cluster_through_the_scheduler(scheduler, three_nodes):
    cluster = dpool.SharedJobCluster(nap_for, scheduler_host="127.0.0.1",
                                     scheduler_port=scheduler.port, secret=SECRET)
    try:
        jobs = [cluster.submit(0.2) for _ in range(3 * NODE_CPUS)]
        assert [job() for job in jobs] == [0.2] * len(jobs)
        assert all(job.status == dpool.DispyJob.Finished for job in jobs)
        assert {job.ip_addr for job in jobs} == {n.host for n in three_nodes}
    finally:
        cluster.close()


def _held(tmp_path, n, prefix):
    return [str(tmp_path / f"{prefix}{i}") for i in range(n)]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_silent_client_hands_its_cpus_on(scheduler, tmp_path, how):
    """Client A holds every CPU; B waits.  A is killed (its connection
    closes) or stopped (silent: the scheduler's lease on it ends after its
    heartbeat deadline): its jobs are killed on the nodes and B's run."""
    markers = _held(tmp_path, 3 * NODE_CPUS, "a")
    proc = holding_client(scheduler.address, SECRET, HEARTBEAT, markers)
    b = client(scheduler)
    try:
        pids = [read_marker(m, 30)[0][0] for m in markers]
        jobs = [b.submit(nap_for, (0.1,)) for _ in range(3 * NODE_CPUS)]
        os.kill(proc.pid, how)
        # At once for a closed connection; within the lease for a silent client.
        assert [j.future.result(HEARTBEAT[1] + 10) for j in jobs] == [0.1] * len(jobs)
        poll_for(lambda: all(pid_gone(pid) for pid in pids), 10,
                 message="client A's jobs to be killed on the nodes")
    finally:
        proc.kill()
        proc.wait(10)
        b.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_scheduler_restart_hangs_nothing(tmp_path, three_nodes):
    """The scheduler is killed under running jobs: they fail at once with
    BrokenCluster (a silent scheduler: after the heartbeat deadline), the
    nodes kill them; the client re-joins the restarted scheduler with
    backoff and runs new jobs."""
    nodes = [(n.host, n.port) for n in three_nodes]
    port = _free_port()
    sched = start_scheduler(tmp_path / "s1", nodes, SECRET, port=port)
    c = client(sched)
    try:
        markers = _held(tmp_path, 2, "m")
        jobs = [c.submit(hold, (m,)) for m in markers]
        pids = [read_marker(m, 30)[0][0] for m in markers]
        sched.kill()
        for job in jobs:
            with pytest.raises(BrokenCluster):
                job.future.result(HEARTBEAT[1] + 10)
        poll_for(lambda: all(pid_gone(pid) for pid in pids), 10,
                 message="the jobs to be killed on the nodes")
        sched = start_scheduler(tmp_path / "s2", nodes, SECRET, port=port)
        job = resubmit(c, nap_for, (0.1,))
        assert job.future.result(30) == 0.1
    finally:
        c.close()
        sched.terminate()


def test_a_node_without_the_scheduler_still_serves_one_client(three_nodes):
    """Shared sessions are the scheduler's: a plain client session still
    takes a node's CPUs for itself (unchanged)."""
    node = three_nodes[0]
    c = Client([(node.host, node.port)], secret=SECRET).start()
    try:
        assert c.submit(nap_for, (0.05,)).future.result(30) == 0.05
    finally:
        c.close()


def test_jobs_with_no_node_left_fail_within_the_deadline(tmp_path):
    """The scheduler's only node dies under running jobs: they go back to
    the queue, and with no node to run them they fail (BrokenCluster) once
    the scheduler's heartbeat deadline has passed, instead of waiting."""
    node = start_node(tmp_path / "node", cpus=2, secret=SECRET, args=("--host", "127.0.0.5"))
    sched = start_scheduler(tmp_path / "sched", [("127.0.0.5", node.port)], SECRET,
                            env={"DPOOL_HEARTBEAT": "0.2,2"})
    c = client(sched)
    try:
        markers = _held(tmp_path, 2, "m")
        jobs = [c.submit(hold, (m,)) for m in markers]
        for m in markers:
            read_marker(m, 30)
        node.kill()
        for job in jobs:
            with pytest.raises(BrokenCluster, match="could run the job"):
                job.future.result(2 + 10)
    finally:
        c.close()
        sched.terminate()
        node.kill()


def test_a_client_gets_the_cpus_of_nodes_that_join_after_it(tmp_path):
    """Six long jobs for a scheduler with one node of 2 CPUs up, then two
    more nodes join.  The client, told (Ready) of 2 CPUs, sent no more than
    4 jobs at a time; the 2 beyond one per CPU waited on the first node
    behind its running jobs while the new nodes idled.  The scheduler now
    tells its clients its new CPU total, and takes back jobs waiting on a
    node for a node that joins."""
    hosts = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]
    ports = [None, _free_port(), _free_port()]
    nodes = [start_node(tmp_path / "n0", cpus=2, secret=SECRET, args=("--host", hosts[0]))]
    ports[0] = nodes[0].port
    sched = start_scheduler(tmp_path / "sched", list(zip(hosts, ports)), SECRET)
    c = client(sched)
    markers, gate = _held(tmp_path, 6, "m"), str(tmp_path / "gate")
    try:
        assert c.nodes()[0].cpus == 2
        jobs = [c.submit(hold, (m, gate)) for m in markers]
        read_marker(markers[0], 20)
        read_marker(markers[1], 20)
        for i in (1, 2):
            nodes.append(start_node(tmp_path / f"n{i}", port=ports[i], cpus=2, secret=SECRET,
                                    args=("--host", hosts[i])))
        for m in markers:   # all six at once: one per CPU of the three nodes
            read_marker(m, 20)
        # (the new total is told within READY_COALESCE s of the nodes joining)
        poll_for(lambda: c.nodes()[0].cpus == 6, 10, message="the client told of 6 CPUs")
        open(gate, "w").close()
        assert len({j.future.result(30) for j in jobs}) == 6
    finally:
        open(gate, "w").close()
        c.close()
        sched.terminate()
        for node in nodes:
            node.kill()


def stubborn(marker, gate):
    """``hold``, noting a SIGINT (a cancel with the session option
    ``interrupt``) in ``marker + ".int"`` and going on."""
    signal.signal(signal.SIGINT, lambda *_: open(marker + ".int", "w").close())
    return hold(marker, gate)


def test_a_cancelled_job_whose_node_is_lost_is_not_run_again(tmp_path):
    """A job cancelled while it runs, whose node is lost before it ended:
    the scheduler placed it again (as a lost node's job) and ran it anew on
    another node; the client, which had asked to cancel it, waited for it.
    It is reported cancelled instead."""
    hosts = ["127.0.0.5", "127.0.0.6"]
    nodes = [start_node(tmp_path / f"n{i}", cpus=1, secret=SECRET, args=("--host", host))
             for i, host in enumerate(hosts)]
    sched = start_scheduler(tmp_path / "sched", [(h, n.port) for h, n in zip(hosts, nodes)],
                            SECRET)
    c = client(sched, session={"notify_start": True, "interrupt": 30})
    marker, gate = str(tmp_path / "m"), str(tmp_path / "gate")
    try:
        job = c.submit(stubborn, (marker, gate))
        read_marker(marker, 30)
        where = poll_for(lambda: job.where, 10, message="the job's node")
        c.cancel(job)
        poll_for(lambda: os.path.exists(marker + ".int"), 30,
                 message="the cancel to reach the job")   # it goes on running
        os.remove(marker)
        nodes[hosts.index(where)].kill()
        with pytest.raises(JobCancelled):
            job.future.result(20)
        assert not os.path.exists(marker)
    finally:
        open(gate, "w").close()
        c.close()
        sched.terminate()
        for node in nodes:
            node.kill()


@pytest.mark.parametrize("what", ["garbage", "huge frame", "run before session"])
def test_a_client_sending_nonsense_loses_its_connection_and_nobody_else_notices(scheduler,
                                                                               what):
    """An authenticated client sending garbage, a frame longer than any
    allowed, or jobs before its session: the scheduler closes that
    connection; another client's jobs run on."""
    import struct

    from dpool import protocol as P
    from dpool.transport.frames import encode
    from helpers import authenticated_socket, recv_until_closed
    other = client(scheduler)
    try:
        job = other.submit(nap_for, (0.01,))
        assert job.future.result(30) == 0.01
        with authenticated_socket(scheduler.port, SECRET) as sock:
            if what == "garbage":
                sock.sendall(b"".join(encode([b"\xffnot a dpool message"])))
            elif what == "huge frame":
                sock.sendall(struct.pack("<IQ", 1, 2**40))
            else:
                sock.sendall(b"".join(encode([P.encode(P.Run, [(1, 1, 0, 0, 1)])])))
            recv_until_closed(sock, 20)   # (fails unless the scheduler closes it)
        jobs = [other.submit(nap_for, (0.01,)) for _ in range(6)]
        assert [j.future.result(30) for j in jobs] == [0.01] * 6
    finally:
        other.close()


def test_a_second_scheduler_does_not_share_a_node_another_one_holds(tmp_path):
    """Two dpool-schedulers given the same node: the second one's sessions
    joined the first one's shared CPUs, and each placed a job per CPU there
    (twice as many jobs as CPUs).  The node holds its CPUs for one
    scheduler; the other is told it is busy (and retries)."""
    node = start_node(tmp_path / "node", cpus=2, secret=SECRET, args=("--host", "127.0.0.5"))
    first = start_scheduler(tmp_path / "a", [("127.0.0.5", node.port)], SECRET)
    second = None
    try:
        assert first.cpus == 2
        second = start_scheduler(tmp_path / "b", [("127.0.0.5", node.port)], SECRET)
        assert second.cpus == 0, "the second scheduler got the node's CPUs too"
    finally:
        if second is not None:
            second.terminate()
        first.terminate()
        node.kill()


def test_a_heavier_client_gets_its_weighted_share(scheduler):
    """Session option ``weight``: a client of weight 2 gets two thirds of the
    CPUs while both have work."""
    a, b = client(scheduler, session={"weight": 2}), client(scheduler)
    try:
        jobs_a = [a.submit(nap, (0.3,)) for _ in range(60)]
        jobs_b = [b.submit(nap, (0.3,)) for _ in range(30)]
        for job in jobs_a + jobs_b:
            job.future.result(60)
        assert 0.57 <= share(jobs_a, jobs_b) <= 0.77
    finally:
        a.close()
        b.close()


def test_shared_job_cluster_limited_to_some_nodes(scheduler, three_nodes):
    """dispy's ``nodes`` of SharedJobCluster: the jobs run on those only."""
    cluster = dpool.SharedJobCluster(nap_for, nodes=["127.0.0.3"], scheduler_host="127.0.0.1",
                                     scheduler_port=scheduler.port, secret=SECRET)
    try:
        jobs = [cluster.submit(0.1) for _ in range(6)]
        assert [job() for job in jobs] == [0.1] * 6
        assert {job.ip_addr for job in jobs} == {"127.0.0.3"}
    finally:
        cluster.close()


def test_sigterm_drains_the_scheduler(tmp_path, three_nodes):
    """SIGTERM: running jobs finish, the queued ones go back to their client
    (which, with no other node, fails them once the scheduler is gone; those
    already waiting on a node's worker run there), and the scheduler exits 0."""
    sched = start_scheduler(tmp_path / "sched", [(n.host, n.port) for n in three_nodes], SECRET)
    c = client(sched)
    try:
        gate = str(tmp_path / "gate")
        markers = _held(tmp_path, 3 * NODE_CPUS, "m")
        running = [c.submit(hold, (m, gate)) for m in markers]
        for m in markers:
            read_marker(m, 30)
        queued = [c.submit(nap_for, (0.1,)) for _ in range(3 * NODE_CPUS)]
        sched.proc.send_signal(signal.SIGTERM)
        open(gate, "w").close()
        assert sched.proc.wait(30) == 0
        assert all(isinstance(j.future.result(30), int) for j in running)
        for job in queued:  # ran on a node already, or failed: none waits
            try:
                assert job.future.result(30) == 0.1
            except BrokenCluster:
                pass
    finally:
        c.close()
        sched.kill()


def helper(data, x):
    return f"{data}:{x}"


def setup_data():
    """A setup: reads the file sent with depends (in the session folder)."""
    global data, setup_pid
    with open("data.txt") as f:
        data = f.read().strip()
    setup_pid = os.getpid()
    return 0


def uses_setup_data(x):
    return helper(data, x), setup_pid  # (globals set by setup_data)


def setup_with(path):
    """A setup taking an argument, given as functools.partial(setup_with, path)."""
    global data, setup_pid
    with open(path) as f:
        data = f.read().strip()
    setup_pid = os.getpid()


def cleanup_with(marker):
    with open(marker, "a") as f:
        f.write(f"{data}\n")


def test_shared_job_cluster_setup_and_cleanup_may_be_functools_partials(scheduler, tmp_path,
                                                                       monkeypatch):
    """dispy: setup and cleanup may be functools.partial objects; the nodes
    failed them with "'functools.partial' object has no attribute '__globals__'"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("partial\n")
    marker = str(tmp_path / "cleaned")
    cluster = dpool.SharedJobCluster(uses_setup_data, depends=[helper, "data.txt"],
                                     setup=functools.partial(setup_with, "data.txt"),
                                     cleanup=functools.partial(cleanup_with, marker),
                                     scheduler_host="127.0.0.1",
                                     scheduler_port=scheduler.port, secret=SECRET)
    try:
        assert [job(timeout=30)[0] for job in [cluster.submit(i) for i in range(6)]] == \
            [f"partial:{i}" for i in range(6)]
    finally:
        cluster.close()
    poll_for(lambda: os.path.exists(marker) and len(open(marker).read().split()) == 3, 15,
             message="cleanup to run on the three nodes")
    assert open(marker).read().split() == ["partial"] * 3


def test_shared_job_cluster_depends_and_setup_reach_every_node(scheduler, tmp_path,
                                                               monkeypatch):
    """A SharedJobCluster's depends (a function, a file) and setup go to each
    node through the scheduler: setup runs once on each node, jobs see both."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("payload\n")
    cluster = dpool.SharedJobCluster(uses_setup_data, depends=[helper, "data.txt"],
                                     setup=setup_data, scheduler_host="127.0.0.1",
                                     scheduler_port=scheduler.port, secret=SECRET)
    try:
        jobs = [cluster.submit(i) for i in range(12)]
        results = [job(timeout=30) for job in jobs]
        assert [r[0] for r in results] == [f"payload:{i}" for i in range(12)]
        by_node = {}
        for job, (_, pid) in zip(jobs, results):
            by_node.setdefault(job.ip_addr, set()).add(pid)
        assert len(by_node) == 3 and all(len(pids) == 1 for pids in by_node.values())
    finally:
        cluster.close()
