"""Review of the engine core: races and lost jobs found by reading the code."""
import os
import signal

import pytest

from dpool import protocol as P
from dpool.core.client import Client
from dpool.errors import JobCancelled, NodeLost
from conftest import poll_for
from helpers_engine import (dpool_node, node1, node_secret,  # noqa: F401 (fixtures)
                            double, getpid, hold, read_marker)


def _session(client):
    return client.call(lambda: next(iter(client.embedded.sessions)))


def test_zygote_dying_during_a_spawn_does_not_end_the_session():
    """A worker start waiting on the zygote when it dies is retried with the
    new zygote; the session (the node, for the client) goes on serving."""
    client = Client(None, cpus=1).start()
    zygote = None
    try:
        pid = client.submit(getpid).future.result(10)
        zygote = client.embedded.zygote.proc
        os.kill(zygote.pid, signal.SIGSTOP)
        os.kill(pid, signal.SIGKILL)  # a new worker is asked of the stopped zygote
        poll_for(lambda: client.call(lambda: len(client.embedded.zygote._pending)), 10,
                 message="a spawn waiting on the zygote")
        os.kill(zygote.pid, signal.SIGKILL)
        os.kill(zygote.pid, signal.SIGCONT)
        assert client.submit(double, (21,)).future.result(10) == 42
        assert client.nodes()
    finally:
        if zygote is not None:
            try:
                os.kill(zygote.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        client.close()


def test_cancel_of_a_job_queued_in_a_worker_that_just_died(tmp_path):
    """Cancel of a job queued inside a worker whose death is not yet fully
    handled (its exit not reported yet) is not lost: the job is not requeued
    and run, its future fails with JobCancelled."""
    client = Client(None, cpus=1).start()
    zygote = None
    try:
        for _ in range(20):  # short jobs: the worker is given several at once
            client.submit(double, (1,)).future.result(10)
        session = _session(client)
        assert client.call(lambda: session.depth) >= 2
        marker = str(tmp_path / "a")
        a = client.submit(hold, (marker,))
        b = client.submit(double, (5,))
        (worker_pid,), _ = read_marker(marker)
        (worker,) = client.call(lambda: list(session.workers))
        assert client.call(lambda: list(worker.outstanding)) == [a.id, b.id]
        cancels = []
        original = session.handlers[P.CANCEL]
        session.handlers[P.CANCEL] = lambda h, f: (original(h, f), cancels.append(h[1]))
        zygote = client.embedded.zygote.proc
        os.kill(zygote.pid, signal.SIGSTOP)  # its exit report waits
        os.kill(worker_pid, signal.SIGKILL)
        poll_for(lambda: client.call(lambda: worker.dead), 10, message="the worker seen dead")
        client.cancel(b)
        poll_for(lambda: cancels, 10, message="the cancel at the node")
        os.kill(zygote.pid, signal.SIGCONT)
        with pytest.raises(JobCancelled):
            b.future.result(10)
        a.future.exception(10)
    finally:
        if zygote is not None:
            os.kill(zygote.pid, signal.SIGCONT)
        client.close()


def test_job_pinned_to_a_lost_node_fails(dpool_node, node1, node_secret):
    """A job pinned to a node that is gone fails with NodeLost instead of
    waiting forever for that node to come back."""
    client = Client([dpool_node.address, node1.address], secret=node_secret).start()
    try:
        link = client.links[1]
        client.close_link(link)
        poll_for(lambda: not link.ready, 10, message="the node to be lost")
        job = client.submit(double, (1,), pin=link)
        with pytest.raises(NodeLost):
            job.future.result(5)
        assert client.submit(double, (2,)).future.result(10) == 4
    finally:
        client.close()


def test_close_cancel_while_a_node_is_closing_cancels_the_others(dpool_node, node1, node_secret,
                                                                 tmp_path):
    """close(cancel=True) right after close_link(): the cancel for the job on
    the closing node can't be sent; the jobs on the other nodes are still
    cancelled (the failed send used to abort the loop over them)."""
    client = Client([dpool_node.address, node1.address], secret=node_secret).start()
    try:
        a, b = client.links
        ja = client.submit(hold, (str(tmp_path / "a"),), pin=a)
        jb = client.submit(hold, (str(tmp_path / "b"),), pin=b)
        read_marker(str(tmp_path / "a"))
        read_marker(str(tmp_path / "b"))
        # close(cancel=True) right behind close_link(), in one loop turn
        # (from user threads the loop usually finishes the close in between).
        client.call(lambda: (client.close_link(a), client.loop.call_soon(client._cancel_all)))
        client.close(timeout=3)
        assert isinstance(jb.future.exception(0), JobCancelled)
        assert ja.future.done()
    finally:
        client.close()
