"""Lone calls on a node's channel (issue 13; dpool/core/channel.py): the
client opens a second connection that one worker of its session serves,
and its calling thread writes the RUN and reads the DONE there, the node
off the call's path.  Every API takes it; the node's Recall, the worker's
death (ChannelLost), a cancel, Ctrl-C in the middle of a record, the
client's shutdown and a TLS client (no channel) are each shown here; the
faults shared with today's path are in test_lone_call_faults.py, with the
channel in use."""
import os
import signal
import threading

import pytest

import dpool
from dpool import protocol as P
from dpool.core.direct import DirectFuture
from dpool.errors import WorkerLost
from dpool.futures import Executor
import tasks
from helpers import cluster_on, pid_gone, poll_for, start_node
from test_direct_calls import QUIET, SECRET, gate_call, held_pids, line_of, opened

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("node"), cpus=2, secret=SECRET)
    yield node
    node.terminate()


def channeled(client, warm=lambda client: client.submit(tasks.identity, (0,)).future.result(30)):
    """Wait until a lone call goes on the node's channel (lent, free);
    ``warm(client)`` makes a call between looks (an idle moment)."""
    line = line_of(client)
    for _ in range(60):
        try:
            poll_for(lambda: line.on_chan and line.free(), timeout=1,
                     message="the channel to be lent")
            return line
        except AssertionError:
            warm(client)
    raise AssertionError("no channel was ever lent")


def on_channel(executor, fn, *args):
    """Submit once the channel is lent; check the call went on it."""
    line = channeled(executor._client)
    future = executor.submit(fn, *args)
    assert type(future) is DirectFuture and line.job is not None and line.on_chan
    return future


def test_lone_calls_take_the_channel_on_every_api(node):
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        conn, before = line.link.conn, line.chan.calls
        assert [on_channel(ex, tasks.square, i).result(30) for i in range(20)] == \
            [i * i for i in range(20)]
        assert line.chan.calls == before + 20
        assert line.link.conn is conn and not conn.closed
        future = on_channel(ex, os.getpid)
        assert future.result(30) == line.chan.pid          # the channel's worker ran it
    with dpool.Pool(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as pool:
        line = channeled(pool._client)
        before = line.chan.calls
        assert [pool.apply(tasks.square, (i,)) for i in range(10)] == [i * i for i in range(10)]
        assert line.chan.calls == before + 10

    # JobCluster's too, once its node's setup is done (dispy's job
    # environment: tests/dispy/test_cluster_channel.py)
    cluster = cluster_on(node, tasks.double, heartbeat=QUIET, secret=SECRET)
    with cluster:
        assert cluster.submit(1)(timeout=30) == 2
        line = channeled(cluster._client, lambda client: cluster.submit(0)(timeout=30))
        before = line.chan.calls
        for i in range(5):
            assert cluster.submit(i)(timeout=30) == 2 * i
        assert line.chan.calls == before + 5


def test_a_large_call_keeps_the_nodes_streamed_path(node):
    """A call whose arguments pass CHANNEL_MAX_BYTES goes through the node
    (streamed on to a worker as it arrives) even with the channel lent: on
    the channel its worker read and opened it itself, 1 GB via a node
    0.68x as fast, twice the worker's CPU (docs/performance.md)."""
    from dpool.core.tcpline import CHANNEL_MAX_BYTES

    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        before = line.chan.calls
        big = b"x" * (CHANNEL_MAX_BYTES + 1)
        future = ex.submit(len, big)
        assert type(future) is not DirectFuture
        assert future.result(30) == len(big)
        assert line.chan.calls == before
        assert on_channel(ex, tasks.square, 3).result(30) == 9   # small ones still do


def test_a_recall_releases_the_channel_and_jobs_run_on_every_cpu(node):
    """Jobs queue at the node behind the lent worker: the node asks for it
    back (Recall), the client releases the channel, every job runs; lone
    calls then take a new channel."""
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        opened_before = line.chan.opened
        futures = [ex.submit(tasks.nap, 0.05, i) for i in range(12)]
        assert [f.result(30) for f in futures] == list(range(12))
        poll_for(lambda: line.chan.conn is None or line.chan.opened > opened_before,
                 message="the channel released")
        line = channeled(ex._client)
        assert line.chan.opened > opened_before
        assert on_channel(ex, tasks.square, 5).result(30) == 25


def test_a_recall_while_a_thread_reads_waits_for_its_answer(node, tmp_path):
    """The node recalls the worker while the calling thread waits on a call
    on the channel: the call ends with its value, the jobs behind it run."""
    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        held = on_channel(ex, gate_call, gate, "held")
        got = []
        reader = threading.Thread(target=lambda: got.append(held.result(60)))
        reader.start()
        try:
            poll_for(lambda: held_pids(gate), message="the call to start")
            others = [ex.submit(tasks.nap, 0.05, i) for i in range(6)]
            assert [f.result(30) for f in others] == list(range(6))
        finally:
            opened(gate)
            reader.join(30)
        assert got == ["held"]
        assert on_channel(ex, tasks.square, 3).result(30) == 9


def test_a_worker_killed_on_the_channel_fails_the_call_as_the_node_does(node):
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        pid = line.chan.pid
        future = on_channel(ex, tasks.kill_worker)
        with pytest.raises(WorkerLost) as info:
            future.result(30)
        assert str(info.value).startswith(f"the worker process (pid {pid}) running this job")
        assert "SIGKILL" in str(info.value)
        assert on_channel(ex, tasks.square, 4).result(30) == 16


def test_a_worker_killed_in_the_middle_of_a_large_result_on_the_channel(node):
    """The channel's worker dies while it seals and sends a 256 MiB result
    (into its reused buffer): the call fails WorkerLost, as a worker dying in
    the middle of a result the node relays does; no part of the result is
    delivered, and the next calls go on (on a channel again)."""
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        pid = line.chan.pid
        future = on_channel(ex, tasks.killed_mid_result, 256 * 2**20)
        with pytest.raises(WorkerLost) as info:
            future.result(60)
        assert f"pid {pid}" in str(info.value) and "SIGKILL" in str(info.value)
        assert on_channel(ex, tasks.square, 4).result(30) == 16


def test_a_channel_worker_dying_while_idle_costs_no_call(node):
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        pid = line.chan.pid
        os.kill(pid, signal.SIGKILL)
        poll_for(lambda: pid_gone(pid), message="the worker to die")
        poll_for(lambda: line.chan.conn is None or line.chan.pid != pid,
                 message="the channel's loss to be heard")
        assert [ex.submit(tasks.square, i).result(30) for i in range(5)] == \
            [i * i for i in range(5)]
        assert on_channel(ex, tasks.square, 6).result(30) == 36


def test_ctrl_c_mid_record_breaks_the_channel_only(node, tmp_path, monkeypatch):
    """A KeyboardInterrupt in the middle of reading the answer's record
    (its state lost): the channel is closed, the call rerun through the
    node (a second run), the session's connection untouched."""
    import dpool.transport.lent as lent

    gate = str(tmp_path / "gate")
    opened(gate)  # (the call returns at once)
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        line = channeled(ex._client)
        conn, chan = line.link.conn, line.chan.conn
        real = lent.LentSocket.receive

        def interrupted(self):
            monkeypatch.setattr(lent.LentSocket, "receive", real)
            raise KeyboardInterrupt
        monkeypatch.setattr(lent.LentSocket, "receive", interrupted)
        future = on_channel(ex, gate_call, gate, "again")
        with pytest.raises(KeyboardInterrupt):
            future.result(30)
        monkeypatch.undo()
        assert future.result(30) == "again"
        assert len(held_pids(gate)) == 2                 # run once more, by the node
        assert chan.closed and line.link.conn is conn and not conn.closed
        assert on_channel(ex, tasks.square, 7).result(30) == 49


def test_shutdown_with_a_call_on_the_channel(node, tmp_path):
    """The executor shuts down (wait=False) while a call on the channel
    runs: nothing leaks (the autouse check), the worker is freed."""
    gate = str(tmp_path / "gate")
    ex = Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET)
    try:
        on_channel(ex, gate_call, gate, "held")
        pid = poll_for(lambda: held_pids(gate), message="the call to start")[0]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        opened(gate)
    poll_for(lambda: pid_gone(pid), timeout=30, message="the session's worker to go")


def test_a_cancelled_call_on_the_channel_stops_its_worker(node, tmp_path):
    """A call on the channel cancelled as it runs (Pool.terminate, an
    interrupted submit, shutdown(cancel_futures=True) cancel running jobs):
    the node stops the channel's worker (Halt), the call fails with
    JobCancelled as a running job the node kills, the next call runs."""
    from dpool.errors import JobCancelled

    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        client = ex._client
        channeled(client)
        job = client.submit(gate_call, (gate, "held"))
        assert type(job.future) is DirectFuture
        pid = poll_for(lambda: held_pids(gate), message="the call to start")[0]
        client.cancel(job)
        with pytest.raises(JobCancelled):
            job.future.result(30)
        poll_for(lambda: pid_gone(pid), 15, message="the worker to be stopped")
        assert on_channel(ex, tasks.square, 8).result(30) == 64


def test_a_tls_client_opens_no_channel(tls_node, pki):
    with Executor(nodes=[tls_node.address], secret=tls_node.secret, cafile=pki["ca"],
                  certfile=pki["client"], heartbeat=QUIET) as ex:
        for i in range(5):
            assert ex.submit(tasks.square, i).result(30) == i * i
        line = line_of(ex._client)
        assert line.chan.conn is None and line.chan.opening is None and line.chan.opened == 0


def test_a_halt_that_comes_late_stops_no_later_call(node, tmp_path):
    """A cancelled call's Halt reaches the node after the call ended on the
    channel (its DONE was on its way): the node stops the channel's worker
    whatever it runs then.  The channel took the next lone call meanwhile,
    and that call was lost with the worker (WorkerLost).  A halted channel
    now takes no more calls: the next goes via the node and keeps its value."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        client = ex._client
        line = channeled(client)
        conn = line.link.conn
        real_send, held = conn.send, []

        def send(frames):  # (the Halt held back: it reaches the node late)
            if not held and type(P.decode(frames[0])) is P.Halt:
                held.append(frames)
                return
            real_send(frames)
        conn.send = send
        job = client.submit(gate_call, (first, "first"))
        assert type(job.future) is DirectFuture and line.on_chan
        poll_for(lambda: held_pids(first), message="the call to start")
        client.cancel(job)
        poll_for(lambda: held, message="the Halt")
        opened(first)                    # the call ends: its DONE comes on the channel
        poll_for(lambda: job.future.done(), message="the call's end")
        poll_for(lambda: line.free(), message="the line free again")
        later = ex.submit(gate_call, second, "second")
        poll_for(lambda: held_pids(second), message="the next call to start")
        client.call(lambda: real_send(held[0]))  # the Halt reaches the node now
        opened(second)
        assert later.result(30) == "second"
        poll_for(lambda: line.chan.conn is None, message="the halted channel closed")
        opened_before = line.chan.opened
        channeled(client)
        assert line.chan.opened > opened_before


def test_a_done_sent_before_the_worker_died_beats_channel_lost(node, tmp_path):
    """The call ends on the channel (its DONE written there), then the
    worker dies: the node's ChannelLost (main link) may be read before the
    DONE (channel).  The call ended: it keeps its value, not WorkerLost."""
    import fcntl
    import struct
    import termios

    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        client = ex._client
        line = channeled(client)
        future = on_channel(ex, gate_call, gate, "kept")
        poll_for(lambda: held_pids(gate), message="the call to start")
        with pytest.raises(TimeoutError):
            future.result(timeout=0.01)           # the loop thread reads it from here
        chan = line.chan
        poll_for(lambda: chan.job is not None, message="the loop thread to take the call")
        conn, pid = chan.conn, chan.pid
        client.call(conn.pause_reading)           # (the DONE stays in the socket)
        sock = conn._stream.get_extra_info("socket")

        def unread():
            got = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
            return struct.unpack("i", got)[0]
        opened(gate)
        poll_for(lambda: unread() > 0, message="the DONE to reach the client")
        os.kill(pid, signal.SIGKILL)
        poll_for(lambda: chan.lost is not None or future.done(),
                 message="the ChannelLost to be read")
        client.call(conn.resume_reading)
        assert future.result(30) == "kept"
        assert on_channel(ex, tasks.square, 9).result(30) == 81


def test_a_late_channel_lost_about_an_earlier_channel_costs_no_call(node, tmp_path):
    """The node's ChannelLost about a channel whose worker died is read
    late, once the client has opened its next channel (its end was read on
    the channel itself meanwhile): it named no channel, and the next
    channel was dropped, its call failing with WorkerLost.  It names its
    channel now (Channel's serial) and a late one is ignored."""
    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        client = ex._client
        line = channeled(client)
        handlers = client.net.handlers
        real, held = handlers[P.ChannelLost], []
        handlers[P.ChannelLost] = lambda *message: held.append(message)  # (read late)
        pid, opened_before = line.chan.pid, line.chan.opened
        os.kill(pid, signal.SIGKILL)
        client.call(line.reclaim)        # (the loop thread reads the channel's end)
        poll_for(lambda: held and line.chan.conn is None, message="the channel's end")
        line = channeled(client)
        assert line.chan.opened > opened_before and line.chan.pid != pid
        conn = line.chan.conn
        future = on_channel(ex, gate_call, gate, "kept")
        poll_for(lambda: held_pids(gate), message="the call to start")
        client.call(lambda: real(*held[0]))  # the late ChannelLost
        opened(gate)
        assert future.result(30) == "kept"
        assert line.chan.conn is conn and not conn.closed
        handlers[P.ChannelLost] = real
        assert on_channel(ex, tasks.square, 10).result(30) == 100


def test_a_client_closing_as_its_channel_opens_leaves_no_rejection_logged(tmp_path,
                                                                         monkeypatch):
    """The client shuts down while its channel's handshake is under way (a
    fresh process's one call, then shutdown: the channel opens at the idle
    moment between): the opening was cut mid-authentication and the node
    logged a WARNING "rejected connection ... closed the connection during
    authentication" for each such client.  The client's close now lets the
    handshake end (OPENING_GRACE) and closes the connection after it."""
    import asyncio

    from dpool.transport import auth

    real, seen, mid = auth._read, [], threading.Event()

    async def held(conn, n):  # (the channel's handshake waits for the client's close)
        if conn not in seen[:1]:
            seen.append(conn)
        if conn is not seen[0]:
            mid.set()
            while not client._direct.closed:
                await asyncio.sleep(0.01)
        return await real(conn, n)
    monkeypatch.setattr(auth, "_read", held)
    node = start_node(tmp_path / "node", cpus=1, secret=SECRET)
    try:
        ex = Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET)
        client = ex._client
        try:
            assert ex.submit(tasks.identity, 1).result(30) == 1   # then idle: a channel opens
            assert mid.wait(30)
        finally:
            ex.shutdown()
    finally:
        node.terminate()
    assert "during authentication" not in node.stderr()
