"""Fault tests on loopback: stopped and killed nodes, silent clients, re-join,
bounded waits.  (Faults of the network itself: tests/api/test_fault_matrix.py.)

Each test asserts a detection bound (generous: the heartbeat deadline plus
2 s), executions vs deliveries (every job delivered exactly once, run again
only if its node was lost while it ran), no hang, nothing leaked (conftest).
"""
import os
import signal
import socket
import time

import pytest

import dpool
from dpool import protocol as P
from dpool.errors import BrokenCluster, WorkerLost
from dpool.futures import Executor
from dpool.transport.frames import encode
from helpers import authenticated_socket, poll_for, recv_until_closed, start_node
from helpers_faults import (HEARTBEAT, check_deliveries, executions, link_for, measure,
                            pids_running, rerun_elsewhere)
from tasks import counted as work, kill_worker as poison

pytestmark = pytest.mark.timeout(60)
DEADLINE = HEARTBEAT[1]
BOUND = DEADLINE + 2.0  # detection bound asserted (generous: the machine is shared)


@pytest.fixture
def nodes(tmp_path, node_secret):
    """Two dpool-node subprocesses (2 CPUs each); stopped ones are continued
    and all are ended at teardown."""
    started = []

    def start(name, **kwargs):
        node = start_node(tmp_path / name, cpus=2, secret=node_secret, **kwargs)
        started.append(node)
        return node
    yield start
    for node in started:
        if node.proc.poll() is None:
            os.kill(node.pid, signal.SIGCONT)
        node.kill()


def running_on(node, out, jobs, pids=None):
    """Jobs (indexes) run by a process of ``node`` (or one of ``pids``)."""
    pids = pids or {p.pid for p in node.descendants()}
    return {i for i in jobs if set(pids_running(out, i)) & pids}


def test_a_stopped_node_is_lost_its_jobs_rerun_and_it_rejoins_when_continued(
        nodes, out, node_secret):
    a, b = nodes("a"), nodes("b")
    with Executor(nodes=[a.address, b.address], secret=node_secret, heartbeat=HEARTBEAT) as ex:
        client = ex._client
        futures = [ex.submit(work, out, i, 1.0) for i in range(8)]
        poll_for(lambda: running_on(a, out, range(8)), message="a job running on a")
        a_pids = {p.pid for p in a.descendants()}
        os.kill(a.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        link = link_for(client, a.address)
        poll_for(lambda: not link.ready, timeout=BOUND + 5, message="the stopped node lost")
        detect = time.monotonic() - t0
        poll_for(lambda: rerun_elsewhere(out, a_pids, range(8)), timeout=30,
                 message="a's jobs to start again on b")
        rerun = time.monotonic() - t0
        results = [f.result(timeout=30) for f in futures]
        recover = time.monotonic() - t0
        assert "heartbeat deadline" in str(link.error)
        os.kill(a.pid, signal.SIGCONT)
        t1 = time.monotonic()
        poll_for(lambda: (link_for(client, a.address) or link).ready, timeout=15,
                 message="the continued node to re-join")
        rejoin = time.monotonic() - t1
        # Its workers ran on while it was stopped: those results are never delivered.
        total = check_deliveries(results, out, 8, rerun=running_on(a, out, range(8), a_pids))
        assert client.late_results >= 0
    assert detect <= BOUND, detect
    measure("node SIGSTOP (loopback)", detect=detect, rerun=rerun, recover=recover,
            rejoin=rejoin)
    print(f"executions={total} deliveries=8")


def test_a_killed_node_restarted_on_its_port_rejoins(nodes, out, node_secret):
    a, b = nodes("a"), nodes("b")
    with Executor(nodes=[a.address, b.address], secret=node_secret, heartbeat=HEARTBEAT) as ex:
        client = ex._client
        futures = [ex.submit(work, out, i, 0.5) for i in range(8)]
        poll_for(lambda: running_on(a, out, range(8)), message="a job running on a")
        port, a_pids = a.port, {p.pid for p in a.descendants()}
        a.kill()
        t0 = time.monotonic()
        link = link_for(client, a.address)
        poll_for(lambda: not link.ready, timeout=BOUND, message="the killed node lost")
        detect = time.monotonic() - t0
        poll_for(lambda: rerun_elsewhere(out, a_pids, range(8)), timeout=30,
                 message="a's jobs to start again on b")
        rerun = time.monotonic() - t0
        results = [f.result(timeout=30) for f in futures]
        recover = time.monotonic() - t0
        check_deliveries(results, out, 8, rerun=running_on(a, out, range(8), a_pids))
        a2 = nodes("a2", port=port)
        t1 = time.monotonic()
        back = poll_for(lambda: (lambda link: link if link is not None and link.ready else None)(
            link_for(client, a2.address)), timeout=15, message="the restarted node to re-join")
        rejoin = time.monotonic() - t1
        assert back is not link
        more = [ex.submit(work, out, 100 + i, 0.3) for i in range(8)]
        assert sorted(f.result(timeout=30) for f in more) == [100 + i for i in range(8)]
        assert back.jobs_done > 0  # used again
    assert detect <= BOUND, detect
    measure("node SIGKILL + restart (loopback)", detect=detect, rerun=rerun, recover=recover,
            rejoin=rejoin)


def test_a_node_started_after_the_client_is_used(nodes, out, node_secret):
    b = nodes("b")
    with socket.socket() as s:  # a port nothing listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Executor(nodes=[b.address, ("127.0.0.1", port)], secret=node_secret,
                  heartbeat=HEARTBEAT) as ex:
        late = nodes("late", port=port)
        link = poll_for(lambda: (lambda link: link if link is not None and link.ready else None)(
            link_for(ex._client, late.address)), timeout=15, message="the late node to join")
        assert sorted(ex.map(work, [out] * 8, range(8), [0.3] * 8)) == list(range(8))
        assert link.jobs_done > 0


@pytest.mark.parametrize("api", ["executor", "pool"])
def test_nodes_can_be_added_while_running(api, nodes, out, node_secret):
    a, b = nodes("a"), nodes("b")
    make = Executor if api == "executor" else dpool.Pool
    with make(nodes=[a.address], secret=node_secret) as pool:
        assert pool.add_nodes([f"127.0.0.1:{b.port}"]) == 1
        client = pool._client
        assert len(client.nodes()) == 2
        if api == "executor":
            assert pool._max_workers == 4
            results = [f.result(timeout=30) for f in
                       [pool.submit(work, out, i, 0.3) for i in range(8)]]
        else:
            assert pool._processes == 4
            results = pool.starmap(work, [(out, i, 0.3) for i in range(8)], chunksize=1)
            pool.close()
            pool.join()
        assert sorted(results) == list(range(8))
        assert link_for(client, b.address).jobs_done > 0


def test_close_terminate_returns_within_its_timeout_with_a_stopped_node(nodes, out, node_secret):
    a = nodes("a")
    cluster = dpool.JobCluster(work, nodes=[a.address], secret=node_secret, heartbeat=(1.0, 30.0))
    try:
        jobs = [cluster.submit(out, i, 30.0) for i in range(3)]
        poll_for(lambda: running_on(a, out, range(3)), message="jobs running")
        os.kill(a.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert cluster.close(timeout=1.0, terminate=True) is True
        took = time.monotonic() - t0
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert took <= 1.0 + 1.0, took
    assert all(job.status in (dpool.DispyJob.Terminated, dpool.DispyJob.Cancelled,
                              dpool.DispyJob.Abandoned) for job in jobs)
    measure("close(timeout=1, terminate=True), node stopped", took=took)


def test_shutdown_cancel_futures_does_not_hang_on_a_stopped_node(nodes, out, node_secret):
    a = nodes("a")
    ex = Executor(nodes=[a.address], secret=node_secret, heartbeat=HEARTBEAT)
    futures = [ex.submit(work, out, i, 30.0) for i in range(4)]
    poll_for(lambda: running_on(a, out, range(4)), message="jobs running")
    os.kill(a.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    took = time.monotonic() - t0
    os.kill(a.pid, signal.SIGCONT)
    assert took <= BOUND, took
    for f in futures:
        assert f.cancelled() or isinstance(f.exception(0), BrokenCluster), f
    measure("Executor.shutdown(cancel_futures), node stopped", took=took)


@pytest.fixture
def black_hole():
    """An address that accepts TCP connections and never says anything."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()


@pytest.mark.parametrize("api", ["executor", "pool", "jobcluster"])
def test_connect_timeout_is_the_callers_and_the_error_says_why(api, black_hole, monkeypatch):
    monkeypatch.setenv("DPOOL_SECRET", "a-long-enough-test-secret")
    t0 = time.monotonic()
    with pytest.raises(BrokenCluster) as info:
        if api == "executor":
            Executor(nodes=[black_hole], connect_timeout=0.5)
        elif api == "pool":
            dpool.Pool(nodes=[black_hole], connect_timeout=0.5)
        else:
            dpool.JobCluster(work, nodes=[black_hole], connect_timeout=0.5)
    took = time.monotonic() - t0
    assert took < 0.5 + 1.5, took
    text = str(info.value)
    host, port = black_hole
    assert f"{host}:{port}: " in text and "0.5 s" in text, text
    assert not text.rstrip().endswith(":") and ": )" not in text, text


def test_connect_timeout_from_the_environment(black_hole, monkeypatch):
    monkeypatch.setenv("DPOOL_SECRET", "a-long-enough-test-secret")
    monkeypatch.setenv("DPOOL_CONNECT_TIMEOUT", "0.3")
    t0 = time.monotonic()
    with pytest.raises(BrokenCluster, match="0.3 s"):
        Executor(nodes=[black_hole])
    assert time.monotonic() - t0 < 0.3 + 1.5
    with pytest.raises(ValueError, match="connect_timeout"):
        Executor(nodes=[black_hole], connect_timeout=0)


# ---------------------------------------------------------------- silent clients

def send(sock, msg):
    sock.sendall(b"".join(encode([P.encode(type(msg), *msg)])))


def reply(sock):
    """The next message from the node (its record)."""
    messages = []
    while not messages:
        chunk = sock.recv(65536)
        assert chunk, "the node closed the connection"
        messages = sock.decoder.feed(chunk)
    return P.decode(messages[0][0])


def open_session(port, secret, **options):
    """A raw client: authenticated socket, SESSION sent, READY (or REFUSED) read."""
    sock = authenticated_socket(port, secret)
    send(sock, P.Session(options))
    return sock, reply(sock)


def test_a_silent_client_loses_its_session_and_cpus(nodes, node_secret):
    a = nodes("a")
    sock, header = open_session(a.port, node_secret, heartbeat=(0.2, 1.0))
    with sock:
        assert type(header) is P.Ready and header.info["cpus"] == 2
        def alive_and_started():  # heartbeats until the workers are up
            send(sock, P.Heartbeat())
            return len(a.descendants()) == 3
        poll_for(alive_and_started, interval=0.1, message="2 workers + the zygote")
        t0 = time.monotonic()
        recv_until_closed(sock, timeout=10)  # heartbeats come, then the node gives up
        took = time.monotonic() - t0
    assert took <= 1.0 + 2.0, took  # silent since READY, a little before t0
    poll_for(lambda: len(a.descendants()) == 1, message="its workers killed")
    sock, header = open_session(a.port, node_secret)
    with sock:
        assert type(header) is P.Ready and header.info["cpus"] == 2  # its CPUs are free again
    measure("client silent (loopback)", detect=took)


def test_a_silent_recoverable_client_is_kept_per_keep_results(nodes, node_secret):
    a = nodes("a", args=["--keep-results", "30"])
    sock, header = open_session(a.port, node_secret, heartbeat=(0.2, 1.0), recover_token="tok")
    with sock:
        assert type(header) is P.Ready
        recv_until_closed(sock, timeout=10)
    # Detached, not ended: its CPUs stay taken and RECOVER gets it back.
    sock, header = open_session(a.port, node_secret)
    with sock:
        assert type(header) is P.Busy and "no free CPUs" in header.reason
    with authenticated_socket(a.port, node_secret) as sock:
        send(sock, P.Recover("tok", False))
        header = reply(sock)
        assert type(header) is P.Ready and header.info["recovered"]
        send(sock, P.Bye())


def test_a_poison_job_fails_clearly_without_harming_the_others(nodes, out, node_secret):
    a = nodes("a")
    with Executor(nodes=[a.address], secret=node_secret, heartbeat=HEARTBEAT) as ex:
        bad = ex.submit(poison)
        good = [ex.submit(work, out, i) for i in range(6)]
        with pytest.raises(WorkerLost, match="SIGKILL"):
            bad.result(timeout=30)
        assert sorted(f.result(timeout=30) for f in good) == list(range(6))
    assert sum(executions(out).values()) == 6


def test_futures_of_a_lost_only_node_that_does_not_come_back_all_resolve(nodes, out, node_secret):
    a = nodes("a")
    ex = Executor(nodes=[a.address], secret=node_secret, heartbeat=HEARTBEAT)
    try:
        futures = [ex.submit(work, out, i, 30.0) for i in range(10)]
        poll_for(lambda: running_on(a, out, range(10)), message="jobs running")
        os.kill(a.pid, signal.SIGSTOP)
        poll_for(lambda: all(f.done() for f in futures), timeout=BOUND + 10,
                 message="every future resolved")
        for f in futures:
            assert isinstance(f.exception(0), BrokenCluster), f
    finally:
        os.kill(a.pid, signal.SIGCONT)
        ex.shutdown(wait=False, cancel_futures=True)


def test_jobs_reclaimed_for_an_added_node_run_once_and_leave_nothing_in_flight(
        nodes, out, node_secret):
    a, b = nodes("a"), nodes("b")
    with Executor(nodes=[a.address], secret=node_secret, heartbeat=HEARTBEAT) as ex:
        futures = [ex.submit(work, out, i, 2.0) for i in range(4)]
        poll_for(lambda: len(running_on(a, out, range(4))) == 2, message="two jobs running")
        assert ex.add_nodes([b.address], secret=node_secret) == 1
        assert sorted(f.result(30) for f in futures) == list(range(4))
        assert running_on(b, out, range(4))  # the two waiting on a were given back
        check_deliveries(list(range(4)), out, 4, rerun=set())
        for link in ex._client.links:
            assert link.in_flight == set(), link
