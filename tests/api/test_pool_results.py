"""dpool.Pool's results, through the public API: a map's result list is its
chunks' lists end to end (types and order kept, an error mid-map raised),
and AsyncResult.get's quick path (two calls of the future) still tells a
wait's timeout, a job's own TimeoutError, a cancelled job and a result the
worker could not send apart."""
import concurrent.futures as cf
import functools
import math
import multiprocessing
from multiprocessing.pool import MaybeEncodingError

import pytest

import dpool
import tasks


class Int(int):
    pass


ITEMS = [0, 1, -1, 255, 256, 2**31, 2**63, -(2**63) - 1, 10**40, True, False, Int(7),
         0.0, -0.0, 1.5, math.inf, "", "s", None, b"b", (1,), [2]]


@pytest.fixture
def pool():
    pool = dpool.Pool(2)
    yield pool
    pool.terminate()
    pool.join()


@pytest.mark.parametrize("chunksize", [None, 1, 3, 100])
def test_map_keeps_each_items_type_and_place(pool, chunksize):
    data = ITEMS * 5
    out = pool.map(tasks.identity, data, chunksize)
    assert out == data and type(out) is list
    assert [type(x) for x in out] == [type(x) for x in data]
    assert [math.copysign(1, x) for x in out if type(x) is float] == \
        [math.copysign(1, x) for x in data if type(x) is float]
    assert pool.map_async(tasks.identity, data, chunksize).get(timeout=60) == data


def test_map_of_nan_and_an_empty_input(pool):
    out = pool.map(tasks.identity, [math.nan] * 3)
    assert len(out) == 3 and all(math.isnan(x) for x in out)
    assert pool.map(tasks.identity, []) == []


def test_an_error_mid_map_is_raised_and_the_pool_goes_on(pool):
    with pytest.raises(ValueError, match="bad item 7"):
        pool.map(functools.partial(tasks.fail_on, bad=7), range(20), 4)
    assert pool.map(tasks.double, range(20), 4) == [2 * x for x in range(20)]


def test_get_tells_a_timeout_from_a_jobs_own_timeout_error(pool):
    slow = pool.apply_async(tasks.nap, (30,))
    with pytest.raises(multiprocessing.TimeoutError):
        slow.get(timeout=0.05)
    own = pool.apply_async(tasks.raise_timeout_error)
    with pytest.raises(TimeoutError, match="raised by the task") as info:
        own.get(timeout=60)
    assert not isinstance(info.value, multiprocessing.TimeoutError)
    assert pool.apply_async(tasks.square, (4,)).get(timeout=60) == 16


def test_get_of_an_unsendable_result_and_of_a_cancelled_job(pool):
    with pytest.raises(MaybeEncodingError):
        pool.apply_async(tasks.return_unpicklable).get(timeout=60)
    queued = [pool.apply_async(tasks.nap, (30,)) for _ in range(4)]
    pool.terminate()
    for result in queued:
        with pytest.raises((cf.CancelledError, dpool.JobCancelled)):
            result.get(timeout=60)
