"""Direct calls over TCP (issue 13): a lone call to an Executor or Pool whose
only node is a dpool-node (AES-GCM records on) is written and answered in
the calling thread (dpool/core/tcpline.py).  Every way of waiting, failing,
cancelling and closing must behave as on the normal path."""
import concurrent.futures as cf
import os
import signal
import threading

import pytest

import dpool
from dpool.core.direct import MAX_ARGUMENT, DirectFuture
from dpool.core.tcpline import TcpLine
from dpool.errors import BrokenCluster, JobCancelled, NodeLost, WorkerLost
from dpool.futures import Executor
import tasks
from helpers import poll_for, start_node

SECRET = b"direct-tcp-secret"
#: A slow heartbeat: its tick takes the link back from direct calls (by
#: design), which would make "this call went direct" a matter of timing.
QUIET = (5.0, 30.0)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("node"), cpus=1, secret=SECRET)
    yield node
    node.terminate()


def make_executor(node, **kwargs):
    ex = Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET, **kwargs)
    assert ex.submit(tasks.identity, 0).result(30) == 0
    return ex


@pytest.fixture
def executor(node):
    with make_executor(node) as ex:
        yield ex


def line_of(client):
    line = client._direct
    assert isinstance(line, TcpLine)
    return line


def parked(client):
    """Wait until a lone call may go direct (a call on the normal path parks
    the link again when it ends)."""
    line = line_of(client)
    for _ in range(50):
        try:
            poll_for(line.free, timeout=1, message="the link to be parked")
            return line
        except AssertionError:
            client.submit(tasks.identity, (0,)).future.result(30)
    raise AssertionError("the node's link was never parked")


def direct_submit(executor, fn, *args):
    """Submit once the link is parked, and check the call went direct."""
    parked(executor._client)
    future = executor.submit(fn, *args)
    assert type(future) is DirectFuture and isinstance(future._line, TcpLine)
    return future


def gate_call(gate, value):
    """Hold until the file ``gate`` exists, then return ``value``."""
    return tasks.count_and_hold(gate + ".log", gate, value)


def opened(gate):
    with open(gate, "w"):
        pass


def test_lone_calls_go_direct_and_return_in_order(executor):
    for i in range(50):
        assert direct_submit(executor, tasks.square, i).result(30) == i * i


def test_an_exception_comes_back_with_its_type_and_remote_traceback(executor):
    future = direct_submit(executor, tasks.raise_value_error, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        future.result(30)
    assert "raise_value_error" in str(info.value.__cause__)
    assert direct_submit(executor, tasks.square, 3).result(30) == 9


def test_a_done_callback_fires_with_nobody_waiting(executor):
    seen, event = [], threading.Event()
    future = direct_submit(executor, tasks.square, 4)
    future.add_done_callback(lambda f: (seen.append(f.result()), event.set()))
    assert event.wait(30)
    assert seen == [16]


def test_as_completed_wait_and_done_see_a_direct_call(executor):
    future = direct_submit(executor, tasks.square, 5)
    assert [f.result() for f in cf.as_completed([future], timeout=30)] == [25]
    future = direct_submit(executor, tasks.square, 6)
    done, not_done = cf.wait([future], timeout=30)
    assert done == {future} and not not_done
    future = direct_submit(executor, tasks.square, 7)
    poll_for(future.done, message="the direct call to be done")
    assert future.result(0) == 49


def test_a_result_that_times_out_keeps_its_answer(executor, tmp_path):
    gate = str(tmp_path / "gate")
    future = direct_submit(executor, gate_call, gate, "late")
    with pytest.raises(cf.TimeoutError):
        future.result(0.05)
    assert future.running() and not future.cancel()
    opened(gate)
    assert future.result(30) == "late"
    assert direct_submit(executor, tasks.square, 2).result(30) == 4


def test_a_second_job_runs_while_nobody_reads_the_direct_call(executor, tmp_path):
    gate = str(tmp_path / "gate")
    first = direct_submit(executor, gate_call, gate, "first")
    second = executor.submit(tasks.square, 8)
    assert type(second) is not DirectFuture or second._line is None  # the normal path
    opened(gate)
    assert second.result(30) == 64
    assert first.result(30) == "first"
    assert [f.result(30) for f in [executor.submit(tasks.square, i) for i in range(20)]] == \
        [i * i for i in range(20)]


def test_a_second_job_while_a_thread_reads_the_direct_call(executor, tmp_path):
    gate = str(tmp_path / "gate")
    first = direct_submit(executor, gate_call, gate, "first")
    got = []
    reader = threading.Thread(target=lambda: got.append(first.result(60)))
    reader.start()
    poll_for(lambda: line_of(executor._client).owner == "user",
             message="the reader to hold the link")
    second = executor.submit(tasks.square, 9)  # the reader hands the link back
    opened(gate)
    assert second.result(30) == 81
    reader.join(30)
    assert got == ["first"]


def test_a_worker_dying_under_a_direct_call_fails_only_that_call(executor):
    future = direct_submit(executor, tasks.kill_worker)
    with pytest.raises(WorkerLost):
        future.result(30)
    assert executor.submit(tasks.square, 3).result(30) == 9
    assert direct_submit(executor, tasks.square, 4).result(30) == 16


def test_a_worker_dying_with_nobody_reading(executor):
    future = direct_submit(executor, tasks.exit_worker, 3)
    event = threading.Event()
    future.add_done_callback(lambda f: event.set())
    assert event.wait(30)
    assert isinstance(future.exception(), WorkerLost)


def test_shutdown_waits_for_a_direct_call_nobody_reads(node, tmp_path):
    gate = str(tmp_path / "gate")
    ex = make_executor(node)
    future = direct_submit(ex, gate_call, gate, "done")
    closer = threading.Thread(target=ex.shutdown)
    closer.start()
    opened(gate)
    closer.join(30)
    assert not closer.is_alive()
    assert future.result(0) == "done"


def test_shutdown_while_a_thread_reads_the_direct_call(node, tmp_path):
    gate = str(tmp_path / "gate")
    ex = make_executor(node)
    future = direct_submit(ex, gate_call, gate, "read")
    results = []
    reader = threading.Thread(target=lambda: results.append(future.result(60)))
    reader.start()
    ex.shutdown(wait=False)
    opened(gate)
    reader.join(30)
    assert results == ["read"]
    ex.shutdown(wait=True)


def test_cancel_futures_and_terminate_kill_a_direct_call(node, tmp_path):
    gate = str(tmp_path / "gate")  # never opened
    pool = dpool.Pool(nodes=[node.address], secret=SECRET, heartbeat=QUIET)
    try:
        assert pool.apply(tasks.identity, (0,)) == 0
        parked(pool._client)
        result = pool.apply_async(gate_call, (gate, "never"))
        assert type(result._future) is DirectFuture
        poll_for(lambda: os.path.exists(gate + ".log"), message="the call to start")
        waiting = []
        waiter = threading.Thread(target=lambda: waiting.append(result.wait(60)))
        waiter.start()
        poll_for(lambda: line_of(pool._client).owner == "user" or result.ready(),
                 message="the waiter to read the call")
        pool.terminate()
        waiter.join(30)
        assert not waiter.is_alive()
        with pytest.raises(JobCancelled):
            result.get(0)
    finally:
        pool.terminate()
        pool.join()


def test_a_node_dying_under_a_direct_call(tmp_path):
    node = start_node(tmp_path / "node", cpus=1, secret=SECRET)
    try:
        ex = Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET,
                      connect_timeout=2)
        try:
            ex.submit(tasks.identity, 0).result(30)
            future = direct_submit(ex, gate_call, str(tmp_path / "gate"), "never")
            poll_for(lambda: os.path.exists(str(tmp_path / "gate.log")),
                     message="the call to start")
            node.kill()
            with pytest.raises((NodeLost, BrokenCluster)):
                future.result(60)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
    finally:
        node.kill()


def test_pool_apply_and_callbacks_on_the_direct_path(node):
    with dpool.Pool(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as pool:
        assert pool.apply(tasks.identity, (0,)) == 0
        assert [pool.apply(tasks.square, (i,)) for i in range(20)] == [i * i for i in range(20)]
        got, event = [], threading.Event()
        parked(pool._client)
        pool.apply_async(tasks.square, (9,), callback=lambda v: (got.append(v), event.set()))
        assert event.wait(30)
        assert got == [81]


def test_many_functions_through_the_line(executor):
    # A new lambda per call: the node is told to forget old ones.
    for i in range(1100):
        assert executor.submit(lambda x, i=i: x + i, 1).result(30) == i + 1
    assert len(line_of(executor._client).link.fns) <= 1024


def test_a_large_argument_takes_the_normal_path(executor):
    data = b"x" * (MAX_ARGUMENT + 1)
    parked(executor._client)
    future = executor.submit(tasks.size_of, data)
    assert type(future) is not DirectFuture or future._line is None
    assert future.result(30) == len(data)
    assert direct_submit(executor, tasks.size_of, b"y").result(30) == 1


def test_map_bursts_and_threads_after_direct_calls(executor):
    assert direct_submit(executor, tasks.square, 2).result(30) == 4
    assert list(executor.map(tasks.square, range(100), chunksize=7)) == \
        [i * i for i in range(100)]
    futures = [executor.submit(tasks.square, i) for i in range(200)]
    assert [f.result(30) for f in futures] == [i * i for i in range(200)]

    def run(base, out):
        out.extend(executor.submit(tasks.square, base + i).result(30) for i in range(30))

    outs = [[] for _ in range(4)]
    threads = [threading.Thread(target=run, args=(100 * k, outs[k])) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outs == [[(100 * k + i) ** 2 for i in range(30)] for k in range(4)]
    assert direct_submit(executor, tasks.square, 3).result(30) == 9


def test_a_heartbeat_tick_takes_a_long_call_over(node, tmp_path):
    """A call longer than a heartbeat tick: the loop thread reads it on and
    keeps the heartbeats (a node would drop a silent client)."""
    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=(0.1, 2.0)) as ex:
        ex.submit(tasks.identity, 0).result(30)
        future = direct_submit(ex, gate_call, gate, "long")
        got = []
        reader = threading.Thread(target=lambda: got.append(future.result(60)))
        reader.start()
        line = line_of(ex._client)
        poll_for(lambda: line.lent is None, message="the tick to take the link back")
        opened(gate)
        reader.join(30)
        assert got == ["long"]


@pytest.mark.parametrize("cut", [0, 3, None])
def test_an_interrupt_while_sending_a_direct_call(executor, monkeypatch, cut):
    """Ctrl-C while submit writes the call: submit raises it; nothing is
    lost or hangs (nothing sent: no call, and the records not sent are
    sealed again with the same numbers; part of it: the rest goes and the
    call runs); the executor goes on, the connection intact."""
    import dpool.transport.lent as lent

    real = lent.LentSocket.finish

    def interrupted(self):
        if cut:
            self._sends.append(self.sock.send(memoryview(self._out)[:cut]))
        monkeypatch.setattr(lent.LentSocket, "finish", real)
        raise KeyboardInterrupt

    client = executor._client
    conn = line_of(client).link.conn
    parked(client)
    monkeypatch.setattr(lent.LentSocket, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if cut is None:  # all of it went: the interrupt lands as submit returns
            monkeypatch.setattr(lent.LentSocket, "finish", real)
            real_count = TcpLine._count

            def count_then_interrupt(self, job, drop):
                real_count(self, job, drop)
                raise KeyboardInterrupt

            monkeypatch.setattr(TcpLine, "_count", count_then_interrupt)
        executor.submit(tasks.square, 5)
    monkeypatch.undo()
    assert executor.submit(tasks.square, 6).result(30) == 36
    assert direct_submit(executor, tasks.square, 7).result(30) == 49
    assert line_of(client).link.conn is conn and not conn.closed  # never cut
    poll_for(lambda: not client._unfinished and not client.jobs,
             message="the interrupted call to be settled")


def test_an_interrupt_that_cant_tell_how_far_the_send_got_ends_the_connection(
        executor, monkeypatch):
    """Ctrl-C in a send before it recorded anything: whether any bytes went
    can't be told, so the connection ends (docs/security.md: never a nonce
    reused, never half a record followed by another), as for a lost node: no
    call was made, and a client whose only node that was is broken
    (docs/failures.md: with no node left, BrokenCluster)."""
    import dpool.transport.lent as lent

    def interrupted(self, messages):
        raise KeyboardInterrupt

    client = executor._client
    conn = line_of(client).link.conn
    parked(client)
    monkeypatch.setattr(lent.LentSocket, "send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        executor.submit(tasks.square, 5)
    monkeypatch.undo()
    poll_for(lambda: conn.closed, message="the connection to end")
    with pytest.raises(BrokenCluster, match="direct call .* was cut short"):
        executor.submit(tasks.square, 6).result(30)


def test_an_interrupt_while_reading_a_direct_call(executor, monkeypatch):
    import dpool.core.tcpline as tcpline

    future = direct_submit(executor, tasks.square, 8)

    def interrupted(self, job, events, timed_out):  # (as if in poll: nothing read)
        raise KeyboardInterrupt

    monkeypatch.setattr(tcpline.TcpLine, "_handle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        future.result(30)
    monkeypatch.undo()
    assert future.result(30) == 64  # the loop thread read it
    assert direct_submit(executor, tasks.square, 9).result(30) == 81
    assert tcpline  # (imported for the patch target's module)


def interrupt_main_thread():
    """Ctrl-C, as the kernel delivers it: SIGINT, handled in the main thread."""
    assert threading.current_thread() is threading.main_thread()
    signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("point", [
    (TcpLine, "_sort", "after"),    # the DONE read off the socket, not yet in its future
    ("client", "_direct_done", "before"),  # the line given back, the answer not yet decoded
])
def test_an_interrupt_after_the_answer_was_read_loses_nothing(executor, monkeypatch, point):
    """Ctrl-C landing once result() has taken the answer off the link (the
    DONE read and opened, or being unpickled): result() raises
    KeyboardInterrupt, but the answer is kept (the next result() returns
    it) and the link is usable (on the local path: eb83d7b)."""
    owner, name, when = point
    if owner == "client":
        owner = executor._client
    real, fired = getattr(owner, name), []

    def hook(*args, **kwargs):
        fire = not fired and threading.current_thread() is threading.main_thread()
        fired.append(1)
        if fire and when == "before":
            interrupt_main_thread()
        value = real(*args, **kwargs)
        if fire and when == "after":
            interrupt_main_thread()
        return value

    future = direct_submit(executor, tasks.square, 7)
    monkeypatch.setattr(owner, name, hook if owner is executor._client else staticmethod(hook))
    with pytest.raises(KeyboardInterrupt):
        future.result(30)
    monkeypatch.undo()
    assert future.result(30) == 49
    assert direct_submit(executor, tasks.square, 8).result(30) == 64
    executor._client.wait(30)
    assert not executor._client._unfinished
