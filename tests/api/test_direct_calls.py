"""Direct calls (issue 13): a lone call on a local Executor or Pool goes from
the calling thread straight to a worker (dpool/core/direct.py).  Every way
of waiting, failing and closing must behave as on the normal path."""
import concurrent.futures as cf
import os
import signal
import threading

import pytest

import dpool
from dpool.core.direct import MAX_ARGUMENT, DirectFuture
from dpool.errors import JobCancelled, WorkerLost
from dpool.futures import Executor
import tasks
from helpers import poll_for


def gate_call(gate, value):
    """Hold until the file ``gate`` exists, then return ``value``."""
    return tasks.count_and_hold(gate + ".log", gate, value)


@pytest.fixture
def executor():
    with Executor(1) as ex:
        assert ex.submit(tasks.identity, 0).result(10) == 0  # a worker ran: lent from now on
        yield ex


def direct_submit(executor, fn, *args):
    """Submit, and check the call went the direct way."""
    future = executor.submit(fn, *args)
    assert type(future) is DirectFuture and future._line is not None
    return future


def opened(gate):
    with open(gate, "w"):
        pass


def test_lone_calls_go_direct_and_return_in_order(executor):
    for i in range(50):
        assert direct_submit(executor, tasks.square, i).result(10) == i * i


def test_an_exception_comes_back_with_its_type_and_remote_traceback(executor):
    future = direct_submit(executor, tasks.raise_value_error, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        future.result(10)
    assert "raise_value_error" in str(info.value.__cause__)
    assert isinstance(future.exception(), ValueError)
    assert executor.submit(tasks.square, 3).result(10) == 9  # and the line still works


def test_a_done_callback_fires_with_nobody_waiting(executor):
    seen, event = [], threading.Event()
    future = direct_submit(executor, tasks.square, 4)
    future.add_done_callback(lambda f: (seen.append(f.result()), event.set()))
    assert event.wait(10)
    assert seen == [16]


def test_as_completed_and_wait_see_a_direct_call(executor):
    future = direct_submit(executor, tasks.square, 5)
    assert [f.result() for f in cf.as_completed([future], timeout=10)] == [25]
    future = direct_submit(executor, tasks.square, 6)
    done, not_done = cf.wait([future], timeout=10)
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
    assert future.result(10) == "late"
    assert executor.submit(tasks.square, 2).result(10) == 4


def test_a_second_job_runs_while_nobody_reads_the_direct_call(executor, tmp_path):
    # One worker, and it is lent: the second job needs it back, though no
    # thread waits for the first.
    gate = str(tmp_path / "gate")
    first = direct_submit(executor, gate_call, gate, "first")
    second = executor.submit(tasks.square, 8)
    assert type(second) is not DirectFuture or second._line is None  # the normal path
    opened(gate)
    assert second.result(10) == 64
    assert first.result(10) == "first"
    assert [f.result(10) for f in [executor.submit(tasks.square, i) for i in range(20)]] == \
        [i * i for i in range(20)]


def test_a_worker_dying_under_a_direct_call_fails_only_that_call(executor):
    future = direct_submit(executor, tasks.kill_worker)
    with pytest.raises(WorkerLost, match="worker process"):
        future.result(10)
    assert executor.submit(tasks.square, 3).result(10) == 9  # a new worker serves
    assert direct_submit(executor, tasks.square, 4).result(10) == 16


def test_a_worker_dying_with_nobody_reading(executor):
    future = direct_submit(executor, tasks.exit_worker, 3)
    event = threading.Event()
    future.add_done_callback(lambda f: event.set())
    assert event.wait(10)
    assert isinstance(future.exception(), WorkerLost)


def test_shutdown_waits_for_a_direct_call_nobody_reads(tmp_path):
    gate = str(tmp_path / "gate")
    ex = Executor(1)
    ex.submit(tasks.identity, 0).result(10)
    future = direct_submit(ex, gate_call, gate, "done")
    closer = threading.Thread(target=ex.shutdown)
    closer.start()
    opened(gate)
    closer.join(30)
    assert not closer.is_alive()
    assert future.result(0) == "done"


def test_shutdown_while_a_thread_reads_the_direct_call(tmp_path):
    gate = str(tmp_path / "gate")
    ex = Executor(1)
    ex.submit(tasks.identity, 0).result(10)
    future = direct_submit(ex, gate_call, gate, "read")
    results = []
    reader = threading.Thread(target=lambda: results.append(future.result(30)))
    reader.start()
    ex.shutdown(wait=False)
    opened(gate)
    reader.join(30)
    assert results == ["read"]
    ex.shutdown(wait=True)


def test_terminate_kills_a_direct_call(tmp_path):
    gate = str(tmp_path / "gate")  # never opened
    pool = dpool.Pool(1)
    try:
        assert pool.apply(tasks.identity, (0,)) == 0
        result = pool.apply_async(gate_call, (gate, "never"))
        assert type(result._future) is DirectFuture
        poll_for(lambda: os.path.exists(gate + ".log"), message="the call to start")
        waiting = []
        waiter = threading.Thread(target=lambda: waiting.append(result.wait(30)))
        waiter.start()
        pool.terminate()
        waiter.join(30)
        assert not waiter.is_alive()
        with pytest.raises(JobCancelled, match="killed"):  # as on the normal path
            result.get(0)
    finally:
        pool.terminate()
        pool.join()


def test_pool_apply_and_callbacks_on_the_direct_path():
    with dpool.Pool(1) as pool:
        assert pool.apply(tasks.identity, (0,)) == 0
        assert [pool.apply(tasks.square, (i,)) for i in range(20)] == [i * i for i in range(20)]
        got, event = [], threading.Event()
        pool.apply_async(tasks.square, (9,), callback=lambda v: (got.append(v), event.set()))
        assert event.wait(10)
        assert got == [81]
        errors, event = [], threading.Event()
        pool.apply_async(tasks.raise_value_error, ("bad",),
                         error_callback=lambda e: (errors.append(e), event.set()))
        assert event.wait(10)
        assert isinstance(errors[0], ValueError)


def test_many_functions_through_the_line(executor):
    # A new lambda per call: the lent worker is told to forget old ones.
    for i in range(300):
        assert executor.submit(lambda x, i=i: x + i, 1).result(10) == i + 1


def test_a_large_argument_takes_the_normal_path(executor):
    data = b"x" * (MAX_ARGUMENT + 1)
    future = executor.submit(tasks.size_of, data)
    assert type(future) is not DirectFuture or future._line is None
    assert future.result(10) == len(data)
    assert direct_submit(executor, tasks.size_of, b"y").result(10) == 1


def test_map_and_bursts_after_direct_calls(executor):
    assert direct_submit(executor, tasks.square, 2).result(10) == 4
    assert list(executor.map(tasks.square, range(100), chunksize=7)) == \
        [i * i for i in range(100)]
    futures = [executor.submit(tasks.square, i) for i in range(200)]
    assert [f.result(10) for f in futures] == [i * i for i in range(200)]
    assert direct_submit(executor, tasks.square, 3).result(10) == 9  # lent again once idle


def test_threads_sharing_an_executor(executor):
    def run(base, out):
        out.extend(executor.submit(tasks.square, base + i).result(10) for i in range(30))

    outs = [[] for _ in range(4)]
    threads = [threading.Thread(target=run, args=(100 * k, outs[k])) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outs == [[(100 * k + i) ** 2 for i in range(30)] for k in range(4)]


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


def interrupt_main_thread():
    """Ctrl-C, as the kernel delivers it: SIGINT, handled in the main thread."""
    assert threading.current_thread() is threading.main_thread()
    signal.raise_signal(signal.SIGINT)


def once_in_main_thread(fn):
    """``fn`` wrapped to interrupt the main thread before or after the first
    call the main thread makes to it (a hook on the direct path)."""
    armed = []

    def hook(when):
        def wrapper(*args, **kwargs):
            fire = not armed and threading.current_thread() is threading.main_thread()
            if fire:
                armed.append(when)
            if fire and when == "before":
                interrupt_main_thread()
            value = fn(*args, **kwargs)
            if fire and when == "after":
                interrupt_main_thread()
            return value
        return wrapper
    return hook


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
