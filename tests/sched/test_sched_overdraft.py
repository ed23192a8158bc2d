"""One authenticated client holding the scheduler's receive overdraft (a
huge message sent slowly) must not stall the other clients: their jobs and
heartbeats keep flowing (the scheduler would otherwise drop them for silence
past their heartbeat deadline)."""
import threading
import time

import pytest

from dpool.core.client import Client
from dpool.transport.frames import header
from helpers import authenticated_socket
from helpers_sched import SECRET, start_scheduler

BUDGET = 1 << 20  # the scheduler's receive budget in this test: 1 MiB
HEARTBEAT = (0.2, 2.0)  # client B's (interval, deadline)


class Trickler(threading.Thread):
    """An authenticated peer declaring a 64 MiB message: 2 MiB at once (past
    the budget: it takes the overdraft), then 32 KiB every 0.1 s."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = authenticated_socket(port, SECRET)
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            self.sock.sendall(header([b"\0" * (64 << 20)]))  # the length only
            self.sock.sendall(b"\0" * (2 << 20))
            while not self.stop.wait(0.1):
                self.sock.sendall(b"\0" * (32 << 10))
        except OSError as exc:
            self.error = exc

    def close(self):
        self.stop.set()
        self.join(10)
        self.sock.close()


@pytest.fixture
def small_budget_scheduler(tmp_path, three_nodes):
    sched = start_scheduler(tmp_path / "scheduler", [(n.host, n.port) for n in three_nodes],
                            SECRET, args=("--receive-budget", str(BUDGET)))
    yield sched
    assert sched.terminate() == 0, sched.stderr()


def test_a_client_holding_the_overdraft_does_not_stall_the_others(small_budget_scheduler):
    sched = small_budget_scheduler
    trickler = Trickler(sched.port)
    b = Client([sched.address], secret=SECRET, heartbeat=HEARTBEAT).start()
    try:
        trickler.start()
        time.sleep(0.5)  # (the trickler has taken the overdraft: no condition to poll)
        # Jobs with 256 KiB arguments: their messages arrive in several reads.
        arg = b"x" * (256 << 10)
        end = time.monotonic() + 3 * HEARTBEAT[1]  # well past B's deadline
        while time.monotonic() < end:
            jobs = [b.submit(len, (arg,)) for _ in range(6)]
            for job in jobs:
                assert job.future.result(2 * HEARTBEAT[1]) == len(arg)
        assert trickler.is_alive() and trickler.error is None  # it held on all along
    finally:
        b.close()
        trickler.close()
