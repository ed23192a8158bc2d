"""dpool.Pool: what the conformance suite cannot compare with
multiprocessing (bounded imap read-ahead, terminate resolving everything,
big map chunks, clean-up of a forgotten pool)."""
import collections
import concurrent.futures as cf
import gc
import itertools
import threading
import warnings

import pytest

import dpool
from dpool.errors import BrokenCluster
import tasks
from helpers import poll_for


@pytest.fixture
def pool():
    pool = dpool.Pool(2)
    yield pool
    pool.terminate()
    pool.join()


def test_big_chunks_map_and_starmap(pool):
    n = 640
    assert pool.map(lambda x: -x, range(n)) == [-x for x in range(n)]
    assert pool.starmap(tasks.add, [(i, i) for i in range(n)]) == [2 * i for i in range(n)]
    with pytest.raises(ValueError, match="bad item 500") as info:
        pool.starmap(tasks.fail_on, [(i, 500) for i in range(n)], 64)
    assert "fail_on" in str(info.value.__cause__)
    with pytest.raises(TypeError, match="missing 1 required"):
        pool.map(tasks.fail_on, range(n))


def _spy_on_submit(client):
    """The types of the job arguments ``client.submit`` gets from now on."""
    seen, submit = [], client.submit

    def spy(fn, args, *rest, **kwargs):
        seen.append(type(args))
        return submit(fn, args, *rest, **kwargs)
    client.submit = spy
    return seen


def test_a_range_is_sent_as_ranges(pool):
    seen = _spy_on_submit(pool._client)
    assert pool.map(tasks.square, range(3, 103, 2), 10) == [x * x for x in range(3, 103, 2)]
    assert pool.map(tasks.square, list(range(20)), 10) == [x * x for x in range(20)]
    assert pool.map(tasks.square, tuple(range(20)), 10) == [x * x for x in range(20)]
    assert seen == [range] * 5 + [list] * 4  # (a tuple's slices are made lists)


def test_imap_reads_its_input_ahead_only_so_far(pool):
    pulled = itertools.count()

    def numbers():
        for i in itertools.count():
            next(pulled)
            yield i

    it = pool.imap(tasks.square, numbers())
    assert [next(it) for _ in range(10)] == [i * i for i in range(10)]
    assert next(pulled) < 500  # an infinite input is fine; memory stays bounded
    pool.terminate()


def test_imap_input_error_is_raised_in_place(pool):
    def numbers():
        yield 1
        yield 2
        raise KeyError("input broke")

    it = pool.imap(tasks.square, numbers())
    assert next(it) == 1 and next(it) == 4
    with pytest.raises(KeyError, match="input broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_terminate_resolves_imap_and_results(pool):
    it = pool.imap(tasks.nap, [30] * 3)
    result = pool.apply_async(tasks.nap, (30,))
    pool.terminate()
    assert result.ready() and not result.successful()
    with pytest.raises((cf.CancelledError, dpool.JobCancelled)):
        it.next(timeout=5)


def test_a_callback_may_terminate_the_pool(pool):
    done = []

    def callback(value):
        pool.terminate()  # from the callback thread: must not deadlock
        done.append(value)

    pool.apply_async(tasks.square, (3,), callback=callback)
    assert poll_for(lambda: done, 10, message="the callback") == [9]
    pool.join()


def test_error_callback_that_raises_is_logged(pool, caplog):
    def bad(exc):
        raise RuntimeError("error callback bug")

    result = pool.apply_async(tasks.raise_value_error, ("x",), error_callback=bad)
    with pytest.raises(ValueError):
        result.get(5)
    assert "error callback bug" in caplog.text
    assert pool.apply(tasks.square, (2,)) == 4


def test_a_forgotten_pool_warns_and_releases_its_workers():
    pool = dpool.Pool(1)
    assert pool.apply(tasks.square, (2,)) == 4
    client = pool._client
    with pytest.warns(ResourceWarning, match="unclosed running dpool pool"):
        del pool
        gc.collect()
    assert poll_for(lambda: not client._thread.thread.is_alive(), 10,
                    message="the client to close")


def test_repr(pool):
    assert "state=RUN" in repr(pool) and "pool_size=2" in repr(pool)
    pool.close()
    assert "state=CLOSE" in repr(pool)


# --------------------------------------------------------- found by review


def _threads_named(name):
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_a_forgotten_pool_with_callbacks_stops_its_callback_thread():
    before = len(_threads_named("dpool-pool-callbacks"))
    pool = dpool.Pool(1)
    seen = []
    pool.apply_async(tasks.square, (3,), callback=seen.append).get(5)
    assert seen == [9]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del pool
        gc.collect()
    poll_for(lambda: len(_threads_named("dpool-pool-callbacks")) == before, 5,
             message="the callback thread to end")


def test_a_closed_pool_dropped_without_join_releases_its_workers():
    # multiprocessing: a pool closed, never joined and then dropped is
    # cleaned up by its finalizer; dpool kept the client and the node.
    pool = dpool.Pool(1)
    assert pool.apply(tasks.square, (2,)) == 4
    client = pool._client
    pool.close()
    del pool
    gc.collect()
    poll_for(lambda: client.closed and not client._thread.thread.is_alive(), 5,
             message="the client to close")


@pytest.mark.parametrize("closed", [False, True])
def test_a_pool_let_go_by_its_last_result_in_the_loop_thread_is_released(tmp_path, closed):
    # A result keeps its pool until it is ready; a map's result is made
    # ready by the client's loop thread, where the pool was then collected:
    # its __del__ released nothing there, the client and its workers stayed.
    pool = dpool.Pool(1)
    client = pool._client
    gate = str(tmp_path / "gate")
    result = pool.starmap_async(tasks.count_and_hold, [(str(tmp_path / "log"), gate, 7)])
    if closed:
        pool.close()
    del pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        open(gate, "w").close()
        assert result.get(30) == [7]
        poll_for(lambda: client.closed and not client._thread.thread.is_alive(), 10,
                 message="the client to close")


def test_imap_on_a_broken_pool_raises_broken_cluster():
    # apply/map raise BrokenCluster (docs: difference 5); imap said
    # CancelledError("the pool was terminated"), which it was not.
    pool = dpool.Pool(1, initializer=tasks.failing_initializer)
    try:
        with pytest.raises(BrokenCluster, match="initializer"):
            pool.apply_async(tasks.square, (2,)).get(10)
        it = pool.imap(tasks.square, range(3))
        with pytest.raises(BrokenCluster, match="initializer"):
            it.next(5)
    finally:
        pool.terminate()
        pool.join()


class _HookedDeque(collections.deque):
    """A deque that runs ``hook`` once, when it is next asked whether it
    holds anything and does: after the answer is made, before it is given
    (a thread switch right after the check)."""

    hook = None

    def __len__(self):
        n = super().__len__()
        if n and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return n


def test_imap_next_from_two_threads_gets_every_item_once(pool):
    """A thread's next() takes a chunk's results in under the lock and sees
    them there; a second consumer's next() (the quick path, without the
    lock) takes the item before the first one pops it: the first must go on
    to the next chunk, not raise IndexError (multiprocessing's IMapIterator
    is thread-safe)."""
    it = pool.imap(tasks.square, range(3), chunksize=1)
    got = []
    it._items = _HookedDeque()
    other = threading.Thread(target=lambda: got.append(it.next(timeout=30)))
    it._items.hook = lambda: (other.start(), other.join())
    got.append(it.next(timeout=30))
    got += list(it)
    assert got == [0, 1, 4]


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_next_with_a_timeout_times_out_while_another_consumer_waits(pool, ordered):
    """multiprocessing's IMapIterator waits on a condition (the lock is let
    go): a second consumer's next(timeout) raises TimeoutError in time
    while a first one waits (here: holds the iterator's lock) for the next
    chunk, and the items are all there later."""
    it = (pool.imap if ordered else pool.imap_unordered)(tasks.square, range(3))
    held, release = threading.Event(), threading.Event()

    def other_consumer():
        with it._lock:
            held.set()
            release.wait(30)  # (released by the test as soon as next() returned)
    other = threading.Thread(target=other_consumer)
    other.start()
    held.wait(30)
    try:
        with pytest.raises(dpool.pool.TimeoutError):
            it.next(timeout=0.01)
    finally:
        release.set()
        other.join()
    assert sorted([it.next(timeout=30)] + list(it)) == [0, 1, 4]


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_next_with_a_negative_timeout_is_a_timeout_of_zero(pool, ordered):
    """multiprocessing's next(timeout=-1) does not wait: the item when it is
    there (else TimeoutError), never a ValueError from the queue it waits on."""
    it = (pool.imap if ordered else pool.imap_unordered)(tasks.square, [3])
    poll_for(lambda: it._pending() and (it._inflight[0].done() if ordered
                                        else not it._done.empty()))
    assert it.next(timeout=-1) == 9
