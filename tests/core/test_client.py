"""The core Client (dpool.core.client) against real nodes: pinned jobs on a
lost node, cancels while a node closes."""

import os

import pytest

from dpool.core.client import Client
from dpool.errors import JobCancelled, NodeLost
from helpers import poll_for, read_marker
from tasks import double, hold


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
        cancel_all = client.stopping.cancel_all
        client.call(lambda: (client.close_link(a), client.loop.call_soon(cancel_all)))
        client.close(timeout=3)
        assert isinstance(jb.future.exception(0), JobCancelled)
        assert ja.future.done()
    finally:
        client.close()


def test_recover_takes_over_a_kept_session(dpool_node, node_secret, tmp_path):
    """Client.recover (what dispy's recover_jobs runs on): a session whose
    client left without BYE is taken over; its jobs, kept result and running
    job, resolve through the client's one DONE path, with their old ids."""
    first = Client([dpool_node.address], secret=node_secret,
                   session={"recover_token": "tok"}).start()
    marks = [str(tmp_path / name) for name in ("a", "b")]
    try:
        jobs = [first.submit(hold, (mark, mark + ".gate")) for mark in marks]
        for mark in marks:
            read_marker(mark)
        first.close_link(first.links[0], bye=False)  # gone without BYE: kept
        poll_for(lambda: "kept for" in dpool_node.stderr(), 10, message="the node to keep it")
    finally:
        first.close(wait=False)
    open(marks[0] + ".gate", "w").close()  # "a" ends while nobody listens: kept
    poll_for(lambda: os.path.exists(marks[0] + ".done"), 10, message="job a to end")
    second = Client([], secret=node_secret)
    try:
        refused, link = second.recover([(dpool_node.address, "unknown"),
                                        (dpool_node.address, "tok")])
        assert "keeps no results" in refused.refusal and not refused.adopted
        assert [job.id for job in link.adopted] == [job.id for job in jobs]
        open(marks[1] + ".gate", "w").close()
        pids = [read_marker(mark)[0][0] for mark in marks]
        assert [job.future.result(10) for job in link.adopted] == pids
        assert second.submit(double, (2,)).id > max(job.id for job in jobs)
    finally:
        second.close(wait=False)
