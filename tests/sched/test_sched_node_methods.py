"""A SharedJobCluster's node-addressed methods reach the nodes behind the
dpool-scheduler (dispy's rules for naming a node), and each affects only
this client's use of the node."""
import asyncio
import functools
import os
import queue
import socket

import pytest

import dpool
from dpool import protocol as P
from dpool.core.client import Client, client_hello
from dpool.transport import connect
from helpers import poll_for
from helpers_sched import SECRET
from tasks import counter_setup, hold, identity, nap_for, read_file

pytestmark = pytest.mark.timeout(120)


def shared(sched, fn=nap_for, **kwargs):
    return dpool.SharedJobCluster(fn, scheduler_host="127.0.0.1", scheduler_port=sched.port,
                                  secret=SECRET, loglevel=None, **kwargs)


def test_submit_node_by_a_name_several_nodes_share_is_ambiguous(scheduler, three_nodes):
    """dispy resolves a host name to its address and takes the node there;
    a name that resolves to none of them but that several nodes report
    (the loopback nodes all report this machine's name) names no one node."""
    name = socket.gethostname()
    cluster = shared(scheduler)
    try:
        assert {n.name for n in cluster.status().nodes} == {name}
        with pytest.raises(ValueError, match="ambiguous"):
            cluster.submit_node(name, 0.05)
        with pytest.raises(ValueError, match="not a node"):
            cluster.submit_node(42, 0.05)  # (dispy returns None)
        job = cluster.submit_node(three_nodes[2].host, 0.05)
        assert job() == 0.05 and job.ip_addr == three_nodes[2].host
    finally:
        cluster.close()


def overlapped(jobs):
    """True if two of these jobs ran at the same time (node-side times)."""
    spans = sorted((job.start_time, job.end_time) for job in jobs)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_deallocate_and_allocate_node_for_this_client_only(scheduler, three_nodes):
    node0 = three_nodes[0].host
    a, b = shared(scheduler), shared(scheduler)
    try:
        assert a.deallocate_node(node0) == 0
        jobs_a = [a.submit(0.2) for _ in range(12)]
        jobs_b = [b.submit(0.2) for _ in range(12)]
        assert [j() for j in jobs_a + jobs_b] == [0.2] * 24
        assert node0 not in {j.ip_addr for j in jobs_a}
        assert node0 in {j.ip_addr for j in jobs_b}, "another client's deallocate_node held"
        assert a.deallocate_node("127.0.0.9") == -1  # not a node of the scheduler
        assert a.allocate_node(node0) == 0
        jobs_a = [a.submit(0.2) for _ in range(12)]
        assert [j() for j in jobs_a] == [0.2] * 12
        assert node0 in {j.ip_addr for j in jobs_a}
    finally:
        a.close()
        b.close()


def test_set_node_cpus_limits_this_clients_jobs_on_the_node_only(scheduler, three_nodes):
    node1 = three_nodes[1].host
    a, b = shared(scheduler), shared(scheduler)
    try:
        assert a.set_node_cpus(node1, -1) == 1  # (2 CPUs: all but one)
        assert a.set_node_cpus(node1, 5) == 2 and a.set_node_cpus(node1, 1) == 1
        poll_for(lambda: {n.ip_addr: n.cpus for n in a.status().nodes}.get(node1) == 1, 10,
                 message="the node's CPUs as this cluster may use them")
        assert {n.ip_addr: n.cpus for n in b.status().nodes}[node1] == 2
        jobs_a = [a.submit_node(node1, 0.3) for _ in range(3)]
        assert [j() for j in jobs_a] == [0.3] * 3
        assert not overlapped(jobs_a), "more of its jobs ran at once than set_node_cpus allows"
        # b alone on the node (while a competes, fair share gives each one CPU)
        jobs_b = [b.submit_node(node1, 0.5) for _ in range(2)]
        assert [j() for j in jobs_b] == [0.5] * 2
        assert overlapped(jobs_b), "another client's set_node_cpus limited this one"
        assert a.set_node_cpus("127.0.0.9", 1) == -1
    finally:
        a.close()
        b.close()


def test_close_node_ends_this_clients_session_there_only(scheduler, three_nodes, tmp_path):
    node2 = three_nodes[2].host
    a, b = shared(scheduler, fn=hold), shared(scheduler)
    gate = str(tmp_path / "gate")
    try:
        running = a.submit_node(node2, str(tmp_path / "m1"), gate)
        queued = [a.submit_node(node2, str(tmp_path / f"q{i}"), gate) for i in range(3)]
        poll_for(lambda: os.path.exists(tmp_path / "m1"), 30, message="the job to start")
        assert a.close_node(node2, terminate_pending=True) == 0
        running(), [job() for job in queued]
        assert running.status == dpool.DispyJob.Terminated
        assert all(job.status in (dpool.DispyJob.Cancelled, dpool.DispyJob.Terminated)
                   for job in queued)
        poll_for(lambda: node2 not in {n.ip_addr for n in a.status().nodes}, 10,
                 message="the node to leave this cluster")
        with pytest.raises(ValueError):
            a.submit_node(node2, str(tmp_path / "m2"), gate)
        job = b.submit_node(node2, 0.05)  # the other client still runs there
        assert job() == 0.05 and job.ip_addr == node2
        assert a.allocate_node(node2) == 0
        poll_for(lambda: node2 in {n.ip_addr for n in a.status().nodes}, 30,
                 message="the node to join this cluster again")
        open(gate, "w").close()
        job = a.submit_node(node2, str(tmp_path / "m3"), gate)
        assert job() and job.ip_addr == node2
    finally:
        a.close(terminate=True)
        b.close()


def test_send_file_and_resetup_node_reach_the_node(scheduler, three_nodes, tmp_path,
                                                   monkeypatch):
    node1 = three_nodes[1].host
    marker = str(tmp_path / "setups")
    monkeypatch.chdir(tmp_path)
    with open("sent.txt", "w") as f:
        f.write("for one node")
    cluster = shared(scheduler, fn=read_file, setup=functools.partial(counter_setup, marker))
    try:
        setups = len(open(marker).read().split())
        assert setups == 3  # one per node
        assert cluster.send_file("sent.txt", node1) == 0
        assert cluster.submit_node(node1, "sent.txt")() == "for one node"
        other = cluster.submit_node(three_nodes[0].host, "sent.txt")
        other()
        assert isinstance(other.exception, str) and "FileNotFoundError" in other.exception
        assert cluster.send_file("sent.txt", "127.0.0.9") == -1
        assert cluster.resetup_node(node1) == 0
        assert len(open(marker).read().split()) == setups + 1
        job = cluster.submit_node(node1, marker)  # its jobs run there again
        assert job().split() == ["setup"] * (setups + 1) and job.ip_addr == node1
    finally:
        cluster.close()


def test_a_node_call_before_a_session_closes_the_connection(scheduler, three_nodes):
    """The scheduler acts only on a client's own session: with none open,
    a node call is a protocol error (nothing is changed, no leg opened)."""
    async def call_first():
        conn = await connect(*scheduler.address, secret=SECRET, hello=client_hello(),
                             timeout=10)
        got: asyncio.Queue = asyncio.Queue()
        conn.set_receiver(got.put_nowait, lambda exc=None: got.put_nowait(None))
        conn.send([P.encode(P.NodeCall, 1, "allocate", three_nodes[0].host, None)])
        try:
            return await asyncio.wait_for(got.get(), 10)
        finally:
            conn.abort()
    assert asyncio.run(call_first()) is None


def test_allocate_node_adds_a_node_the_clusters_nodes_left_out(scheduler, three_nodes):
    first, second = three_nodes[0].host, three_nodes[1].host
    cluster = shared(scheduler, nodes=[first])
    try:
        assert {n.ip_addr for n in cluster.status().nodes} == {first}
        assert cluster.allocate_node([first, second]) == -1  # one at a time, as dispy's
        assert cluster.allocate_node(dpool.NodeAllocate(second)) == 0
        poll_for(lambda: {n.ip_addr for n in cluster.status().nodes} == {first, second}, 30,
                 message="the node allocated to join the cluster")
        job = cluster.submit_node(second, 0.05)
        assert job() == 0.05 and job.ip_addr == second
    finally:
        cluster.close()


@pytest.fixture
def calling(scheduler, three_nodes):
    """A client of the scheduler making node calls itself (a NodeCall on
    its link), and the replies it gets."""
    replies: queue.Queue = queue.Queue()
    client = Client([scheduler.address], secret=SECRET)
    client.register({P.NodeReply: lambda link, msg, frames: replies.put(msg)})
    client.start()
    yield client, replies
    client.close()


def test_bad_node_calls_answer_minus_one_and_lose_nothing(calling, three_nodes):
    client, replies = calling
    link = client.nodes()[0]
    host = three_nodes[0].host
    calls = [("cpus", host, "many"), ("file", host, ("x", 0o644)),  # (no data)
             ("file", host, "not a pair"), ("explode", host, None),
             ("cpus", "127.0.0.9", 1), ("cpus", ["not", "a host"], 1),
             ("cpus", host, float("inf")), ("cpus", host, float("nan")),
             (["op"], host, None), ("close", None, None)]
    for req_id, (op, where, arg) in enumerate(calls, 1):
        client.call_soon(lambda r=req_id, o=op, w=where, a=arg: link.conn.send(
            [P.encode(P.NodeCall, r, o, w, a)]))
    got = sorted((replies.get(timeout=10) for _ in calls), key=lambda msg: msg.req_id)
    assert [(msg.req_id, msg.result) for msg in got] == \
        [(i, -1) for i in range(1, len(calls) + 1)]
    assert client.submit(identity, (7,)).future.result(30) == 7  # the session goes on


def test_pinned_jobs_of_two_clients_share_the_node_fairly(scheduler, three_nodes, tmp_path):
    """A CPU freeing on a node both clients pinned jobs to goes to the one
    furthest below its share (the fair share's rule), whatever order the
    scheduler holds its clients in."""
    node1 = three_nodes[1].host  # 2 CPUs
    a, b = shared(scheduler, fn=hold), shared(scheduler, fn=hold)
    marks = {name: str(tmp_path / name) for name in ("a0", "a1", "a2", "b0")}
    gates = {name: mark + ".gate" for name, mark in marks.items()}
    jobs = []
    try:
        jobs += [a.submit_node(node1, marks[n], gates[n]) for n in ("a0", "a1", "a2")]
        poll_for(lambda: os.path.exists(marks["a0"]) and os.path.exists(marks["a1"]), 30,
                 message="a's first two jobs to take the node's CPUs")
        jobs.append(b.submit_node(node1, marks["b0"], gates["b0"]))
        assert b.set_node_cpus(node1, 2) == 2  # (after its Run: b0 queued there now)
        open(gates["a0"], "w").close()
        poll_for(lambda: os.path.exists(marks["a2"]) or os.path.exists(marks["b0"]), 30,
                 message="a job to take the CPU freed")
        assert os.path.exists(marks["b0"]) and not os.path.exists(marks["a2"]), \
            "the client with 2 jobs running there took the CPU before the one with none"
    finally:
        for gate in gates.values():
            open(gate, "w").close()
        [job() for job in jobs]
        a.close()
        b.close()


def test_a_file_call_with_a_bad_mode_is_answered_once(calling, three_nodes):
    # (the scheduler registered the file's answer before reading its mode:
    # the leg's end answered the call a second time)
    client, replies = calling
    link = client.nodes()[0]
    host = three_nodes[0].host
    assert client.submit(identity, (7,)).future.result(30) == 7  # (its legs are open)
    client.call_soon(lambda: link.conn.send([P.encode(P.NodeCall, 1, "file", host,
                                                      ("x", "bad")), b"data"]))
    client.call_soon(lambda: link.conn.send([P.encode(P.NodeCall, 2, "close", host,
                                                      False)]))
    got = [replies.get(timeout=10) for _ in range(2)]
    assert sorted((msg.req_id, msg.result) for msg in got) == [(1, -1), (2, 0)]
    client.call_soon(lambda: link.conn.send([P.encode(P.NodeCall, 3, "deallocate",
                                                      host, None)]))
    assert replies.get(timeout=10).req_id == 3, "a call answered twice"

