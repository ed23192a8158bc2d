"""Property tests: a map's results equal the builtin ``map``'s, item for
item and type for type (bools stay bools, int and float subclasses stay
themselves, ints past 64 bits, ``-0.0`` and ``nan`` kept), whatever the mix
of items and the chunk size: ``Pool.map``, ``Pool.imap`` and
``Executor.map``, local and via a ``dpool-node``."""
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dpool
import tasks
from dpool.futures import Executor

EDGE_INTS = [0, 1, -1, 255, 256, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
             2**64, 10**40, -(10**40)]
EDGE_FLOATS = [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308]

items = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(),  # big ints too
    st.sampled_from(EDGE_INTS),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(EDGE_FLOATS),
    st.integers(min_value=-(2**70), max_value=2**70).map(tasks.IntSub),
    st.floats(allow_nan=True).map(tasks.FloatSub),
    st.none(),
    st.text(max_size=3),
)
# Homogeneous lists too (all ints, all floats: what a typed chunk codec would
# take), with the odd one out somewhere in them.
homogeneous = st.one_of(
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=300),
    st.lists(st.floats(allow_nan=True), max_size=300),
)
inputs = st.one_of(
    st.lists(items, max_size=120),
    homogeneous,
    st.tuples(homogeneous, st.integers(min_value=0, max_value=300), items).map(
        lambda t: t[0][:t[1]] + [t[2]] + t[0][t[1]:]),
)
chunksizes = st.one_of(st.none(), st.integers(min_value=1, max_value=64))


def key(x):
    """An item as a comparable value: its type and its repr (``nan`` is not
    equal to itself; ``-0.0 == 0.0``; ``True == 1``)."""
    return type(x), repr(x) if type(x) is not float or not math.isnan(x) else \
        ("nan", math.copysign(1.0, x))


def assert_same(out, data):
    expected = list(map(tasks.identity, data))
    assert type(out) is list
    assert [key(x) for x in out] == [key(x) for x in expected]


@pytest.fixture(scope="module", params=["local", "node"])
def placement(request):
    if request.param == "local":
        return {}
    node = request.getfixturevalue("remote_node")
    return {"nodes": [node.address], "secret": node.secret}


# (One per test, not per module: a node serves one client at a time.  Each
# is made once for all of its test's examples.)
@pytest.fixture
def pool(placement):
    pool = dpool.Pool(2, **placement)
    yield pool
    pool.terminate()
    pool.join()


@pytest.fixture
def executor(placement):
    with Executor(2, **placement) as ex:
        yield ex


PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(data=inputs, chunksize=chunksizes)
def test_pool_map_is_the_builtin_map(pool, data, chunksize):
    assert_same(pool.map(tasks.identity, data, chunksize), data)


@PROPERTY
@given(data=inputs, chunksize=st.integers(min_value=1, max_value=64))
def test_pool_imap_is_the_builtin_map(pool, data, chunksize):
    assert_same(list(pool.imap(tasks.identity, data, chunksize)), data)


@PROPERTY
@given(data=inputs, chunksize=st.integers(min_value=1, max_value=64))
def test_executor_map_is_the_builtin_map(executor, data, chunksize):
    assert_same(list(executor.map(tasks.identity, data, chunksize=chunksize)), data)


def test_a_range_and_a_million_ints(pool):
    """The bench's input (1M ints as a list and as a range) and its result."""
    data = list(range(1_000_000))
    out = pool.map(tasks.double, data)
    assert out == [2 * x for x in data] and all(type(x) is int for x in out[::997])
    assert pool.map(tasks.double, range(10**6)) == out
