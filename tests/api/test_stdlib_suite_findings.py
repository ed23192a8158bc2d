"""Departures from the stdlib found by running CPython's own suites
(test_concurrent_futures, _test_multiprocessing's Pool tests) against dpool:
each test here pins one fix, on local workers and on a ``dpool-node``
("remote").  docs/executor-and-pool.md "External suites" lists the runs.
"""
import gc
import sys
import weakref

import pytest

import dpool
from dpool.futures import Executor

KINDS = ["dpool", "remote"]
#: A bound against hangs, not a timing.
RESULT = 30


class ExitsWhenUnpickled:
    """A result whose unpickling (in the client) raises SystemExit."""

    def __reduce__(self):
        return sys.exit, (3,)


def return_exiting():
    return ExitsWhenUnpickled()


class Payload:
    """A result object to hold weak references to."""


def make_payload(_):
    return Payload()


def double(x):
    return 2 * x


@pytest.fixture(params=KINDS)
def nodes(request, remote_node):
    """The keywords that make an Executor or Pool of this kind."""
    if request.param == "dpool":
        return {}
    return {"nodes": [remote_node.address], "secret": remote_node.secret}


def test_a_result_that_exits_when_unpickled_fails_its_future(nodes):
    # CPython's test_exit_during_result_unpickle_in_result_handler: the
    # future never resolved (the SystemExit escaped the client's handler).
    with Executor(1, **nodes) as executor:
        future = executor.submit(return_exiting)
        with pytest.raises(SystemExit):
            future.result(timeout=RESULT)
        assert executor.submit(double, 21).result(timeout=RESULT) == 42


def _interrupt():
    raise KeyboardInterrupt("raised by a result's unpickling")


class InterruptsWhenUnpickled:
    """A result whose unpickling (in the client) raises KeyboardInterrupt."""

    def __reduce__(self):
        return _interrupt, ()


def return_interrupting():
    return InterruptsWhenUnpickled()


def test_a_result_that_interrupts_when_unpickled_fails_its_future(nodes):
    # As the stdlib's manager thread takes any BaseException from a result's
    # unpickling: the KeyboardInterrupt (not a Ctrl-C: raised in the client's
    # loop thread) was re-raised there, ending the loop thread: the future
    # never resolved and the executor took no more work.
    with Executor(1, **nodes) as executor:
        future = executor.submit(return_interrupting)
        with pytest.raises(KeyboardInterrupt):
            future.result(timeout=RESULT)
        assert executor.submit(double, 21).result(timeout=RESULT) == 42


def test_a_pool_result_that_exits_when_unpickled_fails_its_get(nodes):
    with dpool.Pool(1, **nodes) as pool:
        with pytest.raises(SystemExit):
            pool.apply_async(return_exiting).get(timeout=RESULT)
        assert pool.apply(double, (21,)) == 42


# ------------------------------------------ multiprocessing Manager proxies
# (CPython's TestInitializers.test_pool_initializer and
# test_ressources_gced_in_workers pass proxies to the workers: local workers
# are the client's children, and as multiprocessing's children they have its
# authkey and run multiprocessing's after-fork hooks; a node's workers are
# not, docs/executor-and-pool.md.)

def add_one(ns):
    ns.count += 1
    return ns.count


def put_double(queue, x):
    queue.put(2 * x)


@pytest.fixture
def manager():
    import multiprocessing

    mgr = multiprocessing.Manager()
    yield mgr
    process = mgr._process
    mgr.shutdown()
    process.join()
    process.close()  # (its pipes, else closed only when it is collected)


def test_a_managers_proxies_work_in_local_workers(manager):
    ns = manager.Namespace()
    ns.count = 0  # (the proxy's connection, opened here)
    queue = manager.Queue()
    with dpool.Pool(1, initializer=add_one, initargs=(ns,)) as pool:
        pool.apply(put_double, (queue, 21))
        assert pool.apply(add_one, (ns,)) == 2
    assert queue.get(timeout=RESULT) == 42
    with Executor(1) as executor:
        assert executor.submit(add_one, ns).result(timeout=RESULT) == 3


FORKED_CLIENT = """
import multiprocessing, sys
sys.path.insert(0, {here!r})
import dpool
from test_stdlib_suite_findings import add_one
if __name__ == "__main__":
    mgr = multiprocessing.Manager()
    ns = mgr.Namespace()
    ns.count = 0
    with dpool.Pool(1, initializer=add_one, initargs=(ns,)) as pool:
        print(pool.apply(add_one, (ns,)))
    mgr.shutdown()
"""


def test_a_proxy_the_client_used_works_in_workers_forked_from_it(tmp_path):
    # A pool made by a single-threaded program forks its zygote from the
    # client: the proxy's connection, cached before the fork, was a stale
    # descriptor in the workers (OSError EBADF) until they ran
    # multiprocessing's after-fork hooks.
    import os
    import subprocess

    script = tmp_path / "client.py"
    script.write_text(FORKED_CLIENT.format(here=os.path.dirname(__file__)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DPOOL_NODES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"]


# ------------------------------------------------------------ map's results

@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.parametrize("buffersize", [None, 2])
def test_map_keeps_no_reference_to_a_result_once_taken(nodes, chunksize, buffersize):
    # CPython's test_free_reference (issue 14406): the iterator held the
    # chunk being read, and with it the results already taken.
    with Executor(2, **nodes) as executor:
        taken = 0
        for obj in executor.map(make_payload, range(7), chunksize=chunksize,
                                buffersize=buffersize):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None
            taken += 1
        assert taken == 7


class EqualToAll:
    """A result that says it equals anything (as mock.ANY does)."""

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return True

    __hash__ = object.__hash__


def make_equal_to_all(n):
    return EqualToAll(n)


def make_array(n):
    import numpy

    return numpy.array([n, n])


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_gives_every_result_whatever_its_eq_says(chunksize):
    # The chunk's results were popped until one compared equal to an end
    # marker (iter(pop, marker)): a result equal to anything ended the map
    # early, silently; a numpy array's == (an array) raised ValueError.
    with Executor(2) as executor:
        got = list(executor.map(make_equal_to_all, range(7), chunksize=chunksize))
        assert [r.n for r in got] == list(range(7))
        numpy = pytest.importorskip("numpy")
        arrays = list(executor.map(make_array, range(5), chunksize=chunksize))
        assert [a.tolist() for a in arrays] == [[n, n] for n in range(5)]
        del numpy


# ------------------------------------------------- submit at the exit

AT_EXIT_CLIENT = """
import atexit
from dpool.futures import Executor

@atexit.register
def run_last():
    try:
        executor.submit(abs, -1)
    except RuntimeError as exc:
        print(exc)

if __name__ == "__main__":
    executor = Executor(1)
    print(executor.submit(abs, -42).result())
"""


def test_a_submit_at_the_interpreters_exit_raises_the_stdlibs_error(tmp_path):
    # CPython's test_submit_after_interpreter_shutdown: an atexit function's
    # submit (after the executor was closed by the exit) said "the client is
    # closed".
    import os
    import subprocess

    script = tmp_path / "client.py"
    script.write_text(AT_EXIT_CLIENT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DPOOL_NODES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "42", "cannot schedule new futures after interpreter shutdown"]
