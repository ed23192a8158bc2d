"""``multiprocessing.Pool`` API: :class:`Pool`, over the client core.

::

    user threads                     client loop thread              callback thread
    ────────────                     ──────────────────              (one per pool, started
                                                                      on the first callback)
    apply_async / map_async ──► client.submit (a map: one star
                                job per chunk)
                                     future done ──► result._set ─┬─ no callback: ready
                                                                  └─ queue ──► callback(value),
                                                                               then ready
    imap / imap_unordered ──► IMapIterator: submits chunks as the consumer
                              pulls (a bounded read-ahead), and join() feeds
                              whatever is left
    close / join / terminate ──► client.close (terminate also kills running jobs)

Scheduling, worker processes, ``maxtasksperchild`` (the session's
``max_tasks``) and error transport belong to the client core, shared with
:class:`dpool.futures.Executor` and :class:`dpool.JobCluster`.  Deliberate
differences from ``multiprocessing.Pool`` are listed in
``docs/executor-and-pool.md``.
"""
import collections
import concurrent.futures as _cf
import itertools
import logging
import multiprocessing
import queue
import sys
import threading
import warnings
import weakref
from concurrent.futures._base import FINISHED as _FINISHED
from multiprocessing.pool import MaybeEncodingError

from . import protocol as P
from ._adapters import add_nodes, check_initializer, chunks_of, start_client, total_cpus
from .node.worker import RESULT_REPR
from .core.callbacks import CallbackThread
from .progressbar import make_bar, track

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator"]

log = logging.getLogger("dpool")

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
TimeoutError = multiprocessing.TimeoutError  # what get() and next() raise


class Pool:
    """A process pool with ``multiprocessing.Pool``'s API, run by dpool.

    Takes ``multiprocessing.Pool``'s arguments (``context`` is accepted and
    ignored: workers are always forked by dpool's zygote) and dpool's own
    ``nodes``, ``secret``, ``depends``, ``connect_timeout``, ``heartbeat`` and
    the TLS files ``cafile``, ``certfile``, ``keyfile`` (see
    :class:`dpool.futures.Executor`); with ``nodes``, ``processes`` caps the
    CPUs used on each node.
    """

    _state = None  # so that __del__ works when __init__ failed

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, nodes=None, secret=None, depends=None,
                 connect_timeout=None, heartbeat=None, cafile=None, certfile=None,
                 keyfile=None, scheduler=None):
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        check_initializer(initializer)
        self._ctx = context
        self._lock = threading.Lock()
        self._callbacks = None
        self._feeders = weakref.WeakSet()
        self._client = start_client(processes, nodes, secret, maxtasksperchild,
                                    initializer, initargs, process_name="ForkPoolWorker",
                                    depends=depends, connect_timeout=connect_timeout,
                                    heartbeat=heartbeat, tls=(cafile, certfile, keyfile),
                                    scheduler=scheduler)
        self._processes = total_cpus(self._client)
        self._state = RUN

    def add_nodes(self, nodes, secret=None):
        """Use more ``dpool-node``\\ s from now on (``nodes`` as in the
        constructor); returns how many joined at once.  Nodes that do not
        answer yet are retried in the background and used when they do.
        Maps already split into chunks keep their chunk size."""
        self._check_running()
        joined = add_nodes(self._client, nodes, secret)
        self._processes = total_cpus(self._client)
        return joined

    def __repr__(self):
        return (f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} "
                f"pool_size={getattr(self, '_processes', 0)}>")

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    # ------------------------------------------------------------ submitting

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _submit_items(self, fn, items, star):
        """One chunk of a map (``items``: a slice of the input) as one job;
        the items travel as they are, no one-item tuple per item (a slice
        of a ``range`` as a ``range``: three ints on the wire)."""
        mode = P.Call.STARMAP if star else P.Call.MAP
        if type(items) is not list and type(items) is not range:
            items = list(items)
        return self._client.submit(fn, items, star=mode, defer_errors=True).future

    def _runner(self, callback, error_callback):
        if callback is None and error_callback is None:
            return None
        with self._lock:
            if self._callbacks is None:
                self._callbacks = CallbackThread("dpool-pool-callbacks")
            return self._callbacks

    def apply(self, func, args=(), kwds={}):
        """``func(*args, **kwds)`` on a worker; waits for and returns the result."""
        if self._state != RUN:
            raise ValueError("Pool not running")
        # (no AsyncResult made: nobody else sees it)
        return _outcome(self._client.submit(func, args, kwds, defer_errors=True).future, None)

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        """Like :meth:`apply`, but returns an :class:`AsyncResult` at once."""
        if self._state != RUN:  # (_check_running, inline: this is every task's path)
            raise ValueError("Pool not running")
        future = self._client.submit(func, args, kwds, defer_errors=True).future
        if callback is None and error_callback is None:
            return _FutureResult(future, self)  # (no Event, no done-callback: the future does)
        result = ApplyResult(self._runner(callback, error_callback), callback, error_callback,
                             self)
        future.add_done_callback(result._from_future)
        return result

    def map(self, func, iterable, chunksize=None, *, progress=False):
        """``list(map(func, iterable))``, in chunks of ``chunksize`` items.
        ``progress=True`` (dpool's own, as on the other maps) shows a tqdm
        bar of finished items."""
        return self._map_async(func, iterable, chunksize, False, progress=progress).get()

    def starmap(self, func, iterable, chunksize=None, *, progress=False):
        """Like :meth:`map`, but each item is an argument tuple."""
        return self._map_async(func, iterable, chunksize, True, progress=progress).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *,
                  progress=False):
        return self._map_async(func, iterable, chunksize, False, callback, error_callback,
                               progress)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None,
                      *, progress=False):
        return self._map_async(func, iterable, chunksize, True, callback, error_callback,
                               progress)

    def _map_async(self, func, iterable, chunksize, star, callback=None, error_callback=None,
                   progress=False):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        elif chunksize < 1 and len(iterable):
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        bar = make_bar(progress, len(iterable))
        futures, sizes = [], []
        try:
            for items in chunks_of(iterable, chunksize) if len(iterable) else ():
                futures.append(self._submit_items(func, items, star))
                sizes.append(len(items))
        except BaseException:
            for future in futures:
                future.cancel()
            if bar is not None:
                bar.close()
            raise
        track(bar, futures, sizes)
        return MapResult(self._runner(callback, error_callback), futures, callback, error_callback,
                         self)

    def imap(self, func, iterable, chunksize=1, *, progress=False):
        """Lazy, ordered :meth:`map`: an iterator whose ``next(timeout)``
        raises ``multiprocessing.TimeoutError`` when a result is late.
        ``progress=True`` shows a tqdm bar of the results taken (its total
        is ``len(iterable)`` when the iterable has one)."""
        return self._imap(func, iterable, chunksize, True, progress)

    def imap_unordered(self, func, iterable, chunksize=1, *, progress=False):
        """Like :meth:`imap`, but results come in the order they finish."""
        return self._imap(func, iterable, chunksize, False, progress)

    def _imap(self, func, iterable, chunksize, ordered, progress=False):
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        total = _length(iterable)
        iterator = (IMapIterator if ordered else IMapUnorderedIterator)(
            self, func, iterable, chunksize, max(64, 8 * self._processes),
            make_bar(progress, total))
        self._feeders.add(iterator)
        return iterator

    # ------------------------------------------------------------- stopping

    def close(self):
        """Take no more work; the workers exit when what is queued is done."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self):
        """Stop now: running jobs are killed, queued ones cancelled."""
        self._state = TERMINATE
        self._client.close(wait=True, cancel=True, timeout=10)
        self._stop_callbacks()

    def join(self):
        """Wait for all work to finish (after :meth:`close`) and release the
        workers; pending callbacks have run when this returns."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        for feeder in list(self._feeders):
            feeder._feed_all()
        self._client.close(wait=True)
        self._stop_callbacks()

    def _stop_callbacks(self):
        with self._lock:
            runner, self._callbacks = self._callbacks, None
        if runner is not None:
            runner.stop()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.terminate()

    def __del__(self, _warn=warnings.warn):
        if self._state is None or self._client.closed:
            return  # __init__ failed, or terminate()/join() released it all
        running = self._state == RUN
        if running:
            _warn(f"unclosed running dpool pool {self!r}", ResourceWarning, source=self)
        client, runner = self._client, self._callbacks
        in_loop = client.in_loop_thread()
        if in_loop and sys.is_finalizing():
            return  # never block the client's own loop thread
        if in_loop or (not running and not sys.is_finalizing()):
            # Closed but never joined: the queued work finishes, then the
            # workers and the callback thread go (close()'s promise).  Not
            # at interpreter exit, where a new thread never starts (its
            # start() would wait forever, or raise RuntimeError on Python
            # 3.12+, from an atexit handler too): released at once below,
            # as multiprocessing's pools are terminated at exit.
            # (In the loop thread, where a result's done-callback let go of
            # it, the release is handed to a thread too: its client can't
            # be closed from there.)
            try:
                threading.Thread(target=_release, args=(client, runner, running),
                                 name="dpool-pool-release", daemon=True).start()
                return
            except RuntimeError:  # can't create new thread at interpreter shutdown
                if in_loop:
                    return
        try:
            client.close(wait=False, cancel=True)
        except Exception:  # interpreter shutdown: nothing more to do
            pass
        if runner is not None:
            runner.stop(wait=False)  # its thread ends after the queued callbacks


def _release(client, runner, cancel=False):
    """A closed Pool collected before join(): what join() would release
    (``cancel``: an open one, collected in its client's loop thread)."""
    client.close(wait=not cancel, cancel=cancel)
    if runner is not None:
        runner.stop()


def _length(iterable):
    """``len(iterable)``, None if it has none (or one past ``sys.maxsize``:
    a huge ``range``'s ``len()`` raises OverflowError, its iteration does not)."""
    try:
        return len(iterable) if hasattr(iterable, "__len__") else None
    except OverflowError:
        return None


# ----------------------------------------------------------------- results

class ApplyResult:
    """The result of :meth:`Pool.apply_async` (``multiprocessing``'s names)."""

    _event_lock = threading.Lock()

    def __init__(self, runner, callback, error_callback, pool=None):
        self._pool = pool  # (kept until ready, as multiprocessing's: not collected, terminated)
        self._ready = False
        self._event = None  # made when someone waits before it is ready
        self._runner = runner
        self._callback = callback
        self._error_callback = error_callback
        self._success = None
        self._value = None

    def ready(self):
        return self._ready

    def successful(self):
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout=None):
        if self._ready:
            return
        with self._event_lock:
            if self._ready:
                return
            if self._event is None:
                self._event = threading.Event()
        self._event.wait(timeout)

    def _set_ready(self):
        with self._event_lock:
            self._ready = True
            event = self._event
        self._pool = None
        if event is not None:
            event.set()

    def get(self, timeout=None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _from_future(self, future):
        error = _error_of(future)
        if error is None:
            self._set(True, future.result())
        else:
            self._set(False, error)

    def _set(self, success, value):
        self._success, self._value = success, value
        callback = self._callback if success else self._error_callback
        if callback is not None:
            self._runner.put(self._run_callback)
        else:
            self._set_ready()

    def _run_callback(self):
        callback = self._callback if self._success else self._error_callback
        try:
            callback(self._value)
        except BaseException:  # a callback must not kill the pool
            log.exception("dpool.Pool: the %s %r raised; the pool carries on",
                          "callback" if self._success else "error_callback", callback)
        finally:
            self._set_ready()


AsyncResult = ApplyResult


class _FutureResult(ApplyResult):
    """An :class:`ApplyResult` without callbacks: a view of its future (120
    bytes of state per task, instead of an Event and a done-callback)."""

    __slots__ = ("_future", "_pool")

    def __init__(self, future, pool):  # (no super().__init__: nothing of it is used)
        self._future = future
        self._pool = pool  # (kept: a pool reachable only through its results runs them)

    def ready(self):
        return self._future.done()

    def successful(self):
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return _error_of(self._future) is None

    def wait(self, timeout=None):
        _wait(self._future, timeout)

    def get(self, timeout=None):
        future = self._future
        if future._state == _FINISHED and future._exception is None:
            return future._result  # (_outcome's first case, without its call)
        return _outcome(future, timeout)


class MapResult(ApplyResult):
    """The result of :meth:`Pool.map_async`: ready when every chunk is done;
    fails with the first error (in completion order), as ``multiprocessing``."""

    def __init__(self, runner, futures, callback, error_callback, pool=None):
        super().__init__(runner, callback, error_callback, pool)
        self._futures = futures
        self._left = len(futures)
        self._error = None
        self._count_lock = threading.Lock()
        if not futures:
            self._success, self._value = True, []
            self._set_ready()
        for future in futures:
            future.add_done_callback(self._chunk_done)

    def _chunk_done(self, future):
        error = _error_of(future)
        with self._count_lock:
            self._left -= 1
            if error is not None and self._error is None:
                self._error = error
            last = self._left == 0
        if last:
            futures, self._futures = self._futures, None
            if self._error is None:
                self._set(True, _concatenated(futures))
            else:
                self._set(False, self._error)


def _concatenated(futures):
    """The chunks' result lists end to end: ``+=`` copies each list's
    pointers in C (callgrind, 1M ints in 8 chunks: 14 instructions an item,
    against 53 for ``list(itertools.chain.from_iterable(...))``)."""
    out = []
    for future in futures:
        out += future.result()
    return out


def _outcome(future, timeout):
    """``AsyncResult.get(timeout)`` of a task's future (a dpool future): its
    value, or its error raised as ``multiprocessing`` raises it."""
    if future._state == _FINISHED and future._exception is None:
        # Done and succeeded, read at once (its state is set after its value,
        # see dpool.core.future.resolve): callgrind, 1.7k instructions a
        # call fewer than the two calls below.
        return future._result
    try:  # (the rest in two calls of the future: waited, succeeded)
        if future.exception(timeout) is None:
            return future.result()
    except _cf.CancelledError:
        pass
    except _cf.TimeoutError:  # (only the wait raises it: a job's own is returned)
        raise TimeoutError from None  # (multiprocessing's)
    raise _error_of(future)


def _error_of(future):
    if future.cancelled():
        return _cf.CancelledError("the job was cancelled (the pool was terminated)")
    error = future.exception()
    text = getattr(error, RESULT_REPR, None)
    if isinstance(text, str):
        # (made once, kept on the error: each get() raises the same one, as
        # multiprocessing's)
        wrapped = getattr(error, _WRAPPED, None)
        if wrapped is None:
            wrapped = _encoding_error(error, text)
            setattr(error, _WRAPPED, wrapped)
        return wrapped
    return error


_WRAPPED = "dpool_encoding_error"


def _encoding_error(error, result_repr):
    """multiprocessing's MaybeEncodingError for a result the worker could not
    send (``result_repr``: the result's repr, made on the worker)."""
    wrapped = MaybeEncodingError(error, None)
    wrapped.value = result_repr
    wrapped.args = (wrapped.exc, result_repr)
    return wrapped


def _wait(future, timeout):
    """Whether the future is done within ``timeout`` (its own errors aside)."""
    try:
        future.exception(timeout)
    except _cf.CancelledError:
        pass
    except _cf.TimeoutError:  # (the builtin one; this module's is multiprocessing's)
        return False
    return True


class IMapIterator:
    """The iterator :meth:`Pool.imap` returns: ``next(timeout=None)``.

    Chunks are submitted ahead of the consumer, at most ``window`` at a time
    (bounded memory); :meth:`Pool.join` submits the rest.  An error raised
    by a chunk (or by the input iterable) is raised in its place, and
    iteration can go on after it, as in ``multiprocessing``.
    """

    def __init__(self, pool, func, iterable, chunksize, window, bar=None):
        self._pool = pool
        self._bar = bar
        self._func = func
        self._chunks = _item_chunks(iter(iterable), chunksize)
        self._window = window
        self._exhausted = False
        self._lock = threading.RLock()
        self._inflight = collections.deque()  # chunk futures, in input order
        self._items = collections.deque()  # results of the current chunk
        self._feed()

    def __iter__(self):
        return self

    def next(self, timeout=None):
        # The quick path, without the lock: an item of the current chunk
        # (deque.popleft is atomic).  Callgrind, list() over one 125,000-item
        # chunk: 930 instructions an item, 3,060 with the lock.
        if self._bar is None:
            try:
                return self._items.popleft()
            except IndexError:
                pass
        # (A timed wait for the lock: another consumer may hold it while it
        # waits for the next chunk; multiprocessing's waits on a condition.)
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise TimeoutError
        try:
            # (popleft, not a check then a pop: another thread's quick path
            # may take the item between the two.)
            while True:
                try:
                    item = self._items.popleft()
                    break
                except IndexError:
                    pass
                try:
                    future = self._next_done(timeout)
                except StopIteration:
                    if self._bar is not None:
                        self._bar.close()
                    raise
                error = _error_of(future)
                if error is not None:
                    raise error
                self._items.extend(future.result())
            if self._bar is not None:
                self._bar.update(1)
            return item
        finally:
            self._lock.release()

    __next__ = next

    def _next_done(self, timeout):
        if not self._inflight:
            raise StopIteration
        future = self._inflight[0]
        if not _wait(future, timeout):
            raise TimeoutError
        self._inflight.popleft()
        self._refill()
        return future

    def _pending(self):
        return len(self._inflight)

    def _refill(self):
        if not self._exhausted and self._pending() <= self._window // 2:
            self._feed()

    def _feed(self, limit=None):
        """Submit chunks until ``window`` (or, with limit=0, all) are in flight."""
        with self._lock:
            while not self._exhausted and (limit == 0 or self._pending() < self._window):
                future = self._submit_next()
                if future is not None:
                    self._add(future)

    def _feed_all(self):
        self._feed(limit=0)

    def _submit_next(self):
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._exhausted = True
            return None
        except Exception as exc:  # the input iterable failed: raise it in its place
            self._exhausted = True
            return _failed(exc)
        try:
            return self._pool._submit_items(self._func, chunk, False)
        except _cf.BrokenExecutor as exc:  # e.g. the initializer failed: say so
            self._exhausted = True
            return _failed(exc)
        except RuntimeError as exc:  # the pool's client is closed (terminated)
            self._exhausted = True
            error = _cf.CancelledError("the pool was terminated")
            error.__cause__ = exc
            return _failed(error)
        except Exception as exc:  # e.g. an argument that cannot be pickled
            return _failed(exc)

    def _add(self, future):
        self._inflight.append(future)


class IMapUnorderedIterator(IMapIterator):
    """The iterator :meth:`Pool.imap_unordered` returns: chunks' results in
    the order the chunks finish."""

    def __init__(self, *args):
        self._done = queue.SimpleQueue()
        self._count = 0
        super().__init__(*args)

    def _add(self, future):
        self._count += 1
        future.add_done_callback(self._done.put)

    def _next_done(self, timeout):
        if not self._count:
            raise StopIteration
        try:
            # (a negative timeout is no wait, as multiprocessing's: the queue
            # would raise ValueError)
            future = self._done.get(timeout=None if timeout is None else max(timeout, 0))
        except queue.Empty:
            raise TimeoutError from None
        self._count -= 1
        self._refill()
        return future

    def _pending(self):
        return self._count


def _failed(exc):
    future = _cf.Future()
    future.set_running_or_notify_cancel()
    future.set_exception(exc)
    return future


def _item_chunks(iterator, n):
    """Lists of up to ``n`` items from ``iterator``, each sent as it is (a
    chunk of a map, ``Call.MAP``), as :meth:`Pool.map` sends them.  (Lists
    of one-argument tuples run ``fn(*a)``: callgrind, per int item, 612
    instructions to make the tuples, 677 to pickle them and 908 to unpickle
    them, against 72, 181 and 226 for the items themselves.)"""
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk
