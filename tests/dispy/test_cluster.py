"""JobCluster (the dispy-compatible API) end to end against real nodes."""
import os
import stat
import time

import pytest

import dpool
from dpool.errors import BrokenCluster
from helpers import cluster_on, pid_gone, poll_for, read_marker, start_node
from tasks import double, getpid, hold, nap

DispyJob = dpool.DispyJob
pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------- results

def test_many_tiny_jobs(dpool_node):
    with cluster_on(dpool_node, double) as cluster:
        jobs = []
        for i in range(200):
            job = cluster.submit(i)
            job.id = f"job-{i}"
            jobs.append(job)
        assert [job(timeout=20) for job in jobs] == [2 * i for i in range(200)]
        assert all(job.status == DispyJob.Finished for job in jobs)
        assert [job.id for job in jobs] == [f"job-{i}" for i in range(200)]
        assert all(job.result == 2 * i for i, job in enumerate(jobs))
        assert all(job.exception is None for job in jobs)


def test_job_fields(dpool_node):
    with cluster_on(dpool_node, nap) as cluster:
        job = cluster.submit(0.05, "value")
        assert job.status in (DispyJob.Created, DispyJob.Running)
        job.id = 17
        assert job() == "value"
        assert job.id == 17
        assert job.status == DispyJob.Finished
        assert job.submit_time <= job.start_time <= job.end_time
        assert job.end_time - job.start_time >= 0.04
        assert job.ip_addr == "127.0.0.1"
        assert job.stdout == "" and job.stderr == ""
        assert job.exception is None


def test_status_is_running_while_the_job_runs(dpool_node, tmp_path):
    marker, gate = str(tmp_path / "marker"), str(tmp_path / "gate")
    with cluster_on(dpool_node, hold) as cluster:
        job = cluster.submit(marker, gate)
        read_marker(marker)
        try:
            poll_for(lambda: job.status == DispyJob.Running, message="status Running")
        finally:
            open(gate, "w").close()
            job(timeout=10)


def test_job_status_callback_is_called(dpool_node):
    seen = []
    with cluster_on(dpool_node, double,
                    job_status=lambda job: seen.append((job.id, job.status))) as cluster:
        job = cluster.submit_job_id("a", 4)  # (an id set after submit may come after its end)
        assert job(timeout=10) == 8
    assert ("a", DispyJob.Finished) in seen  # close() runs the callbacks queued


def test_wait_and_job_timeouts(dpool_node, tmp_path):
    marker, gate = str(tmp_path / "marker"), str(tmp_path / "gate")
    with cluster_on(dpool_node, hold) as cluster:
        job = cluster.submit(marker, gate)
        read_marker(marker)
        # (the job holds until the gate opens: returning at all is keeping the timeout)
        assert cluster.wait(timeout=0.1) is False
        assert job(timeout=0.1) is None
        assert not job.finish.is_set()
        open(gate, "w").close()
        assert cluster.wait(timeout=10) is True
        assert job.finish.is_set() and job.status == DispyJob.Finished
        assert isinstance(job(), int)


def test_close_waits_for_jobs(dpool_node):
    cluster = cluster_on(dpool_node, nap)
    jobs = [cluster.submit(0.3, i) for i in range(3)]
    cluster.close()
    assert [job.status for job in jobs] == [DispyJob.Finished] * 3
    assert [job() for job in jobs] == [0, 1, 2]
    assert cluster._client.closed
    with pytest.raises(RuntimeError):
        cluster.submit(1, 1)


def test_close_terminate_kills_running_jobs(dpool_node, tmp_path):
    cluster = cluster_on(dpool_node, hold)
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    jobs = [cluster.submit(m, None) for m in markers]
    pids = [read_marker(m)[0][0] for m in markers[:2]]  # 2 CPUs: two run, one waits
    t0 = time.monotonic()
    cluster.close(terminate=True)
    assert time.monotonic() - t0 < 5
    for pid in pids:
        poll_for(lambda: pid_gone(pid), 5, message=f"worker {pid} to die")
    assert all(job.finish.is_set() and job.result is None for job in jobs)
    assert [job.status for job in jobs] == \
        [DispyJob.Terminated, DispyJob.Terminated, DispyJob.Cancelled]
    assert not os.path.exists(markers[2])


def test_context_manager_closes_and_keeps_the_exception(dpool_node, tmp_path):
    marker = str(tmp_path / "marker")
    with pytest.raises(KeyError, match="from the block"):
        with cluster_on(dpool_node, hold) as cluster:
            job = cluster.submit(marker, None)
            (pid,), _ = read_marker(marker)
            raise KeyError("from the block")
    assert cluster._client.closed
    poll_for(lambda: pid_gone(pid), 5, message="the running job to be killed")
    assert job.finish.is_set()


def test_context_manager_waits_on_normal_exit(dpool_node):
    with cluster_on(dpool_node, nap) as cluster:
        job = cluster.submit(0.2, "done")
    assert cluster._client.closed
    assert job.status == DispyJob.Finished and job() == "done"


def test_stats_prints_the_node_table(dpool_node, capsys):
    with cluster_on(dpool_node, nap) as cluster:
        jobs = [cluster.submit(0.01, i) for i in range(4)]
        cluster.wait(timeout=10)
        capsys.readouterr()
        cluster.stats()
        out = capsys.readouterr().out
    lines = out.splitlines()
    heading = next(line for line in lines if "Node" in line)
    for word in ("CPUs", "Jobs", "Sec/Job", "Node Time Sec"):
        assert word in heading
    rows = [line for line in lines if line.strip().startswith("127.0.0.1")]
    assert len(rows) == 1, out
    cells = [cell.strip() for cell in rows[0].split("|")]
    assert cells[1] == "2" and cells[2] == "4", rows[0]
    assert float(cells[3]) >= 0.005
    assert "Total job time" in out and "wall time" in out
    assert all(job.status == DispyJob.Finished for job in jobs)


# ---------------------------------------------------------------- secrets

@pytest.mark.parametrize("kind", ["str", "bytes"])
def test_secret_argument(dpool_node, kind):
    secret = dpool_node.secret.decode() if kind == "str" else dpool_node.secret
    with cluster_on(dpool_node, double, secret=secret) as cluster:
        assert cluster.submit(21)(timeout=10) == 42


def test_secret_from_environment(dpool_node, monkeypatch):
    monkeypatch.setenv("DPOOL_SECRET", dpool_node.secret.decode())
    with dpool.JobCluster(double, nodes=[dpool_node.address]) as cluster:
        assert cluster.submit(5)(timeout=10) == 10


def test_missing_secret_says_how_to_set_one(dpool_node):
    with pytest.raises(ValueError, match="DPOOL_SECRET"):
        dpool.JobCluster(double, nodes=[dpool_node.address])


def test_missing_secret_fails_clearly(dpool_node):
    """What happens today: the cluster fails to start, naming the secret."""
    with pytest.raises((ValueError, BrokenCluster), match="secret"):
        dpool.JobCluster(double, nodes=[dpool_node.address])


def test_loopback_node_leaves_its_secret_for_local_clients(tmp_path, dpool_home):
    node = start_node(tmp_path / "node", cpus=1, secret=None)
    try:
        path = dpool_home / f"node-{node.port}.secret"
        assert path.exists(), node.stderr()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_bytes().strip()) >= 32
        assert str(path) in node.stderr()
        with dpool.JobCluster(double, nodes=[("127.0.0.1", node.port)]) as cluster:
            assert cluster.submit(3)(timeout=10) == 6
        # The same file works for a client given the address as "localhost".
        with dpool.JobCluster(double, nodes=[("localhost", node.port)]) as cluster:
            assert cluster.submit(4)(timeout=10) == 8
    finally:
        assert node.terminate() == 0


def test_nodes_as_host_port_strings(dpool_node):
    """``JobCluster(nodes=["host:port"])`` was taken for a host name (the
    Executor and Pool accepted it): the one address parser reads it."""
    address = f"127.0.0.1:{dpool_node.port}"
    with dpool.JobCluster(double, nodes=[address], secret=dpool_node.secret,
                          loglevel=None) as cluster:
        assert cluster.submit(5)(timeout=10) == 10
        assert [node.ip_addr for node in cluster.status().nodes] == ["127.0.0.1"]


def test_node_strings_parse_as_in_the_other_apis():
    from dpool._adapters import node_addresses
    from dpool.dispy.model import allocations

    specs = ["h", "h:5", "[::1]:7", "::1", "10.0.0.1:80"]
    assert [(a.host, a.port) for a in allocations(specs, 51350)] == node_addresses(specs)
    with pytest.raises(ValueError, match="expected host:port"):
        allocations(["h:port"], 51350)


# ------------------------------------------------------- computations

def test_lambda_computation(dpool_node):
    with cluster_on(dpool_node, lambda x, y=1: (x + y, os.getpid())) as cluster:
        jobs = [cluster.submit(i, y=10) for i in range(5)]
        assert [job(timeout=10)[0] for job in jobs] == [10, 11, 12, 13, 14]


def test_closure_computation(dpool_node):
    offset = 1000

    def add(x):
        return x + offset

    with cluster_on(dpool_node, add) as cluster:
        assert cluster.submit(1)(timeout=10) == 1001


def test_not_callable():
    with pytest.raises(TypeError):
        dpool.JobCluster(42, nodes=[("127.0.0.1", 1)])


def test_embedded_local_node():
    """No nodes, no secret anywhere: an embedded node, whatever runs on 51350."""
    with dpool.JobCluster(getpid, cpus=2) as cluster:
        assert cluster._client.embedded is not None
        assert cluster._client.nodes()[0].cpus == 2
        jobs = [cluster.submit() for _ in range(6)]
        pids = {job(timeout=10) for job in jobs}
        assert len(pids) <= 2 and os.getpid() not in pids
        assert all(job.ip_addr == "127.0.0.1" for job in jobs)


# ------------------------------------------------------------ two nodes

def test_two_nodes_share_the_jobs(tmp_path, node_secret):
    nodes = [start_node(tmp_path / f"n{i}", cpus=1, secret=node_secret) for i in range(2)]
    try:
        with dpool.JobCluster(nap, nodes=[n.address for n in nodes],
                              secret=node_secret) as cluster:
            assert len(cluster._client.nodes()) == 2
            jobs = [cluster.submit(0.05, i) for i in range(8)]
            cores = [job.core_job for job in jobs]  # (a finished DispyJob drops it)
            assert [job(timeout=10) for job in jobs] == list(range(8))
            used = {core.node.address for core in cores}
            assert used == {n.address for n in nodes}
    finally:
        for node in nodes:
            assert node.terminate() == 0


def test_lost_node_jobs_run_again_elsewhere(tmp_path, node_secret):
    """At-least-once: jobs on a node that dies are re-run on the other node."""
    nodes = [start_node(tmp_path / f"n{i}", cpus=1, secret=node_secret) for i in range(2)]
    gate = str(tmp_path / "gate")
    markers = [str(tmp_path / f"m{i}") for i in range(4)]
    try:
        with dpool.JobCluster(hold, nodes=[n.address for n in nodes],
                              secret=node_secret) as cluster:
            jobs = [cluster.submit(m, gate) for m in markers]
            by_node = {n.pid: {p.pid for p in n.descendants()} for n in nodes}
            running = {}
            poll_for(lambda: sum(os.path.exists(m) for m in markers) == 2, 10,
                     message="one job running on each node")
            for m in markers:
                if os.path.exists(m):
                    (pid,), _ = read_marker(m)
                    owner = next(n for n in nodes if pid in by_node[n.pid]
                                 or pid in {p.pid for p in n.descendants()})
                    running[owner.pid] = (m, pid)
            victim, survivor = nodes
            lost_marker, lost_pid = running[victim.pid]
            victim_children = victim.descendants()
            victim.kill()
            poll_for(lambda: len(cluster._client.nodes()) == 1, 10,
                     message="the client to notice the lost node")
            for child in victim_children:
                poll_for(lambda: pid_gone(child.pid), 10, message="the lost node's workers")
            os.unlink(lost_marker)
            open(gate, "w").close()
            assert cluster.wait(timeout=15)
            survivor_pids = {p.pid for p in survivor.descendants()}
            for job in jobs:
                assert job.status == DispyJob.Finished, (job.status, job.exception)
                assert job.result in survivor_pids
            assert os.path.exists(lost_marker)  # it ran a second time
    finally:
        for node in nodes:
            node.kill()


def test_finish_event_taken_before_or_after_the_end(dpool_node, tmp_path):
    """``job.finish`` is made on first use: an Event taken while the job runs
    is set when it ends; one taken afterwards is already set."""
    import threading

    marker, gate = str(tmp_path / "marker"), str(tmp_path / "gate")
    with cluster_on(dpool_node, hold) as cluster:
        early = cluster.submit(marker, gate)
        read_marker(marker)
        event = early.finish
        assert not event.is_set()
        woke = threading.Event()
        waiter = threading.Thread(target=lambda: (event.wait(10), woke.set()))
        waiter.start()
        open(gate, "w").close()
        assert woke.wait(10) and early.finish is event
        waiter.join()
        late = cluster.submit(str(tmp_path / "m2"), gate)
        assert late(timeout=10) is not None
        assert late.finish.is_set()


# --------------------------------------------- node addresses and fallback


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


def test_jobcluster_refuses_a_node_port_out_of_range():
    """``JobCluster(nodes=[("127.0.0.1", 99999)])`` (and NodeAllocate) connected
    to port 34463, getaddrinfo's wrap-around, instead of refusing the port."""
    for nodes in ([("127.0.0.1", 99999)], [("127.0.0.1", 70000)]):
        with pytest.raises(ValueError, match="65535"):
            dpool.JobCluster(double, nodes=nodes, secret="x")
    with pytest.raises(ValueError, match="65535"):
        dpool.NodeAllocate("127.0.0.1", port=99999)


# ------------------------------------------------------------ Ctrl-C

@pytest.mark.parametrize("embedded", [False, True])
def test_ctrl_c_during_the_setup_wait_closes_everything(dpool_node, tmp_path, embedded):
    """A KeyboardInterrupt while JobCluster() waits for the nodes' setup
    re-raises with the client closed (its threads, sockets, an embedded
    node and the setup's process gone: the leak check) and nothing left
    running: it left the client open."""
    import functools
    import signal
    import threading

    marker = str(tmp_path / "setup")
    main = threading.main_thread().ident
    before = set(threading.enumerate())

    def interrupt():
        read_marker(marker)  # the setup runs: JobCluster() waits for it
        signal.pthread_kill(main, signal.SIGINT)
    thread = threading.Thread(target=interrupt)
    thread.start()
    kwargs = dict(cpus=1) if embedded else dict(nodes=[dpool_node.address],
                                                 secret=dpool_node.secret)
    try:
        with pytest.raises(KeyboardInterrupt):
            dpool.JobCluster(getpid, setup=functools.partial(hold, marker), **kwargs)
    finally:
        thread.join(30)
    pid = int(open(marker).read().split()[0])
    poll_for(lambda: pid_gone(pid), timeout=10, message="the setup's process gone")
    poll_for(lambda: set(threading.enumerate()) <= before, timeout=10,
             message="the client's threads gone")
