"""Direct calls over TCP (dpool/core/tcpline.py): Ctrl-C at any point of a
call, a link held by a user thread, and closing with a long queue.  Each
fault is injected at a chosen point (hooks, a line tracer), never timed."""
import signal
import sys
import threading
import time

import pytest

from dpool.core.tcpline import TcpLine
import tasks
from helpers import poll_for, start_node
from test_direct_calls import (SECRET, direct_submit, gate_call, line_of, make_executor,
                                   opened, parked)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("node"), cpus=1, secret=SECRET)
    yield node
    node.terminate()


@pytest.fixture
def executor(node):
    with make_executor(node) as ex:
        yield ex


def thread_cpu(thread):
    """CPU seconds ``thread`` has used so far (not wall time)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def test_the_loop_thread_blocks_while_a_user_thread_holds_the_link(
        executor, monkeypatch, tmp_path):
    """A job submitted while a user thread reads a direct call: the loop
    thread asks for the link and waits for it, without spinning (before, its
    wake-up rescheduled itself on every loop iteration until the link came
    back, and queued one more drain each time)."""
    client = executor._client
    line = line_of(client)
    gate = str(tmp_path / "gate")
    first = direct_submit(executor, gate_call, gate, "first")
    release = threading.Event()
    real_handle = TcpLine._handle

    def slow_to_hand_back(self, job, events, timed_out):  # (a reader not scheduled yet)
        if any(fd == self.wake for fd, _ in events):
            release.wait(30)
        return real_handle(self, job, events, timed_out)

    monkeypatch.setattr(TcpLine, "_handle", slow_to_hand_back)
    got = []
    reader = threading.Thread(target=lambda: got.append(first.result(60)))
    reader.start()
    poll_for(lambda: line.owner == "user", message="the reader to hold the link")
    drains = []
    real_drain = client._drain
    monkeypatch.setattr(client, "_drain", lambda *a: (drains.append(1), real_drain(*a))[1])
    second = executor.submit(tasks.square, 9)
    poll_for(lambda: line.deferred, message="the loop thread to ask for the link")
    loop_thread = client._thread.thread
    before, cpu = len(drains), thread_cpu(loop_thread)
    for _ in range(20):  # loop iterations: each one re-ran the wake-up
        client.call(lambda: None)
    threading.Event().wait(0.2)  # (a held link, for the CPU time below)
    spins, used = len(drains) - before, thread_cpu(loop_thread) - cpu
    release.set()
    opened(gate)
    assert second.result(30) == 81
    reader.join(30)
    assert got == ["first"]
    assert spins == 0, f"the loop thread re-ran its wake-up {spins} times"
    assert used < 0.05, f"the loop thread used {used:.3f} s of CPU waiting for the link"


class InterruptAt:
    """A profiler for the calling thread: Ctrl-C (SIGINT, handled as the
    kernel's would be) at the ``at``-th point where Python may run a signal
    handler in ``codes``: on entering one of them, or as a call made from
    one of them returns (Python checks for signals there, not between two
    plain stores)."""

    def __init__(self, codes, at):
        self.codes, self.at, self.points, self.where = codes, at, 0, None

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if event == "return":
            code = frame.f_back.f_code if frame.f_back is not None else None
        elif event not in ("call", "c_return"):
            return
        if code in self.codes:
            self.points += 1
            if self.points == self.at + 1:
                self.where = f"{event} {frame.f_code.co_name}:{frame.f_lineno}"
                signal.raise_signal(signal.SIGINT)


def submit_code():
    """What a direct call's submit runs (where Ctrl-C may land)."""
    import dpool.transport.lent as lent
    from dpool.core.directcalls import DirectCalls

    code = [DirectCalls.submit, TcpLine.start, TcpLine._plan, TcpLine._count,
            lent.LentSocket.send, lent.LentSocket.finish]
    return {fn.__code__ for fn in code}


def traced_submit(executor, tracer):
    sys.setprofile(tracer)
    try:
        return executor.submit(tasks.square, 5)
    finally:
        sys.setprofile(None)


def test_ctrl_c_anywhere_in_a_direct_submit_keeps_the_executor(executor, monkeypatch):
    """Ctrl-C at each line a direct call's submit runs (the call's records
    sealed, sent in part, sent in full, counted, the line released): submit
    raises KeyboardInterrupt or returns the call's future; the connection is
    never cut (a one-node executor would be broken for good), the link is
    handed back at most once, a call that was made is tracked until it ends
    (cancelled: nobody has its future), and the executor goes on."""
    assert threading.current_thread() is threading.main_thread()
    client = executor._client
    line = line_of(client)
    conn = line.link.conn
    codes = submit_code()
    parked(client)
    dry = InterruptAt(codes, -1)
    assert traced_submit(executor, dry).result(30) == 25
    handbacks = []
    real_take_back = type(conn).take_back
    monkeypatch.setattr(conn, "take_back", lambda *a, **k: (
        handbacks.append(1), real_take_back(conn, *a, **k))[1])
    for at in range(dry.points):
        parked(client)
        handbacks.clear()
        try:
            future = traced_submit(executor, InterruptAt(codes, at))
        except KeyboardInterrupt:
            future = None
        if future is not None:
            assert future.result(30) == 25
        assert executor.submit(tasks.square, 6).result(30) == 36, at
        assert len(handbacks) <= 1, f"Ctrl-C at line {at}: the link handed back twice"
        assert client.wait(30), f"Ctrl-C at line {at}: a call never ended"
        assert not client._unfinished and not client.jobs, at
        assert line_of(client) is line and line.link.conn is conn and not conn.closed, \
            f"Ctrl-C at line {at} cut the connection"
    assert direct_submit(executor, tasks.square, 7).result(30) == 49


class Ticker:
    """Counts the client loop's turns (a callback that comes back each turn)."""

    def __init__(self, client):
        self.loop, self.turns, self.on = client.loop, 0, True
        self.loop.call_soon_threadsafe(self.tick)

    def tick(self):
        self.turns += 1
        if self.on:
            self.loop.call_soon(self.tick)


def most_in_one_turn(turns):
    return max((turns.count(turn) for turn in set(turns)), default=0)


def queue_behind_a_held_call(executor, gate, n):
    """A call holding the node's only CPU, then ``n`` jobs queued."""
    first = executor.submit(gate_call, gate, "held")
    return first, [executor.submit(tasks.square, i) for i in range(n)]


@pytest.mark.parametrize("how", ["cancel_all", "shutdown"])
def test_cancelling_or_closing_a_long_queue_lets_the_loop_turn(
        node, monkeypatch, tmp_path, how):
    """close(cancel=True)'s cancel of every job, and the shutdown's failing
    of what is left, go DRAIN_BATCH jobs per loop turn (as submits are taken
    in), not the whole queue at once; every job still ends."""
    import dpool.core.client as client_module

    monkeypatch.setattr(client_module, "DRAIN_BATCH", 8)
    ex = make_executor(node)
    client = ex._client
    first, futures = queue_behind_a_held_call(ex, str(tmp_path / "gate"), 200)
    turns, ticker = [], Ticker(client)
    if how == "cancel_all":  # (counted once per job: its cancel)
        real_cancel = client.scheduler.cancel
        monkeypatch.setattr(client.scheduler, "cancel", lambda job_id: (
            turns.append(ticker.turns), real_cancel(job_id))[1])
    else:  # (its end)
        real_finish = client._finish
        monkeypatch.setattr(client, "_finish", lambda job, *a, **k: (
            turns.append(ticker.turns), real_finish(job, *a, **k))[1])
    try:
        if how == "cancel_all":
            client.loop.call_soon_threadsafe(client.stopping.cancel_all)
            poll_for(lambda: all(f.done() for f in futures), timeout=30,
                     message="every job cancelled")
        else:
            client.close(wait=False)  # what is left fails (BrokenCluster)
    finally:
        ticker.on = False
        ex.shutdown(wait=True, cancel_futures=True)
    assert first.done() and all(f.done() for f in futures)
    assert len(turns) >= 150
    assert most_in_one_turn(turns) <= 2 * 8, most_in_one_turn(turns)


def test_ctrl_c_as_a_direct_submit_returns_cancels_the_call(executor, monkeypatch, tmp_path):
    """Ctrl-C landing as the line's start() returns into submit (the call
    sent in full and counted, the line released; Python runs signal
    handlers as a call returns): submit raises KeyboardInterrupt, the
    caller never gets the future, so the call that was made is cancelled
    and stays counted until it ends (before, it was dropped from the
    unfinished set and left running on the node: shutdown(wait=True) did
    not wait for it, and nobody would ever see its answer)."""
    from dpool.errors import JobCancelled

    client = executor._client
    parked(client)
    gate = str(tmp_path / "gate")
    made = []
    real_start = TcpLine.start

    def start_then_interrupt(self, job):
        if real_start(self, job):
            made.append(job)
            raise KeyboardInterrupt  # (as the signal lands in submit)
        return False

    monkeypatch.setattr(TcpLine, "start", start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            executor.submit(gate_call, gate, "held")
        monkeypatch.undo()
        (job,) = made
        # (counted until it ends: a cancel that killed its worker at once has ended it)
        assert job.future in client._unfinished or job.future.done(), \
            "a call made is no longer counted"
        assert client.wait(30), "the interrupted call never ended"
        assert isinstance(job.future.exception(0), JobCancelled)
    finally:
        opened(gate)
    assert executor.submit(tasks.square, 6).result(30) == 36


def test_cancel_all_goes_on_when_submits_refill_the_queue_as_it_drains(
        node, monkeypatch, tmp_path):
    """close(cancel=True)'s cancel of every job: submits racing it (from
    other threads) that put as many jobs in the queue as one turn took out
    are not a link held by a user thread (before, the queue's unchanged
    length was taken for that: the cancel waited for a hand-back that never
    came, and the jobs were never cancelled)."""
    import dpool.core.client as client_module

    monkeypatch.setattr(client_module, "DRAIN_BATCH", 4)
    ex = make_executor(node)
    client = ex._client
    gate = str(tmp_path / "gate")
    try:
        first, futures = queue_behind_a_held_call(ex, gate, 8)
        poll_for(lambda: not client._incoming, message="the queue taken in")
        client._wake_pending = True  # (queued, not taken in yet: no wake-up)
        futures += [ex.submit(tasks.square, i) for i in range(4)]
        real_drain, refilled = client._drain, []

        def drain_racing_submits(limit=-1):  # (the submits of another thread, meanwhile)
            before = len(client._incoming)
            took = real_drain(limit)
            if not refilled and limit > 0:
                refilled.extend(client.submit(tasks.square, i).future
                                for i in range(before - len(client._incoming)))
            return took
        monkeypatch.setattr(client, "_drain", drain_racing_submits)
        client.loop.call_soon_threadsafe(client.stopping.cancel_all)
        poll_for(lambda: refilled and all(f.done() for f in futures + refilled),
                 timeout=15, message="every job cancelled")
    finally:
        opened(gate)
        ex.shutdown(wait=True, cancel_futures=True)


def test_a_job_taken_in_while_the_shutdown_fails_the_rest_still_ends(
        node, monkeypatch, tmp_path):
    """The shutdown fails what is left DRAIN_BATCH jobs per loop turn: a
    submit that raced close() (past its closed check) and is taken in
    between two of those turns ends too (before, the jobs were counted
    once, then all forgotten: that job's future never resolved)."""
    ex = make_executor(node)
    client = ex._client
    gate = str(tmp_path / "gate")
    raced, real_abandon = [], client.stopping._abandon

    def abandon_racing_a_submit(job, error):
        if not raced:  # (a submit of another thread, past its check before close())
            client.closed = False
            try:
                raced.append(client.submit(tasks.square, 3).future)
            finally:
                client.closed = True
        real_abandon(job, error)

    # The held job through the loop thread, never a direct call (which the
    # line, once parked, would make of it: it is not among client.jobs).
    monkeypatch.setattr(client, "_submit_direct", lambda *args: None)
    try:
        first = ex.submit(gate_call, gate, "held")
        poll_for(lambda: not client._incoming and client.jobs, message="the call taken in")
        monkeypatch.setattr(client.stopping, "_abandon", abandon_racing_a_submit)
        client.close(wait=False)
    finally:
        opened(gate)
        ex.shutdown(wait=True)
    assert first.done() and raced
    assert raced[0].done(), "a job taken in during the shutdown never ended"


def test_ctrl_c_as_result_takes_the_link_hands_it_back(executor, monkeypatch):
    """Ctrl-C landing in result() once it took the link to read the answer
    but before the read began (Python runs signal handlers as a function is
    entered): the link is handed back, the answer is not lost and the
    executor goes on (before, the link stayed held by nobody: the loop
    thread waited for it for good, and every later job with it)."""
    client = executor._client
    future = direct_submit(executor, tasks.square, 5)
    line = line_of(client)
    real_read = TcpLine._read

    def interrupted_on_entry(self, job, timeout):
        monkeypatch.setattr(TcpLine, "_read", real_read)
        raise KeyboardInterrupt

    monkeypatch.setattr(TcpLine, "_read", interrupted_on_entry)
    with pytest.raises(KeyboardInterrupt):
        future.result(30)
    monkeypatch.undo()
    poll_for(lambda: line.owner != "user", timeout=10, message="the link handed back")
    assert future.result(30) == 25
    assert executor.submit(tasks.square, 6).result(30) == 36
