"""Big queues (issue 16), untimed: counts and bytes, not clocks.

A queued no-op task costs the client at most 1.5 KB (tracemalloc, while a
job holds the only worker).  Maps over huge generators run in bounded
memory: inputs are read only a stated window ahead of the consumer.

- ``Executor.map(..., buffersize=b, chunksize=c)``: at most ``b`` chunks
  submitted and not yet yielded, so ``(b + 1) * c`` inputs read ahead.
- ``Pool.imap`` / ``imap_unordered``: at most ``max(64, 8 * processes)``
  chunks in flight (the window), so ``(window + 1) * chunksize`` read ahead.
"""
import gc
import itertools
import tracemalloc

import pytest

import dpool
from dpool.futures import Executor

TEN_MILLION = 10_000_000


class Counting:
    """A generator of ``n`` ints that counts how many were read."""

    def __init__(self, n=TEN_MILLION):
        self.n, self.read = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield i


def inc(x):
    return x + 1


def fail_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x


def hold(gate):
    """Keep the worker busy until ``gate`` exists."""
    import os
    import time
    while not os.path.exists(gate):
        time.sleep(0.01)


def queued_bytes(submit, n=20_000):
    """tracemalloc bytes per task for ``n`` tasks submitted and still queued."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        handles = [submit(i) for i in range(n)]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return used / n, handles


def hold_or_inc(x):
    """JobCluster's one computation: hold the worker (a gate path), or inc."""
    return hold(x) if isinstance(x, str) else x + 1


@pytest.mark.parametrize("api", ["executor", "pool", "cluster"])
def test_a_queued_no_op_task_costs_the_client_at_most_1_5_kb(api, tmp_path):
    gate = str(tmp_path / "gate")
    try:
        if api == "cluster":  # (a DispyJob each, besides the core job: 1.15 KB)
            cluster = dpool.JobCluster(hold_or_inc, cpus=1, loglevel=40)
            try:
                busy = cluster.submit(gate)
                per_task, jobs = queued_bytes(cluster.submit)
                open(gate, "w").close()
                assert busy() is None, busy.exception
                assert jobs[-1]() == 20_000, jobs[-1].exception
            finally:
                cluster.close()
        elif api == "executor":
            with Executor(1) as executor:
                busy = executor.submit(hold, gate)
                per_task, futures = queued_bytes(lambda i: executor.submit(inc, i))
                open(gate, "w").close()
                assert busy.result(60) is None and futures[-1].result(60) == 20_000
        else:
            with dpool.Pool(1) as pool:
                busy = pool.apply_async(hold, (gate,))
                per_task, results = queued_bytes(lambda i: pool.apply_async(inc, (i,)))
                open(gate, "w").close()
                assert busy.get(60) is None and results[-1].get(60) == 20_000
    finally:
        open(gate, "a").close()
    assert per_task <= 1536, per_task  # (before the light futures: 2.2 KB and 3.7 KB)


@pytest.fixture
def ex():
    with Executor(2) as executor:
        yield executor


@pytest.mark.parametrize("buffersize,chunksize", [(1, 1), (4, 10), (16, 100)])
def test_executor_map_buffersize_reads_a_window_ahead(ex, buffersize, chunksize):
    source = Counting()
    results = ex.map(inc, source, chunksize=chunksize, buffersize=buffersize)
    assert source.read <= buffersize * chunksize  # submitted at once: buffersize chunks
    consumed = 0
    for consumed, value in enumerate(itertools.islice(results, 5000), 1):
        assert value == consumed
        assert source.read <= consumed + (buffersize + 1) * chunksize, (consumed, source.read)
    results.close()  # pending chunks are cancelled
    assert source.read < TEN_MILLION


def test_executor_map_buffersize_keeps_the_stdlib_semantics(ex):
    assert list(ex.map(pow, range(50), itertools.repeat(2), buffersize=3)) == \
        [i * i for i in range(50)]
    assert list(ex.map(inc, [], buffersize=2)) == []
    results = ex.map(fail_on_3, range(10), buffersize=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three"):
        next(results)
    with pytest.raises(TypeError, match="buffersize must be an integer or None"):
        ex.map(inc, range(3), buffersize=2.0)
    with pytest.raises(ValueError, match="buffersize must be None or > 0"):
        ex.map(inc, range(3), buffersize=0)


def test_executor_map_buffersize_after_shutdown_raises_from_the_iterator():
    executor = Executor(1)
    results = executor.map(inc, range(100), buffersize=2)
    assert next(results) == 1
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        list(results)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 50])
def test_pool_imap_reads_a_window_ahead(method, chunksize):
    source = Counting()
    with dpool.Pool(2) as pool:
        window = max(64, 8 * 2)
        results = getattr(pool, method)(inc, source, chunksize=chunksize)
        seen = set()
        for consumed, value in enumerate(itertools.islice(results, 5000), 1):
            seen.add(value)
            assert source.read <= consumed + (window + 1) * chunksize, (consumed, source.read)
        assert len(seen) == 5000
        if method == "imap":
            assert seen == set(range(1, 5001))
    assert source.read < TEN_MILLION
