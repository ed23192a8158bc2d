"""What the dashboard shows about one Executor, Pool or JobCluster.

A :class:`Monitor` listens to its client's events (in the client's loop
thread: counts, recent errors and jobs) and builds a JSON-ready snapshot on
request, also in the loop thread, where the client's state may be read.
"""
import asyncio
import collections
import os
import threading
import time

from ..core import client as core
from ..core.status import query_nodes

# How a job that ended is counted (core status -> dashboard name).
_ENDED = {core.FINISHED: "finished", core.TERMINATED: "failed",
          core.CANCELLED: "cancelled", core.ABANDONED: "abandoned"}

RECENT = 50        # recent jobs kept
ERRORS = 20        # recent errors kept
SAMPLES = 300      # throughput samples kept
SAMPLE_EVERY = 1.0  # seconds between throughput samples
STATUS_EVERY = 2.0  # seconds between Status requests to remote nodes


class Monitor:
    def __init__(self, source, name=None, show_job_args=True):
        self.source = source
        self.client = getattr(source, "_client", source)
        self.name = name or _name_of(source)
        self.show_job_args = show_job_args
        self.started = time.time()
        self.counts = collections.Counter()
        self.errors = collections.deque(maxlen=ERRORS)
        self.recent = collections.deque(maxlen=RECENT)
        self.samples = collections.deque(maxlen=SAMPLES)  # (time, jobs ended so far)
        self._last = None
        self._loads = {}  # (host, port) -> the remote node's last Status
        self._loads_at = 0.0
        self._lock = threading.Lock()  # the loop thread writes, HTTP threads copy
        # copy on write: the loop thread may be iterating the list
        self.client.listeners = self.client.listeners + [self.on_event]

    def detach(self):
        self.client.listeners = [fn for fn in self.client.listeners if fn != self.on_event]

    # ---------------------------------------------------- loop thread

    def on_event(self, kind, job):
        if kind != "done":
            return
        ended = "cancelled" if job.cancelled else _ENDED.get(job.status, "failed")
        entry = {"id": _job_id(job), "status": ended, "node": _node_name(job.node),
                 "end": time.time(), "duration": _duration(job)}
        if self.show_job_args:
            entry["args"] = _job_args(job)
        with self._lock:
            self.counts[ended] += 1
            self.recent.appendleft(entry)
            if ended in ("failed", "abandoned") and job.error is not None:
                self.errors.appendleft(dict(entry, error=f"{type(job.error).__name__}: "
                                                        f"{job.error}"))

    def _collect(self):
        """Runs in the loop thread: the live part of the snapshot."""
        client = self.client
        # Nodes report when a job starts only if the session asked them to
        # (JobCluster with callbacks); otherwise a job sent counts as running.
        starts_known = bool(client.session.get("notify_start"))
        running, queued = collections.Counter(), client.incoming()
        for job in client.jobs.values():
            if job.sent and job.node is not None and \
                    (job.start_time is not None or not starts_known):
                running[job.node] += 1
            else:
                queued += 1
        nodes = [_node_row(link, running.get(link, 0), self._loads.get(link.address))
                 for link in client.links]
        return nodes, queued, sum(running.values())

    def _refresh_loads(self):
        """Ask the remote nodes for their load (a Status request each, on the
        client's loop), at most every STATUS_EVERY seconds."""
        now = time.monotonic()
        if now - self._loads_at < STATUS_EVERY:
            return
        self._loads_at = now
        addresses = [link.address for link in self.client.nodes()
                     if isinstance(link.address, tuple)]
        if not addresses:
            return
        query = query_nodes(addresses, [self.client.secret] * len(addresses),
                            ssl=self.client.ssl, timeout=2)
        answers = asyncio.run_coroutine_threadsafe(query, self.client.loop).result(5)
        self._loads = {address: answer for address, answer in zip(addresses, answers)
                       if isinstance(answer, dict)}

    # ---------------------------------------------------- HTTP threads

    def snapshot(self):
        """A dict for ``/api/status`` (the last one once the client closed)."""
        closed = self.client.closed or not self.client.alive
        if not closed:
            try:
                self._refresh_loads()
                nodes, queued, running = self.client.call(self._collect, timeout=5)
            except (RuntimeError, TimeoutError):
                closed = True
        if closed:
            if self._last is not None:
                return dict(self._last, closed=True, queued=0, running=0)
            nodes, queued, running = [], 0, 0
        with self._lock:
            counts = dict(self.counts)
            errors, recent = list(self.errors), list(self.recent)
            self._sample(time.time(), sum(counts.values()))
            throughput = _rates(self.samples)
        jobs = {"queued": queued, "running": running, "finished": 0, "failed": 0,
                "cancelled": 0, "abandoned": 0}
        jobs.update(counts)
        self._last = {"name": self.name, "kind": type(self.source).__name__,
                      "closed": closed, "started": self.started, "nodes": nodes,
                      "jobs": jobs, "throughput": throughput, "errors": errors,
                      "recent": recent}
        return self._last

    def _sample(self, now, ended):
        if not self.samples:
            self.samples.append((self.started, 0))
        if now - self.samples[-1][0] >= SAMPLE_EVERY:
            self.samples.append((now, ended))


def _rates(samples):
    """[(time, jobs per second)] between successive samples."""
    samples = list(samples)
    return [(round(t1, 3), round((n1 - n0) / (t1 - t0), 3))
            for (t0, n0), (t1, n1) in zip(samples, samples[1:]) if t1 > t0]


def _name_of(source):
    name = getattr(source, "name", None)
    return name() if callable(name) else name or type(source).__name__


def _job_id(job):
    tag = job.tag
    return getattr(tag, "id", job.id)  # a JobCluster's DispyJob has its own id


def _job_args(job):
    args = getattr(job.tag, "args", None)  # only JobCluster keeps the arguments
    if args is None:
        return None
    text = repr(args)
    return text if len(text) <= 80 else text[:77] + "..."


def _duration(job):
    if job.start_time is None or job.end_time is None:
        return None
    return round(job.end_time - job.start_time, 6)


def _node_name(link):
    return None if link is None else link.name


def _node_row(link, running, status=None):
    info = link.info or {}
    avail = info.get("avail_info") or {}
    row = {"name": link.name, "address": _address(link), "cpus": link.cpus,
           "running": running, "done": link.jobs_done, "cpu_time": round(link.cpu_time, 3),
           "connected": bool(link.ready), "error": None if link.ready else _text(link.error),
           "cpu_busy": None if avail.get("cpu") is None else round(100.0 - avail["cpu"], 1),
           "memory_free": avail.get("memory"), "load": None}
    if link.address == "embedded":
        row.update(_local_load())
    elif status is not None:  # fresher than the avail_info of the session's start
        row.update(load=status.get("load"), cpu_busy=status.get("cpu_busy"),
                   memory_free=status.get("memory_free"))
    return row


def _local_load():
    import psutil

    return {"load": round(os.getloadavg()[0], 2),
            "cpu_busy": round(psutil.cpu_percent(None), 1),
            "memory_free": psutil.virtual_memory().available}


def _address(link):
    if isinstance(link.address, tuple):
        return "%s:%s" % link.address
    return str(link.address)


def _text(error):
    return None if error is None else str(error) or type(error).__name__
