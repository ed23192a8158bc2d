"""JobCluster's loop-thread side: the core client's events copied into
DispyJobs and DispyNodes, and the user's callbacks queued, in order.

::

    client loop thread (Client on_event)            callback thread (core.callbacks)
    ────────────────────────────────────            ────────────────────────────────
    "node"        DispyNode Initialized / Closed ──► cluster_status(status, node, None)
    "started"     job.start_time, node.busy ───────► cluster_status(Running, node, job)
    "provisional" job.result (provisional) ────────► job_status(job), cluster_status(...)
    "file"        saved under the current folder
    "avail"       node.avail_info ─────────────────► cluster_status(AvailInfo, node, None)
    "done"        DispyJob.finish_from ────────────► job_status(job), cluster_status(...)

Through a dpool-scheduler (SharedJobCluster) the cluster's nodes are the
nodes behind it, as the scheduler lists them (``nodes`` in its Ready, sent
again as they change: event "ready"): ``behind[link]`` holds a DispyNode per
host, the callbacks name those, and a job's node is the one its start named
(``Job.where``).

Callbacks get snapshots (``DispyJob.snapshot``), as in dispy.  What the
cluster does besides (its job set, the recover file, closing an idle node)
it does in the hooks it gives: ``on_done(job, core_job)`` and
``on_node_closed(link)``.
"""
import logging
import os
import threading
import time

from ..node.env import job as jobenv
from .model import DispyJob, DispyNode, DispyNodeAvailInfo, resolve_host

log = logging.getLogger("dpool")


class ClusterEvents:
    def __init__(self, job_status, cluster_status, callbacks, on_done, on_node_closed):
        self.job_status, self.cluster_status = job_status, cluster_status
        self.callbacks = callbacks  # a CallbackThread, or None when there are no callbacks
        self.on_done, self.on_node_closed = on_done, on_node_closed
        self.nodes = {}  # NodeLink -> DispyNode (initialized nodes)
        self.behind = {}  # a scheduler's NodeLink -> {host: DispyNode} (its nodes)
        self.changed = threading.Condition()  # notified on every "node" event
        self._ips = {}  # NodeLink (or host name) -> its IP address, resolved once
        self._busy_on = {}  # DispyJob -> the DispyNode it started on
        self._handlers = {"node": self._node_changed, "provisional": self._provisional,
                          "file": self._file_received, "avail": self._avail,
                          "started": self._job_started, "ready": self._ready_again}

    def on_event(self, kind, core_job):
        """Client loop thread (the client's ``on_event``): a job's end, on
        every job's path, handled here (one call per job less), the other
        events by their handlers."""
        if kind != "done":
            self._handlers[kind](core_job)
            return
        job = core_job.tag
        if job is None:
            return
        link, where = core_job.node, core_job.where
        try:
            self.on_done(job, core_job)
        except Exception:  # (the recover file not written: disk full) the job ends all the same
            log.exception("dpool: job %s: its end could not be recorded", job.id)
        ip = self._ips.get(link if where is None else where)  # (job_ip, known: once per job)
        job.finish_from(core_job, self.job_ip(core_job) if ip is None else ip)
        # Without callbacks nobody sees a node between two status() calls,
        # and status() reads its counts from the link: only the nodes behind
        # a scheduler (counted here, per job) need this for each job, and a
        # job that started behind one lost since (its _busy_on entry).
        if self.callbacks is not None or link in self.behind or self._busy_on:
            self._node_done(job, core_job, link)


    def ip_of(self, link):
        """The node's IP address, resolved once per node (never per job)."""
        if link is None:
            return None
        ip = self._ips.get(link)
        if ip is None:
            ip = self._ips[link] = ("127.0.0.1" if link.address == "embedded"
                                    else resolve_host(link.address[0]))
        return ip

    def job_ip(self, core_job):
        """The IP address of the node that ran the job: through a scheduler,
        the node it named in the job's start, else the job's node."""
        where = core_job.where
        if where is None:
            return self.ip_of(core_job.node)
        ip = self._ips.get(where)
        if ip is None:
            ip = self._ips[where] = resolve_host(where)
        return ip

    def created(self, job):
        """A job was submitted (user thread)."""
        if self.cluster_status:
            self.callbacks.put(self.cluster_status, DispyJob.Created, None, job.snapshot())

    def node_of(self, core_job):
        """The DispyNode a job runs (or ran) on: behind a scheduler, the one
        its start named."""
        behind = self.behind.get(core_job.node)
        if behind is None:
            return self.nodes.get(core_job.node)
        return behind.get(core_job.where)

    def all_closed(self):
        """The cluster closed (its loop thread has stopped): every node Closed."""
        for link, node in self.nodes.items():
            for one in self.behind.get(link, {}).values() if link in self.behind else [node]:
                self._closed(one)
        self.nodes.clear()
        self.behind.clear()

    def _closed(self, node):
        node.avail_cpus = node.busy = 0
        node.update_time = time.time()
        if self.cluster_status:
            self.callbacks.put(self.cluster_status, DispyNode.Closed, node, None)

    # ------------------------------------------------------------ loop thread

    def _node_changed(self, link):
        if link.ready and not link.hold:
            node = DispyNode(self.ip_of(link), link.name, link.cpus)
            node.avail_info = DispyNodeAvailInfo.from_info(link.info.get("avail_info"))
            node.platform = (link.info.get("avail_info") or {}).get("platform", "")
            node.update_time = time.time()
            self.nodes[link] = node
            status = DispyNode.Initialized
        else:
            node = self.nodes.pop(link, None)
            if node is None:  # left out before it was initialized (e.g. setup failed)
                node = DispyNode(self.ip_of(link), link.name, 0)
            node.avail_cpus = node.busy = 0
            node.exception = str(link.error) if link.error else None
            node.update_time = time.time()
            status = DispyNode.Closed
            self.on_node_closed(link)
        if link.info.get("scheduler"):  # its nodes, not the scheduler, are the cluster's
            self._list_behind(link, status == DispyNode.Initialized)
        elif self.cluster_status:
            self.callbacks.put(self.cluster_status, status, node, None)
        with self.changed:
            self.changed.notify_all()

    def _ready_again(self, link):
        """A scheduler's list of nodes changed."""
        if link in self.nodes and link.info.get("scheduler"):
            self._list_behind(link, True)

    def _list_behind(self, link, up):
        """The nodes behind a scheduler: Initialized as they are listed,
        Closed as they leave the list (all of them when ``up`` is False)."""
        known = self.behind.setdefault(link, {})
        listed = {}
        for entry in link.info.get("nodes", ()) if up else ():
            name, cpus = listed.get(entry["host"], (entry["name"], 0))
            listed[entry["host"]] = (name, cpus + entry["cpus"])
        for host in [host for host in known if host not in listed]:
            self._closed(known.pop(host))
        for host, (name, cpus) in listed.items():
            node = known.get(host)
            if node is not None:
                node.cpus = cpus
                continue
            ip = self._ips.get(host)
            if ip is None:
                ip = self._ips[host] = resolve_host(host)
            node = known[host] = DispyNode(ip, name, cpus)
            node.update_time = time.time()
            if self.cluster_status:
                self.callbacks.put(self.cluster_status, DispyNode.Initialized, node, None)
        if not up:
            del self.behind[link]

    def _provisional(self, event):
        core_job, value = event
        job = core_job.tag
        job.provisional(value)
        self._notify(job, job.status, self.node_of(core_job))

    def _file_received(self, event):
        core_job, name, data = event
        try:
            path = jobenv.safe_path(os.getcwd(), name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        except (OSError, ValueError) as exc:
            log.warning("a file sent by job %s could not be saved: %s",
                        getattr(getattr(core_job, "tag", None), "id", "?"), exc)

    def _avail(self, link):
        node = self.nodes.get(link)
        if node is None:
            return
        node.avail_info = DispyNodeAvailInfo.from_info(link.info.get("avail_info"))
        node.tx, node.rx = link.tx, link.rx
        node.update_time = time.time()
        if self.cluster_status:
            self.callbacks.put(self.cluster_status, DispyNode.AvailInfo, node, None)

    def _job_started(self, core_job):
        job = core_job.tag
        if job is None:
            return
        node = self.node_of(core_job)
        job.start_time = core_job.start_time
        job.ip_addr = self.job_ip(core_job)
        before = self._busy_on.pop(job, None)  # started again (a scheduler's retry)
        if before is not None and before.busy > 0:
            before.busy -= 1
        if node is not None:
            self._busy_on[job] = node
            node.busy += 1
            node.update_time = time.time()
        if self.cluster_status:
            self.callbacks.put(self.cluster_status, DispyJob.Running, node, job.snapshot())

    def _node_done(self, job, core_job, link):
        """The job's node: one job less running, one more done; callbacks."""
        node = self.node_of(core_job)
        busy_on = self._busy_on.pop(job, None) if self._busy_on else None
        if node is not None:
            if busy_on is node and node.busy > 0:
                node.busy -= 1
            if link in self.behind:  # one of the nodes behind a scheduler
                node.jobs_done += 1
                if core_job.start_time and core_job.end_time:
                    node.cpu_time += max(0.0, core_job.end_time - core_job.start_time)
            else:
                node.jobs_done, node.cpu_time = link.jobs_done, link.cpu_time
                node.tx, node.rx = link.traffic()
            node.update_time = time.time()
        if self.callbacks is not None:
            self._notify(job, job.status, node)

    def _notify(self, job, status, node):
        if self.callbacks is None:
            return
        snap = job.snapshot()
        if self.job_status:
            self.callbacks.put(self.job_status, snap)
        if self.cluster_status:
            self.callbacks.put(self.cluster_status, status, node, snap)
