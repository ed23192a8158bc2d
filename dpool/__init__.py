"""dpool: a distributed process pool.

Three ways in, one engine:

- :class:`dpool.futures.Executor` — a ``concurrent.futures`` executor;
- :class:`dpool.Pool` — a ``multiprocessing.Pool``;
- :class:`dpool.JobCluster` — dispy's API (``import dpool as dispy``).
"""
from .dispy.cluster import (ClusterStatus, DispyJob, DispyNode, DispyNodeAvailInfo, JobCluster,
                      NodeAllocate)
from .dispy.model import logger
from .dispy.shared import SharedJobCluster
from .pool import Pool
from .dispy.recover import recover_jobs
from .progressbar import progress
from .errors import (AuthenticationError, BrokenCluster, ConnectionClosed, DpoolError,
                     JobCancelled, NodeLost, ProtocolError, RemoteError, VersionMismatch,
                     WorkerLost)

__version__ = "0.1.0"

__all__ = ["Pool", "JobCluster", "SharedJobCluster", "recover_jobs", "progress", "DispyJob",
           "DispyNode",
           "DispyNodeAvailInfo", "NodeAllocate", "ClusterStatus", "DpoolError",
           "AuthenticationError",
           "BrokenCluster", "ConnectionClosed", "JobCancelled", "NodeLost", "ProtocolError",
           "RemoteError", "VersionMismatch", "WorkerLost", "logger"]


def __getattr__(name):
    """``dispy.httpd`` (and ``dpool.dashboard``) after ``import dpool as dispy``,
    imported on first use."""
    if name in ("httpd", "dashboard"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
