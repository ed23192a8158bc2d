"""The dashboard of a set of nodes, with no client of them (``dpool dashboard``):
each node's Status, asked at most once a second while someone watches."""
import asyncio
import threading
import time

from ..core.status import explain, query_nodes

REFRESH = 1.0  # seconds a snapshot is reused


class NodesMonitor:
    """A dashboard source made of ``dpool-node`` addresses."""

    kind = "dpool-node"

    def __init__(self, addresses, secrets, ssl=None, name="nodes", timeout=3.0):
        self.addresses = list(addresses)
        self.secrets = list(secrets)
        self.ssl = ssl
        self.name = name
        self.timeout = timeout
        self.source = self  # DashboardServer.remove compares sources
        self._last = None
        self._at = 0.0
        self._lock = threading.Lock()

    def detach(self):
        pass

    def snapshot(self):
        with self._lock:
            if self._last is None or time.monotonic() - self._at >= REFRESH:
                self._last = self._collect()
                self._at = time.monotonic()
            return self._last

    def _collect(self):
        answers = asyncio.run(query_nodes(self.addresses, self.secrets, ssl=self.ssl,
                                          timeout=self.timeout))
        rows = [_row(address, answer, self.timeout)
                for address, answer in zip(self.addresses, answers)]
        up = [row for row in rows if row["connected"]]
        jobs = {"queued": sum(row["queued"] for row in up),
                "running": sum(row["running"] for row in up)}
        errors = [{"id": "-", "node": row["address"], "error": row["error"]}
                  for row in rows if not row["connected"]]
        return {"name": self.name, "kind": self.kind, "closed": False, "started": None,
                "nodes": rows, "jobs": jobs, "throughput": [], "errors": errors,
                "recent": []}


def _row(address, answer, timeout):
    host, port = address
    row = {"address": f"{host}:{port}", "connected": isinstance(answer, dict)}
    if not row["connected"]:
        return dict(row, name="-", cpus=0, running=0, queued=0, done=None,
                    error=explain(answer, timeout))
    return dict(row, name=answer["name"], cpus=answer["cpus"], running=answer["running"],
                queued=answer["queued"], done=None, error=None, load=answer.get("load"),
                cpu_busy=answer.get("cpu_busy"), memory_free=answer.get("memory_free"),
                free_cpus=answer.get("free_cpus"), sessions=answer.get("sessions"))
