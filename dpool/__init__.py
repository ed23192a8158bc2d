"""dpool: a distributed process pool.

Three ways in, one engine:

- :class:`dpool.futures.Executor` — a ``concurrent.futures`` executor;
- :class:`dpool.Pool` — a ``multiprocessing.Pool``;
- :class:`dpool.JobCluster` — dispy's API (``import dpool as dispy``).

The public names are imported on first use (PEP 562), so that ``import
dpool`` stays cheap: a node's zygote and workers import ``dpool.node``
without the client, the APIs and their dependencies (issue 13: a pool's
first task waits for its zygote's interpreter to start).
"""
import importlib

from .errors import (AuthenticationError, BrokenCluster, ConnectionClosed, DpoolError,
                     JobCancelled, NodeLost, ProtocolError, RemoteError, VersionMismatch,
                     WorkerLost)

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "JobCluster": "dispy.cluster", "ClusterStatus": "dispy.cluster", "DispyJob": "dispy.cluster",
    "DispyNode": "dispy.cluster", "DispyNodeAvailInfo": "dispy.cluster",
    "NodeAllocate": "dispy.cluster", "logger": "dispy.model", "Pool": "pool",
    "SharedJobCluster": "dispy.shared",
    "recover_jobs": "dispy.recover", "progress": "progressbar",
}

__all__ = ["Pool", "JobCluster", "SharedJobCluster", "recover_jobs", "progress", "DispyJob",
           "DispyNode",
           "DispyNodeAvailInfo", "NodeAllocate", "ClusterStatus", "DpoolError",
           "AuthenticationError",
           "BrokenCluster", "ConnectionClosed", "JobCancelled", "NodeLost", "ProtocolError",
           "RemoteError", "VersionMismatch", "WorkerLost", "logger"]


def __getattr__(name):
    """The public names above, and the submodules as attributes (``dpool.futures``,
    ``dispy.httpd`` after ``import dpool as dispy``), imported on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
