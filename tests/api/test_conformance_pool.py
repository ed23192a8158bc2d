"""One suite, three pools: ``multiprocessing.Pool`` (the reference),
``dpool.Pool`` on local workers, and the same on a ``dpool-node``
subprocess ("remote", over TCP with a secret).

Where dpool differs from multiprocessing on purpose, the test branches on
``kind`` and says why (docs/executor-and-pool.md lists the same points).
"""
import collections.abc
import functools
import gc
import concurrent.futures.process
import multiprocessing
import multiprocessing.pool
import re
import sys
import threading
import time
import warnings
import weakref

import pytest

import dpool
from dpool.errors import BrokenCluster, WorkerLost
import tasks

KINDS = ["stdlib", "dpool", "remote"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def make(kind, remote_node):
    """make(*args, **kwargs) -> a new pool of this kind, terminated after the test.

    (The module's node is requested by every test so that it starts before
    the per-test leak check takes its snapshot.)"""
    made = []

    def make(*args, **kwargs):
        if kind == "stdlib":
            pool = multiprocessing.get_context("fork").Pool(*args, **kwargs)
        elif kind == "dpool":
            pool = dpool.Pool(*args, **kwargs)
        else:
            pool = dpool.Pool(*args, nodes=[remote_node.address], secret=remote_node.secret,
                              **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.terminate()
        pool.join()
    if kind == "stdlib":
        for pool in made:
            _release_pipes(pool)
    made.clear()


def _release_pipes(pool):
    """multiprocessing closes a pool's pipes only when the pool is garbage
    collected, which a pending result can delay past the leak check: close
    them here (test code only; these are multiprocessing's private names)."""
    for pipe in (pool._inqueue, pool._outqueue, pool._change_notifier):
        pipe._reader.close()
        pipe._writer.close()
    for process in pool._pool:
        process.close()


@pytest.fixture
def pool(make):
    return make(2)


def pool_class(kind):
    return multiprocessing.Pool if kind == "stdlib" else dpool.Pool


# ------------------------------------------------------------------ results

def test_apply(pool):
    assert pool.apply(tasks.add, (1, 2), {"c": 3}) == 6


def test_apply_async(pool):
    result = pool.apply_async(tasks.add, (1,), {"b": 2})
    assert result.get(5) == 3
    assert result.ready() and result.successful()


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_map_and_starmap(pool, chunksize):
    assert pool.map(tasks.square, range(50), chunksize) == [i * i for i in range(50)]
    pairs = [(i, 10 * i) for i in range(30)]
    assert pool.starmap(tasks.add, pairs, chunksize) == [a + b for a, b in pairs]


RANGES = [range(0, 50, 3), range(40, -7, -4), range(5, 5), range(10**12, 10**12 + 9)]


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_map_over_a_range(pool, chunksize):
    # dpool sends each chunk of a range as a range (its slices are ranges)
    for r in RANGES:
        assert pool.map(tasks.square, r, chunksize) == [x * x for x in r]
        assert pool.map_async(tasks.square, r, chunksize).get(5) == [x * x for x in r]
    with pytest.raises(ValueError, match="bad item 3"):
        pool.map(tasks.fail_on_3, range(8), chunksize)


def test_starmap_over_a_range_fails_as_the_stdlib(pool):
    with pytest.raises(TypeError):  # an int is no argument tuple
        pool.starmap(tasks.add, range(3))


def test_map_takes_any_iterable(pool):
    assert pool.map(tasks.square, (i for i in range(10))) == [i * i for i in range(10)]
    assert sorted(pool.map(tasks.square, {1, 2, 3})) == [1, 4, 9]


def test_map_empty(pool):
    assert pool.map(tasks.square, []) == []
    assert pool.map_async(tasks.square, []).get(5) == []


def test_map_async_and_starmap_async(pool):
    assert pool.map_async(tasks.square, range(5), 2).get(5) == [0, 1, 4, 9, 16]
    assert pool.starmap_async(tasks.add, [(1, 2), (3, 4)]).get(5) == [3, 7]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_in_order_and_imap_unordered(pool, chunksize):
    assert list(pool.imap(tasks.square, range(20), chunksize)) == [i * i for i in range(20)]
    assert sorted(pool.imap_unordered(tasks.square, range(20), chunksize)) == \
        sorted(i * i for i in range(20))


class _Table(collections.abc.Mapping):
    """A mapping whose keys are looked up, not hashed: like a dict on 3.12+
    (where slices are hashable), ``table[0:0]`` is a KeyError."""

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def __getitem__(self, key):
        for k, v in self._pairs:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._pairs)

    def __len__(self):
        return len(self._pairs)


@pytest.mark.parametrize("chunksize", [None, 1, 2])
def test_map_over_a_mapping_maps_its_keys(pool, chunksize):
    # map takes its items by iterating (a mapping's keys), never by slicing
    table = _Table((k, -k) for k in range(5))
    assert pool.map(tasks.square, table, chunksize) == [k * k for k in range(5)]
    assert pool.starmap(tasks.add, _Table(((k, 1), k) for k in range(3)), chunksize) == [1, 2, 3]


def test_imap_over_a_range_longer_than_sys_maxsize(pool, kind):
    # imap takes any iterable: a range whose len() raises OverflowError too
    # (multiprocessing's task thread reads the whole input ahead, so here
    # it would not finish: dpool's imap reads a window ahead)
    if kind == "stdlib":
        pytest.skip("multiprocessing's imap reads its whole input ahead")
    huge = range(sys.maxsize, 2 * sys.maxsize + 10)
    for it in (pool.imap(tasks.square, huge, 3), pool.imap_unordered(tasks.square, huge)):
        assert len([next(it) for _ in range(5)]) == 5


def test_map_over_a_range_longer_than_sys_maxsize_is_an_overflow_error(pool):
    with pytest.raises(OverflowError):
        pool.map(tasks.square, range(sys.maxsize, 2 * sys.maxsize + 10))


def test_imap_is_ordered_even_when_late_tasks_finish_first(pool):
    delays = [0.2, 0.1, 0.0, 0.0]
    assert list(pool.imap(tasks.nap, [0.2, 0.1, 0.0, 0.0])) == [None] * len(delays)
    args = [(d, i) for i, d in enumerate(delays)]
    assert pool.starmap(tasks.nap, args, 1) == [0, 1, 2, 3]


def test_imap_unordered_yields_in_completion_order(pool):
    it = pool.imap_unordered(tasks.nap_for, [0.3, 0.0])
    assert next(it) == 0.0  # the quick one; the slow one is still running
    assert next(it) == 0.3


def test_imap_next_timeout(pool, tmp_path):
    gate = str(tmp_path / "gate")
    it = pool.imap(functools.partial(tasks.count_and_hold, str(tmp_path / "log")), [gate])
    with pytest.raises(multiprocessing.TimeoutError):  # (the call holds until the gate opens)
        it.next(timeout=0.1)
    open(gate, "w").close()
    assert it.next(timeout=30) is None


def test_imap_rejects_bad_chunksize(pool):
    with pytest.raises(ValueError):
        pool.imap(tasks.square, [1], 0)


def test_imap_of_an_unconsumed_iterator_survives_close_and_join(make):
    pool = make(2)
    it = pool.imap(tasks.square, range(300))
    pool.close()
    pool.join()
    assert list(it) == [i * i for i in range(300)]


# --------------------------------------------------------------- exceptions

def test_exception_keeps_type_and_remote_traceback(pool):
    result = pool.apply_async(tasks.raise_value_error, ("from the task",))
    with pytest.raises(ValueError, match="from the task") as info:
        result.get(5)
    assert not result.successful()
    cause = info.value.__cause__
    assert cause is not None and "raise_value_error" in str(cause)
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback)  # what code checks for


def test_map_raises_the_error(pool):
    with pytest.raises(ValueError, match="bad item 3"):
        pool.starmap(tasks.fail_on, [(i, 3) for i in range(8)], 2)


def test_imap_raises_in_place_and_goes_on(pool):
    it = pool.imap(tasks.die_or_value, [1, 2, 3])  # nothing dies; just the protocol
    assert list(it) == [1, 2, 3]
    it = pool.imap(tasks.raise_value_error, ["x"])
    with pytest.raises(ValueError, match="x"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    it = pool.imap(tasks.fail_on_3, [1, 3, 5], 1)
    assert next(it) == 1
    with pytest.raises(ValueError):
        it.next(timeout=5)
    assert next(it) == 5  # chunksize 1: the error took one item's place


def test_chunked_imap_after_a_failed_chunk(pool, kind):
    it = pool.imap(tasks.fail_on_3, range(1, 7), 3)
    with pytest.raises(ValueError):
        next(it)  # the first chunk, [1, 2, 3], failed as a whole
    if kind == "stdlib":
        # multiprocessing's chunked imap is a plain generator: it is over.
        assert list(it) == []
    else:
        # dpool's is the same iterator for any chunksize: later chunks follow.
        assert list(it) == [4, 5, 6]


def test_get_timeout_never_blocks_past_it(pool, tmp_path):
    gate = str(tmp_path / "gate")
    result = pool.apply_async(tasks.count_and_hold, (str(tmp_path / "log"), gate, "late"))
    try:
        with pytest.raises(multiprocessing.TimeoutError):  # (the call holds until the gate opens)
            result.get(timeout=0.1)
        assert not result.ready()
    finally:
        open(gate, "w").close()
    with pytest.raises(ValueError):
        result.successful()  # not ready yet
    result.wait(5)
    assert result.ready() and result.get(0) == "late"


def test_task_raising_timeout_error_is_not_a_timeout(pool):
    with pytest.raises(TimeoutError, match="raised by the task"):
        pool.apply(tasks.raise_timeout_error)


@pytest.mark.parametrize("arg, error", [(tasks.Unpicklable, TypeError),
                                        (tasks.RaisesOnReduce, tasks.ReduceError)])
def test_unpicklable_argument(pool, arg, error):
    # The pickler's own exception (or what __reduce__ raised): through the
    # result for apply_async, from the call for map.
    result = pool.apply_async(tasks.identity, (arg(),))
    with pytest.raises(error):
        result.get(5)
    with pytest.raises(error):
        pool.map(tasks.identity, [1, arg()])
    with pytest.raises(error):
        pool.apply(tasks.identity, (arg(),))
    assert pool.apply(tasks.square, (3,)) == 9


def test_unpicklable_result(pool):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="lock") as info:
        pool.apply_async(tasks.return_unpicklable).get(5)
    assert "Unpicklable object" in info.value.value
    assert "TypeError" in info.value.exc
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="lock"):
        pool.apply(tasks.return_unpicklable)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError,
                       match=r"Error sending result: '\[<tasks.Unpicklable"):
        pool.map(tasks.return_unpicklable, [1], chunksize=1)
    assert pool.apply(tasks.square, (3,)) == 9


@pytest.mark.parametrize("task", [tasks.return_unpicklable,
                                  functools.partial(tasks.raise_value_error, "bad")],
                         ids=["unsendable-result", "raised"])
def test_get_of_a_failed_task_raises_the_same_error_each_time(pool, task):
    # multiprocessing's get() raises the one error it got, each time (the
    # object error_callback is given); an unsendable result's
    # MaybeEncodingError used to be made anew by each get().
    result = pool.apply_async(task)
    result.wait(5)

    def raised():
        with pytest.raises(Exception) as info:
            result.get(5)
        return info.value

    first = raised()
    assert raised() is first


def test_a_pool_reachable_only_through_its_results_runs_them(kind, remote_node, tmp_path):
    # multiprocessing's results hold their pool until they are ready, so
    # ``Pool().apply_async(f).get()`` works; dpool's pool was collected at
    # once and terminated: the jobs were cancelled.
    if kind == "remote":
        pool = dpool.Pool(1, nodes=[remote_node.address], secret=remote_node.secret)
    else:
        pool = pool_class(kind)(1)
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    results = [pool.apply_async(tasks.count_and_hold, (log, gate, "plain")),
               pool.apply_async(tasks.count_and_hold, (log, gate, "called"), callback=len),
               pool.map_async(tasks.square, [3])]
    alive = weakref.ref(pool)
    del pool
    gc.collect()
    open(gate, "w").close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # (the pool was never closed)
        assert [result.get(30) for result in results] == ["plain", "called", [9]]
        pool = alive()
        if pool is not None:
            pool.terminate()
            pool.join()
            if kind == "stdlib":
                _release_pipes(pool)
        del pool, results
        gc.collect()


def test_worker_process_names(pool):
    names = {name for name, _ in pool.map(tasks.process_name, range(8), chunksize=1)}
    assert "MainProcess" not in names
    assert all(re.fullmatch(r"ForkPoolWorker-\d+", name) for name in names), names


@pytest.mark.parametrize("crash", [tasks.exit_worker, tasks.kill_worker])
def test_task_that_kills_its_worker(pool, kind, crash):
    result = pool.apply_async(crash)
    if kind == "stdlib":
        # multiprocessing replaces the worker but loses the task: get()
        # would wait forever.
        result.wait(0.5)
        assert not result.ready()
        del result  # it stays pending: let the pool be collected
    else:
        # dpool on purpose: the task fails with WorkerLost; the pool goes on.
        with pytest.raises(WorkerLost) as info:
            result.get(5)
        assert isinstance(info.value, concurrent.futures.process.BrokenProcessPool)
    assert pool.apply(tasks.square, (3,)) == 9


# ---------------------------------------------------------------- callbacks

def test_callbacks_run_before_get_returns_in_one_thread(pool):
    seen, threads = [], set()

    def callback(value):
        threads.add(threading.get_ident())
        seen.append(value)

    results = [pool.apply_async(tasks.square, (i,), callback=callback) for i in range(10)]
    for result in results:
        result.get(5)
    assert sorted(seen) == [i * i for i in range(10)]
    assert len(threads) == 1 and threading.get_ident() not in threads
    out = []
    assert pool.map_async(tasks.square, range(4), callback=out.append).get(5) == [0, 1, 4, 9]
    assert out == [[0, 1, 4, 9]]


def test_error_callback(pool):
    errors = []
    result = pool.apply_async(tasks.raise_value_error, ("cb",), error_callback=errors.append)
    with pytest.raises(ValueError):
        result.get(5)
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    result = pool.map_async(tasks.fail_on_3, [1, 3], callback=errors.append,
                            error_callback=errors.append)
    with pytest.raises(ValueError):
        result.get(5)
    assert len(errors) == 2 and isinstance(errors[1], ValueError)


def test_callbacks_run_in_completion_order(pool):
    order = []
    slow = pool.apply_async(tasks.nap, (0.3, "slow"), callback=order.append)
    fast = pool.apply_async(tasks.nap, (0.0, "fast"), callback=order.append)
    fast.get(5)
    slow.get(5)
    assert order == ["fast", "slow"]


def test_a_raising_callback_does_not_kill_the_pool(pool, kind):
    if kind == "stdlib":
        pytest.skip("multiprocessing: the exception kills the result-handler thread "
                    "and every later result hangs; dpool logs it and goes on")

    def bad(value):
        raise RuntimeError("callback bug")

    pool.apply_async(tasks.square, (2,), callback=bad).wait(5)
    out = []
    assert pool.apply_async(tasks.square, (3,), callback=out.append).get(5) == 9
    assert out == [9]


# --------------------------------------------------- close / join / terminate

def test_close_then_join_finishes_the_work(pool):
    results = [pool.apply_async(tasks.nap, (0.05, i)) for i in range(6)]
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(tasks.square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(tasks.square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        pool.imap(tasks.square, [1])
    pool.join()
    assert [r.get(0) for r in results] == list(range(6))


def test_join_before_close_raises(pool):
    with pytest.raises(ValueError):
        pool.join()
    assert pool.apply(tasks.square, (2,)) == 4  # still usable


def test_terminate_stops_running_work(pool, kind):
    result = pool.apply_async(tasks.nap, (30, "never"))
    time.sleep(0.05)
    start = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - start < 25  # not the call's 30 s
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(tasks.square, (1,))
    if kind == "stdlib":
        assert not result.ready()  # multiprocessing leaves it pending forever
        del result  # (so that the pool can be collected)
    else:
        # dpool on purpose: every result resolves (no hang); this one failed.
        assert result.ready() and not result.successful()


def test_context_manager_terminates(make):
    with make(2) as pool:
        assert pool.apply(tasks.square, (5,)) == 25
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(tasks.square, (1,))


def test_pool_cannot_be_pickled(make):
    import pickle

    with pytest.raises(NotImplementedError):
        pickle.dumps(make(1))


# -------------------------------------------------------------- arguments

def test_processes_must_be_positive(kind):
    for bad in (0, -2):
        with pytest.raises(ValueError):
            pool_class(kind)(bad)


def test_maxtasksperchild_is_checked(kind):
    for bad in (0, -1, "2", 1.5):
        with pytest.raises(ValueError):
            pool_class(kind)(1, maxtasksperchild=bad)


def test_initializer_must_be_callable(kind):
    with pytest.raises(TypeError):
        pool_class(kind)(1, initializer=42)


def test_initializer_runs_in_every_worker(make):
    pool = make(2, tasks.set_initialized, ("ready",))
    assert set(pool.map(tasks.get_initialized, range(8), 1)) == {"ready"}


def test_maxtasksperchild_replaces_workers(make):
    pool = make(1, maxtasksperchild=1)
    pids = [pool.apply(tasks.getpid) for _ in range(3)]
    assert len(set(pids)) == 3


def test_failing_initializer(make, kind):
    if kind == "stdlib":
        pytest.skip("multiprocessing restarts the failing workers forever: get() hangs")
    # dpool on purpose: the pool breaks and says why.
    pool = make(1, initializer=tasks.failing_initializer)
    with pytest.raises(BrokenCluster, match="initializer"):
        pool.apply_async(tasks.square, (2,)).get(10)


# -------------------------------------------------- functions dpool can ship

def test_lambda(pool, kind):
    fn = lambda x: x * 10  # noqa: E731
    if kind == "stdlib":
        # multiprocessing pickles functions by reference: it cannot ship it.
        with pytest.raises(Exception, match="pickle|attribute"):
            pool.apply_async(fn, (2,)).get(5)
    else:
        assert pool.apply(fn, (2,)) == 20
        assert pool.map(fn, range(4)) == [0, 10, 20, 30]
        assert list(pool.imap_unordered(fn, [1])) == [10]


def test_terminate_runs_none_of_the_imap_calls_sent_ahead(make, kind, tmp_path):
    """terminate() with an imap's calls sent ahead to the node (the
    client's read-ahead after quick calls: their futures run from the send)
    runs none of those not started, as the stdlib's terminate (the tasks
    in its queue never run); only the one running and the one held next
    may have started."""
    from helpers import poll_for

    pool = make(1)
    assert pool.map(abs, range(-100, 0)) == list(range(100, 0, -1))  # (short calls: a read-ahead)
    log, first, rest = (str(tmp_path / name) for name in ("log", "first", "rest"))
    open(first, "w").close()
    results = pool.imap(functools.partial(tasks.count_and_hold, log), [first] + [rest] * 39)
    next(results)
    if kind != "stdlib":
        links = pool._client.links
        poll_for(lambda: sum(len(link.in_flight) for link in links) > 3,
                 message="more calls sent ahead to the node than one running and one held")
    pool.terminate()
    open(rest, "w").close()  # (what was not stopped runs now)
    pool.join()
    with open(log) as f:
        assert len(f.readlines()) <= 3
