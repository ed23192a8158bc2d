"""One suite, three executors: ``ProcessPoolExecutor`` (the reference),
``dpool.futures.Executor`` on local workers, and the same on a
``dpool-node`` subprocess ("remote", over TCP with a secret).

Where dpool differs from the stdlib on purpose, the test branches on
``kind`` and says why (docs/executor-and-pool.md lists the same points).
"""
import asyncio
import concurrent.futures as cf
import gc
import os
import re
import sys
import threading
import time
import weakref

import pytest

from dpool.errors import WorkerLost
from dpool.futures import Executor
import tasks
from helpers import poll_for

KINDS = ["stdlib", "dpool", "remote"]
#: How long a test waits for a result: a bound against hangs, not a timing.
#: The first result of a new executor includes its start-up (under pytest a
#: local Executor starts its zygote as a fresh interpreter, since
#: faulthandler's watchdog thread rules out forking it; the stdlib spawns
#: its workers), which took more than 5 s on 2 cores at load average 20-40.
RESULT = 30


@pytest.fixture(scope="module")
def resource_tracker():
    """The stdlib's "spawn" start method (used with max_tasks_per_child)
    starts a resource-tracker process that lives as long as this process:
    start it before the leak check's snapshot."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def make(kind, remote_node, resource_tracker):
    """make(*args, **kwargs) -> a new executor of this kind, shut down after the test.

    (The module's node is requested by every test so that it starts before
    the per-test leak check takes its snapshot.)"""
    made = []

    def make(*args, **kwargs):
        if kind == "stdlib":
            executor = cf.ProcessPoolExecutor(*args, **kwargs)
        elif kind == "dpool":
            executor = Executor(*args, **kwargs)
        else:
            executor = Executor(*args, nodes=[remote_node.address], secret=remote_node.secret,
                                **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make):
    return make(2)


# ------------------------------------------------------------------ results

def test_submit_returns_a_standard_future(executor):
    future = executor.submit(tasks.add, 1, 2, c=3)
    assert isinstance(future, cf.Future)
    assert future.result(RESULT) == 6


def test_fn_is_positional_only(executor):
    # The stdlib's submit(fn, /, *args, **kwargs): "fn" can be a keyword of the task.
    assert executor.submit(dict, fn=1).result(RESULT) == {"fn": 1}


def test_many_submits_all_resolve(executor):
    futures = [executor.submit(tasks.square, i) for i in range(300)]
    assert [f.result(10) for f in futures] == [i * i for i in range(300)]


def test_wait_and_as_completed(executor):
    futures = [executor.submit(tasks.nap, 0.01 * (i % 3), i) for i in range(12)]
    done, not_done = cf.wait(futures, timeout=10)
    assert not not_done
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=10)) == list(range(12))


def test_asyncio_wrap_future(executor):
    async def main():
        return await asyncio.wait_for(asyncio.wrap_future(executor.submit(tasks.square, 7)), 10)

    assert asyncio.run(main()) == 49


@pytest.mark.parametrize("chunksize", [1, 3, 50])
def test_map_in_order(executor, chunksize):
    results = executor.map(tasks.add, range(20), range(100, 115), chunksize=chunksize)
    assert list(results) == [a + b for a, b in zip(range(20), range(100, 115))]


def _buffered(kind, buffersize):
    """map's buffersize argument (the stdlib has it from 3.14 on)."""
    if buffersize is None or (kind == "stdlib" and sys.version_info < (3, 14)):
        return {}
    return {"buffersize": buffersize}


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_over_a_range(executor, kind, chunksize):
    # dpool sends each chunk of a range as a range (its slices are ranges)
    for r in [range(0, 50, 3), range(40, -7, -4), range(5, 5), range(10**12, 10**12 + 9)]:
        assert list(executor.map(tasks.square, r, chunksize=chunksize)) == [x * x for x in r]
        results = executor.map(tasks.square, r, chunksize=chunksize, **_buffered(kind, 2))
        assert list(results) == [x * x for x in r]


@pytest.mark.parametrize("buffersize", [None, 1])
def test_map_closed_in_the_middle_of_a_chunk_yields_nothing_more(executor, kind, buffersize):
    results = executor.map(tasks.square, range(10), chunksize=5, **_buffered(kind, buffersize))
    assert next(results) == 0
    results.close()
    with pytest.raises(StopIteration):
        next(results)
    results.close()  # (again: nothing happens, as for a generator)


@pytest.mark.parametrize("buffersize", [None, 1])
def test_map_is_over_after_its_error(executor, kind, buffersize):
    results = executor.map(tasks.fail_on, range(6), [3] * 6, chunksize=2,
                           **_buffered(kind, buffersize))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)  # the chunk [2, 3] failed as a whole, as the stdlib's
    assert list(results) == []


def test_map_over_a_range_longer_than_sys_maxsize_with_buffersize(executor, kind):
    # len() of such a range raises OverflowError: with buffersize the
    # stdlib (3.14) reads it lazily, so must dpool
    if kind == "stdlib" and sys.version_info < (3, 14):
        pytest.skip("the stdlib's buffersize is 3.14+")
    huge = range(sys.maxsize, 2 * sys.maxsize + 10, 1)
    results = executor.map(tasks.square, huge, chunksize=3, buffersize=2)
    assert [next(results) for _ in range(7)] == [x * x for x in huge[:7]]
    results.close()


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_over_two_iterables_stopiteration_is_an_error(executor, chunksize):
    # fn raising StopIteration is an error at its item, not the end of the
    # results (the stdlib's generator turns it into RuntimeError)
    results = executor.map(tasks.stop_on, range(6), [3] * 6, chunksize=chunksize)
    assert [next(results) for _ in range(2)] == [0, 1]
    with pytest.raises(RuntimeError):
        list(results)


def test_map_is_ordered_even_when_late_tasks_finish_first(executor):
    delays = [0.2, 0.1, 0.0, 0.0]
    assert list(executor.map(tasks.nap, delays, range(4))) == [0, 1, 2, 3]


def test_map_empty(executor):
    assert list(executor.map(tasks.square, [])) == []


def test_map_submits_at_call_not_at_iteration(executor):
    results = executor.map(tasks.getpid, range(4))  # nothing consumed yet
    poll_for(lambda: True)
    executor.shutdown(wait=True)  # the work was already submitted
    assert len(list(results)) == 4


def test_map_bad_chunksize(executor):
    with pytest.raises(ValueError):
        executor.map(tasks.square, [1], chunksize=0)


def test_map_timeout_never_blocks_past_it(executor, tmp_path):
    gate = str(tmp_path / "gate")
    results = executor.map(tasks.count_and_hold, [str(tmp_path / "log")], [gate], timeout=0.1)
    try:
        with pytest.raises(TimeoutError):  # (the call holds until the gate opens)
            next(results)
    finally:
        open(gate, "w").close()


def test_map_closed_early_cancels_the_rest(make, tmp_path):
    executor = make(1)
    log, first, rest = (str(tmp_path / name) for name in ("log", "first", "rest"))
    open(first, "w").close()
    results = executor.map(tasks.count_and_hold, [log] * 40, [first] + [rest] * 39)
    next(results)
    results.close()  # what a `break` out of a for loop does
    open(rest, "w").close()  # (what was not cancelled runs now)
    executor.shutdown(wait=True)
    with open(log) as f:
        assert len(f.readlines()) < 10  # a call or two may have started, not the 40


def test_map_closed_early_cancels_the_calls_sent_ahead(make, kind, tmp_path):
    """Calls a node holds unstarted count as not started: after a quick
    first call the client sends the rest ahead (its read-ahead grows as
    calls get shorter), and closing the iterator cancels those too, as the
    stdlib's map cancels the calls not started (at most one per worker
    more than those running may start, as the stdlib's call queue)."""
    if kind == "stdlib":
        pytest.skip("dpool's read-ahead: the stdlib queues max_workers + 1 calls")
    executor = make(1)
    assert list(executor.map(abs, range(-100, 0))) == list(range(100, 0, -1))  # (short calls:
    log, first, rest = (str(tmp_path / name) for name in ("log", "first", "rest"))  # a read-ahead)
    open(first, "w").close()
    results = executor.map(tasks.count_and_hold, [log] * 40, [first] + [rest] * 39)
    next(results)
    links = executor._client.links
    poll_for(lambda: sum(len(link.in_flight) for link in links) > 3,
             message="more calls sent ahead to the node than one running and one held")
    results.close()
    open(rest, "w").close()
    executor.shutdown(wait=True)
    with open(log) as f:
        assert len(f.readlines()) <= 3  # the first, the one running, the one held next


# --------------------------------------------------------------- exceptions

def test_exception_keeps_type_and_remote_traceback(executor):
    future = executor.submit(tasks.raise_value_error, "from the task")
    with pytest.raises(ValueError, match="from the task") as info:
        future.result(RESULT)
    cause = info.value.__cause__
    assert cause is not None and "raise_value_error" in str(cause)
    assert "Traceback" in str(cause)
    assert isinstance(cause, cf.process._RemoteTraceback)  # what code checks for


def test_map_raises_at_the_failing_item_after_earlier_results(executor):
    results = executor.map(tasks.fail_on, range(6), [3] * 6)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)


def test_task_raising_timeout_error_is_not_a_timeout(executor):
    future = executor.submit(tasks.raise_timeout_error)
    with pytest.raises(TimeoutError, match="raised by the task"):
        future.result(RESULT)


def test_result_timeout_never_blocks_past_it(executor):
    future = executor.submit(tasks.nap, 0.5, "late")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.1)
    assert time.monotonic() - start < 0.4
    assert future.result(RESULT) == "late"


def test_unpicklable_result_fails_the_future(executor):
    future = executor.submit(tasks.return_unpicklable)
    with pytest.raises(TypeError, match="lock") as info:  # the pickler's own error
        future.result(RESULT)
    assert isinstance(info.value.__cause__, cf.process._RemoteTraceback)
    assert executor.submit(tasks.square, 3).result(RESULT) == 9


@pytest.mark.parametrize("arg, error", [(tasks.Unpicklable, TypeError),
                                        (tasks.RaisesOnReduce, tasks.ReduceError)])
def test_unpicklable_argument_fails_the_future(executor, arg, error):
    # The stdlib (and dpool) return a future, which fails with the pickler's
    # own exception (or whatever __reduce__ raised), traceback as its cause.
    future = executor.submit(tasks.identity, arg())
    with pytest.raises(error) as info:
        future.result(RESULT)
    assert isinstance(info.value.__cause__, cf.process._RemoteTraceback)
    results = executor.map(tasks.identity, [1, arg()])
    assert next(results) == 1
    with pytest.raises(error):
        next(results)
    assert executor.submit(tasks.square, 3).result(RESULT) == 9


def test_worker_process_names(executor, kind):
    names = {name for name, _ in executor.map(tasks.process_name, range(8))}
    assert "MainProcess" not in names
    assert all(re.fullmatch(r"ForkProcess-\d+", name) for name in names), names


def test_an_argument_is_freed_once_its_future_is_dropped(executor):
    """Nothing keeps what was given to submit (the callable included) once
    the caller dropped the future: long-running executors don't grow."""
    data, holder = tasks.Weakrefable(), tasks.Weakrefable()
    refs = [weakref.ref(data), weakref.ref(holder)]
    future = executor.submit(tasks.identity, data)
    assert future.result(RESULT).__class__ is tasks.Weakrefable
    future = executor.submit(holder.method, 2)  # a bound method: holds its object
    assert future.result(RESULT) == 2
    del data, holder, future
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


@pytest.mark.parametrize("crash", [tasks.exit_worker, tasks.kill_worker])
def test_task_that_kills_its_worker(executor, kind, crash):
    future = executor.submit(crash)
    if kind == "stdlib":
        # The stdlib breaks the whole pool.
        with pytest.raises(cf.process.BrokenProcessPool):
            future.result(RESULT)
        with pytest.raises(cf.process.BrokenProcessPool):
            executor.submit(tasks.square, 3)
    else:
        # dpool on purpose: only that task fails; the worker is replaced and
        # the executor keeps working.
        with pytest.raises(WorkerLost, match="worker process") as info:
            future.result(RESULT)
        # Also a BrokenProcessPool, for code that catches that.
        assert isinstance(info.value, cf.process.BrokenProcessPool)
        assert executor.submit(tasks.square, 3).result(RESULT) == 9


# ------------------------------------------------------------------- cancel

def test_cancel_a_queued_future(make):
    executor = make(1)
    futures = [executor.submit(tasks.nap, 0.05, i) for i in range(8)]
    last = futures[-1]
    assert last.cancel()
    assert last.cancelled()
    with pytest.raises(cf.CancelledError):
        last.result(0)
    assert [f.result(RESULT) for f in futures[:-1]] == list(range(7))


def test_a_running_future_cannot_be_cancelled(make):
    executor = make(1)
    future = executor.submit(tasks.nap, 0.3, "ran")
    poll_for(future.running, 5, message="the task to start")
    assert not future.cancel()
    assert future.result(RESULT) == "ran"


# ----------------------------------------------------------------- shutdown

def test_submit_after_shutdown_raises(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(tasks.square, 2)
    with pytest.raises(RuntimeError):
        executor.map(tasks.square, [1])
    executor.shutdown()  # twice is fine


def test_shutdown_waits_for_submitted_work(executor):
    futures = [executor.submit(tasks.nap, 0.05, i) for i in range(6)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(6))


def test_shutdown_without_wait_returns_and_work_completes(executor, tmp_path):
    gate = str(tmp_path / "gate")
    future = executor.submit(tasks.count_and_hold, str(tmp_path / "log"), gate, "done")
    executor.shutdown(wait=False)  # returns while the call holds (until the gate opens)
    assert not future.done()
    open(gate, "w").close()
    assert poll_for(future.done, RESULT, message="the future to complete")
    assert future.result() == "done"


def test_shutdown_cancel_futures_cancels_what_has_not_started(make):
    executor = make(1)
    first = executor.submit(tasks.nap, 0.2, "first")
    poll_for(first.running, 5, message="the first task to start")
    rest = [executor.submit(tasks.nap, 0.2, i) for i in range(10)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert first.result() == "first"
    assert sum(f.cancelled() for f in rest) >= 8  # at most a read-ahead had started


def test_context_manager_shuts_down(make):
    with make(2) as executor:
        future = executor.submit(tasks.nap, 0.05, 1)
    assert future.done()
    with pytest.raises(RuntimeError):
        executor.submit(tasks.square, 2)


# -------------------------------------------------------------- arguments

def test_max_workers_must_be_positive(kind):
    cls = cf.ProcessPoolExecutor if kind == "stdlib" else Executor
    for bad in (0, -1):
        with pytest.raises(ValueError):
            cls(bad)


def test_initializer_must_be_callable(kind):
    cls = cf.ProcessPoolExecutor if kind == "stdlib" else Executor
    with pytest.raises(TypeError):
        cls(1, initializer=42)


def test_max_tasks_per_child_is_checked(kind):
    cls = cf.ProcessPoolExecutor if kind == "stdlib" else Executor
    with pytest.raises(TypeError):
        cls(1, max_tasks_per_child="1")
    with pytest.raises(ValueError):
        cls(1, max_tasks_per_child=0)


def test_mp_context_is_accepted(make):
    import multiprocessing

    executor = make(1, mp_context=multiprocessing.get_context("fork"))
    assert executor.submit(tasks.square, 4).result(RESULT) == 16


def test_max_tasks_per_child_replaces_workers(make):
    # The stdlib picks the "spawn" start method here (slow but correct).
    executor = make(1, max_tasks_per_child=1)
    pids = [executor.submit(tasks.getpid).result(20) for _ in range(3)]
    assert len(set(pids)) == 3


def test_initializer_runs_in_every_worker(make):
    executor = make(2, initializer=tasks.set_initialized, initargs=("ready",))
    assert set(executor.map(tasks.get_initialized, range(8))) == {"ready"}


def test_failing_initializer_breaks_the_executor(make):
    executor = make(1, initializer=tasks.failing_initializer)

    def submit_fails():
        # code written for the stdlib catches this, from submit() once the
        # break is known (a worker may start, and fail, before the first
        # submit: a remote node starts one at once), else from result()
        try:
            executor.submit(tasks.square, 2).result(RESULT)
        except cf.process.BrokenProcessPool:
            return True
        return False

    assert submit_fails()
    assert poll_for(submit_fails, message="the executor to be broken")


# -------------------------------------------------- functions dpool can ship

def _closure_factory(k):
    def times_k(x):
        return k * x
    return times_k


MAIN_STYLE = [pytest.param(lambda x: x + 1, 3, id="lambda"),
              pytest.param(_closure_factory(5), 10, id="closure")]


@pytest.mark.parametrize("fn, expected", MAIN_STYLE)
def test_lambdas_and_closures(executor, kind, fn, expected):
    future = executor.submit(fn, 2)
    if kind == "stdlib":
        # The stdlib pickles functions by reference: it cannot ship these.
        with pytest.raises(Exception, match="pickle|attribute"):
            future.result(RESULT)
    else:
        # dpool ships them by value (cloudpickle), once per node.
        assert future.result(RESULT) == expected
        assert list(executor.map(fn, [2, 2], chunksize=2)) == [expected, expected]


def test_main_module_function(executor, kind):
    namespace = {"__name__": "__main__"}
    exec("def triple(x):\n    return 3 * x\n", namespace)
    triple = namespace["triple"]
    assert triple.__module__ == "__main__"
    future = executor.submit(triple, 4)
    if kind == "stdlib":
        with pytest.raises(Exception, match="pickle|attribute|triple"):
            future.result(RESULT)
    else:
        assert future.result(RESULT) == 12


# ----------------------------------------------------------- dpool placement

def test_remote_placement_runs_on_the_node(kind, make):
    if kind != "remote":
        pytest.skip("about the remote placement only")
    executor = make(2)
    pids = set(executor.map(tasks.getpid, range(8)))
    assert os.getpid() not in pids
    assert executor._client.nodes()[0].address != "embedded"


def test_executor_threads_do_not_grow_per_task(executor):
    for i in range(50):
        executor.submit(tasks.square, i)
    before = threading.active_count()
    executor.submit(tasks.square, 1).result(RESULT)
    assert threading.active_count() <= before + 1
