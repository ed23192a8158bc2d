"""dispy's ``SharedJobCluster``: a JobCluster whose jobs go through ``dpool-scheduler``.

::

    SharedJobCluster ── one session ──► dpool-scheduler ── a session per node ──► dpool-node
      (a JobCluster whose one "node"     (places the jobs of all its clients
       is the scheduler)                  on the nodes, equal shares)

Everything a JobCluster does works the same way (jobs, callbacks,
``depends``, ``setup``/``cleanup``, ``dest_path``): the scheduler passes the
computation to each node its jobs may run on, and each job's ``ip_addr``
names the node that ran it.  The cluster's nodes are the nodes behind the
scheduler, as it lists them (events.py: ``ClusterEvents.behind``):
``status()``, ``node_jobs`` and the cluster_status callbacks show those, and
``submit_node`` runs a job on one of them (the scheduler places it there).
See docs/scheduler.md.
"""
import collections
import itertools
import logging
from concurrent.futures import Future, TimeoutError

from .. import protocol as P
from ..config import scheduler_address
from .cluster import JobCluster, by_dispys_order
from .depends import file_entry
from .model import ClusterStatus, DispyNode, NodeAllocate, resolve_host

log = logging.getLogger("dpool")

#: SharedJobCluster's parameters after ``cluster_status``, in dispy 4.15's
#: order: what a program passing them by position means.
DISPY_SHARED_ORDER = ("host", "dispy_port", "client_port", "scheduler_host", "ext_host",
                      "ip_addr", "ext_ip_addr", "loglevel", "callback", "setup", "cleanup",
                      "dest_path", "poll_interval", "reentrant", "exclusive", "secret",
                      "keyfile", "certfile", "recover_file")


class SharedJobCluster(JobCluster):
    """dispy's SharedJobCluster: ``computation`` runs on the nodes of the
    ``dpool-scheduler`` at ``scheduler_host:scheduler_port``, which shares
    them among its clients.  ``nodes`` limits this cluster to those nodes
    (host names or addresses, ``*`` patterns allowed).  With
    ``exclusive=True`` the cluster has the scheduler's nodes to itself, as in
    dispy: it starts once no other client uses the scheduler (waiting up to
    its connect timeout), and other clients wait until it closes."""

    def __init__(self, computation, nodes=None, depends=(), job_status=None,
                 cluster_status=None, *args, **kwargs):
        # (past cluster_status, arguments given by position are dispy's, in
        # dispy's order; the rest are keywords, dpool's included)
        self._init_shared(computation, nodes, depends, job_status, cluster_status,
                          **by_dispys_order("SharedJobCluster", DISPY_SHARED_ORDER, args,
                                            kwargs))

    def _init_shared(self, computation, nodes, depends, job_status, cluster_status, *,
                     scheduler_host=None, scheduler_port=None, exclusive=False,
                     client_port=None, port=None, **options):
        # client_port, port (dispy's: where the client takes the scheduler's
        # messages): none here, the client connects out to the scheduler.
        self._exclusive = bool(exclusive)
        self._replies = {}  # node call id -> (scheduler link, Future of its NodeReply)
        self._call_ids = itertools.count(1)
        self._only_nodes = _node_patterns(nodes)
        host, sport = scheduler_address(scheduler_host, scheduler_port)
        self._init(computation, [NodeAllocate(host, sport)], depends, job_status,
                   cluster_status, node_port=sport, **options)

    # ------------------------------------------------- the nodes behind the scheduler

    def submit_node(self, node, *args, **kwargs):
        """Run a job on ``node`` (a DispyNode, IP address or host name of a
        node behind the scheduler) only; ValueError if there is none."""
        return self.submit_job_id_node(None, node, *args, **kwargs)

    def submit_job_id_node(self, job_id, node, *args, **kwargs):
        link, host = self._behind(node, strict=True)
        return self._submit(job_id, link, args, kwargs, place=host)

    def status(self):
        """ClusterStatus of the nodes behind the scheduler (this cluster's)."""
        def collect_status():
            busy = collections.Counter((job.node, job.where)
                                       for job in self._client.jobs.values()
                                       if job.sent and job.where is not None)
            nodes = []
            for link, behind in self._events.behind.items():
                for host, node in behind.items():
                    node.busy = busy[(link, host)]
                    nodes.append(node)
            return ClusterStatus(nodes, self._client.pending())
        if self._client.closed:
            return ClusterStatus([], 0)
        return self._call(collect_status)

    def node_jobs(self, node, from_node=False):
        """The jobs running on ``node`` (behind the scheduler); [] if unknown."""
        link, host = self._behind(node)
        if link is None:
            return []
        return self._call(lambda: [job.tag for job in self._client.jobs.values()
                                   if job.node is link and job.where == host and job.sent
                                   and job.tag is not None])

    def _behind(self, node, strict=False):
        """A DispyNode, IP address or host name -> (scheduler link, the
        node's host as the scheduler names it), by dispy's rules: a DispyNode
        by its address; a string as the scheduler names the node, else by the
        address it resolves to, else (nodes the client cannot resolve) by the
        name the node reports, if only one reports it.  (None, None) when no
        node matches; ValueError when ``strict``, or when several do."""
        known = [(link, host, one) for link, behind in list(self._events.behind.items())
                 for host, one in list(behind.items())]
        if isinstance(node, DispyNode):
            tests = [lambda host, one: one.ip_addr == node.ip_addr]
        elif isinstance(node, str):
            ip = resolve_host(node)
            tests = [lambda host, one: host == node, lambda host, one: one.ip_addr == ip,
                     lambda host, one: one.name == node]
        else:
            tests = []
        for test in tests:
            found = [(link, host) for link, host, one in known if test(host, one)]
            if len(found) > 1:
                raise ValueError(f"{node!r} is ambiguous: it names {len(found)} nodes behind "
                                 f"the scheduler ({sorted(host for _, host in found)}); "
                                 f"give a node's address or its DispyNode")
            if found:
                return found[0]
        if strict:
            raise ValueError(f"{node!r} is not a node of this cluster (the nodes behind the "
                             f"scheduler: {sorted(one.ip_addr for _, _, one in known)})")
        return None, None

    # ----------------------------------------- node methods, through the scheduler

    def allocate_node(self, node):
        """Run this cluster's jobs on ``node`` (a DispyNode, address, host
        name or NodeAllocate; a list of one, as dispy) again after
        deallocate_node or close_node (its setup runs again then), or a
        node of the scheduler that ``nodes=`` left out; 0, or -1 if the
        scheduler has no such node."""
        if isinstance(node, list):
            if len(node) != 1:
                return -1  # (dispy's SharedJobCluster allocates one node at a time)
            node = node[0]
        link, host = self._behind(node)
        if link is None:
            link = next(iter(self._events.behind), None)
            host = node.host if isinstance(node, NodeAllocate) else \
                node.ip_addr if isinstance(node, DispyNode) else node
        return self._node_call(link, host, "allocate")

    def deallocate_node(self, node):
        """No more of this cluster's jobs go to ``node`` (those running there
        finish; other clients' jobs are not affected); 0 or -1."""
        return self._node_call(*self._behind(node), "deallocate")

    def close_node(self, node, terminate_pending=False):
        """Stop using ``node``: this cluster's jobs queued for it only are
        cancelled, its session there ends once its jobs running there are
        done (terminated at once with ``terminate_pending``); 0 or -1."""
        return self._node_call(*self._behind(node), "close", bool(terminate_pending))

    def resetup_node(self, node, terminate_pending=False, timeout=60):
        """close_node, then this cluster's session on ``node`` opened again
        (its setup runs again there); returns when done: 0, or -1."""
        return self._node_call(*self._behind(node), "resetup", bool(terminate_pending),
                               timeout=timeout)

    def set_node_cpus(self, node, cpus):
        """Run at most ``cpus`` of this cluster's jobs at once on ``node``
        (negative: all its CPUs but that many); other clients' jobs there
        are not affected.  The number now allowed, or -1."""
        return self._node_call(*self._behind(node), "cpus", int(cpus))

    def send_file(self, path, node, relay=False, timeout=30):
        """Send a file to this cluster's job folder on ``node`` (always
        through the scheduler, whatever ``relay``); 0 if written, -1 if not."""
        link, host = self._behind(node)
        if link is None:
            return -1
        name, mode, data = file_entry(path)
        return self._node_call(link, host, "file", (name, mode), [data], timeout=timeout)

    def _node_call(self, link, host, op, arg=None, frames=(), timeout=30):
        """Ask the scheduler to act on this client's use of the node
        ``host``; its answer (-1 if unknown, lost, or no answer in time)."""
        if link is None or self._client.closed:
            return -1
        req_id = next(self._call_ids)
        reply = Future()
        self._replies[req_id] = (link, reply)

        def send():
            if not link.ready or link.conn.closed:
                self._answer(req_id, -1)
                return
            link.conn.send([P.encode(P.NodeCall, req_id, op, host, arg), *frames])
        self._client.call_soon(send)
        try:
            return reply.result(timeout)
        except TimeoutError:
            log.warning("%s(%r): the scheduler did not answer within %s s", op, host, timeout)
            return -1
        finally:
            self._replies.pop(req_id, None)

    def _answer(self, req_id, result):
        _, reply = self._replies.pop(req_id, (None, None))
        if reply is not None and not reply.done():
            reply.set_result(result)

    def _on_node_reply(self, link, msg, frames):
        self._answer(msg.req_id, msg.result)

    def _node_closed(self, link):
        super()._node_closed(link)
        for req_id, (on, _) in list(self._replies.items()):
            if on is link:
                self._answer(req_id, -1)

    def _new_client(self, nodes, **options):
        client = super()._new_client(nodes, **options)
        client.register({P.NodeReply: self._on_node_reply})
        return client

    def _session(self):
        # The start of each job carries the node that runs it (job.ip_addr).
        options = dict(super()._session(), notify_start=True)
        if self._exclusive:
            options["exclusive"] = True
        if self._only_nodes:
            options["nodes"] = self._only_nodes
        return options


def _node_patterns(nodes):
    """``nodes`` as a list of host patterns (None: all the scheduler's nodes)."""
    if nodes in (None, "*", ["*"]):
        return None
    if isinstance(nodes, (str, NodeAllocate)):
        nodes = [nodes]
    out = []
    for node in nodes:
        if isinstance(node, NodeAllocate):
            out.append(node.host)
        elif isinstance(node, (tuple, list)):
            out.append(str(node[0]))
        else:
            out.append(str(node).rsplit(":", 1)[0] if str(node).count(":") == 1 else str(node))
    return out
