"""``concurrent.futures`` API: :class:`Executor`, a ``ProcessPoolExecutor``.

::

    user threads                          dpool.core.client.Client
    ────────────                          ────────────────────────
    submit(fn, *args, **kwargs) ──► client.submit ──► core Job; its Future is returned as is
    map(fn, *iterables, chunksize) ──► one star job per chunk (one message each)
        generator ◄── chunk results, in order, flattened
    shutdown() ──► client.close()   (wait=False: closed by a short-lived thread)

The executor is a thin adapter: scheduling, worker processes, retries and
result delivery all belong to the client core, which is shared with
:class:`dpool.Pool` and :class:`dpool.JobCluster`.  With no ``nodes`` (and no
``DPOOL_NODES`` in the environment) the client embeds a local node, so the
local and the distributed case run the same code.

Deliberate differences from ``ProcessPoolExecutor`` are listed in
``docs/executor-and-pool.md``.
"""
import collections
import concurrent.futures as _cf
import itertools
import os
import sys
import threading
import time
import weakref

from . import protocol as P
from ._adapters import add_nodes, check_initializer, chunks_of, start_client, total_cpus
from .progressbar import make_bar, track

__all__ = ["Executor"]

# Executors never shut down: their work is finished at the interpreter's
# exit, before its threads are joined, as the stdlib's executors' is.  (At
# finalization, where ``__del__`` would run for them, no thread starts.)
_unclosed: "weakref.WeakSet[Executor]" = weakref.WeakSet()


#: ``Executor._shutdown_thread`` of an executor the interpreter's exit closed.
_AT_EXIT = "interpreter shutdown"


def _finish_unclosed():
    for executor in list(_unclosed):
        if not executor._shutdown_thread and not executor._client.closed:
            executor._shutdown_thread = _AT_EXIT
            executor._client.close()


def _refuse(shutdown):
    """The stdlib's error for a submit after ``shutdown()``, or after the
    interpreter's exit began (an ``atexit`` function's submit)."""
    when = _AT_EXIT if shutdown is _AT_EXIT else "shutdown"
    return RuntimeError(f"cannot schedule new futures after {when}")


threading._register_atexit(_finish_unclosed)  # (the stdlib's executors' hook)
# A forked child (multiprocessing's runs the hook when its target returns)
# has copies of the parent's executors, not its own: their work is not its.
os.register_at_fork(after_in_child=_unclosed.clear)

# ------------------------------------------------------------ the executor

class Executor(_cf.Executor):
    """A ``concurrent.futures`` executor whose workers are dpool processes.

    Takes ``ProcessPoolExecutor``'s arguments (``mp_context`` is accepted and
    ignored: workers are always forked by dpool's zygote) and dpool's own:

    ``nodes``
        ``[(host, port), ...]`` or ``"host:port,host:port"``: run on these
        ``dpool-node``\\ s instead of local processes (default: the
        ``DPOOL_NODES`` environment variable, else local).  ``max_workers``
        then caps the CPUs used on each node.
    ``depends``
        modules and files the nodes need, e.g. ``[mymodule, "data.csv"]``:
        sent once to each node, into the folder the jobs run in (on their
        ``sys.path``), before any job.  Needed with remote nodes for a
        function from a module they don't have; ignored by local workers,
        which import what this process imports.
    ``secret``
        the nodes' shared secret (default: ``DPOOL_SECRET``, or for nodes on
        this host the secret they leave in ``~/.dpool``).
    ``connect_timeout``
        seconds to connect to a node and open a session (default
        ``DPOOL_CONNECT_TIMEOUT``, else 10).
    ``heartbeat``
        ``(interval, deadline)`` in seconds (default ``DPOOL_HEARTBEAT``,
        else 1 and 10): a node silent past the deadline is lost, its jobs
        rerun elsewhere, and it is retried until it answers again.
    ``cafile``, ``certfile``, ``keyfile``
        TLS to the nodes, as for :class:`dpool.JobCluster`: the nodes'
        certificates are checked against ``cafile``; ``certfile``/``keyfile``
        are this client's, for nodes that require one.
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, nodes=None, secret=None, depends=None,
                 connect_timeout=None, heartbeat=None, cafile=None, certfile=None,
                 keyfile=None, scheduler=None):
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        check_initializer(initializer)
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._mp_context = mp_context
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread = False
        self._closer = None
        self._client = start_client(max_workers, nodes, secret, max_tasks_per_child,
                                    initializer, initargs, depends=depends,
                                    connect_timeout=connect_timeout, heartbeat=heartbeat,
                                    tls=(cafile, certfile, keyfile),
                                    scheduler=scheduler)
        self._max_workers = total_cpus(self._client)
        _unclosed.add(self)

    def add_nodes(self, nodes, secret=None):
        """Use more ``dpool-node``\\ s from now on (``nodes`` as in the
        constructor); returns how many joined at once.  Nodes that do not
        answer yet are retried in the background and used when they do."""
        with self._shutdown_lock:
            if self._shutdown_thread:
                raise RuntimeError("cannot add nodes after shutdown")
            joined = add_nodes(self._client, nodes, secret)
            self._max_workers = total_cpus(self._client)
            return joined

    def submit(self, fn, /, *args, **kwargs):
        with self._shutdown_lock:
            if self._shutdown_thread:
                raise _refuse(self._shutdown_thread)
            return self._client.submit(fn, args, kwargs, defer_errors=True).future

    submit.__doc__ = _cf.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None, progress=False):
        """Like :func:`map`, run on the workers; results come back lazily
        and in order.  Each chunk of ``chunksize`` calls is one job (one
        message each way).  ``timeout`` counts from this call: a result not
        ready by then raises ``TimeoutError`` from the iterator.

        The iterables are read at once, unless ``buffersize`` (Python
        3.14's argument, on every Python here) caps the jobs submitted and
        not yet yielded: ``buffersize`` chunks are submitted now, and one
        more each time the iterator moves on to the next chunk, so at most
        ``buffersize * chunksize`` inputs are read ahead of the consumer and
        at most that many results are held for it.
        ``progress=True`` (dpool's own) shows a tqdm bar of finished calls.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        bar = make_bar(progress)  # (a bad option fails before anything is submitted)
        if len(iterables) == 1:  # items as they are: no one-item tuple each
            chunks, mode = chunks_of(iterables[0], chunksize), P.Call.MAP
        else:
            chunks, mode = chunks_of(zip(*iterables), chunksize), P.Call.STARMAP
        try:
            futures = self._submit_chunks(fn, mode, chunks, buffersize, bar)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        revoke = self._client.revoke
        if buffersize is None:
            return _Results.of(_chained_results(futures, end_time, revoke))
        return _Results.of(_buffered_results(futures, end_time,
                                             self._refiller(fn, mode, chunks, bar), bar, revoke))

    def _submit_chunks(self, fn, mode, chunks, limit, bar):
        """Submit ``limit`` (None: all) chunks; their futures (none submitted
        if one fails to submit).  With a limit the bar's total stays open
        (the input's length is unknown) and the caller closes it."""
        submit = self._client.submit
        futures, sizes = [], []
        with self._shutdown_lock:
            if self._shutdown_thread:
                raise _refuse(self._shutdown_thread)
            try:
                for chunk in itertools.islice(chunks, limit):
                    futures.append(submit(fn, chunk, star=mode, defer_errors=True).future)
                    sizes.append(len(chunk))
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        if limit is None:
            track(bar, futures, sizes)
        elif bar is not None:
            for future, size in zip(futures, sizes):
                future.add_done_callback(lambda _, size=size: bar.update(size))
        return futures

    def _refiller(self, fn, mode, chunks, bar):
        """The next chunk's future, or None when the input (or the executor)
        is done; holds the executor weakly, as the stdlib's iterator does."""
        executor = weakref.ref(self)

        def refill():  # (after shutdown: RuntimeError, as the stdlib's submit)
            ex = executor()
            futures = [] if ex is None else ex._submit_chunks(fn, mode, chunks, 1, bar)
            return futures[0] if futures else None
        return refill

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop taking work; ``cancel_futures`` cancels what has not started.

        With ``wait=False`` this returns at once; the work already submitted
        still runs and the workers are released when it is done.
        """
        with self._shutdown_lock:
            self._shutdown_thread = True
            if cancel_futures:
                # Only futures not yet running can be cancelled (as the stdlib).
                for future in self._client.unfinished():
                    future.cancel()
                self._client.cancel_queued()   # those a dpool-scheduler queues
            if not wait and self._closer is None:
                # Not a daemon: the interpreter's exit waits for the submitted
                # work, as it does for the stdlib's executor-manager thread.
                self._closer = threading.Thread(target=self._client.close,
                                                name="dpool-executor-shutdown")
                self._closer.start()
        if wait:
            if self._closer is not None:
                self._closer.join()
            self._client.close(wait=True)

    def __del__(self):
        # A forgotten executor finishes the work it was given (as the
        # stdlib's does: ``list(Executor().map(f, xs))`` must work), then
        # releases its workers; from a thread of its own, since garbage
        # collection may run anywhere, the client's loop thread included.
        client = getattr(self, "_client", None)
        if client is None or client.closed:
            return
        if sys.is_finalizing():  # (made during the exit: no thread starts now)
            try:
                client.close(wait=False, cancel=True)
            except Exception:  # interpreter shutdown: nothing more to do
                pass
            return
        try:
            threading.Thread(target=client.close, name="dpool-executor-shutdown").start()
        except RuntimeError:  # interpreter shutdown: nothing more to do
            pass


def _result(future, end_time):
    """The chunk's results; the future cancelled if we give up on it."""
    try:
        if end_time is None:
            return future.result()
        return future.result(end_time - time.monotonic())
    finally:
        future.cancel()


class _Results(itertools.chain):
    """What :meth:`Executor.map` returns: the items of each chunk, in order,
    taken by ``itertools.chain``'s C loop (a generator's ``yield from chunk``
    cost about four times as much per item).  ``source`` is a generator of
    the chunks' iterators, which waits for each chunk (``timeout``, errors)
    and cancels the rest when it is closed; closing this iterator (as a
    ``break`` out of a ``for`` loop over a generator does on collection,
    or ``close()``) closes it, and drops what is left of the current chunk,
    as closing the stdlib's generator does."""

    @classmethod
    def of(cls, chunks):
        current = [iter(())]
        results = cls.from_iterable(_tracked(chunks, current))
        results._source, results._current = chunks, current
        return results

    def close(self):
        self._source.close()  # (its finally cancels the chunks not taken)
        collections.deque(self._current[0], maxlen=0)


def _tracked(chunks, current):
    """The chunks as iterators, the one being read kept in ``current[0]``."""
    for chunk in chunks:
        current[0] = it = _draining(chunk)
        del chunk
        yield it


def _draining(chunk):
    """An iterator over a chunk's results (a list, of this map's own) that
    lets go of each result as it is taken, as the stdlib's map does: no
    reference to a result the consumer has dropped stays behind.  (C calls
    only: the list reversed, popped as many times as it has items; no end
    marker, which a result's ``__eq__`` could claim to equal.)"""
    if type(chunk) is not list:
        return iter(chunk)
    chunk.reverse()
    return map(chunk.pop, itertools.repeat(-1, len(chunk)))


def _buffered_results(futures, end_time, refill, bar, revoke):
    """Yield each chunk's results in order, submitting one more chunk
    (``refill``) each time one is taken; cancel the rest on an early stop."""
    pending = collections.deque(futures)
    del futures
    try:
        while pending:
            future = refill()
            if future is not None:
                pending.append(future)
            yield _result(pending.popleft(), end_time)
    finally:
        _cancel_rest(pending, revoke)
        if bar is not None:
            bar.close()


def _chained_results(futures, end_time, revoke):
    """Yield each chunk's results in order; cancel the rest if the consumer
    stops early or a wait times out (as the stdlib does)."""
    futures.reverse()
    try:
        while futures:
            yield _result(futures.pop(), end_time)
    finally:
        _cancel_rest(futures, revoke)


def _cancel_rest(futures, revoke):
    """Cancel the calls not started (the stdlib's map does on an early stop):
    those a node holds unstarted (sent ahead: their futures run from the
    send) are asked back (``revoke``) and cancelled as they come back."""
    sent = [future for future in futures if not future.cancel() and not future.done()]
    if sent:
        revoke(sent)
