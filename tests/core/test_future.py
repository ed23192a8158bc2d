"""dpool.core.future: the light Future behaves as concurrent.futures.Future."""
import asyncio
import concurrent.futures as cf
import gc
import threading
import tracemalloc

import pytest

from dpool.core.future import Future, resolve, set_running


def resolver(fn):
    """Run ``fn`` in a thread once ``ready`` is set; returns (thread, ready)."""
    ready = threading.Event()

    def run():
        ready.wait(10)
        fn()
    thread = threading.Thread(target=run)
    thread.start()
    return thread, ready


def test_is_a_concurrent_futures_future_and_resolves_like_one():
    f = Future()
    assert isinstance(f, cf.Future)
    assert not f.done() and not f.running() and not f.cancelled()
    assert f.set_running_or_notify_cancel() and f.running()
    f.set_result(42)
    assert f.done() and f.result() == 42 and f.exception() is None
    with pytest.raises(cf.InvalidStateError):
        f.set_result(1)
    g = Future()
    g.set_exception(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        g.result()
    assert isinstance(g.exception(), ValueError)
    assert "raised ValueError" in repr(g) and "returned int" in repr(f)


def test_cancel_as_the_stdlib():
    f = Future()
    seen = []
    f.add_done_callback(seen.append)
    assert f.cancel() and f.cancel() and f.cancelled() and seen == [f]
    with pytest.raises(cf.CancelledError):
        f.result()
    assert f.set_running_or_notify_cancel() is False
    running = Future()
    running.set_running_or_notify_cancel()
    assert not running.cancel()
    with pytest.raises(RuntimeError):
        running.set_running_or_notify_cancel()


def test_result_timeout_and_a_waiter_woken_by_another_thread():
    f = Future()
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.01)
    thread, ready = resolver(lambda: resolve([(f, "late", None)]))
    ready.set()
    assert f.result(timeout=10) == "late"
    thread.join()


def test_resolve_a_batch_runs_callbacks_in_order_and_skips_done_futures():
    futures = [Future() for _ in range(5)]
    order = []
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    futures[2].cancel()
    order.clear()
    resolve([(f, i, None) for i, f in enumerate(futures)])
    assert order == [0, 1, 3, 4]
    assert [f.result() for i, f in enumerate(futures) if i != 2] == [0, 1, 3, 4]
    late = []
    futures[0].add_done_callback(late.append)  # already done: runs at once
    assert late == [futures[0]]


def test_a_failing_callback_is_logged_and_the_others_run(caplog):
    f = Future()
    seen = []
    f.add_done_callback(lambda _: 1 / 0)
    f.add_done_callback(seen.append)
    f.set_result(None)
    assert seen == [f] and "exception calling callback" in caplog.text


@pytest.mark.parametrize("how", ["wait", "as_completed", "wait_first"])
def test_stdlib_wait_and_as_completed(how):
    futures = [Future() for _ in range(50)]
    resolve([(f, i, None) for i, f in enumerate(futures[:10])])
    thread, ready = resolver(lambda: resolve([(f, i, None) for i, f in enumerate(futures)]))
    if how == "as_completed":
        got = []
        for n, f in enumerate(cf.as_completed(futures, timeout=10)):
            if n == 9:  # the 10 done before: now the rest
                ready.set()
            got.append(f.result())
        assert sorted(got) == list(range(50))
    else:
        ready.set()
        mode = cf.FIRST_COMPLETED if how == "wait_first" else cf.ALL_COMPLETED
        done, pending = cf.wait(futures, timeout=10, return_when=mode)
        if how == "wait":
            assert not pending
        else:
            assert done
    thread.join()


def test_wait_sees_a_cancelled_future_once_notified():
    f = Future()
    f.cancel()
    thread, ready = resolver(f.set_running_or_notify_cancel)
    ready.set()
    done, _ = cf.wait([f], timeout=10)
    assert f in done
    thread.join()


def test_asyncio_wrap_future():
    f = Future()

    async def main():
        wrapped = asyncio.wrap_future(f)
        asyncio.get_running_loop().call_soon(lambda: threading.Thread(
            target=f.set_result, args=(7,)).start())
        return await asyncio.wait_for(wrapped, 10)
    assert asyncio.run(main()) == 7


def test_many_racing_resolutions_and_waits_lose_nothing():
    """Resolver and waiters race on thousands of futures: every waiter
    wakes with its value (a lost wake-up would hang until the timeout)."""
    futures = [Future() for _ in range(3000)]
    results = []

    def consume(part):
        results.extend(f.result(timeout=30) for f in part)
    waiters = [threading.Thread(target=consume, args=(futures[i::3],)) for i in range(3)]
    for t in waiters:
        t.start()
    for i in range(0, 3000, 100):
        resolve([(f, j, None) for j, f in enumerate(futures[i:i + 100], i)])
    for t in waiters:
        t.join()
    assert sorted(results) == list(range(3000))


def test_a_future_costs_a_tenth_of_the_stdlib_one_until_waited_on():
    def per_future(make, n=20_000):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        keep = [make() for _ in range(n)]
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(keep) == n
        return used / n
    ours, stdlib = per_future(Future), per_future(cf.Future)
    assert ours < 200 and ours * 8 < stdlib, (ours, stdlib)
    f = Future()
    resolve([(f, 1, None)])
    assert f.result() == 1 and f._cond is None  # done before anyone waited: no Condition


def _repr_states():
    """(name, a function bringing a future to that state) for repr."""
    def cancelled_notified(f):
        f.cancel()
        f.set_running_or_notify_cancel()
    return [("pending", lambda f: None), ("running", lambda f: f.set_running_or_notify_cancel()),
            ("cancelled", lambda f: f.cancel()), ("cancelled_and_notified", cancelled_notified),
            ("returned", lambda f: f.set_result([])),
            ("raised", lambda f: f.set_exception(KeyError()))]


@pytest.mark.parametrize("name,bring", _repr_states(), ids=[n for n, _ in _repr_states()])
def test_repr_is_the_stdlib_one_in_every_state(name, bring):
    ours, theirs = Future(), cf.Future()
    bring(ours)
    bring(theirs)
    assert repr(ours).replace(f"{id(ours):#x}", "ID") == \
        repr(theirs).replace(f"{id(theirs):#x}", "ID")


def test_pickling_is_refused_as_the_stdlib_one():
    import pickle
    with pytest.raises(TypeError):
        pickle.dumps(cf.Future())
    for f in (Future(), Future()):
        with pytest.raises(TypeError):
            pickle.dumps(f)
    done = Future()
    done.set_result(1)
    with pytest.raises(TypeError):
        pickle.dumps(done)


def test_set_running_of_a_batch_is_set_running_or_notify_cancel_of_each():
    """The client starts a RUN batch's futures under one lock: each pending
    one runs, each cancelled one is returned, its waiters told as by
    set_running_or_notify_cancel (as_completed yields it)."""
    pending, cancelled, reference = Future(), Future(), Future()
    assert cancelled.cancel() and reference.cancel()
    waiting = cf.as_completed([cancelled])  # a waiter installed before the start
    got = []
    thread = threading.Thread(target=lambda: got.extend(waiting))
    thread.start()
    assert set_running([pending, cancelled]) == [cancelled]
    assert not reference.set_running_or_notify_cancel()
    thread.join(10)
    assert got == [cancelled]
    assert pending.running()
    assert cancelled._state == reference._state == cf._base.CANCELLED_AND_NOTIFIED
    with pytest.raises(RuntimeError):  # as the stdlib's: a running future can't start again
        set_running([pending])


class _ResolvedWhileHeld(threading.Condition):
    """A future's condition: when the waiting thread takes it (as
    concurrent.futures' _AcquireFutures does, before it reads the state),
    ``change()`` runs in another thread, which goes as far as it can before
    it needs this condition (the waiting thread holds it)."""

    def __init__(self, change):
        super().__init__()
        self.change, self.thread, self.blocked = change, None, threading.Event()
        take = self.acquire

        def acquire(*args):
            got = take(*args)
            if self.thread is None:
                self.thread = threading.Thread(target=self.change)
                self.thread.start()
                assert self.blocked.wait(10), "the change did not come to the condition"
            return got
        self.acquire = acquire

    def __enter__(self):
        if threading.current_thread() is self.thread:
            self.blocked.set()
        return super().__enter__()


class _Recording(list):
    """A future's waiter list that remembers every waiter added to it."""

    def __init__(self):
        super().__init__()
        self.added = []

    def append(self, waiter):
        self.added.append(waiter)
        super().append(waiter)


@pytest.mark.parametrize("change", ["resolve", "set_running", "set_running_or_notify_cancel"])
def test_wait_counts_a_future_once_when_it_changes_as_it_is_waited_on(change):
    """concurrent.futures.wait reads the futures' states under their
    conditions, then installs its waiter: a state changed outside the
    condition between the two (under dpool's own lock) was counted done AND
    then told to the waiter, so wait() returned with a future not done (and
    as_completed could yield one twice)."""
    f, g = Future(), Future()
    if change != "resolve":
        f.cancel()
    run = {"resolve": lambda: resolve([(f, 1, None)]),
           "set_running": lambda: set_running([f]),
           "set_running_or_notify_cancel": f.set_running_or_notify_cancel}[change]
    f._wl, f._cond = [], _ResolvedWhileHeld(run)
    g._wl, g._cond = _Recording(), threading.Condition()
    out = []
    waiting = threading.Thread(target=lambda: out.append(cf.wait([f, g], timeout=10)))
    waiting.start()
    try:
        assert f._cond.blocked.wait(10)
        f._cond.thread.join(10)  # f's change made and told: g is still pending
        (waiter,) = g._wl.added
        assert not waiter.event.is_set(), "wait() was told every future is done, g is not"
    finally:
        resolve([(g, 2, None)])
        waiting.join(10)
    assert out[0].done == {f, g} and not out[0].not_done
