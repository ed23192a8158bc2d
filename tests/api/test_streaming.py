"""Maps over huge generators run in bounded memory (issue 16): inputs are
read only a stated window ahead of the consumer (untimed: counts, not clocks).

- ``Executor.map(..., buffersize=b, chunksize=c)``: at most ``b`` chunks
  submitted and not yet yielded, so ``(b + 1) * c`` inputs read ahead.
- ``Pool.imap`` / ``imap_unordered``: at most ``max(64, 8 * processes)``
  chunks in flight (the window), so ``(window + 1) * chunksize`` read ahead.
"""
import itertools

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
