"""Direct calls over TCP (dpool/core/tcpline.py): Ctrl-C at any point of a
call, a link held by a user thread, and closing with a long queue.  Each
fault is injected at a chosen point (hooks, a line tracer), never timed."""
import threading
import time

import pytest

from dpool.core.tcpline import TcpLine
import tasks
from helpers import poll_for, start_node
from test_direct_calls_tcp import SECRET, direct_submit, gate_call, line_of, make_executor, opened


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
