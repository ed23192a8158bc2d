"""A joblib backend: ``joblib.Parallel`` (and scikit-learn's ``n_jobs``) on dpool.

Importing this module registers the backend under the name ``"dpool"``::

    import joblib
    import dpool.joblib                      # registers "dpool"

    with joblib.parallel_backend("dpool"):   # local worker processes
        joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

    with joblib.parallel_backend("dpool", nodes="hostA:51350,hostB", secret="..."):
        GridSearchCV(estimator, grid, n_jobs=-1).fit(X, y)   # on the nodes

``nodes`` and ``secret`` are those of :class:`dpool.futures.Executor`
(default: ``DPOOL_NODES`` and ``DPOOL_SECRET``; no nodes: local processes).
``n_jobs=-1`` (the default under this backend) means every CPU of the
cluster.  Each ``Parallel`` call gets its own executor, closed when the call
ends, so nothing outlives the ``with`` block; starting one costs about a
second (its worker processes).  To pay that once, give yours::

    with dpool.futures.Executor(nodes=...) as ex:
        with joblib.parallel_backend("dpool", executor=ex):
            ...                               # every Parallel call uses ex

Needs joblib (``pip install 'dpool[ecosystem]'``).
"""
import copy
import mmap
import os
import sys
import threading

import joblib
from joblib.parallel import AutoBatchingMixin, ParallelBackendBase

from ._adapters import NODES_ENV, total_cpus
from .futures import Executor

__all__ = ["DpoolBackend", "register"]

NAME = "dpool"


class DpoolBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase over a :class:`dpool.futures.Executor`."""

    default_n_jobs = -1
    supports_retrieve_callback = True  # results come through future callbacks
    supports_timeout = True

    def __init__(self, nodes=None, secret=None, executor=None, nesting_level=None,
                 **backend_kwargs):
        super().__init__(nesting_level=nesting_level, **backend_kwargs)
        if executor is not None and (nodes is not None or secret is not None):
            raise ValueError("give executor= or nodes=/secret=, not both")
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(f"executor must be a dpool.futures.Executor, not "
                            f"{type(executor).__name__}")
        self.nodes = nodes
        self.secret = secret
        self._given = executor  # the user's: used, never shut down
        self._executor = executor
        self._initializer = self._init_of(self.backend_kwargs)  # the context's
        self._init = self._initializer  # this Parallel call's (configure)
        self._workers = None  # local processes asked for (None: all CPUs)
        self._futures = set()  # ours not done yet (the user's executor may run others)
        self._lock = threading.Lock()  # done callbacks run in the client's loop thread

    # ------------------------------------------------------------ sizing

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        return max(self._cluster_cpus() + 1 + n_jobs, 1)  # -1: all, -2: all but one...

    def _cluster_cpus(self):
        return total_cpus(self._start())

    # ------------------------------------------------------------ lifecycle

    def _start(self):
        """The executor's client, starting the executor if needed."""
        if self._executor is None:
            initializer, initargs = self._init
            self._executor = Executor(self._workers, nodes=self.nodes, secret=self.secret,
                                      initializer=initializer, initargs=initargs)
        return self._executor._client

    def _init_of(self, kwargs):
        """joblib's ``initializer``/``initargs`` (given to ``Parallel`` or
        to the backend's context, as for its loky and multiprocessing
        backends): run in every worker before its first task."""
        initializer = kwargs.get("initializer")
        if initializer is not None and self._given is not None:
            raise ValueError("initializer= with executor=: give the initializer "
                             "to your dpool.futures.Executor")
        return initializer, tuple(kwargs.get("initargs", ()))

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **kwargs):
        self.parallel = parallel
        init = self._init_of({**self.backend_kwargs, **kwargs})
        if init != self._init:  # (an executor started without it: not this call's)
            self.terminate()
            self._init = init
        if n_jobs is not None and n_jobs > 0 and self._executor is None and self._local():
            self._workers = n_jobs  # local: no more processes than asked for
        return self.effective_n_jobs(n_jobs)

    def _local(self):
        return self.nodes is None and not os.environ.get(NODES_ENV, "").strip()

    def submit(self, func, callback=None):
        self._start()
        if self._executor is not self._given and self._local():
            func = _sharing_memmaps(func)
        future = self._executor.submit(_run, func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future):
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, future):
        return future.result()

    def terminate(self):
        """End of a Parallel call: release the workers (not the user's)."""
        executor, self._executor = self._executor, self._given
        self._workers = None
        self._init = self._initializer
        if executor is not None and executor is not self._given:
            executor.shutdown(wait=True, cancel_futures=True)
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready=True):
        """A task failed: cancel ours that have not run yet (running ones finish)."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        if not ensure_ready:
            self.terminate()


def _run(batch):
    """Run a task (joblib's ``BatchedCalls``) on a worker.  Sent by
    reference, so the worker imports this module and has "dpool"
    registered as joblib's are, for a task that names it (a nested
    ``Parallel(backend="dpool")``), in a fresh interpreter (a node's) too."""
    return batch()


# ------------------------------------------------------------ memmaps
# joblib's process backends hand a task's ``numpy.memmap`` arguments to
# their workers as memmaps of the same file, so what a task writes into one
# is seen by the caller ("Writing parallel computation results in shared
# memory" in joblib's docs); pickled as is, a memmap becomes an array copy
# and the writes are lost.  Local workers share the caller's files: there,
# a task's memmap arguments (contiguous ones, given directly as arguments)
# are sent as (file, offset, shape) and opened again on the worker.


class _SharedMemmap:
    """A ``numpy.memmap`` argument, pickled as the way to map it again."""

    __slots__ = ("args",)

    def __init__(self, array, mmap_start):
        granularity_start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
        offset = granularity_start + array.ctypes.data - mmap_start
        mode = "r+" if array.mode == "w+" else array.mode  # (w+ would truncate it)
        order = "F" if not array.flags.c_contiguous else "C"
        self.args = (array.filename, array.dtype, mode, offset, array.shape, order)

    def __reduce__(self):
        return _open_memmap, self.args


def _open_memmap(filename, dtype, mode, offset, shape, order):
    import numpy as np

    return np.memmap(filename, dtype=dtype, mode=mode, offset=offset, shape=shape,
                     order=order)


def _shared(np, value):
    """``value``, or a _SharedMemmap for a memmap of a file that can be
    mapped again (not a 0-size or a non-contiguous view)."""
    if not isinstance(value, np.memmap) or value.filename is None or value.size == 0:
        return value
    if getattr(value, "_mmap", None) is None:
        return value
    if not (value.flags.c_contiguous or value.flags.f_contiguous):
        return value
    start = np.frombuffer(value._mmap, dtype=np.uint8).ctypes.data
    return _SharedMemmap(value, start)


def _sharing_memmaps(batch):
    """joblib's ``BatchedCalls`` with its calls' memmap arguments shared
    (a shallow copy; ``batch`` itself if it has none)."""
    np = sys.modules.get("numpy")
    items = getattr(batch, "items", None)
    if np is None or not items:
        return batch
    if not any(isinstance(v, np.memmap) for _, args, kwargs in items
               for v in (*args, *kwargs.values())):
        return batch
    shared = copy.copy(batch)
    shared.items = [(func, tuple(_shared(np, a) for a in args),
                     {k: _shared(np, v) for k, v in kwargs.items()})
                    for func, args, kwargs in items]
    return shared


def register():
    """Register the backend as ``"dpool"`` (done on import)."""
    joblib.register_parallel_backend(NAME, DpoolBackend)


register()
