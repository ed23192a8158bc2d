"""dispy-compatible API: ``JobCluster`` (and the model in :mod:`dpool.dispy.model`).

A dispy program runs unchanged with ``import dpool as dispy``::

    cluster = dispy.JobCluster(compute)          # local node if none is running
    job = cluster.submit(5)
    host, n = job()                              # waits, returns job.result

::

    user thread                    client loop thread               callback thread
    ───────────                    ──────────────────               ───────────────
    JobCluster(...): check computation, depends, setup; connect
      └─ prepare(link) per node: NodeAllocate.allocate -> CPUs,
         FILE (depends) + SETUP messages after SESSION
    submit() ─► Client.submit ──►  events: node / started /          job_status(job)
                                   provisional / file / done  ──►    cluster_status(status,
                                   (ClusterEvents writes the           node, job)
                                   DispyJob and DispyNode fields)    one at a time, in order

``JobCluster`` is an adapter over :class:`dpool.core.client.Client`; its
loop-thread side is :mod:`dpool.dispy.events`, its client extension
:mod:`dpool.dispy.env`; the node side of the job environment is
:mod:`dpool.node.env.session` and :mod:`dpool.node.env.job`.
"""
import decimal
import errno
import inspect
import logging
import math
import numbers
import os
import shutil
import socket
import threading
import time
import weakref

from .. import config, liveness, serialize
from ..core import client as core
from ..core import discover
from ..hosts import is_loopback
from ..transport import udp
from ..core.callbacks import CallbackThread
from ..node.env import job as jobenv
from .depends import collect, file_entry, file_messages
from .env import JobEnv
from .events import ClusterEvents
from .recover import RecoverFile, default_name
from .model import (ClusterStatus, DispyJob, DispyNode,
                          DispyNodeAvailInfo, NodeAllocate, allocations, resolve_host)
from ..errors import BrokenCluster, DpoolError
from .. import protocol as P

log = logging.getLogger("dpool")

__all__ = ["JobCluster", "DispyJob", "DispyNode", "DispyNodeAvailInfo", "NodeAllocate",
           "ClusterStatus"]

SETUP_WAIT = 60.0  # seconds JobCluster() waits for the nodes' setup
CANCEL_GRACE = 5.0  # seconds a cancelled running job has to end after its KeyboardInterrupt
CLOSE_CANCEL_WAIT = 0.4  # seconds close(terminate=True) waits for nodes to confirm cancels
_DISPY_ONLY = {"host", "dispy_port", "ext_host", "ip_addr", "ext_ip_addr", "ipv4_udp_multicast",
               "ping_interval", "pulse_interval", "poll_interval", "reentrant", "recover_file"}


# The callback threads of clusters not closed: when the program ends, the
# callbacks already queued still run (as dispy's exit handler runs them: a
# job's Finished after the wait() that let the program end), before the
# interpreter stops its threads.  A forked child leaves its parent's alone.
_open_callbacks: "weakref.WeakSet[CallbackThread]" = weakref.WeakSet()
EXIT_WAIT = 10.0  # seconds the exit waits for them, in all, however many clusters
_clock = time.monotonic


def _run_queued_callbacks():
    """Every open cluster's queued callbacks run at once (each thread told
    to end after them first), then one deadline for all of them: the exit
    waits as long as the slowest, at most EXIT_WAIT s (not that per cluster)."""
    threads = list(_open_callbacks)
    for callbacks in threads:
        callbacks.stop(wait=False)
    deadline = _clock() + EXIT_WAIT
    for callbacks in threads:
        callbacks.thread.join(max(0.0, deadline - _clock()))


threading._register_atexit(_run_queued_callbacks)
os.register_at_fork(after_in_child=_open_callbacks.clear)


#: JobCluster's parameters after ``cluster_status``, in dispy 4.15's order:
#: what a program passing them by position means.
DISPY_ORDER = ("host", "dispy_port", "ext_host", "ip_addr", "ext_ip_addr",
               "ipv4_udp_multicast", "dest_path", "loglevel", "callback", "setup", "cleanup",
               "ping_interval", "pulse_interval", "poll_interval", "reentrant", "secret",
               "keyfile", "certfile", "recover_file")


def by_dispys_order(name, order, args, kwargs):
    """``kwargs`` plus the positional ``args`` named by ``order``."""
    if len(args) > len(order):
        raise TypeError(f"{name}() takes at most {5 + len(order)} positional arguments "
                        f"({5 + len(args)} given)")
    for key, value in zip(order, args):
        if key in kwargs:
            raise TypeError(f"{name}() got multiple values for argument {key!r}")
        kwargs[key] = value
    return kwargs


class JobCluster:
    """Run one computation on the nodes of a cluster (dispy's JobCluster).

    ``computation`` is a function, or the path (or PATH name) of a program.
    With ``nodes=None`` the cluster uses a ``dpool-node`` on this host at
    ``node_port`` if one answers, else an embedded node with ``cpus`` local
    CPUs; ``'*'`` and patterns find nodes over authenticated UDP (which
    needs the nodes' secret).  ``secret`` (or ``DPOOL_SECRET``) authenticates with
    the nodes.  See docs/dispy-compatibility.md for every argument.
    """

    def __init__(self, computation, nodes=None, depends=(), job_status=None,
                 cluster_status=None, *args, **kwargs):
        # (past cluster_status, arguments given by position are dispy's, in
        # dispy's order; the rest are keywords, dpool's included)
        self._init(computation, nodes, depends, job_status, cluster_status,
                   **by_dispys_order("JobCluster", DISPY_ORDER, args, kwargs))

    def _init(self, computation, nodes, depends, job_status, cluster_status, *, dest_path=None,
              loglevel=logging.INFO, setup=None, cleanup=True, secret="", keyfile=None,
              certfile=None, cafile=None, cpus=None, node_port=None, port=None, callback=None,
              connect_timeout=None, heartbeat=None, **dispy_options):
        unknown = set(dispy_options) - _DISPY_ONLY
        if unknown:
            raise TypeError(f"JobCluster() got unexpected arguments: {', '.join(sorted(unknown))}")
        self._pulse_interval = _check_pulse_interval(dispy_options.get("pulse_interval"))
        self._multicast = bool(dispy_options.get("ipv4_udp_multicast"))  # discovery's
        self._liveness = dict(connect_timeout=liveness.connect_timeout(connect_timeout),
                              heartbeat=liveness.settings(heartbeat))
        _configure_logging(loglevel)
        self.job_status = _check_callback(job_status or callback, 1, "job_status")
        self.cluster_status = _check_callback(cluster_status, 3, "cluster_status")
        self.node_port = node_port or port or config.NODE_PORT
        self.secret = config.as_secret(secret) or config.env_secret()
        self._ssl = core.tls_context(cafile, certfile, keyfile)
        self._client_cert = bool(certfile)
        self._take_computation(computation, list(depends), setup, cleanup)
        self._dest_path = _check_dest_path(dest_path)
        self._init_state()
        self._take_nodes(nodes)
        self._start_up(cpus, dispy_options.get("recover_file"), (cafile, certfile, keyfile))
        if self._callbacks is not None:
            self._callbacks.release()

    def _take_computation(self, computation, depends, setup, cleanup):
        """The computation (a function, or a program run by jobenv.run_program),
        the depends and setup/cleanup, checked and ready to send."""
        self._program = None
        if isinstance(computation, str):
            path = computation if os.path.isfile(computation) else shutil.which(computation)
            if not path:
                raise FileNotFoundError(f"program {computation!r} not found (nor on PATH)")
            self._program = os.path.basename(path)
            depends.append(path)
            computation = jobenv.run_program
        elif not callable(computation):
            raise TypeError(f"computation must be a function or a program path, "
                            f"not {type(computation).__name__}")
        self.computation = computation
        self._files, names = collect(depends)
        if self._program is not None:  # its name on the node (a path under cwd is kept)
            self._program_file = self._files[-1][0]
        names["__dpool_computation__"] = computation
        self._names = names
        self._setup, self._cleanup = setup, cleanup
        self._check_setup(setup, cleanup)
        self._cleanup_files = cleanup is not False
        _check_picklable(computation, names, setup, cleanup)

    def _init_state(self):
        self._start = time.time()
        self._recover = self._used_secret = None
        # The jobs not done yet (close_node's pinned ones are looked up in
        # it): one set.add in the user's thread and one set.discard in the
        # loop thread per job, each atomic without a lock of ours.
        self._jobs = set()
        self._closing = {}  # NodeLink -> close when idle

    def _take_nodes(self, nodes):
        self._allocs = [] if nodes is None else allocations(nodes, self.node_port)
        for alloc in self._allocs or [NodeAllocate("*")]:
            for dep in alloc.depends:  # missing files fail here, not per node
                file_entry(dep)
            if type(alloc).allocate is NodeAllocate.allocate:  # else allocate sets them
                self._check_setup_args(alloc.setup_args)

    def _start_up(self, cpus, recover_file, tls_files):
        """Open the recover file, start the callback thread, connect to the
        nodes and wait for their setup; on failure release what was started."""
        if recover_file:  # opt-in (dispy always writes one): see docs
            self._recover = RecoverFile(default_name() if recover_file is True else recover_file,
                                        *tls_files)
        # Held until JobCluster() returns, as dispy's come (after its nodes
        # are found): a cluster_status that submits to the node it is told
        # of needs the program's ``cluster = JobCluster(...)`` done.
        self._callbacks = CallbackThread(held=True) \
            if (self.job_status or self.cluster_status) else None
        if self._callbacks is not None:
            _open_callbacks.add(self._callbacks)
        self._events = ClusterEvents(self.job_status, self.cluster_status, self._callbacks,
                                     self._job_finished, self._node_closed)
        self._nodes = self._events.nodes  # NodeLink -> DispyNode (initialized nodes)
        self._client = None
        try:
            self._client = self._make_client(cpus)
            self._wait_for_setup(self._client)
        except BaseException:  # (a Ctrl-C in the wait too: nothing is left open)
            if self._client is not None:
                self._client.close(wait=False, cancel=True)
            if self._callbacks is not None:
                self._callbacks.stop(10)
            if self._recover is not None:
                self._recover.close()
            raise

    def _wait_for_setup(self, client, timeout=SETUP_WAIT):
        """Return once every node has run setup (or was left out); raise if
        no node is left.  A setup still running after ``timeout`` s goes on:
        jobs wait for it."""
        with self._events.changed:
            if not self._events.changed.wait_for(
                    lambda: not any(link.ready and link.hold for link in client.links), timeout):
                log.warning("setup is still running on some nodes after %ss; jobs wait for "
                            "them", timeout)
                return
        if not any(link.ready for link in client.links):
            errors = "; ".join(str(link.error) for link in client.links if link.error)
            client.close(wait=False, cancel=True)
            raise BrokenCluster(f"no node could be set up: {errors}")

    # ------------------------------------------------------------ checks

    def _check_setup(self, setup, cleanup):
        if setup is not None and not callable(setup):
            raise TypeError("setup must be a function")
        if not (isinstance(cleanup, bool) or callable(cleanup)):
            raise TypeError("cleanup must be True, False or a function")

    def _check_setup_args(self, setup_args):
        for fn, what in ((self._setup, "setup"), (self._cleanup, "cleanup")):
            if callable(fn) and not isinstance(fn, bool):
                try:
                    inspect.signature(fn).bind(*setup_args)
                except TypeError as exc:
                    raise TypeError(f"{what} {getattr(fn, '__name__', fn)!r} cannot be called "
                                    f"with setup_args {setup_args!r}: {exc}") from None
                except ValueError:  # no signature (builtin): find out on the node
                    pass

    # ------------------------------------------------------------ creation

    def _session(self):
        options = {"capture": True, "notify_start": bool(self.job_status or self.cluster_status),
                   "cleanup": self._cleanup_files, "cleanup_fn": callable(self._cleanup)
                   and not isinstance(self._cleanup, bool),
                   "setup": True,  # workers are forked from the setup process
                   "interrupt": CANCEL_GRACE}  # cancel: KeyboardInterrupt first
        if self._dest_path:
            options["dest_path"] = self._dest_path
        if self._pulse_interval:
            options["pulse_interval"] = self._pulse_interval
        return options

    def _client_args(self):
        return dict(session=self._session(), on_event=self._events.on_event, prepare=self._prepare,
                    ssl=self._ssl, **self._liveness)

    def _new_client(self, nodes, **options):
        """A core client with the job environment extension registered."""
        client = core.Client(nodes, **dict(self._client_args(), **options))
        self._env = JobEnv(client)
        # Without callbacks a lone job may go direct over a node's link
        # (dpool.core.tcpline): its end is taken in the thread that reads it
        # (ClusterEvents.on_event, a job's end, touches nothing the loop thread does then).
        client.direct_events = not (self.job_status or self.cluster_status)
        return client

    def _make_client(self, cpus):
        if not self._allocs:
            return self._local_client(cpus)
        # (one node named by several NodeAllocates is one node: _allocs_for)
        addresses = list(dict.fromkeys((a.host, a.port) for a in self._allocs
                                       if not discover.is_pattern(a.host)))
        patterns = [(a.host, a.port) for a in self._allocs if discover.is_pattern(a.host)]
        if patterns and not addresses:
            self._used_secret = config.discovery_secret(self.secret, self.node_port)
        else:
            self._used_secret = config.secret_for(self.secret, addresses,
                                                  client_cert=self._client_cert)
        found = discover.settings(patterns, self._used_secret, self.node_port,
                                  multicast=self._multicast) if patterns else None
        return self._new_client(addresses, secret=self._used_secret, discovery=found).start()

    def _local_client(self, cpus):
        """The dpool-node on this host at node_port, on 127.0.0.1 or (with a
        secret) any of this host's addresses (a node bound to its LAN
        address); else an embedded node."""
        self._embedded_cpus = config.resolve_cpus(cpus)
        why = "no dpool-node at"
        local = self.secret or config.find_local_secret(self.node_port)
        hosts = [("127.0.0.1", local)]
        if self.secret:  # (without one, only 127.0.0.1 is tried: no look at the interfaces)
            hosts += [(host, self.secret) for host in udp.local_addresses()
                      if not is_loopback(host)]
        for host, secret in hosts:
            if secret is None:
                continue
            self._used_secret = secret
            client = self._new_client([(host, self.node_port)], secret=secret,
                                      connect_timeout=min(3, self._liveness["connect_timeout"]))
            try:
                client.start()
                log.info("using the dpool-node at %s:%d", host, self.node_port)
                return client
            except (BrokenCluster, DpoolError, OSError) as exc:
                if not _refused(exc, client):
                    log.warning("the node at %s:%d could not be used (%s)",
                                host, self.node_port, exc)
                    why = "could not use the dpool-node at"
                    break
        self._used_secret = local
        client = self._new_client(None, cpus=self._embedded_cpus, ssl=None)
        client.start()
        log.info("%s 127.0.0.1:%d; started an embedded local node with "
                 "%d CPUs", why, self.node_port, client.nodes()[0].cpus)
        return client

    def _allocs_for(self, link):
        """The NodeAllocates consulted for this node, in dispy's order: all
        of those on its port, sorted as dispy sorts its list (on the address
        as a regular expression, ``.`` escaped and ``*`` as ``.*``, greatest
        first: a node's own address before the patterns matching it; equal
        ones in the order given)."""
        if link.address == "embedded":
            return [NodeAllocate("*")]
        port = link.address[1]
        return sorted((alloc for alloc in self._allocs if alloc.port == port),
                      key=_dispy_order, reverse=True) or [NodeAllocate("*")]

    def _allocate(self, link, ip, name, cpus, info):
        """dispy's rule: each NodeAllocate in turn (:meth:`_allocs_for`)
        until one's ``allocate`` gives CPUs (more than 0: 0, ``None`` or
        less tries the next); (its CPUs, it), or (0, None) if none does."""
        for alloc in self._allocs_for(link):
            want = _allocated_cpus(alloc.allocate(self, ip, name, cpus,
                                                  DispyNodeAvailInfo.from_info(info),
                                                  info.get("platform", "")), cpus)
            if want:
                return want, alloc
        return 0, None

    def _prepare(self, link):
        """Loop thread, before a session opens: CPUs, depends, setup for one node."""
        hello = getattr(link.conn, "hello", None) or {}
        ip = self._events.ip_of(link)
        name = hello.get("name") or socket.gethostname()
        if link.address == "embedded":
            cpus = self._embedded_cpus
        else:
            cpus = hello.get("free_cpus") or hello.get("cpus") or 0
        try:
            want, alloc = self._allocate(link, ip, name, cpus, hello.get("avail_info") or {})
            if not want:
                log.info("node %s (%s): not used (allocate returned no CPUs)", ip, name)
                return None
            # allocate may set this node's depends and setup_args (dispy's
            # node_setup example): read them now.
            node_files = [file_entry(dep) for dep in alloc.depends]
            self._check_setup_args(alloc.setup_args)
        except Exception:
            log.exception("NodeAllocate.allocate failed for %s; the node is left out", ip)
            return None
        session = dict(self._session(), cpus=want)
        if hello.get("scheduler") and want >= cpus:  # all of them: nodes joining it later too
            del session["cpus"]
        if self._recover is not None and link.address != "embedded":
            session["recover_token"] = self._recover.new_session(link.address, self._used_secret)
        messages = file_messages(self._files + node_files)
        names = dict(self._names, dispy_node_name=name, dispy_node_ip_addr=ip)
        cleanup = self._cleanup if not isinstance(self._cleanup, bool) else None
        messages.append([P.encode(P.Setup),
                         *serialize.dumps((names, self._setup, alloc.setup_args, cleanup))])
        link.hold = True  # no jobs until the node's setup is done (JobEnv admits it)
        return session, messages

    # -------------------------------------------------------------- events

    def _job_finished(self, job, core_job):
        """Loop thread, as a job ends (before its waiters wake)."""
        self._jobs.discard(job)
        if self._program is not None:  # a program's output is bytes, as dispy's
            core_job.stdout = (core_job.stdout or "").encode(errors="surrogateescape")
            core_job.stderr = (core_job.stderr or "").encode(errors="surrogateescape")
        if self._recover is not None:
            job.track_id(None)
            self._recover.done(core_job.id)  # received: recover_jobs leaves it out
        if core_job.node in self._closing:
            link = core_job.node
            if self._client.in_loop_thread():
                self._close_if_idle(link)
            else:  # (a direct call's end, read in a user thread)
                self._client.call_soon(lambda: self._close_if_idle(link))

    def _node_closed(self, link):
        self._closing.pop(link, None)

    # ------------------------------------------------------------ user API

    def submit(self, *args, **kwargs):
        """Run the computation with these arguments; returns a DispyJob."""
        return self._submit(None, None, args, kwargs)

    def submit_job_id(self, job_id, *args, **kwargs):
        return self._submit(job_id, None, args, kwargs)

    def submit_node(self, node, *args, **kwargs):
        """Run a job on ``node`` only (a DispyNode, IP address or host name)."""
        return self._submit(None, self._link(node, strict=True), args, kwargs)

    def submit_job_id_node(self, job_id, node, *args, **kwargs):
        return self._submit(job_id, self._link(node, strict=True), args, kwargs)

    def _submit(self, job_id, pin, args, kwargs, place=None):
        fn = self.computation
        if self._program is not None or (kwargs and "dispy_job_depends" in kwargs):
            fn, args, kwargs = self._special_call(args, kwargs)
        job = DispyJob(job_id, args, kwargs)
        jobs = self._jobs
        jobs.add(job)
        if self.cluster_status:
            self._events.created(job)
        try:
            core_job = self._client.submit(fn, args, kwargs, job, pin, place=place)
            job.submitted(core_job, pin)
            if self._recover is not None:
                core_id = core_job.id  # (not j.core_job: None once the job ended)
                self._recover.job(core_id, job.id)
                job.track_id(lambda j: self._recover.job(core_id, j.id))
        except BaseException:
            jobs.discard(job)
            raise
        return job

    def _special_call(self, args, kwargs):
        """(fn, args, kwargs) of a program's job or of one with
        dispy_job_depends (files sent with the job)."""
        fn = self.computation
        files = kwargs.pop("dispy_job_depends", None)
        if self._program is not None:
            args = (self._program_file, *(str(a) for a in args))
        if files:
            entries, names = collect(files)
            if names and self._program is not None:
                raise TypeError("dispy_job_depends: a program computation takes files "
                                "and modules, not functions or classes")
            # (names, the job's functions and classes, only when there are
            # some: what a node of the version before them understands)
            args = (entries, self._cleanup_files, args, kwargs) + ((names,) if names else ())
            fn, kwargs = jobenv.run_with_files, {}
        return fn, args, kwargs

    def cancel(self, job):
        """Cancel a queued (-> Cancelled) or running (-> Terminated) job; 0 or -1."""
        core = job.core_job     # (None once finished)
        if core is None or job.is_done():
            return -1
        self._client.cancel(core)
        return 0

    def wait(self, timeout=None):
        """Wait for all submitted jobs to finish; True if they did in time."""
        return self._client.wait(timeout)

    __call__ = wait

    def close(self, timeout=None, terminate=False):
        """Wait for the jobs and release the nodes; True once closed.

        With ``terminate=False`` and jobs still unfinished after ``timeout``
        seconds, nothing is closed and False is returned (as in dispy).
        With ``terminate=True`` the jobs still unfinished after ``timeout``
        (at once if None) are cancelled: Cancelled if queued, Terminated if
        running.
        """
        if self._client.closed:
            return True
        if terminate:
            if timeout:
                self._client.wait(timeout)
            # Nodes that answer confirm the cancels in milliseconds; one that
            # does not (stopped, cut off) must not hold close() past timeout.
            self._client.close(wait=True, cancel=True, timeout=CLOSE_CANCEL_WAIT)
        else:
            if not self._client.wait(timeout):
                return False
            self._client.close(wait=False)
        self._events.all_closed()  # the loop thread has stopped
        if self._callbacks is not None:
            self._callbacks.stop(10)
        if self._recover is not None:
            self._recover.close()  # closed with BYE: the nodes keep nothing
        return True

    def shutdown(self):
        self.close()

    @property
    def name(self):
        return self._program or getattr(self.computation, "__name__", str(self.computation))

    # -------------------------------------------------------------- nodes

    def status(self):
        """ClusterStatus(nodes=[DispyNode...], jobs_pending=N)."""
        def collect_status():
            busy = {}
            for job in self._running():
                if job.sent and job.node is not None:
                    busy[job.node] = busy.get(job.node, 0) + 1
            for link, node in self._nodes.items():
                node.busy = busy.get(link, 0)
                if node.jobs_done != link.jobs_done:  # (not counted per job without callbacks)
                    node.update_time = time.time()
                node.jobs_done, node.cpu_time = link.jobs_done, link.cpu_time
                node.tx, node.rx = link.tx, link.rx
            return ClusterStatus(list(self._nodes.values()), self._client.pending())
        if self._client.closed:
            return ClusterStatus([], 0)
        return self._call(collect_status)

    def print_status(self, wall_time=None):
        """Print the per-node table dispy prints: CPUs, jobs, time per job,
        bytes sent to and received from each node."""
        info = self.status()
        print()
        heading = " %30s | %5s | %7s | %10s | %13s | %8s | %8s" % (
            "Node", "CPUs", "Jobs", "Sec/Job", "Node Time Sec", "Sent", "Rcvd")
        print(heading)
        print("-" * len(heading))
        total = 0.0
        for node in info.nodes:
            per_job = node.cpu_time / node.jobs_done if node.jobs_done else 0.0
            total += node.cpu_time
            print(" %-30.30s | %5s | %7s | %10.3f | %13.3f | %8s | %8s" % (
                f"{node.ip_addr} ({node.name})", node.cpus, node.jobs_done, per_job,
                node.cpu_time, _byte_size(node.tx), _byte_size(node.rx)))
        print()
        if info.jobs_pending:
            print("Jobs pending: %s" % info.jobs_pending)
        wall = wall_time or (time.time() - self._start)
        print("Total job time: %.3f sec, wall time: %.3f sec, speedup: %.3f"
              % (total, wall, total / wall if wall else 0.0))
        print()

    stats = print_status

    def _call(self, fn, timeout=30):
        return self._client.call(fn, timeout)

    def _link(self, node, strict=False):
        """A DispyNode, IP address, host name (or NodeAllocate) -> NodeLink."""
        if isinstance(node, DispyNode):
            ip, name = node.ip_addr, node.name
        elif isinstance(node, NodeAllocate):
            ip, name = node.ip_addr, node.host
        elif isinstance(node, str):
            ip, name = resolve_host(node), node
        else:
            ip = name = None
        for link, known in list(self._nodes.items()):
            if known.ip_addr == ip or known.name == name:
                return link
        if strict:
            raise ValueError(f"{node!r} is not a node of this cluster "
                             f"(nodes: {[n.ip_addr for n in self._nodes.values()]})")
        return None

    def allocate_node(self, node):
        """Use (again) a node: a DispyNode, host, address, NodeAllocate or list."""
        specs = node if isinstance(node, list) else [node]
        links = []
        for spec in specs:
            link = None if isinstance(spec, (NodeAllocate, tuple)) else self._link(spec)
            if link is not None:
                self._closing.pop(link, None)
                self._client.set_cpus(link, link.cpus)
                continue
            alloc = allocations([spec], self.node_port)[0]
            for dep in alloc.depends:  # missing files fail here, not per node
                file_entry(dep)
            self._check_setup_args(alloc.setup_args)
            self._allocs.append(alloc)
            links.extend(self._client.add_nodes([(alloc.host, alloc.port)]))
        return 0 if all(link.ready for link in links) else -1

    def discover_nodes(self, nodes):
        """dispy's discover_nodes: look for ``nodes`` (a host, an address, a
        NodeAllocate, or a list of them).  ``'*'`` and patterns (``'10.77.*'``)
        are looked for over UDP (pinged now; matching nodes join as they
        answer); named nodes are connected to, as by :meth:`allocate_node`.
        Returns 0, as dispy's does."""
        allocs = allocations(nodes if isinstance(nodes, list) else [nodes], self.node_port)
        patterns = [a for a in allocs if discover.is_pattern(a.host)]
        named = [a for a in allocs if not discover.is_pattern(a.host)]
        if patterns:
            for alloc in patterns:
                for dep in alloc.depends:  # missing files fail here, not per node
                    file_entry(dep)
            secret = self._used_secret or config.discovery_secret(self.secret, self.node_port)
            if not self._client.secret:
                self._client.secret = self._used_secret = secret
            self._allocs.extend(patterns)
            self._client.discover([(a.host, a.port) for a in patterns], secret, self.node_port,
                                  multicast=self._multicast)
        if named:
            self.allocate_node(named)
        return 0

    def deallocate_node(self, node):
        """Send no more jobs to this node (its running jobs finish); 0 or -1."""
        link = self._link(node)
        if link is None:
            return -1
        self._client.set_cpus(link, 0)
        return 0

    def close_node(self, node, terminate_pending=False):
        """Stop using a node: jobs pinned to it and waiting are cancelled; its
        running jobs finish first (or are terminated with terminate_pending)."""
        link = self._link(node)
        if link is None:
            return -1
        self._client.set_cpus(link, 0)

        def close():
            for job in self._running():
                if job.node is link and (terminate_pending or not job.sent):
                    self._client.cancel(job)
            self._closing[link] = True
            self._close_if_idle(link)
        self._client.call_soon(close)
        for job in self._pinned_waiting(link):
            core = job.core_job
            if core is not None:    # (None: it finished meanwhile)
                self._client.cancel(core)
        return 0

    def _running(self):
        """(loop thread) The client's jobs not finished, the direct call in
        flight (not among them) included.  Polled (status(), node_jobs()),
        a direct call is read by the loop thread from now on, as a polled
        DispyJob.status hands it over: else its end shows at the next tick."""
        direct = self._client.directs.in_flight()
        if direct is not None:
            direct.future.done()  # (the line's still while a user thread reads it)
        jobs = list(self._client.jobs.values())
        direct = self._client.directs.in_flight()
        if direct is not None and direct.tag is not None:
            jobs.append(direct)
        return jobs

    def _pinned_waiting(self, link):
        jobs = list(self._jobs)  # (a copy made in C: atomic)
        return [job for job, core in ((job, job.core_job) for job in jobs)
                if core is not None and not core.sent and core.node is None
                and job.pinned_to is link]

    def _close_if_idle(self, link):
        if link in self._closing and not any(job.node is link for job in self._running()):
            del self._closing[link]
            self._client.close_link(link)

    def resetup_node(self, node, terminate_pending=False, timeout=60):
        """Close a node's session and set it up again (setup runs again);
        returns when done: 0, or -1 if the node is unknown or did not come back."""
        link = self._link(node)
        if link is None:
            return -1
        address = link.address
        self.close_node(node, terminate_pending)
        deadline = time.monotonic() + timeout
        with self._events.changed:
            self._events.changed.wait_for(lambda: not link.ready, timeout)
        if link.ready or address == "embedded":
            return -1
        new = self._client.add_nodes([address])[0]
        with self._events.changed:
            self._events.changed.wait_for(lambda: not (new.ready and new.hold),
                                         max(0.0, deadline - time.monotonic()))
        self._call(lambda: None)  # the loop has done with the event (a lost node's jobs)
        return 0 if new.ready and not new.hold else -1

    def set_node_cpus(self, node, cpus):
        """Use this many of the node's CPUs (negative: all but that many); the
        number now used, or -1."""
        link = self._link(node)
        if link is None:
            return -1
        cpus = int(cpus)
        n = min(link.cpus, cpus) if cpus >= 0 else max(0, link.cpus + cpus)
        self._client.set_cpus(link, n)
        self._nodes[link].cpus = n
        return n

    def node_jobs(self, node, from_node=False):
        """The jobs running (or sent to run) on a node."""
        link = self._link(node)
        if link is None:
            return -1
        return self._call(lambda: [job.tag for job in self._running()
                                   if job.node is link and job.sent and job.tag is not None])

    def send_file(self, path, node, relay=False, timeout=30):
        """Send a file to a node's job folder; 0 if written there, -1 if not."""
        link = self._link(node)
        if link is None:
            return -1
        name, mode, data = file_entry(path)
        try:
            error = self._env.send_file(link, name, data, mode).result(timeout)
        except TimeoutError:
            error = f"no answer from node {link.name} in {timeout} s"
        if error:
            log.warning("send_file(%r): %s", path, error)
            return -1
        return 0

    # -------------------------------------------------------------- ending

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


# ------------------------------------------------------------------ helpers

def _check_callback(fn, nargs, what):
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"{what} must be a function")
    try:
        inspect.signature(fn).bind(*range(nargs))
    except TypeError:
        raise TypeError(f"{what} must take {nargs} positional argument"
                        f"{'s' if nargs > 1 else ''}") from None
    except ValueError:
        pass
    return fn


def _refused(exc, client):
    """Whether nothing listens there (connection refused), the other errors
    being a node that is there but can't be used."""
    errors = [exc, exc.__context__, *(link.error for link in client.links)]
    return "refused" in str(exc) or any(
        isinstance(e, OSError) and e.errno == errno.ECONNREFUSED for e in errors)


def _dispy_order(alloc):
    """The key dispy sorts its NodeAllocates on (see ``_allocs_for``)."""
    return alloc.ip_addr.replace(".", "\\.").replace("*", ".*")


def _allocated_cpus(want, cpus):
    """What ``NodeAllocate.allocate`` returned (any real number, a Decimal
    too), as a whole number of CPUs, used as dispy uses it: dispy keeps
    ``min(node's CPUs, want)`` and runs jobs on the node while fewer than
    that are busy, so a fraction counts as a whole CPU (1.5: 2 jobs at a
    time) and an infinite number as all of the node's ``cpus``; nothing, 0
    or less is no CPU (0: the next NodeAllocate is asked).
    Anything else (nan, a string...) raises TypeError."""
    if not want:
        return 0
    if not isinstance(want, (numbers.Real, decimal.Decimal)) or want != want:
        raise TypeError(f"NodeAllocate.allocate returned {want!r}, not a number of CPUs")
    if want <= 0:
        return 0
    return cpus if want == math.inf else math.ceil(want)


def _check_pulse_interval(value):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.1 <= value <= 1000:
        raise ValueError("pulse_interval must be a number of seconds between 0.1 and 1000")
    return value


def _check_dest_path(dest_path):
    if dest_path is None:
        return None
    if not isinstance(dest_path, str):
        raise TypeError("dest_path must be a string")
    dest_path = dest_path.strip().strip("/")
    jobenv.safe_path("/", dest_path)  # ValueError for '..' and the like
    return dest_path


def _check_picklable(computation, names, setup, cleanup):
    try:
        serialize.dumps_function(computation)
    except Exception as exc:
        raise TypeError(f"the computation {computation!r} cannot be sent to the nodes: "
                        f"{exc}") from exc
    try:
        serialize.dumps((names, setup, (), cleanup))
    except Exception as exc:
        raise TypeError(f"depends, setup or cleanup cannot be sent to the nodes: {exc}") from exc


def _byte_size(n):
    """1234567 -> '1.2 M' (dispy's units in print_status)."""
    for unit, size in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n


def _configure_logging(level):
    logger = logging.getLogger("dpool")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s dpool - %(message)s"))
        logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)
