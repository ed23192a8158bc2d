"""A worker's lone result passed on by the node without the batch decoder
(8b41745, protocol.RESULT_NFRAMES): results of no, one and many payload
frames, large ones, and exceptions arrive whole, alone and in batches."""
import pytest

import dpool
from helpers import cluster_on
from tasks import identity, raise_value_error

pytestmark = pytest.mark.timeout(60)

VALUES = [None, b"", b"x" * 10, b"y" * (5 << 20),
          [bytearray(b"z" * 200_000), b"w" * 300_000, b"v" * 70_000],
          {"a": b"q" * 70_000, "b": [b"r" * 40_000] * 3}]


def test_lone_and_batched_results_of_any_frame_count(dpool_node):
    with cluster_on(dpool_node, identity) as cluster:
        for value in VALUES:  # one at a time: each result alone on the node
            assert cluster.submit(value)(timeout=30) == value
        jobs = [cluster.submit(value) for value in VALUES * 3]
        assert [job(timeout=30) for job in jobs] == VALUES * 3


def test_lone_exceptions(dpool_node):
    with cluster_on(dpool_node, raise_value_error) as cluster:
        for message in ["short", "m" * 200_000]:
            job = cluster.submit(message)
            assert job(timeout=30) is None
            assert job.status == dpool.DispyJob.Terminated
            assert "ValueError" in job.exception and message[:50] in job.exception
        ok = cluster.submit("after")
        ok(timeout=30)
        assert ok.status == dpool.DispyJob.Terminated
