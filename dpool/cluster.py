"""dispy-compatible API: ``JobCluster``, ``DispyJob``, ``NodeAllocate``.

A dispy program runs unchanged with ``import dpool as dispy``::

    cluster = dispy.JobCluster(compute)          # local node if none is running
    job = cluster.submit(5)
    host, n = job()                              # waits, returns job.result

``JobCluster`` is an adapter over :class:`dpool.core.client.Client`; it keeps
dispy's names and fields and turns the client's job events into dispy's job
fields (status, result, exception, stdout, stderr, times, ip_addr).
"""
import logging
import queue
import socket
import threading
import time
import traceback

from . import config
from .core import client as core
from .errors import BrokenCluster, DpoolError

log = logging.getLogger("dpool")


class DispyJob:
    """A job submitted to a cluster; ``job()`` waits for and returns its result.

    ``id`` may be set by the user; the other fields are filled in by dpool:
    ``result``, ``stdout``, ``stderr``, ``exception`` (the remote traceback
    text, ``None`` on success), ``submit_time``, ``start_time``, ``end_time``,
    ``status`` (one of the constants below) and ``ip_addr`` (the node's).
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

    def __init__(self, args=(), kwargs=None):
        self.id = None
        self.args = args
        self.kwargs = kwargs or {}
        self.result = None
        self.stdout = None
        self.stderr = None
        self.exception = None
        self.submit_time = time.time()
        self.start_time = None
        self.end_time = None
        self._status = None  # set when final (or provisional); else read from the core job
        self.ip_addr = None
        self.finish = threading.Event()
        self._job = None

    def __call__(self, clear=False, timeout=None):
        """Wait for the job to finish (up to ``timeout`` s) and return its result."""
        self.finish.wait(timeout)
        if clear:
            self.finish.clear()
        return self.result

    @property
    def status(self):
        if self._status is not None:
            return self._status
        if self._job is None:
            return DispyJob.Created
        return DispyJob._from_core[self._job.status]

    def __lt__(self, other):  # dispy sorts jobs in priority queues
        return self.submit_time < other.submit_time

    def __repr__(self):
        return f"<DispyJob id={self.id!r} status={self.status}>"


class NodeAllocate:
    """Which nodes to use and how many CPUs on each (dispy's NodeAllocate).

    ``host`` is a name, an IP address or a pattern with ``*``; ``port`` the
    node's port (default 51350); ``cpus`` 0 for all, negative to leave some
    free.  Subclasses may override :meth:`allocate`.
    """

    def __init__(self, host, port=None, cpus=0):
        self.host = host
        self.port = port
        self.cpus = cpus
        self.ip_addr = host

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        """The number of CPUs to use on this node (0 leaves the node out)."""
        if self.cpus > 0:
            return min(self.cpus, cpus)
        if self.cpus < 0:
            return max(0, cpus + self.cpus)
        return cpus


def _parse_nodes(nodes, default_port):
    """dispy's ``nodes`` -> list of NodeAllocate (patterns kept as patterns)."""
    if isinstance(nodes, (str, NodeAllocate, tuple)):
        nodes = [nodes]
    out = []
    for node in nodes:
        if isinstance(node, NodeAllocate):
            spec = node
        elif isinstance(node, str):
            spec = NodeAllocate(node)
        elif isinstance(node, tuple) and 1 <= len(node) <= 3:
            spec = NodeAllocate(*node)
        else:
            raise ValueError(f"invalid node {node!r}: give a host name, an IP address, "
                             f"a '*' pattern or a NodeAllocate")
        if spec.port is None:
            spec.port = default_port
        out.append(spec)
    return out


class JobCluster:
    """Run one computation on the nodes of a cluster (dispy's JobCluster).

    With ``nodes=None`` (or ``'*'``) the cluster uses a ``dpool-node`` running
    on this host at ``node_port`` if one answers, else it starts an embedded
    node with all local CPUs (one log line says which).  ``secret`` (or the
    ``DPOOL_SECRET`` environment variable) authenticates with the nodes.
    """

    def __init__(self, computation, nodes=None, depends=(), job_status=None,
                 cluster_status=None, ip_addr=None, port=None, node_port=None,
                 ext_ip_addr=None, dest_path=None, loglevel=logging.INFO, setup=None,
                 cleanup=True, ping_interval=None, pulse_interval=None, poll_interval=None,
                 reentrant=False, secret="", keyfile=None, certfile=None, recover_file=None,
                 cpus=None, cafile=None, **kwargs):
        if not callable(computation):
            raise TypeError(f"computation must be a function, not {type(computation).__name__}")
        _configure_logging(loglevel)
        self.computation = computation
        self.job_status = job_status
        self.cluster_status = cluster_status
        self.node_port = node_port or config.NODE_PORT
        self.secret = config.as_secret(secret) or config.env_secret()
        self._ssl = _tls_context(cafile, certfile, keyfile)
        self._jobs = set()
        self._lock = threading.Lock()
        self._start = time.time()
        self._callbacks = _CallbackThread() if (job_status or cluster_status) else None
        try:
            self._client = self._make_client(nodes, dest_path, cleanup, cpus)
        except BaseException:
            if self._callbacks is not None:
                self._callbacks.stop()
            raise

    # ------------------------------------------------------------ creation

    def _session(self, dest_path, cleanup):
        return {"capture": True, "notify_start": bool(self.job_status or self.cluster_status),
                "cleanup": cleanup,
                **({"cwd": dest_path} if dest_path else {})}

    def _make_client(self, nodes, dest_path, cleanup, cpus):
        session = self._session(dest_path, cleanup)
        specs = None if nodes in (None, "*", ["*"]) else _parse_nodes(nodes, self.node_port)
        if specs is None:
            return self._local_client(session, cpus)
        addresses = []
        for spec in specs:
            if "*" in spec.host:
                raise NotImplementedError(
                    f"node pattern {spec.host!r} needs broadcast discovery, which dpool does "
                    f"not have yet; name the nodes by host name or address")
            addresses.append((spec.host, spec.port))
        client = core.Client(addresses, secret=self._secret_for(addresses), session=session,
                             on_event=self._on_event, ssl=self._ssl)
        return client.start()

    def _secret_for(self, addresses):
        if self.secret:
            return self.secret
        if all(_is_local(host) for host, _ in addresses):
            found = {config.find_local_secret(port) for _, port in addresses}
            if len(found) == 1 and None not in found:
                return found.pop()
        raise ValueError("a secret is needed to talk to dpool nodes: pass secret=... or set "
                         "DPOOL_SECRET (nodes on this host also leave it in ~/.dpool)")

    def _local_client(self, session, cpus):
        secret = self.secret or config.find_local_secret(self.node_port)
        if secret is not None:
            client = core.Client([("127.0.0.1", self.node_port)], secret=secret, session=session,
                                 on_event=self._on_event, connect_timeout=3, ssl=self._ssl)
            try:
                client.start()
                log.info("using the dpool-node at 127.0.0.1:%d", self.node_port)
                return client
            except (BrokenCluster, DpoolError, OSError) as exc:
                refused = isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc)
                if not refused:
                    log.warning("the node at 127.0.0.1:%d could not be used (%s)",
                                self.node_port, exc)
        client = core.Client(None, cpus=cpus, session=session, on_event=self._on_event)
        client.start()
        log.info("no dpool-node at 127.0.0.1:%d; started an embedded local node with "
                 "%d CPUs", self.node_port, client.nodes()[0].cpus)
        return client

    # -------------------------------------------------------------- events

    def _on_event(self, kind, obj):
        """Called in the client's loop thread: copy core state into DispyJobs."""
        if kind == "node":
            return
        job = obj.tag
        if job is None:
            return
        if kind == "started":
            job.start_time = obj.start_time
            job.ip_addr = _ip_of(obj.node)
        elif kind == "done":
            self._finish(job, obj)
        if self.job_status is not None:
            self._callbacks.put((self.job_status, (job,)))

    def _finish(self, job, core_job):
        future = core_job.future
        job.start_time = core_job.start_time or job.start_time
        job.end_time = core_job.end_time or time.time()
        job.stdout, job.stderr = core_job.stdout or "", core_job.stderr or ""
        job.ip_addr = _ip_of(core_job.node) if core_job.node is not None else job.ip_addr
        if future.cancelled():
            job._status = DispyJob.Cancelled
        else:
            error = future.exception()
            if error is None:
                job.result = future.result()
            else:
                job.exception = _exception_text(error)
            job._status = DispyJob._from_core[core_job.status]
        with self._lock:
            self._jobs.discard(job)
        job.finish.set()

    # ------------------------------------------------------------ user API

    def submit(self, *args, **kwargs):
        """Run the computation with these arguments; returns a DispyJob."""
        job = DispyJob(args, kwargs)
        with self._lock:
            self._jobs.add(job)
        try:
            job._job = self._client.submit(self.computation, args, kwargs, tag=job)
        except BaseException:
            with self._lock:
                self._jobs.discard(job)
            raise
        return job

    def cancel(self, job):
        """Cancel a queued (-> Cancelled) or running (-> Terminated) job."""
        if job._job is None or job.finish.is_set():
            return -1
        self._client.cancel(job._job)
        return 0

    def wait(self, timeout=None):
        """Wait for all submitted jobs to finish; True if they did in time."""
        return self._client.wait(timeout)

    def close(self, timeout=None, terminate=False):
        """Wait for the jobs (or terminate them) and release the nodes."""
        if terminate:
            self._client.close(wait=True, cancel=True, timeout=timeout)
        else:
            finished = self._client.wait(timeout)
            self._client.close(wait=False, cancel=not finished)
        if self._callbacks is not None:
            self._callbacks.stop()

    shutdown = close

    def stats(self, wall_time=None):
        self.print_status(wall_time)

    def print_status(self, wall_time=None):
        """Print the per-node table dispy prints: CPUs, jobs, time per job."""
        print()
        heading = " %30s | %5s | %7s | %10s | %13s" % ("Node", "CPUs", "Jobs", "Sec/Job", "Node Time Sec")
        print(heading)
        print("-" * len(heading))
        total = 0.0
        for link in self._client.links:
            name = f"{_ip_of(link)} ({link.name})"
            per_job = link.cpu_time / link.jobs_done if link.jobs_done else 0.0
            total += link.cpu_time
            print(" %-30.30s | %5s | %7s | %10.3f | %13.3f" % (name, link.cpus, link.jobs_done,
                                                              per_job, link.cpu_time))
        print()
        wall = wall_time if wall_time is not None else time.time() - self._start
        print("Total job time: %.3f sec, wall time: %.3f sec, speedup: %.3f"
              % (total, wall, total / wall if wall else 0.0))
        print()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(terminate=exc_type is not None)
        return False

    def __del__(self):
        client = getattr(self, "_client", None)
        if client is not None and not client.closed:
            try:
                client.close(wait=False, cancel=True)
            except Exception:  # interpreter shutdown: nothing more to do
                pass


class _CallbackThread:
    """Runs user callbacks one at a time, in order, off the client's loop."""

    def __init__(self):
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="dpool-callbacks", daemon=True)
        self.thread.start()

    def put(self, item):
        self.queue.put(item)

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("dpool: callback %r raised", getattr(fn, "__name__", fn))

    def stop(self, timeout=10):
        if self.thread.is_alive():
            self.queue.put(None)
            if threading.current_thread() is not self.thread:
                self.thread.join(timeout)


def _tls_context(cafile, certfile, keyfile):
    """TLS to the nodes when any of the files is given: the nodes' certificates
    are checked against ``cafile`` (the system CAs if None); ``certfile`` and
    ``keyfile`` are this client's certificate, for nodes that require one."""
    if not (cafile or certfile):
        return None
    from .transport import client_ssl_context

    return client_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)


def _ip_of(link):
    if link is None:
        return None
    if link.address == "embedded":
        return "127.0.0.1"
    host = link.address[0]
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _is_local(host):
    from .transport import netaddr

    return netaddr.is_loopback(host)


def _exception_text(error):
    cause = error.__cause__
    if cause is not None and type(cause).__name__ == "RemoteTraceback":
        return str(cause).strip().strip('"').strip() + "\n"
    return "".join(traceback.format_exception(error))


def _configure_logging(level):
    logger = logging.getLogger("dpool")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s dpool - %(message)s"))
        logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)

