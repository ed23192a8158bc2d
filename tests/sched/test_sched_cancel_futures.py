"""Executor.shutdown(cancel_futures=True) through a dpool-scheduler: the
jobs still queued in the scheduler are cancelled, as at a node (only those
placed on a node, 2 per CPU at most, still run)."""
import pytest

from dpool.futures import Executor
from helpers import poll_for, start_node
from helpers_sched import SECRET, start_scheduler
from tasks import nap_for

pytestmark = pytest.mark.timeout(90)


def test_shutdown_cancel_futures_cancels_the_jobs_queued_in_the_scheduler(tmp_path):
    node = start_node(tmp_path / "node", cpus=1, secret=SECRET, args=("--host", "127.0.0.5"))
    sched = start_scheduler(tmp_path / "sched", [("127.0.0.5", node.port)], SECRET)
    try:
        ex = Executor(scheduler=sched.address, secret=SECRET)
        futures = [ex.submit(nap_for, 1.0) for _ in range(24)]
        poll_for(lambda: any(f.running() or f.done() for f in futures), 30,
                 message="a job sent")
        ended = sum(f.done() for f in futures)   # (0 unless this thread was held up)
        ex.shutdown(wait=True, cancel_futures=True)
        ran = [f for f in futures if not f.cancelled()]
        assert all(f.result(0) == 1.0 for f in ran)
        assert len(ran) <= 2 + ended, \
            f"{len(ran)} of 24 jobs ran after shutdown(cancel_futures=True)"
    finally:
        sched.terminate()
        node.kill()
