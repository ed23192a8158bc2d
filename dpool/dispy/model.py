"""dispy's data model: jobs, nodes, node allocation, cluster status.

These are the objects a dispy program touches (``DispyJob``, ``DispyNode``,
``DispyNodeAvailInfo``, ``NodeAllocate``, ``ClusterStatus``); the machinery
that fills them in is :mod:`dpool.dispy.cluster`.  Status constants have dispy's
values, so code that compares them with numbers keeps working.
"""
import collections
from concurrent.futures import CancelledError
import fnmatch
import itertools
import logging
import socket
import threading
import time
import traceback

from ..core import client as core
from ..hosts import parse_address

log = logging.getLogger("dpool")

#: What ``JobCluster.status()`` returns: DispyNode objects and the number of
#: jobs not finished yet.
ClusterStatus = collections.namedtuple("ClusterStatus", ["nodes", "jobs_pending"])



def _dispy_logger():
    """``dispy.logger``: dpool's logger, with pycos.Logger's level names as
    attributes (programs write ``loglevel=dispy.logger.DEBUG`` and
    ``dispy.logger.setLevel(dispy.logger.INFO)``)."""
    logger = logging.getLogger("dpool")
    for name in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"):
        setattr(logger, name, getattr(logging, name))
    return logger


logger = _dispy_logger()

_NONE = object()  # DispyJob.kwargs set to None


class DispyJob:
    """A job submitted to a cluster; ``job()`` waits for and returns its result.

    ``id`` may be set by the user (dispy numbers jobs 1, 2, ... by default);
    the other fields are filled in by dpool: ``result``, ``stdout``,
    ``stderr``, ``exception`` (the remote traceback text, ``None`` on
    success), ``submit_time``, ``start_time``, ``end_time``, ``status`` (one
    of the constants below), ``ip_addr`` (the node's) and ``finish`` (an
    Event set when the job is done, whatever its end).
    """

    Created = 5
    Running = 6
    ProvisionalResult = 7
    Cancelled = 8
    Terminated = 9
    Abandoned = 10
    Finished = 11

    _from_core = {core.CREATED: Created, core.RUNNING: Running, core.FINISHED: Finished,
                  core.CANCELLED: Cancelled, core.TERMINATED: Terminated,
                  core.ABANDONED: Abandoned}
    _ids = itertools.count(1)

    # Slots, as dispy's DispyJob has (no attributes of the user's own): a
    # million queued jobs each save a dict's worth of memory and their
    # construction's attribute stores.
    __slots__ = ("_id", "args", "_kwargs", "result", "stdout", "stderr", "exception",
                 "submit_time", "start_time", "end_time", "_status", "ip_addr", "_event",
                 "_done", "_job", "_pin", "_on_id", "__weakref__")

    def __init__(self, job_id=None, args=(), kwargs=None):
        self._id = job_id if job_id is not None else next(DispyJob._ids)
        self.args = args
        self._kwargs = kwargs or None  # (an empty dict per job is 64 bytes)
        self.result = self.stdout = self.stderr = self.exception = None
        self.submit_time = time.time()
        self.start_time = self.end_time = None
        self._status = None  # set when final or provisional; else read from the core job
        self.ip_addr = None
        self._event = None  # ``finish``, made when someone needs to wait on it
        self._done = False
        self._job = None  # the core Job, once submitted
        self._pin = None  # the NodeLink it must run on, if any
        self._on_id = None  # called with the job when its id changes (the recover file)

    _event_lock = threading.Lock()

    @property
    def kwargs(self):
        """The keyword arguments it was submitted with (None for a recovered job)."""
        kwargs = self._kwargs
        if kwargs is None:  # none given: the dict is made when asked for
            kwargs = self._kwargs = {}
        return None if kwargs is _NONE else kwargs

    @kwargs.setter
    def kwargs(self, value):
        self._kwargs = _NONE if value is None else value

    @property
    def id(self):
        return self._id

    @id.setter
    def id(self, value):
        """Yours to set, before or after submit (dispy's programs do
        ``job = cluster.submit(x); job.id = x``); a recoverable cluster
        records the new id, so recover_jobs returns it."""
        self._id = value
        if self._on_id is not None:
            self._on_id(self)

    @property
    def finish(self):
        """dispy's Event, set when the job is done (made on first use: most
        jobs are done before anyone waits, and an Event per job is not free).
        The loop thread sets ``_done`` before it reads ``_event`` and this
        sets ``_event`` before it reads ``_done``, so one of them sets the
        Event (without a lock on the loop thread's side)."""
        event = self._event
        if event is None:
            with DispyJob._event_lock:  # (two user threads asking at once)
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
                    if self._done:
                        event.set()
            self._handoff()
        return event

    def _handoff(self):
        """Someone may wait or poll without reading the answer: a direct
        call's (dpool.core.direct) is read by the loop thread from now on
        (``done()`` of a direct call's future hands it over)."""
        core = self._job
        if core is not None:
            core.future.done()

    # The cluster's side (client loop thread or submit): never the user's.

    @property
    def core_job(self):
        """The client core's Job (None until submitted)."""
        return self._job

    @property
    def pinned_to(self):
        """The NodeLink this job must run on (submit_node), or None."""
        return self._pin

    def is_done(self):
        """True once the job's fields are final (without making ``finish``)."""
        return self._done

    def submitted(self, core_job, pin=None):
        self._pin = pin
        if not self._done:  # (else finished already: no cycle through its core job)
            self._job = core_job

    def track_id(self, record):
        """Call ``record(job)`` each time the id is set from now on (the
        recover file records it); ``None`` stops it."""
        self._on_id = record

    @classmethod
    def recovered(cls, job_id, core_job, ip_addr):
        """A job of a client gone away, collected by ``recover_jobs``: its
        outcome taken as JobCluster takes a job's (``args`` and ``kwargs``
        None, as in dispy)."""
        job = cls(None, None)
        job.id, job.kwargs = job_id, None
        job.finish_from(core_job, ip_addr)
        return job

    @classmethod
    def abandoned(cls, job_id, why):
        """A job that never ran and never will (``recover_jobs``: no node
        kept it), ``why`` in its ``exception``."""
        job = cls(None, None)
        job.id, job.kwargs, job.exception, job._status = job_id, None, why, DispyJob.Abandoned
        job._set_done()
        return job

    def provisional(self, value):
        """A provisional result (dispy_provisional_result) arrived."""
        self.result = value
        self._status = DispyJob.ProvisionalResult

    def finish_from(self, core_job, ip_addr=None):
        """Take the final state of the core job (loop thread) and wake waiters."""
        self.start_time = core_job.start_time or self.start_time
        self.end_time = core_job.end_time or time.time()
        stdout, stderr = core_job.stdout, core_job.stderr
        self.stdout = "" if stdout is None else stdout
        self.stderr = "" if stderr is None else stderr
        self.ip_addr = ip_addr or self.ip_addr
        if core_job.cancelled:
            self._status = DispyJob.Cancelled
        else:
            if core_job.error is None:
                self.result = core_job.value
            else:
                self.result = None
                self.exception = exception_text(core_job.error)
            self._status = DispyJob._from_core[core_job.status]
        # The core job keeps this job (its tag, which the event handlers and
        # the dashboard read); this job needs its core job no more: without
        # the cycle, a finished job the user drops is freed at once with its
        # result, not at the garbage collector's next full pass.
        self._job = None
        self._done = True  # (_set_done, inline: every job's path)
        event = self._event
        if event is not None:
            event.set()

    def _set_done(self):
        """Called once the job's fields are final: wakes every waiter (see
        ``finish`` for why no lock is needed)."""
        self._done = True
        event = self._event
        if event is not None:
            event.set()

    def __call__(self, clear=False, timeout=None):
        """Wait for the job to finish (up to ``timeout`` s) and return its result."""
        if not self._done:
            self._wait(timeout)
        if clear:
            with DispyJob._event_lock:
                self._done = False
                if self._event is not None:
                    self._event.clear()
        return self.result

    def _wait(self, timeout):
        """Wait on the core job's future while nobody made ``finish`` (an
        Event per job costs 1.2 KB): the client copies the fields in before
        the future resolves.  Cancelled from another thread, or after ``clear``:
        ``finish`` for the time left."""
        core = self._job
        if core is not None and self._event is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                core.future.exception(timeout)
            except (CancelledError, TimeoutError):  # the job's fields say
                pass
            if self._done:
                return
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.finish.wait(timeout)

    @property
    def status(self):
        if self._status is not None:
            return self._status
        core = self._job
        if core is None:
            return DispyJob.Created
        core.future.done()  # (polled: a direct call is read by the loop thread, see _handoff)
        return DispyJob._from_core[core.status]

    def snapshot(self):
        """A copy with the status frozen: what callbacks get (as in dispy)."""
        job = DispyJob.__new__(DispyJob)
        for name in _COPIED:
            setattr(job, name, getattr(self, name))
        job._status = self.status
        job._on_id = None
        return job

    def __lt__(self, other):  # dispy sorts jobs in priority queues
        return self.submit_time < other.submit_time

    def __repr__(self):
        return f"<DispyJob id={self.id!r} status={self.status}>"


_COPIED = [name for name in DispyJob.__slots__ if name != "__weakref__"]


class DispyNodeAvailInfo:
    """A node's free resources, in dispy's units: ``cpu`` (percent
    available), ``memory`` and ``disk`` (bytes available) and ``swap``
    (percent available), measured with psutil by the node."""

    def __init__(self, cpu, memory, disk, swap):
        self.cpu = cpu
        self.memory = memory
        self.disk = disk
        self.swap = swap

    @classmethod
    def from_info(cls, info):
        if not info:
            return None
        return cls(info.get("cpu"), info.get("memory"), info.get("disk"), info.get("swap"))

    def __repr__(self):
        return (f"<DispyNodeAvailInfo cpu={self.cpu}% memory={self.memory} disk={self.disk} "
                f"swap={self.swap}>")


class DispyNode:
    """A node as the cluster sees it (given to ``cluster_status`` callbacks
    and listed by ``status()``).  ``exception`` is dpool's addition: the
    error that left the node out (failed setup, lost connection) or None."""

    Initialized = DispyJob.Created - 1
    Closed = DispyJob.Finished + 5
    AvailInfo = Closed + 1

    def __init__(self, ip_addr, name, cpus):
        self.ip_addr = ip_addr
        self.name = name
        self.cpus = cpus
        self.avail_cpus = cpus
        self.busy = 0
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.tx = 0
        self.rx = 0
        self.update_time = 0
        self.avail_info = None
        self.platform = ""
        self.exception = None

    def __repr__(self):
        return f"<DispyNode {self.ip_addr} ({self.name}) cpus={self.cpus} busy={self.busy}>"


def exception_text(error):
    """DispyJob.exception: the remote traceback text (or this one's)."""
    cause = error.__cause__
    if cause is not None and type(cause).__name__ == "RemoteTraceback":
        return str(cause).strip().strip('"').strip() + "\n"
    return "".join(traceback.format_exception(error))


def resolve_host(host):
    """A host name or address -> IP address (the name itself if it won't resolve)."""
    if any(c in host for c in "*?["):   # a pattern: matched against discovered nodes
        return host
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


class NodeAllocate:
    """Which nodes to use and how many CPUs on each (dispy's NodeAllocate).

    ``host`` is a name, an IP address or a pattern with ``*``; ``port`` the
    node's port (default 51350); ``cpus`` 0 for all, negative to leave some
    free; ``depends`` files sent to this node only; ``setup_args`` the
    arguments of ``setup`` on this node.  Subclasses may override
    :meth:`allocate`.
    """

    def __init__(self, host, port=None, cpus=0, depends=(), setup_args=()):
        if isinstance(depends, str) or not isinstance(depends, (list, tuple)):
            raise TypeError("NodeAllocate: depends must be a list of file paths")
        if not isinstance(setup_args, tuple):
            raise TypeError("NodeAllocate: setup_args must be a tuple")
        self.host = host
        self.ip_addr = resolve_host(host)
        self.port = int(port) if port else None
        if self.port is not None and not 0 < self.port <= 65535:  # else getaddrinfo wraps it
            raise ValueError(f"NodeAllocate: port {port} is not 1 to 65535")
        self.cpus = int(cpus or 0)
        self.depends = list(depends)
        self.setup_args = setup_args

    def matches(self, ip_addr, name=None):
        for pattern in {self.ip_addr, self.host}:
            if fnmatch.fnmatchcase(ip_addr, pattern) \
                    or (name and fnmatch.fnmatchcase(name, pattern)):
                return True
        return False

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        """The number of CPUs to use on this node (0 leaves the node out)."""
        if not self.matches(ip_addr, name):
            return 0
        if self.cpus > 0:
            return min(self.cpus, cpus)
        if self.cpus < 0:
            return max(0, cpus + self.cpus)
        return cpus

    def __repr__(self):
        return f"<NodeAllocate {self.host}:{self.port} cpus={self.cpus}>"


def allocations(nodes, default_port):
    """dispy's ``nodes`` -> list of NodeAllocate.  A string is parsed as by
    the other APIs (``"host"``, ``"host:port"``, ``"[ipv6]:port"``)."""
    if isinstance(nodes, (str, NodeAllocate, tuple)):
        nodes = [nodes]
    out = []
    for node in nodes:
        if isinstance(node, NodeAllocate):
            spec = node
        elif isinstance(node, str):
            spec = NodeAllocate(*parse_address(node, default_port))
        elif isinstance(node, tuple) and 1 <= len(node) <= 3:
            spec = NodeAllocate(*node)
        else:
            raise ValueError(f"invalid node {node!r}: give a host name, an IP address, "
                             f"a (host, port[, cpus]) tuple or a NodeAllocate")
        if spec.port is None:
            spec.port = default_port
        out.append(spec)
    return out
