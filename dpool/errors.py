"""The exceptions dpool raises.

Every error dpool raises on its own account derives from :class:`DpoolError`.
Errors raised by user code on a node come back as their own type, with the
remote traceback attached as ``__cause__`` (see :mod:`dpool.serialize`).
"""
from concurrent.futures.process import BrokenProcessPool


class DpoolError(Exception):
    """Base class of dpool's own errors."""


class ConnectionClosed(DpoolError, ConnectionError):
    """The connection was closed (by the peer, by us, or by a failure)."""


class HandshakeRefused(ConnectionClosed):
    """The node closed the connection before the handshake began: it was
    refusing new connections (too many still authenticating, from this
    address or in all), e.g. under a flood.  Clients retry it with backoff."""


class AuthenticationError(DpoolError):
    """The peer did not prove knowledge of the shared secret."""


class ProtocolError(DpoolError):
    """The peer sent something that does not follow the wire protocol."""


class VersionMismatch(ProtocolError):
    """The two sides speak different protocol versions."""


class NodeLost(DpoolError):
    """The node running a job went away before the job finished."""


class WorkerLost(DpoolError, BrokenProcessPool):
    """The worker process running a job died (exit, signal, crash).

    Also a ``BrokenProcessPool`` (what ``ProcessPoolExecutor`` raises when a
    worker dies), so that ``except BrokenProcessPool`` still catches it; but
    only that job fails: the worker is replaced and the executor stays usable.
    """


class JobCancelled(DpoolError):
    """The job was cancelled before it produced a result."""


class BrokenCluster(DpoolError, BrokenProcessPool):
    """The cluster can no longer run jobs (no nodes left, failed set-up...).

    A ``BrokenProcessPool`` (so a ``BrokenExecutor``) as the stdlib's broken
    executor raises, so that ``except BrokenProcessPool`` still catches it."""


class RemoteError(DpoolError):
    """A remote exception that could not be sent back as its own type.

    ``type_name`` is the qualified name of the original exception's type and
    ``traceback`` the remote traceback text.
    """

    def __init__(self, type_name, message, traceback=""):
        super().__init__(type_name, message, traceback)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __str__(self):
        return f"{self.type_name}: {self.message}"
