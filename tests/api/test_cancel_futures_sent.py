"""Executor.shutdown(cancel_futures=True) with jobs sent to a node but not
started there.  The stdlib: "cancel all pending futures that the executor
has not started running" (its ProcessPoolExecutor has at most
max_workers + 1 calls it can no longer cancel).  A dpool client keeps up to
cpus x (2 + read-ahead) short jobs in flight at a node, their futures
running from the send: those beyond one per CPU that the node still
queues, or a worker holds behind its running job, are asked back and
cancelled (at most max_workers + 1 run, as the stdlib's)."""
import pytest

import tasks
from dpool.futures import Executor
from helpers import poll_for

pytestmark = pytest.mark.timeout(120)


def test_shutdown_cancel_futures_cancels_jobs_sent_to_the_node_unstarted(tmp_path):
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    ex = Executor(1)
    try:
        # 3 ms jobs: the client's read-ahead sends several to the node, the
        # node hands the worker two (the running one and the next).
        assert list(ex.map(tasks.nap, [0.003] * 30)) == [None] * 30
        first = ex.submit(tasks.count_and_hold, log, gate, "first")
        poll_for(lambda: (tmp_path / "log").exists(), 30, message="the first job to start")
        rest = [ex.submit(tasks.nap, 0.003, i) for i in range(8)]
        poll_for(lambda: sum(f.running() for f in rest) >= 3, 30,
                 message="jobs sent to the node")
        ex.shutdown(wait=False, cancel_futures=True)
        # Those the node still queues come back at once (rest[0], held by
        # the worker, is asked back in the same turn of the node, and comes
        # back as the first job ends).
        poll_for(lambda: all(f.cancelled() for f in rest[1:]), 30,
                 message="the jobs the node queues cancelled")
        open(gate, "w").close()
        assert first.result(30) == "first"
        poll_for(lambda: all(f.done() for f in rest), 30, message="every job to end")
        # The node keeps one per CPU (the first job, or rest[0] when the
        # first went on the direct line as a lone call): at most one runs.
        ran = [f.result() for f in rest if not f.cancelled()]
        assert ran in ([], [0]), f"{len(ran)} of 8 unstarted jobs ran: {ran}"
    finally:
        open(gate, "w").close()
        ex.shutdown(wait=True)
