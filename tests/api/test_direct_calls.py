"""Direct calls (issue 13): a lone call to an Executor or Pool goes from the
calling thread straight to a worker: on a local one, to a worker the
embedded node lent (dpool/core/direct.py, path "local"); on one whose only
node is a dpool-node (AES-GCM records on), written and answered on the link
in the calling thread (dpool/core/tcpline.py, path "tcp").  Every way of
waiting, failing, cancelling and closing must behave as on the normal path:
the tests that concern both paths run on both, the others on theirs."""
import concurrent.futures as cf
import os
import signal
import sys
import threading

import pytest

import dpool
from dpool import protocol as P
from dpool.core.direct import MAX_ARGUMENT, DirectFuture
from dpool.core.tcpline import TcpLine
from dpool.errors import BrokenCluster, JobCancelled, NodeLost, WorkerLost
from dpool.futures import Executor
import tasks
from helpers import poll_for, start_node

SECRET = b"direct-tcp-secret"
#: A slow heartbeat: its tick takes the link back from direct calls (by
#: design), which would make "this call went direct" a matter of timing.
#: Its first tick comes 30 s after the client starts (tick: interval / 2),
#: after any test here: with (5, 30) one came every 2.5 s, and one landing
#: between parked() and the submit sent the call the normal way (a test
#: asserting a DirectFuture failed when the machine was loaded enough that
#: a test ran past its client's first tick).
QUIET = (60.0, 240.0)
#: Tests of one path only.
LOCAL = pytest.mark.parametrize("path", ["local"], indirect=True)
TCP = pytest.mark.parametrize("path", ["tcp"], indirect=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("node"), cpus=1, secret=SECRET)
    yield node
    node.terminate()


class Local:
    """Executors and pools of one local worker."""

    def executor(self):
        ex = Executor(1)
        assert ex.submit(tasks.identity, 0).result(30) == 0  # a worker ran: lent from now on
        return ex

    def pool(self):
        return dpool.Pool(1)

    def park(self, client):
        """(the embedded node lends its idle worker at once)"""

    def wait_reader(self, client, result):
        """(the reader holds the worker's socket at once)"""


class Tcp:
    """Executors and pools whose only node is ``node`` (one CPU)."""

    def __init__(self, node):
        self.node = node

    def executor(self, **kwargs):
        return make_executor(self.node, **kwargs)

    def pool(self):
        return dpool.Pool(nodes=[self.node.address], secret=SECRET, heartbeat=QUIET)

    def park(self, client):
        parked(client)

    def wait_reader(self, client, result):
        poll_for(lambda: line_of(client).owner == "user" or result.ready(),
                 message="the waiter to read the call")


@pytest.fixture(params=["local", "tcp"])
def path(request, node):
    """The path a test runs on (the node is the module's, started before
    the test's processes are counted: not one it must leave behind)."""
    return Local() if request.param == "local" else Tcp(node)


@pytest.fixture
def executor(path):
    with path.executor() as ex:
        yield ex


def make_executor(node, **kwargs):
    ex = Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET, **kwargs)
    assert ex.submit(tasks.identity, 0).result(30) == 0
    return ex


def line_of(client):
    line = client._direct
    assert isinstance(line, TcpLine)
    return line


def settled(line):
    """True once the line lends the node's channel, or none will come (TLS,
    an extension without direct events, refused): no channel opens under a
    test's call."""
    client, chan = line.client, line.chan
    return line.on_chan or chan.refused or client.ssl is not None \
        or client._extended and not client.direct_events \
        or not isinstance(line.link.info.get("channel"), str)


def parked(client):
    """Wait until a lone call may go direct over TCP (a call on the normal
    path parks the link again when it ends), on the node's channel if it
    offers one (tests/api/test_channel_calls.py)."""
    line = line_of(client)
    for _ in range(50):
        try:
            poll_for(lambda: line.free() and settled(line), timeout=1,
                     message="the link to be parked")
            return line
        except AssertionError:
            client.submit(tasks.identity, (0,)).future.result(30)
    chan = line.chan
    raise AssertionError(f"the node's link was never parked (free {line.free()}, "
                         f"channel: lent {line.on_chan}, open {chan.conn is not None}, "
                         f"opening {chan.opening is not None}, job {chan.job}, "
                         f"recalled {chan.recalled}, lost {chan.lost})")


def parked_link(executor):
    """The client and its node's connection, once its link is parked."""
    client = executor._client
    conn = line_of(client).link.conn
    parked(client)
    return client, conn


def direct_submit(executor, fn, *args):
    """Submit (over TCP once the link is parked), and check the call went
    the direct way."""
    client = executor._client
    if isinstance(client._direct, TcpLine):
        parked(client)
    future = executor.submit(fn, *args)
    assert type(future) is DirectFuture and future._line is client._direct
    return future


def gate_call(gate, value):
    """Hold until the file ``gate`` exists, then return ``value``."""
    return tasks.count_and_hold(gate + ".log", gate, value)


def held_pids(gate):
    """The pids of the processes that ran ``gate_call(gate, ...)`` so far."""
    try:
        with open(gate + ".log") as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def opened(gate):
    with open(gate, "w"):
        pass


def interrupt_main_thread(signum=signal.SIGINT):
    """Ctrl-C, as the kernel delivers it: SIGINT, handled in the main thread."""
    assert threading.current_thread() is threading.main_thread()
    signal.raise_signal(signum)


def once_in_main_thread(fn, signum=signal.SIGINT):
    """``fn`` wrapped to interrupt the main thread (``signum``) before or
    after the first call the main thread makes to it (a hook on the direct
    path)."""
    armed = []

    def hook(when):
        def wrapper(*args, **kwargs):
            fire = not armed and threading.current_thread() is threading.main_thread()
            if fire:
                armed.append(when)
            if fire and when == "before":
                interrupt_main_thread(signum)
            value = fn(*args, **kwargs)
            if fire and when == "after":
                interrupt_main_thread(signum)
            return value
        return wrapper
    return hook


# ------------------------------------------------------------- both paths


def test_lone_calls_go_direct_and_return_in_order(executor):
    for i in range(50):
        assert direct_submit(executor, tasks.square, i).result(30) == i * i


def test_an_exception_comes_back_with_its_type_and_remote_traceback(executor):
    future = direct_submit(executor, tasks.raise_value_error, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        future.result(30)
    assert "raise_value_error" in str(info.value.__cause__)
    assert isinstance(future.exception(), ValueError)
    assert direct_submit(executor, tasks.square, 3).result(30) == 9  # the line still works


def test_a_done_callback_fires_with_nobody_waiting(executor):
    seen, event = [], threading.Event()
    future = direct_submit(executor, tasks.square, 4)
    future.add_done_callback(lambda f: (seen.append(f.result()), event.set()))
    assert event.wait(30)
    assert seen == [16]


def test_as_completed_and_wait_see_a_direct_call(executor):
    future = direct_submit(executor, tasks.square, 5)
    assert [f.result() for f in cf.as_completed([future], timeout=30)] == [25]
    future = direct_submit(executor, tasks.square, 6)
    done, not_done = cf.wait([future], timeout=30)
    assert done == {future} and not not_done


def test_polling_done_alone_sees_the_call_end(executor):
    future = direct_submit(executor, tasks.square, 7)
    poll_for(future.done, message="the direct call to be done")
    assert future.result(0) == 49


def test_a_result_that_times_out_keeps_its_answer(executor, tmp_path):
    gate = str(tmp_path / "gate")
    future = direct_submit(executor, gate_call, gate, "late")
    with pytest.raises(cf.TimeoutError):
        future.result(0.05)
    assert future.running() and not future.cancel()  # running: can't be cancelled
    opened(gate)
    assert future.result(30) == "late"
    assert direct_submit(executor, tasks.square, 2).result(30) == 4


def test_a_second_job_runs_while_nobody_reads_the_direct_call(executor, tmp_path):
    # One worker, and it is lent: the second job needs it back, though no
    # thread waits for the first.
    gate = str(tmp_path / "gate")
    first = direct_submit(executor, gate_call, gate, "first")
    second = executor.submit(tasks.square, 8)
    assert type(second) is not DirectFuture or second._line is None  # the normal path
    opened(gate)
    assert second.result(30) == 64
    assert first.result(30) == "first"
    assert [f.result(30) for f in [executor.submit(tasks.square, i) for i in range(20)]] == \
        [i * i for i in range(20)]


def test_a_worker_dying_under_a_direct_call_fails_only_that_call(executor):
    future = direct_submit(executor, tasks.kill_worker)
    with pytest.raises(WorkerLost, match="worker process"):
        future.result(30)
    assert executor.submit(tasks.square, 3).result(30) == 9  # a new worker serves
    assert direct_submit(executor, tasks.square, 4).result(30) == 16


def test_a_worker_dying_with_nobody_reading(executor):
    future = direct_submit(executor, tasks.exit_worker, 3)
    event = threading.Event()
    future.add_done_callback(lambda f: event.set())
    assert event.wait(30)
    assert isinstance(future.exception(), WorkerLost)


def test_shutdown_waits_for_a_direct_call_nobody_reads(path, tmp_path):
    gate = str(tmp_path / "gate")
    ex = path.executor()
    future = direct_submit(ex, gate_call, gate, "done")
    closer = threading.Thread(target=ex.shutdown)
    closer.start()
    opened(gate)
    closer.join(30)
    assert not closer.is_alive()
    assert future.result(0) == "done"


def test_shutdown_while_a_thread_reads_the_direct_call(path, tmp_path):
    gate = str(tmp_path / "gate")
    ex = path.executor()
    future = direct_submit(ex, gate_call, gate, "read")
    results = []
    reader = threading.Thread(target=lambda: results.append(future.result(60)))
    reader.start()
    ex.shutdown(wait=False)
    opened(gate)
    reader.join(30)
    assert results == ["read"]
    ex.shutdown(wait=True)


def test_terminate_kills_a_direct_call(path, tmp_path):
    gate = str(tmp_path / "gate")  # never opened
    pool = path.pool()
    try:
        assert pool.apply(tasks.identity, (0,)) == 0
        path.park(pool._client)
        result = pool.apply_async(gate_call, (gate, "never"))
        assert type(result._future) is DirectFuture
        poll_for(lambda: os.path.exists(gate + ".log"), message="the call to start")
        waiting = []
        waiter = threading.Thread(target=lambda: waiting.append(result.wait(60)))
        waiter.start()
        path.wait_reader(pool._client, result)
        pool.terminate()
        waiter.join(30)
        assert not waiter.is_alive()
        with pytest.raises(JobCancelled, match="killed"):  # as on the normal path
            result.get(0)
    finally:
        pool.terminate()
        pool.join()


def test_pool_apply_and_callbacks_on_the_direct_path(path):
    with path.pool() as pool:
        assert pool.apply(tasks.identity, (0,)) == 0
        assert [pool.apply(tasks.square, (i,)) for i in range(20)] == [i * i for i in range(20)]
        got, event = [], threading.Event()
        path.park(pool._client)
        pool.apply_async(tasks.square, (9,), callback=lambda v: (got.append(v), event.set()))
        assert event.wait(30)
        assert got == [81]
        errors, event = [], threading.Event()
        path.park(pool._client)
        pool.apply_async(tasks.raise_value_error, ("bad",),
                         error_callback=lambda e: (errors.append(e), event.set()))
        assert event.wait(30)
        assert isinstance(errors[0], ValueError)


def test_many_functions_through_the_line(executor):
    # A new lambda per call: the node (the lent worker) is told to forget old ones.
    for i in range(1100):
        assert executor.submit(lambda x, i=i: x + i, 1).result(30) == i + 1
    assert len(executor._client._direct.link.fns) <= 1024


def test_a_large_argument_takes_the_normal_path(path, executor):
    data = b"x" * (MAX_ARGUMENT + 1)
    path.park(executor._client)
    future = executor.submit(tasks.size_of, data)
    assert type(future) is not DirectFuture or future._line is None
    assert future.result(30) == len(data)
    assert direct_submit(executor, tasks.size_of, b"y").result(30) == 1


def test_map_and_bursts_after_direct_calls(executor):
    assert direct_submit(executor, tasks.square, 2).result(30) == 4
    assert list(executor.map(tasks.square, range(100), chunksize=7)) == \
        [i * i for i in range(100)]
    futures = [executor.submit(tasks.square, i) for i in range(200)]
    assert [f.result(30) for f in futures] == [i * i for i in range(200)]
    assert direct_submit(executor, tasks.square, 3).result(30) == 9  # direct again once idle


def test_threads_sharing_an_executor(executor):
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


def test_wait_in_another_thread_returns_as_calls_end(executor):
    """Client.wait() in another thread while this one makes calls (direct
    ones when the line is free): each wait returns once the calls end (the
    wake-up is skipped only while nobody waits)."""
    client = executor._client
    for i in range(30):
        future = executor.submit(tasks.square, i)
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(client.wait(60)))
        waiter.start()
        assert future.result(30) == i * i
        waiter.join(30)
        assert not waiter.is_alive() and waited == [True]


# ------------------------------------------------------------- local only


@LOCAL
def test_an_interrupt_while_sending_a_direct_call_leaves_the_executor_usable(
        executor, monkeypatch):
    """Ctrl-C while submit writes the call to the lent worker: submit raises
    it, and the executor goes on (the worker, its stream perhaps cut
    mid-frame, is not lent forever; shutdown does not wait for the call)."""
    import dpool.core.direct as direct

    real = direct._send_all

    def interrupted(sock, parts):
        real(sock, [bytes(memoryview(parts[0])[:3])])  # a frame cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(direct, "_send_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        executor.submit(tasks.square, 5)
    monkeypatch.setattr(direct, "_send_all", real)
    assert executor.submit(tasks.square, 6).result(30) == 36
    assert executor.submit(tasks.square, 7).result(30) == 49


def test_a_job_submitted_while_a_direct_call_is_being_written_runs(monkeypatch):
    """Thread A's direct call is still being written when thread B's job
    reaches the loop thread (Pool.apply_async takes no lock): B's job must
    get the worker once A's call is answered, with nobody waiting on A's."""
    import dpool.core.direct as direct

    real, sending, go = direct._send_all, threading.Event(), threading.Event()

    def slow(sock, parts):
        sending.set()
        assert go.wait(30)
        real(sock, parts)

    with dpool.Pool(1) as pool:
        assert pool.apply(tasks.identity, (0,)) == 0
        monkeypatch.setattr(direct, "_send_all", slow)
        first = []
        writer = threading.Thread(
            target=lambda: first.append(pool.apply_async(tasks.square, (2,))))
        writer.start()
        assert sending.wait(30)
        monkeypatch.setattr(direct, "_send_all", real)
        second = pool.apply_async(tasks.square, (3,))  # normal path: A's call is in flight
        client = pool._client
        poll_for(lambda: not client._incoming and not client._wake_pending,
                 message="the loop thread to take the second job")
        go.set()
        writer.join(30)
        assert type(first[0]._future) is DirectFuture
        assert second.get(30) == 9
        assert first[0].get(30) == 4


def test_pool_join_while_a_direct_call_is_being_written(monkeypatch):
    """Pool.join from another thread while apply_async still writes its
    direct call: join waits for the call (nobody else ever reads it) and
    returns; the call's result is kept."""
    import dpool.core.direct as direct

    real, sending, go = direct._send_all, threading.Event(), threading.Event()

    def slow(sock, parts):
        sending.set()
        assert go.wait(30)
        real(sock, parts)

    pool = dpool.Pool(1)
    try:
        assert pool.apply(tasks.identity, (0,)) == 0
        line = pool._client._direct
        handed, real_handoff = threading.Event(), line.handoff

        def handoff(future):
            real_handoff(future)
            handed.set()

        monkeypatch.setattr(line, "handoff", handoff)
        monkeypatch.setattr(direct, "_send_all", slow)
        first = []
        writer = threading.Thread(
            target=lambda: first.append(pool.apply_async(tasks.square, (2,))))
        writer.start()
        assert sending.wait(30)
        pool.close()
        joiner = threading.Thread(target=pool.join)
        joiner.start()
        assert handed.wait(30)  # join asked for the call's answer, while it is written
        go.set()
        writer.join(30)
        joiner.join(30)
        assert not joiner.is_alive()
        assert first[0].get(0) == 4
    finally:
        go.set()
        pool.terminate()
        pool.join()


@LOCAL
@pytest.mark.parametrize("point", [
    ("buffer_updated", "before"),  # the answer's bytes read off the socket, not decoded
    ("buffer_updated", "after"),   # decoded, not yet handed to the future
    ("_end", "before"),            # read whole, the line not yet given back
])
def test_an_interrupt_while_the_answer_is_read_loses_nothing(executor, monkeypatch, point):
    """Ctrl-C landing while result() takes the answer off the worker's
    socket: result() raises KeyboardInterrupt, but the answer is kept (the
    next result() returns it) and the worker is not lent forever."""
    import dpool.core.direct as direct
    from dpool.transport.frames import FrameDecoder

    name, when = point
    owner = FrameDecoder if name == "buffer_updated" else direct.DirectLine
    future = direct_submit(executor, tasks.square, 7)
    monkeypatch.setattr(owner, name, once_in_main_thread(getattr(owner, name))(when))
    with pytest.raises(KeyboardInterrupt):
        future.result(30)
    monkeypatch.undo()
    assert future.result(30) == 49
    line = executor._client._direct
    poll_for(line.free, message="the line to be free again")
    assert direct_submit(executor, tasks.square, 8).result(30) == 64


class Timeout(Exception):
    """What a program's own SIGALRM handler raises (a timeout of its own)."""


def raise_timeout(signum, frame):
    raise Timeout


def exit_143(signum, frame):
    sys.exit(143)


@pytest.mark.parametrize("signum", [signal.SIGALRM, signal.SIGTERM])
@pytest.mark.parametrize("path", ["local", "tcp"], indirect=True)
def test_a_raising_handler_of_another_signal_while_the_answer_is_read_loses_nothing(
        executor, path, monkeypatch, signum):
    """A program's handler of SIGALRM or SIGTERM that raises (a timeout,
    SystemExit), landing as result() has the answer decoded but not yet in
    its future: result() raises it, and the answer is kept as for Ctrl-C."""
    import dpool.core.direct as direct
    from dpool.transport.frames import FrameDecoder

    error, handler = (Timeout, raise_timeout) if signum == signal.SIGALRM else \
        (SystemExit, exit_143)
    previous = signal.signal(signum, handler)
    try:
        owner, name = (FrameDecoder, "buffer_updated") if isinstance(path, Local) else \
            (TcpLine, "_sort")
        future = direct_submit(executor, tasks.square, 7)
        hook = once_in_main_thread(getattr(owner, name), signum)("after")
        monkeypatch.setattr(owner, name, hook if owner is FrameDecoder else staticmethod(hook))
        with pytest.raises(error):
            future.result(30)
        monkeypatch.undo()
        assert future.result(30) == 49
        assert direct_submit(executor, tasks.square, 8).result(30) == 64
    finally:
        signal.signal(signum, previous)
    assert direct  # (the path patched: core/direct.py's and tcpline.py's)


@LOCAL
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_around_taking_the_line_leaves_it_usable(executor, monkeypatch, when):
    """Ctrl-C in submit just before or just after the call was written
    (its lock released, the call not yet handed over): submit raises it, and
    the executor goes on (the worker is not held by a writer that is gone)."""
    import dpool.core.direct as direct

    line = executor._client._direct

    class Lock:  # the line's lock, interrupting once as submit takes the line
        def __init__(self, lock):
            self.lock, self.armed = lock, when == "before"

        def __enter__(self):
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()
            if self.armed and threading.current_thread() is threading.main_thread():
                self.armed = False
                interrupt_main_thread()

    monkeypatch.setattr(line, "lock", Lock(line.lock))
    if when == "after":
        monkeypatch.setattr(direct, "_send_all",
                            once_in_main_thread(direct._send_all)("after"))
    with pytest.raises(KeyboardInterrupt):
        executor.submit(tasks.square, 5)
    monkeypatch.undo()
    assert executor.submit(tasks.square, 6).result(30) == 36
    assert executor.submit(tasks.square, 7).result(30) == 49


@LOCAL
def test_ctrl_c_as_a_local_direct_submit_returns_keeps_the_call_counted(
        executor, monkeypatch, tmp_path):
    """Ctrl-C landing as the line's start() returns into submit (the call
    written in full to the lent worker): submit raises KeyboardInterrupt,
    and the call that was made stays counted until it ends, its answer read
    by the loop thread (before, it was dropped from the unfinished set:
    Client.wait and shutdown(wait=True) returned while it ran, and the
    shutdown killed it)."""
    import dpool.core.direct as direct

    client = executor._client
    gate = str(tmp_path / "gate")
    made = []
    real_start = direct.DirectLine.start

    def start_then_interrupt(self, job):
        if real_start(self, job):
            made.append(job)
            raise KeyboardInterrupt  # (as the signal lands in submit)
        return False

    monkeypatch.setattr(direct.DirectLine, "start", start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            executor.submit(gate_call, gate, "held")
        monkeypatch.undo()
        (job,) = made
        assert job.future in client._unfinished, "a call made is no longer counted"
        assert not client.wait(0)
    finally:
        opened(gate)
    assert client.wait(30), "the interrupted call never ended"
    assert job.future.result(0) == "held"
    assert executor.submit(tasks.square, 6).result(30) == 36


def test_pool_join_waits_for_a_direct_call_started_after_it_began_waiting(
        monkeypatch, tmp_path):
    """apply_async racing close(): its direct call starts once join() already
    waits in Client.wait (which hands a call in flight to the loop thread
    only as it begins): join returns once the call ends, with nobody calling
    get() (before, nobody read the call's answer: join hung until someone
    asked for the result)."""
    import dpool.core.direct as direct

    gate = str(tmp_path / "gate")
    real_start, go, starting = direct.DirectLine.start, threading.Event(), threading.Event()

    def held_start(self, job):
        starting.set()
        assert go.wait(30)
        return real_start(self, job)

    pool = dpool.Pool(1)
    client, results, joiner = pool._client, [], None
    try:
        assert pool.apply(tasks.identity, (0,)) == 0
        monkeypatch.setattr(direct.DirectLine, "start", held_start)
        submitter = threading.Thread(
            target=lambda: results.append(pool.apply_async(gate_call, (gate, "held"))))
        submitter.start()
        assert starting.wait(30)  # past the closed checks, the call not yet made
        pool.close()
        joiner = threading.Thread(target=pool.join)
        joiner.start()
        poll_for(lambda: client._idle_waiters == 1, message="join to wait")
        go.set()
        submitter.join(30)
        assert type(results[0]._future) is DirectFuture
        opened(gate)
        joiner.join(30)
        assert not joiner.is_alive(), "join never saw the call end"
        assert results[0].get(0) == "held"
    finally:
        go.set()
        opened(gate)
        if results:
            results[0].get(30)  # (read here: the waiting join ends)
        if joiner is not None:
            joiner.join(30)
        pool.terminate()
        pool.join()


@LOCAL
def test_a_call_submitted_while_a_worker_is_being_lent_goes_the_normal_way(
        executor, monkeypatch):
    """The loop thread lends the line a worker (offer) while a user thread
    submits: the call must not go direct on a half-made line (its socket
    set, its poller and decoder not yet)."""
    import dpool.core.direct as direct

    client = executor._client
    line = client._direct
    client.loop.call_soon_threadsafe(line.reclaim)  # the client is idle: no lease
    poll_for(lambda: line.worker is None, message="the lease to end")
    lending, go, real = threading.Event(), threading.Event(), direct.FrameDecoder

    def slow_decoder():
        lending.set()
        assert go.wait(30)
        return real()

    monkeypatch.setattr(direct, "FrameDecoder", slow_decoder)
    client.loop.call_soon_threadsafe(line.offer)
    assert lending.wait(30)
    try:
        future = executor.submit(tasks.square, 3)
        with pytest.raises(cf.TimeoutError):
            future.result(0)  # (not answered yet: the loop thread is still lending)
    finally:
        go.set()
    assert future.result(30) == 9
    poll_for(line.free, message="the line to be lent")
    assert direct_submit(executor, tasks.square, 4).result(30) == 16


# --------------------------------------------------------------- TCP only


@TCP
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


def test_a_heartbeat_tick_takes_a_long_call_over(node, tmp_path):
    """A call longer than a heartbeat tick on the parked link (no channel:
    as if the node refused one): the loop thread reads it on and keeps the
    heartbeats (a node would drop a silent client).  (On the node's channel
    the link is never parked: test_lone_call_faults.py's long call.)"""
    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=(0.1, 2.0)) as ex:
        line_of(ex._client).chan.refused = True
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
@TCP
def test_an_interrupt_while_sending_a_direct_call(executor, monkeypatch, cut):
    """Ctrl-C while submit writes the call: submit raises it; nothing is
    lost or hangs (nothing sent: no call, and the records not sent are
    sealed again with the same numbers; part or all of it: the call was
    made, the loop thread writes the rest and cancels it, tracked until it
    ends); the executor goes on, the connection intact."""
    import dpool.transport.lent as lent

    real = lent.LentSocket.finish

    def interrupted(self):
        if cut:
            self._sends.append(self.sock.send(memoryview(self._out)[:cut]))
        monkeypatch.setattr(lent.LentSocket, "finish", real)
        raise KeyboardInterrupt

    client, conn = parked_link(executor)
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


@TCP
def test_an_interrupt_as_the_send_begins_makes_no_call_and_keeps_the_connection(
        executor, monkeypatch):
    """Ctrl-C in a send before it recorded anything: the line knows it has
    not begun (its count of sends), so no call was made and nothing is cut
    (before, that could not be told and the connection ended: a one-node
    executor was then BrokenCluster for good)."""
    import dpool.transport.lent as lent

    def interrupted(self, messages):
        raise KeyboardInterrupt

    client, conn = parked_link(executor)
    monkeypatch.setattr(lent.LentSocket, "send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        executor.submit(tasks.square, 5)
    monkeypatch.undo()
    assert not client._unfinished and not client.jobs  # no call
    assert direct_submit(executor, tasks.square, 6).result(30) == 36
    assert line_of(client).link.conn is conn and not conn.closed


@TCP
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


@pytest.mark.parametrize("point", [
    (TcpLine, "_sort", "after"),    # the DONE read off the socket, not yet in its future
    ("client", "_direct_done", "before"),  # the line given back, the answer not yet decoded
])
@TCP
def test_an_interrupt_after_the_answer_was_read_loses_nothing(executor, monkeypatch, point):
    """Ctrl-C landing once result() has taken the answer off the link (the
    DONE read and opened, or being unpickled): result() raises
    KeyboardInterrupt, but the answer is kept (the next result() returns
    it) and the link is usable (on the local path: eb83d7b)."""
    owner, name, when = point
    if owner == "client":
        owner = executor._client
    hook = once_in_main_thread(getattr(owner, name))(when)
    future = direct_submit(executor, tasks.square, 7)
    monkeypatch.setattr(owner, name, hook if owner is executor._client else staticmethod(hook))
    with pytest.raises(KeyboardInterrupt):
        future.result(30)
    monkeypatch.undo()
    assert future.result(30) == 49
    assert direct_submit(executor, tasks.square, 8).result(30) == 64
    executor._client.wait(30)
    assert not executor._client._unfinished


def test_a_forget_while_a_local_worker_is_lent_reaches_it():
    """The client forgets a function (a Forget to the embedded node) while
    the worker that loaded it is lent to the client for direct calls: the
    node told only its other workers, and the lent one kept the function
    for good, the node still counting it loaded there.  It is told once it
    is the node's again (its socket is the client's until then)."""
    with Executor(1) as ex:
        client = ex._client
        assert ex.submit(tasks.square, 2).result(30) == 4      # via the node: loaded
        line = client._direct
        poll_for(lambda: line.worker is not None, message="the worker to be lent")
        worker, session, link = line.worker, line.session, line.link
        (fn_id,) = link.fns
        assert fn_id in worker.fns

        def forget():
            link.forget([fn_id])
            link.conn.send([P.encode(P.Forget, [fn_id])])
        client.call(forget)
        poll_for(lambda: fn_id not in session.fns, message="the node to read the Forget")
        client.call(line.reclaim)
        poll_for(lambda: worker in session.workers, message="the worker back")
        assert fn_id not in worker.fns
        assert ex.submit(tasks.square, 3).result(30) == 9      # (sent again, loaded again)
