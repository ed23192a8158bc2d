"""dispy compatibility (issue #3) through the public API, against real nodes."""
import decimal
import fractions
import functools
import logging
import os
import threading
import time

import pytest

import dpool as dispy
from dpool import protocol as P
from dpool.errors import BrokenCluster
import tasks
from helpers import cluster_on, pid_gone, poll_for, read_marker

DispyJob, DispyNode = dispy.DispyJob, dispy.DispyNode
pytestmark = pytest.mark.timeout(30)


def helper(d, x):
    return f"{d}:{x}"


# ----------------------------------------------------------- 1. job and node model

def test_status_constants_have_dispys_values():
    assert [DispyJob.Created, DispyJob.Running, DispyJob.ProvisionalResult, DispyJob.Cancelled,
            DispyJob.Terminated, DispyJob.Abandoned, DispyJob.Finished] == list(range(5, 12))
    assert (DispyNode.Initialized, DispyNode.Closed, DispyNode.AvailInfo) == (4, 16, 17)
    for name in ("JobCluster", "DispyJob", "DispyNode", "DispyNodeAvailInfo", "NodeAllocate"):
        assert hasattr(dispy, name)


def test_status_and_print_status(dpool_node, capsys):
    with cluster_on(dpool_node, tasks.identity) as cluster:
        jobs = [cluster.submit(i) for i in range(4)]
        assert cluster.wait(10)
        status = cluster.status()
        assert status.jobs_pending == 0
        (node,) = status.nodes
        assert isinstance(node, DispyNode)
        assert (node.ip_addr, node.cpus, node.jobs_done, node.busy) == ("127.0.0.1", 2, 4, 0)
        assert node.cpu_time >= 0 and node.update_time > 0
        assert isinstance(node.avail_info, dispy.DispyNodeAvailInfo)
        assert node.avail_info.memory > 0 and node.avail_info.disk > 0
        cluster.print_status()
        out = capsys.readouterr().out
        assert "Node" in out and "Total job time" in out
        assert [job.id for job in jobs] == sorted(job.id for job in jobs)  # numbered like dispy



@pytest.mark.parametrize("job_status", [None, lambda job: None])
def test_print_status_counts_a_job_cancelled_while_running(dpool_node, tmp_path, capsys,
                                                           job_status):
    # dispy counts a Terminated job as done on its node (jobs_done, cpu_time),
    # as provisional_results.py's and longrun.py's print_status() show; its
    # time is known when the node tells the job's start (callbacks)
    marker = str(tmp_path / "running")
    with cluster_on(dpool_node, tasks.hold, job_status=job_status) as cluster:
        job = cluster.submit(marker)
        read_marker(marker)
        assert cluster.cancel(job) == 0
        job(timeout=10)
        assert job.status == DispyJob.Terminated
        (node,) = cluster.status().nodes
        assert node.jobs_done == 1 and node.busy == 0
        assert node.cpu_time > 0 if job_status else node.cpu_time == 0
        cluster.print_status()
        row = [line for line in capsys.readouterr().out.splitlines() if "127.0.0.1" in line]
        assert row and row[0].split("|")[2].strip() == "1"


# ---------------------------------------------------------------- 2. callbacks

def test_callbacks_see_node_and_job_transitions_in_order(dpool_node):
    events, seen = [], []
    threads = set()

    def cluster_status(status, node, job):
        threads.add(threading.current_thread().name)
        events.append((status, node.ip_addr if node else None, job.id if job else None))

    def job_status(job):
        threads.add(threading.current_thread().name)
        seen.append((job.id, job.status, job.result))

    cluster = cluster_on(dpool_node, tasks.identity, cluster_status=cluster_status,
                         job_status=job_status)
    job = cluster.submit_job_id("j1", 7)
    assert job() == 7
    cluster.close()
    assert threads == {"dpool-callbacks"}
    ip = "127.0.0.1"
    assert events[0] == (DispyNode.Initialized, ip, None)
    mine = [e for e in events if e[2] == "j1"]
    assert mine == [(DispyJob.Created, None, "j1"), (DispyJob.Running, ip, "j1"),
                    (DispyJob.Finished, ip, "j1")]
    assert events[-1] == (DispyNode.Closed, ip, None)
    assert seen == [("j1", DispyJob.Finished, 7)]


def test_callback_exception_is_logged_and_the_next_runs(dpool_node, caplog):
    seen = []

    def job_status(job):
        seen.append(job.id)
        if len(seen) == 1:
            raise ValueError("callback bug")

    with caplog.at_level(logging.ERROR, logger="dpool"):
        with cluster_on(dpool_node, tasks.identity, job_status=job_status) as cluster:
            for i in range(3):
                cluster.submit(i)
    assert len(seen) == 3
    assert "callback bug" in caplog.text


def test_the_exit_wait_for_queued_callbacks_is_one_deadline_for_all_clusters(monkeypatch):
    # A program that leaves N clusters unclosed, each with a callback still
    # running, waited 10 s per cluster at its exit (N x 10 s): one deadline
    # for all now, the threads told to end at once.
    import weakref

    from dpool.core.callbacks import CallbackThread
    from dpool.dispy import cluster as cluster_mod

    release, now, waits = threading.Event(), [0.0], []
    threads = [CallbackThread() for _ in range(3)]
    for callbacks in threads:
        callbacks.put(release.wait, 30)  # (a callback the exit finds running)

        def hung_join(timeout=None):  # the join of a hung thread: its whole timeout
            waits.append(timeout)
            now[0] += timeout or 0.0
        monkeypatch.setattr(callbacks.thread, "join", hung_join)
    monkeypatch.setattr(cluster_mod, "_open_callbacks", weakref.WeakSet(threads))
    monkeypatch.setattr(cluster_mod, "_clock", lambda: now[0], raising=False)
    try:
        cluster_mod._run_queued_callbacks()
        assert len(waits) == 3 and sum(waits) <= cluster_mod.EXIT_WAIT, waits
        assert all(not callbacks.queue.empty() for callbacks in threads)  # their ends queued
    finally:
        release.set()
        for callbacks in threads:
            del callbacks.thread.join
            callbacks.stop(10)


def test_callback_signatures_are_checked():
    with pytest.raises(TypeError, match="job_status"):
        dispy.JobCluster(tasks.identity, nodes=[("127.0.0.1", 1)], job_status=lambda: None)
    with pytest.raises(TypeError, match="cluster_status"):
        dispy.JobCluster(tasks.identity, nodes=[("127.0.0.1", 1)], cluster_status=lambda a: None)


# ------------------------------------------------------ 3. cancel, wait, close

def test_close_timeout_without_terminate_keeps_the_cluster(dpool_node, tmp_path):
    gate, marker = str(tmp_path / "gate"), str(tmp_path / "m")
    cluster = cluster_on(dpool_node, tasks.hold)
    job = cluster.submit(marker, gate)
    poll_for(lambda: os.path.exists(marker), 10, message="the job to start")
    assert cluster.close(timeout=0.2) is False  # (the job holds until the gate opens)
    assert cluster.submit(marker + "2", gate) is not None  # still open
    open(gate, "w").close()
    assert cluster.close(timeout=10) is True
    assert job.status == DispyJob.Finished


def test_close_terminate_after_timeout_wakes_every_waiter(dpool_node, tmp_path):
    gate, marker = str(tmp_path / "gate"), str(tmp_path / "m")
    cluster = cluster_on(dpool_node, tasks.hold)
    running = cluster.submit(marker, gate)
    queued = [cluster.submit(str(tmp_path / f"q{i}"), gate) for i in range(3)]
    poll_for(lambda: os.path.exists(marker), 10, message="the job to start")
    (pid,), _ = read_marker(marker)
    woken = []
    waiters = [threading.Thread(target=lambda j=j: woken.append(j())) for j in [running] + queued]
    for t in waiters:
        t.start()
    t0 = time.monotonic()
    assert cluster.close(timeout=0.3, terminate=True) is True
    assert 0.25 < time.monotonic() - t0  # it waited its timeout (the jobs hold: then killed)
    for t in waiters:
        t.join(5)
    assert len(woken) == 4
    assert running.status == DispyJob.Terminated
    assert {j.status for j in queued} <= {DispyJob.Cancelled, DispyJob.Terminated}
    poll_for(lambda: pid_gone(pid), 5, message="the running job's process to die")


# ------------------------------------------------------ 4. inside a computation

def test_globals_provisional_results_and_send_file(dpool_node, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    with cluster_on(dpool_node, tasks.where) as cluster:
        x, name, ip, job_path, cwd = cluster.submit(1)(timeout=10)
        assert (x, ip) == (1, "127.0.0.1") and name and job_path == cwd
    with cluster_on(dpool_node, tasks.provisional,
                    job_status=lambda job: seen.append((job.status, job.result))) as cluster:
        job = cluster.submit(3)
        assert job(timeout=10) == ("final", 3)
    poll_for(lambda: len(seen) == 4, 5, message="all job_status calls")
    assert seen == [(DispyJob.ProvisionalResult, ("step", i)) for i in range(3)] + \
        [(DispyJob.Finished, ("final", 3))]
    with cluster_on(dpool_node, tasks.send_back) as cluster:
        assert cluster.submit("out.txt", "from the node")(timeout=10) == 0
    poll_for(lambda: (tmp_path / "out.txt").exists(), 5, message="the file sent back")
    assert (tmp_path / "out.txt").read_text() == "from the node"


# --------------------------------------------------- 5. depends, setup, cleanup

def test_depends_setup_once_per_node_and_cleanup(dpool_node, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("payload\n")
    marker = str(tmp_path / "setup-ran")
    cluster = cluster_on(dpool_node, tasks.uses_setup, depends=[helper, "data.txt"],
                         setup=tasks.setup_reads, cleanup=tasks.cleanup_writes,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=("data.txt", marker))])
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    jobs = [cluster.submit(i, str(rendezvous)) for i in range(6)]
    results = [job(timeout=15) for job in jobs]
    assert [r[0] for r in results] == [f"payload:{i}" for i in range(6)]
    assert len({r[1] for r in results}) == 2  # both workers saw setup's global
    assert len(open(marker).read().split()) == 1  # setup ran once on the node
    cluster.close()
    poll_for(lambda: os.path.exists(marker + ".cleanup"), 10, message="cleanup to run")
    assert open(marker + ".cleanup").read() == "payload"


def test_setup_and_cleanup_may_be_functools_partials(dpool_node, tmp_path, monkeypatch):
    """dispy: setup is "a function or functools.partial", and so is cleanup;
    the node failed with "'functools.partial' object has no attribute
    '__globals__'".  The partial's function's globals are what setup sets."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("partial\n")
    marker = str(tmp_path / "setup-ran")
    cluster = cluster_on(dpool_node, tasks.uses_setup, depends=[helper, "data.txt"],
                         setup=functools.partial(tasks.setup_reads, "data.txt", marker),
                         cleanup=functools.partial(tasks.cleanup_writes, "data.txt", marker))
    try:
        assert cluster.submit(1)(timeout=15)[0] == "partial:1"
    finally:
        cluster.close()
    poll_for(lambda: os.path.exists(marker + ".cleanup"), 10, message="cleanup to run")
    assert open(marker + ".cleanup").read() == "partial"


def test_job_depends_and_dest_path(dpool_node, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "per-job.txt").write_text("job file")
    with cluster_on(dpool_node, tasks.read_file_where, dest_path="dpool-test/sub") as cluster:
        job = cluster.submit("per-job.txt", dispy_job_depends=["per-job.txt"])
        assert job(timeout=10) is not None, job.exception
        text, cwd, job_path = job.result
        assert text == "job file"
        assert cwd == job_path and cwd.endswith(os.path.join("", "dpool-test", "sub"))
        assert not os.path.exists(os.path.join(cwd, "per-job.txt"))  # cleanup=True
    with pytest.raises(ValueError):
        dispy.JobCluster(tasks.identity, nodes=[dpool_node.address], secret=dpool_node.secret,
                         dest_path="../escape")


def test_failing_setup_leaves_the_node_out_and_says_why(dpool_node, tmp_path, caplog):
    events = []
    with pytest.raises(BrokenCluster, match="setup broke on purpose"):
        cluster_on(dpool_node, tasks.identity, setup=tasks.setup_raises,
                   cluster_status=lambda s, n, j: events.append((s, n, j)))
    assert "setup broke on purpose" in caplog.text  # logged
    (status, node, job), = events
    assert status == DispyNode.Closed and job is None
    assert "setup broke on purpose" in node.exception


def test_failed_resetup_fails_pending_jobs(dpool_node, tmp_path):
    """No node left after a failed setup: jobs waiting fail with that error."""
    marker = str(tmp_path / "setups")
    cluster = cluster_on(dpool_node, tasks.identity, setup=tasks.counter_setup,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=(marker,))])
    try:
        os.mkdir(marker + ".blocker")
        os.rename(marker, marker + ".old")
        os.rmdir(marker + ".blocker")
        os.mkdir(marker)  # the next setup cannot append to it: it raises
        assert cluster.resetup_node("127.0.0.1") == -1
        with pytest.raises(BrokenCluster, match="setup failed"):
            cluster.submit(1)
    finally:
        cluster.close(terminate=True)


def test_bad_input_fails_at_creation(dpool_node, tmp_path):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot be sent"):
        cluster_on(dpool_node, lambda x: lock)
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        cluster_on(dpool_node, tasks.identity, depends=[str(tmp_path / "no-such-file")])
    with pytest.raises(TypeError, match="setup"):
        cluster_on(dpool_node, tasks.identity, setup=tasks.setup_two)  # needs 2 args, given none
    with pytest.raises(TypeError, match="invalid dependency"):
        cluster_on(dpool_node, tasks.identity, depends=[42])
    with pytest.raises(FileNotFoundError):
        cluster_on(dpool_node, "/no/such/program")


# ------------------------------------------------------------------- 6. nodes

class OneCpu(dispy.NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        return 1


class NoCpu(dispy.NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        return 0


def test_node_allocate_override(dpool_node):
    with cluster_on(dpool_node, tasks.identity, nodes=[OneCpu("127.0.0.1", dpool_node.port)]) as c:
        assert [n.cpus for n in c.status().nodes] == [1]
        assert c.submit(3)(timeout=10) == 3
    with pytest.raises(BrokenCluster, match="allocation"):
        cluster_on(dpool_node, tasks.identity, nodes=[NoCpu("127.0.0.1", dpool_node.port)])


class Wants(dispy.NodeAllocate):
    """allocate returns ``want``, whatever it is."""

    def __init__(self, host, port, want):
        super().__init__(host, port)
        self.want = want

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        return self.want


@pytest.mark.parametrize("want, cpus", [(1.5, 2), (0.5, 1), (1.0, 1), (float("inf"), 2),
                                        (7, 2), (decimal.Decimal("1.5"), 2),
                                        (decimal.Decimal("Infinity"), 2),
                                        (fractions.Fraction(1, 2), 1)])
def test_node_allocate_returning_a_fraction_uses_it_as_dispy(dpool_node, want, cpus):
    """dispy keeps ``min(node's CPUs, allocate(...))`` and runs jobs on the
    node while fewer than that are busy: a fraction of a CPU is a whole one
    (1.5 -> 2 jobs at a time), an infinite number all of the node's."""
    with cluster_on(dpool_node, tasks.identity,
                    nodes=[Wants("127.0.0.1", dpool_node.port, want)]) as cluster:
        assert [n.cpus for n in cluster.status().nodes] == [cpus]
        assert [job(timeout=30) for job in [cluster.submit(i) for i in range(4)]] == \
            [0, 1, 2, 3]


@pytest.mark.parametrize("want", [0, None, -1])
def test_node_allocate_giving_no_cpus_asks_the_next_one(dpool_node, want):
    """dispy asks each NodeAllocate in turn (sorted on their addresses, a
    node's own before a pattern; equal ones in the order given) and uses
    the first whose allocate gives CPUs (0 or less: the next one is asked),
    with its setup_args."""
    host, port = dpool_node.address
    nodes = [Wants(host, port, want), Wants(host, port, 1), Wants(host, port, 2)]
    with cluster_on(dpool_node, tasks.identity, nodes=nodes) as cluster:
        assert [n.cpus for n in cluster.status().nodes] == [1]
        assert cluster.submit(5)(timeout=30) == 5


def test_node_allocate_order_is_dispys():
    """dispy's order: the address as a regular expression, greatest first."""
    from dpool.dispy.cluster import _dispy_order
    allocs = [dispy.NodeAllocate(host) for host in
              ["*", "10.0.*", "10.0.0.5", "10.0.0.*", "192.168.1.2"]]
    ordered = sorted(allocs, key=_dispy_order, reverse=True)
    assert [a.host for a in ordered] == ["192.168.1.2", "10.0.0.5", "10.0.0.*", "10.0.*", "*"]


@pytest.mark.parametrize("want", [float("nan"), "2", [2], -0.5])
def test_node_allocate_returning_no_number_leaves_the_node_out(dpool_node, want, caplog):
    with pytest.raises(BrokenCluster, match="allocation"):
        cluster_on(dpool_node, tasks.identity, nodes=[Wants("127.0.0.1", dpool_node.port, want)])
    if want == want and not isinstance(want, (int, float)):  # (not a number: an error logged)
        assert "allocate returned" in caplog.text


def test_node_methods(dpool_node, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sent.txt").write_text("sent later")
    gate, marker = str(tmp_path / "gate"), str(tmp_path / "m")
    with cluster_on(dpool_node, tasks.hold) as cluster:
        (node,) = cluster.status().nodes
        job = cluster.submit_node(node, marker, gate)
        poll_for(lambda: os.path.exists(marker), 10, message="the pinned job to start")
        assert cluster.node_jobs("127.0.0.1") == [job]
        assert cluster.set_node_cpus(node, 1) == 1
        assert cluster.set_node_cpus(node, -1) == 1
        assert cluster.send_file("sent.txt", node) == 0
        open(gate, "w").close()
        job(timeout=10)
        assert cluster.deallocate_node(node) == 0
        assert cluster.allocate_node("127.0.0.1") == 0
        with pytest.raises(ValueError, match="not a node"):
            cluster.submit_node("10.255.255.1", marker, gate)
        assert cluster.node_jobs("10.255.255.1") == -1
    with cluster_on(dpool_node, tasks.read_file, cleanup=False) as cluster:
        (node,) = cluster.status().nodes
        assert cluster.send_file("sent.txt", node) == 0
        assert cluster.submit("sent.txt")(timeout=10) == "sent later"


def test_close_node_and_resetup_node(dpool_node, tmp_path):
    marker = str(tmp_path / "setups")
    events = []
    cluster = cluster_on(dpool_node, tasks.identity, setup=tasks.counter_setup,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=(marker,))],
                         cluster_status=lambda s, n, j: events.append(s))
    try:
        assert cluster.submit(1)(timeout=10) == 1
        assert cluster.resetup_node("127.0.0.1") == 0
        assert open(marker).read().split() == ["setup", "setup"]
        assert cluster.submit(2)(timeout=10) == 2
        assert cluster.close_node("127.0.0.1") == 0
        poll_for(lambda: not cluster.status().nodes, 5, message="the node to be closed")
        # cluster_status callbacks run on the callback thread, after the
        # status has changed (as dispy's): wait for the second Closed
        poll_for(lambda: events.count(DispyNode.Closed) == 2, 5,
                 message="the second Closed callback")
        assert events.count(DispyNode.Initialized) == 2
    finally:
        cluster.close(timeout=5, terminate=True)


# ------------------------------------------------------- 7. program computations

def test_program_computation(dpool_node, tmp_path):
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho \"args: $*\"\necho oops >&2\n"
                    "[ \"$1\" = sleep ] && exec sleep 30\nexit $1\n")
    prog.chmod(0o755)
    with cluster_on(dpool_node, str(prog)) as cluster:
        assert cluster.name == "prog.sh"
        job = cluster.submit(3, "x")
        assert job(timeout=10) == 3
        assert job.status == DispyJob.Finished
        assert job.stdout == b"args: 3 x\n" and job.stderr == b"oops\n"  # bytes, as dispy's
        long = cluster.submit("sleep")

        def sleeper():
            return [p for p in dpool_node.descendants() if p.name() == "sleep"]
        (proc,) = poll_for(sleeper, 5, message="the program to run")
        assert cluster.cancel(long) == 0
        long(timeout=5)
        assert long.status == DispyJob.Terminated
        poll_for(lambda: pid_gone(proc.pid), 5, message="the program to be killed")


# ------------------------------------------- cleanup, depends and programs, continued


def test_cleanup_runs_after_close_terminate_with_every_cpu_busy(dpool_node, tmp_path):
    """close(terminate=True) kills the running jobs' workers; the cleanup
    function must still run once (in a replacement worker)."""
    marker = str(tmp_path / "cleanup-ran")
    cluster = cluster_on(dpool_node, tasks.hold, cleanup=tasks.cleanup_marks,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=(marker,))])
    gate = str(tmp_path / "never")
    jobs = [cluster.submit(str(tmp_path / f"m{i}"), gate) for i in range(2)]
    poll_for(lambda: all(os.path.exists(tmp_path / f"m{i}") for i in range(2)), 10,
             message="both jobs to run")
    pids = [read_marker(str(tmp_path / f"m{i}"))[0][0] for i in range(2)]
    # What close(terminate=True) sends, CANCEL then BYE, back to back (so the
    # node has not replaced the killed workers yet when BYE arrives).
    client = cluster._client
    link, = client.links

    def cancel_and_bye():
        link.conn.send([P.encode(P.Cancel, [job._job.id for job in jobs])])
        link.conn.send([P.encode(P.Bye)])
    client.loop.call_soon_threadsafe(cancel_and_bye)
    assert cluster.close(terminate=True)
    poll_for(lambda: os.path.exists(marker), 5, message="cleanup to run")
    assert int(open(marker).read()) not in pids
    poll_for(lambda: all(pid_gone(p) for p in pids), 5, message="the jobs' workers to die")


def test_a_cleanup_that_kills_its_process_does_not_hold_the_session(dpool_node, tmp_path):
    """The worker running cleanup dies: the session ends then (its other
    workers are killed, its CPUs freed), not CLEANUP_TIMEOUT (10 s) later."""
    cluster = cluster_on(dpool_node, tasks.hold, cleanup=tasks.cleanup_dies,
                         nodes=[dispy.NodeAllocate("127.0.0.1", dpool_node.port,
                                                   setup_args=("unused",))])
    gate = tmp_path / "gate"
    jobs = [cluster.submit(str(tmp_path / f"m{i}"), str(gate)) for i in range(2)]
    poll_for(lambda: all(os.path.exists(tmp_path / f"m{i}") for i in range(2)), 10,
             message="both jobs to run")
    gate.touch()
    pids = {job(timeout=10) for job in jobs}
    assert len(pids) == 2
    cluster.close()
    poll_for(lambda: all(pid_gone(p) for p in pids), 4, message="the session's workers to die")
    assert "the process running cleanup" in dpool_node.stderr()


def test_a_dependency_the_node_cannot_write_does_not_keep_a_recoverable_session(
        dpool_node, tmp_path, monkeypatch):
    """The node cannot write a dependency: the client leaves the node out.
    With recover_file the node must not keep that session (and its CPUs)
    for --keep-results seconds as if the client had died."""
    from dpool.errors import BrokenCluster

    outside, cwd = tmp_path / "outside", tmp_path / "cwd"
    (cwd / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "sub").write_text("a file named sub")
    (cwd / "sub" / "a.txt").write_text("a file under the folder sub")
    monkeypatch.chdir(cwd)
    with pytest.raises(BrokenCluster, match="cannot write"):
        cluster_on(dpool_node, tasks.identity, depends=[str(outside / "sub"), "sub/a.txt"],
                   recover_file=str(tmp_path / "_dispy_review"))
    with cluster_on(dpool_node, tasks.identity) as cluster:
        assert cluster.submit(5)(timeout=10) == 5
        assert [node.cpus for node in cluster.status().nodes] == [2]
    assert "kept for" not in dpool_node.stderr()


def test_program_in_a_subfolder_of_the_working_directory(dpool_node, tmp_path, monkeypatch):
    """JobCluster('bin/prog'): the program is sent as bin/prog (its path under
    the working directory is kept); the job must run that file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin").mkdir()
    prog = tmp_path / "bin" / "review-prog-7"
    prog.write_text("#!/bin/sh\necho \"args: $*\"\nexit 7\n")
    prog.chmod(0o755)
    with cluster_on(dpool_node, "bin/review-prog-7") as cluster:
        job = cluster.submit("a", 1)
        assert job(timeout=10) == 7, job.exception
        assert job.stdout == b"args: a 1\n"
