"""The scheduler service behind ``dpool-scheduler``: many clients, one set of nodes.

::

    clients (Client, JobCluster, SharedJobCluster, Executor, Pool)
       │  the node protocol: to a client the scheduler is one node with all
       │  the nodes' CPUs (same handshake, records, heartbeats, messages)
       ▼
    Broker ── ClientSession (one per client): its queue of jobs, its functions,
       │      its computation (initializer, depends, setup: the ``preamble``)
       │      and one Leg per node (nodeport.py)
       ├── placement: whenever a node has a free CPU and clients have queued
       │   jobs, the share policy picks the client (equal shares, work
       │   conserving); a node never runs more jobs than it has CPUs
       └── NodePort (one per node): anchor session, CPUs, jobs running there

Jobs keep the ids their client gave them (each client has its own session,
its Leg, on each node, so ids never meet).  Results, exceptions, provisional
results and files from a node go to the client as the node sent them;
Started gets the node's address as a third item of each job (so a dispy
job's ``ip_addr`` names the node that ran it).  A client that goes away
(Bye, closed, or silent past its lease) has its legs closed: the nodes kill
its running jobs, and its CPUs go to the other clients at once.  A node lost
while running a client's jobs: they are placed again (at most
``max_retries`` times, then they fail with NodeLost), and the node is
re-joined with backoff.
"""
from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import os
import socket
from typing import Any

from .. import liveness
from .. import protocol as P
from .. import serialize
from ..errors import NodeLost
from ..protocol import Outcome
from ..transport import PROTOCOL_VERSION, Connection, start_server
from .nodeport import Link, NodePort, Watch

log = logging.getLogger("dpool.scheduler")

#: Session options a leg does not pass on to its node: the scheduler answers
#: those itself (heartbeats) or does not offer them through a scheduler.
_NOT_FORWARDED = ("heartbeat", "cpus", "recover_token", "pulse_interval", "nodes", "weight")
_ENV = (P.SetupDone, P.SetupFail, P.FileDone, P.Provisional, P.SendFile)


class EqualShare:
    """The share policy's shape (a stand-in until dpool.core's fair-share
    class lands): ``pick(clients)`` names the client whose next job takes a
    free CPU: the one with the fewest running jobs per unit of weight,
    oldest first on a tie."""

    def __init__(self) -> None:
        self.order: dict[Any, float] = {}  # client -> weight, oldest first

    def add(self, client: Any, weight: float = 1.0) -> None:
        self.order[client] = max(float(weight), 1e-6)

    def remove(self, client: Any) -> None:
        self.order.pop(client, None)

    def pick(self, candidates: list) -> Any:
        return min(candidates, key=lambda c: c.running / self.order.get(c, 1.0))


class ClientSession:
    """One client of the scheduler."""

    def __init__(self, broker: Broker, conn: Connection, sid: int) -> None:
        self.broker, self.conn, self.sid = broker, conn, sid
        self.options: dict = {}
        self.init_frames: list = []
        self.preamble: list[list] = []  # File(None) and Setup: sent to each new leg
        self.legs: dict[NodePort, Link] = {}
        self.held: set[Link] = set()  # legs whose setup has not finished
        self.setup_state: str | None = None  # None, "done", "failed"
        self.fns: dict[int, Any] = {}  # fn_id -> blob
        self.sent_fns: dict[Link, set[int]] = collections.defaultdict(set)
        self.queue: collections.deque = collections.deque()  # (item, payload frames)
        self.cancelled: set[int] = set()  # queued jobs cancelled (skipped when popped)
        self.placed: dict[int, tuple[Link, tuple, list]] = {}  # job id -> (leg, item, payload)
        self.tries: collections.Counter = collections.Counter()
        self.running = 0
        self.limit = 1 << 62
        self.files: dict[int, list] = {}  # file request -> [legs left, first error]
        self.ended = False
        self.counts: collections.Counter = collections.Counter()
        self.handlers = {P.Session: self.on_session, P.Func: self.on_func, P.Run: self.on_run,
                         P.Cancel: self.on_cancel, P.Bye: self.on_bye, P.Forget: self.on_forget,
                         P.File: self.on_file, P.Setup: self.on_setup,
                         P.Heartbeat: lambda msg, frames: None, P.Reclaim: self.on_reclaim,
                         P.Status: self.on_status, P.Recover: self.on_recover}

    def __repr__(self) -> str:
        return f"client {self.sid} ({self.conn.peer})"

    # ------------------------------------------------------------ from the client

    def on_message(self, frames: list) -> None:
        if self.ended:
            return
        try:
            msg = P.decode(frames[0])
            handler = self.handlers[type(msg)]
        except Exception as exc:  # an authenticated peer sent nonsense
            log.warning("%s: bad message (%s); closing its session", self, exc)
            self.end("protocol error")
            return
        handler(msg, frames)

    def on_close(self, exc: BaseException | None = None) -> None:
        if not self.ended:
            log.info("%s disconnected%s", self, f" ({exc})" if exc else "")
        self.end("client disconnected")

    def on_session(self, msg: Any, frames: list) -> None:
        broker = self.broker
        if self.options or not broker.ready_nodes():
            self.tell([P.encode(P.Refused, f"scheduler {broker.name} has no node "
                                               f"ready" if not self.options else
                                     "a session is open on this connection already")])
            self.end("refused")
            return
        self.options = dict(msg.options)
        self.init_frames = list(frames[1:])
        if "heartbeat" in self.options:
            broker.watch.add(self.conn, liveness.peer_settings(self.options["heartbeat"]))
        broker.policy.add(self, float(self.options.get("weight", 1.0)))
        self.limit = int(self.options.get("cpus") or 1 << 62)  # the most jobs running at once
        info = broker.info()
        info["cpus"] = info["free_cpus"] = min(info["cpus"], self.limit)
        self.tell([P.encode(P.Ready, info)])
        log.info("%s: session open, %d nodes", self, len(broker.ready_nodes()))
        for port in broker.ready_nodes():
            self.open_leg(port)

    def on_func(self, msg: Any, frames: list) -> None:
        self.fns[msg.fn_id] = frames[1]

    def on_run(self, msg: Any, frames: list) -> None:
        queue = self.queue
        for item, payload in P.run_items(msg, frames):
            queue.append((tuple(item), list(payload)))
        self.broker.place_soon()

    def on_cancel(self, msg: Any, frames: list) -> None:
        by_leg: dict[Link, list[int]] = collections.defaultdict(list)
        queued = {item[0] for item, _ in self.queue}
        for job_id in msg.job_ids:
            where = self.placed.get(job_id)
            if where is not None:
                by_leg[where[0]].append(job_id)
            elif job_id in queued and job_id not in self.cancelled:
                self.cancelled.add(job_id)
                self.report(job_id, Outcome.CANCELLED)
        for leg, ids in by_leg.items():
            leg.send([P.encode(P.Cancel, ids)])

    def on_reclaim(self, msg: Any, frames: list) -> None:
        given: list[int] = []
        while self.queue and len(given) < msg.count:
            item, _ = self.queue.pop()
            if item[0] not in self.cancelled:
                given.append(item[0])
        self.tell([P.encode(P.GiveBack, given)])

    def on_forget(self, msg: Any, frames: list) -> None:
        for fn_id in msg.fn_ids:
            self.fns.pop(fn_id, None)
        for leg, sent in self.sent_fns.items():
            drop = [fn_id for fn_id in msg.fn_ids if fn_id in sent]
            if drop:
                sent.difference_update(drop)
                leg.send([P.encode(P.Forget, drop)])

    def on_file(self, msg: Any, frames: list) -> None:
        if msg.req_id is None:  # a dependency: every node gets it, new ones too
            self.on_setup(msg, frames)
            return
        legs = [leg for leg in self.legs.values() if leg.ready]
        if not legs:
            self.tell([P.encode(P.FileDone, msg.req_id, "no node is connected")])
            return
        self.files[msg.req_id] = [len(legs), None]
        for leg in legs:
            leg.send(list(frames))

    def on_setup(self, msg: Any, frames: list) -> None:
        self.preamble.append(list(frames))
        for leg in self.legs.values():
            if leg.conn is not None:
                leg.send(list(frames))

    def on_status(self, msg: Any, frames: list) -> None:
        if not self.options:
            self.tell([P.encode(P.Status, self.broker.status())])
        self.end("status")

    def on_recover(self, msg: Any, frames: list) -> None:
        self.tell([P.encode(P.Refused, "a scheduler keeps no results to recover")])
        self.end("refused")

    def on_bye(self, msg: Any, frames: list) -> None:
        self.end("client closed the session")

    # ---------------------------------------------------------------- legs

    def wants(self, port: NodePort) -> bool:
        """The client's ``nodes`` option (host patterns) admits ``port``."""
        patterns = self.options.get("nodes")
        if not patterns:
            return True
        names = (port.host, str((port.anchor.info if port.anchor else {}).get("name", "")))
        return any(fnmatch.fnmatchcase(name, str(pattern))
                   for pattern in patterns for name in names)

    def open_leg(self, port: NodePort) -> None:
        if self.ended or port in self.legs or not self.wants(port):
            return
        leg = self.legs[port] = Link(port)
        if self.options.get("setup"):
            self.held.add(leg)
        options = {key: value for key, value in self.options.items()
                   if key not in _NOT_FORWARDED}
        options["shared"] = True
        self.broker.spawn(self._open(leg, options))

    async def _open(self, leg: Link, options: dict) -> None:
        try:
            await leg.open(options, self.init_frames, lambda: list(self.preamble),
                           self.on_leg_message, self.on_leg_closed)
        except Exception as exc:
            leg.abort()
            if self.legs.get(leg.port) is leg:
                del self.legs[leg.port]
            self.held.discard(leg)
            if not self.ended:
                log.warning("%s: node %s: %s", self, leg.port, exc)
                self._check_setup()
            return
        if self.ended:
            leg.bye()
            return
        self.broker.place_soon()

    def usable(self, port: NodePort) -> Link | None:
        leg = self.legs.get(port)
        if leg is None or not leg.ready or leg in self.held:
            return None
        return leg

    def on_leg_message(self, leg: Link, msg: Any, frames: list) -> None:
        kind = type(msg)
        if kind is P.Done:
            self.on_done(leg, msg, frames)
        elif kind is P.Started:
            if self.options.get("notify_start"):
                host = leg.port.host
                self.tell([P.encode(P.Started, [(job[0], job[1], host)
                                                     for job in msg.jobs])])
        elif kind is P.GiveBack:
            self.requeue(leg, msg.job_ids)
        elif kind in _ENV:
            self.on_leg_env(leg, kind, msg, frames)
        elif kind is P.InitFail:
            self.tell(list(frames))
            self.end("initializer failed")
        # Draining, AvailInfo: the node's anchor tells the scheduler; nothing to pass on

    def on_done(self, leg: Link, msg: Any, frames: list) -> None:
        port, placed = leg.port, self.placed
        for record, _ in P.raw_results(msg, frames):
            if placed.pop(record[0], None) is not None:
                port.busy -= 1
                self.running -= 1
                self.tries.pop(record[0], None)
        self.counts["done"] += len(msg.results)
        self.tell(frames)
        self.broker.place_soon()

    def on_leg_env(self, leg: Link, kind: type, msg: Any, frames: list) -> None:
        if kind is P.SetupDone:
            self.held.discard(leg)
            if self.setup_state is None:
                self.setup_state = "done"
                self.tell([P.encode(P.SetupDone, {"cpus": self.broker.total_cpus()})])
            self.broker.place_soon()
        elif kind is P.SetupFail:
            self._setup_failed = list(frames)
            log.warning("%s: setup failed on node %s (left out)", self, leg.port)
            leg.bye()
        elif kind is P.FileDone:
            self.file_answered(msg.req_id, msg.error)
        else:  # Provisional, SendFile: for the client's job, as they came
            self.tell(list(frames))

    _setup_failed: list | None = None

    def _check_setup(self) -> None:
        """No leg left to set up and none done: the client's setup failed."""
        if self.setup_state is None and self.options.get("setup") and not self.legs:
            self.setup_state = "failed"
            frames = self._setup_failed or [
                P.encode(P.SetupFail),
                *serialize.dump_exception(NodeLost("no node could run the setup"))]
            self.tell(frames)

    def file_answered(self, req_id: int | None, error: str | None) -> None:
        if req_id is None:
            if error is not None:
                log.warning("%s: a dependency could not be written: %s", self, error)
            return
        state = self.files.get(req_id)
        if state is None:
            return
        state[0] -= 1
        state[1] = state[1] or error
        if state[0] <= 0:
            del self.files[req_id]
            self.tell([P.encode(P.FileDone, req_id, state[1])])

    def on_leg_closed(self, leg: Link, exc: BaseException | None) -> None:
        """The leg (or its node) went away: its jobs are placed again."""
        if self.legs.get(leg.port) is leg:
            del self.legs[leg.port]
        self.held.discard(leg)
        self.sent_fns.pop(leg, None)
        if self.ended:
            return
        self.requeue(leg, [job_id for job_id, where in self.placed.items() if where[0] is leg],
                     lost=True)
        for req_id in list(self.files):
            self.file_answered(req_id, f"node {leg.port} went away")
        self._check_setup()

    def requeue(self, leg: Link, job_ids: list, lost: bool = False) -> None:
        front = []
        for job_id in job_ids:
            where = self.placed.pop(job_id, None)
            if where is None:
                continue
            leg.port.busy -= 1
            self.running -= 1
            if lost:
                self.tries[job_id] += 1
                if self.tries[job_id] > self.broker.max_retries:
                    self.report(job_id, Outcome.WORKER_LOST, serialize.dump_exception(NodeLost(
                        f"node {leg.port} was lost while running the job (tried "
                        f"{self.tries.pop(job_id)} times)")), attempt=where[1][4])
                    continue
            front.append((where[1], where[2]))
        self.queue.extendleft(reversed(front))
        self.broker.place_soon()

    # ------------------------------------------------------------- to the client

    def tell(self, frames: list) -> None:
        if not self.conn.closed:
            self.conn.send(frames)

    def report(self, job_id: int, outcome: int, frames: Any = (),
               attempt: int | None = None) -> None:
        if attempt is None:
            attempt = next((item[4] for item, _ in self.queue if item[0] == job_id), None)
        self.tell([P.encode(P.Done, [P.result(job_id, outcome, len(frames),
                                                   attempt=attempt)]), *frames])

    def take(self, port: NodePort, leg: Link, count: int, batch: list) -> int:
        """Up to ``count`` queued jobs for ``leg`` into ``batch``; how many."""
        queue, cancelled, taken = self.queue, self.cancelled, 0
        while queue and taken < count:
            item, payload = queue.popleft()
            if cancelled and item[0] in cancelled:
                cancelled.discard(item[0])
                continue
            self.placed[item[0]] = (leg, item, payload)
            batch.append((item, payload))
            taken += 1
        port.busy += taken
        self.running += taken
        return taken

    def send(self, leg: Link, batch: list) -> None:
        sent = self.sent_fns[leg]
        header: list[tuple] = []
        frames: list[Any] = [None]
        for item, payload in batch:
            fn_id = item[1]
            if fn_id not in sent and fn_id in self.fns:
                sent.add(fn_id)
                leg.send([P.encode(P.Func, fn_id), self.fns[fn_id]])
            header.append(item)
            frames.extend(payload)
        frames[0] = P.encode(P.Run, header)
        leg.send(frames)

    def end(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        broker = self.broker
        broker.watch.discard(self.conn)
        broker.policy.remove(self)
        broker.clients.discard(self)
        for leg, _, _ in self.placed.values():
            leg.port.busy -= 1
        self.placed.clear()
        self.queue.clear()
        for leg in list(self.legs.values()):
            leg.bye()
        self.legs.clear()
        if not self.conn.closed:
            self.conn.close()
        if self.options:
            log.info("%s ended (%s): %d results", self, why, self.counts["done"])
        broker.place_soon()


class Broker:
    """The scheduler: accepts clients as a node does, drives the nodes."""

    def __init__(self, nodes: list[tuple[str, int]], *, secret: bytes, ssl: Any = None,
                 node_ssl: Any = None, name: str | None = None, heartbeat: Any = None,
                 connect_timeout: float | None = None, max_retries: int = 2,
                 policy: Any = None) -> None:
        self.name = name or socket.gethostname()
        self.secret = secret
        self.ssl = ssl
        self.max_retries = max_retries
        self.policy = policy or EqualShare()
        self.watch = Watch()
        settings = liveness.settings(heartbeat)
        timeout = liveness.connect_timeout(connect_timeout)
        self.ports = [NodePort(host, port, secret=secret, ssl=node_ssl, watch=self.watch,
                               settings=settings, connect_timeout=timeout)
                      for host, port in nodes]
        self.clients: set[ClientSession] = set()
        self.tasks: set[asyncio.Task] = set()
        self.server: Any = None
        self._sids = iter(range(1, 1 << 62))
        self._place_scheduled = False
        self.draining = False

    # ------------------------------------------------------------- nodes

    def ready_nodes(self) -> list[NodePort]:
        return [port for port in self.ports if port.ready]

    def total_cpus(self) -> int:
        return sum(port.cpus for port in self.ready_nodes())

    def info(self) -> dict:
        cpus = self.total_cpus()
        return {"name": self.name, "cpus": cpus, "free_cpus": cpus, "pid": os.getpid(),
                "scheduler": True, "nodes": len(self.ready_nodes())}

    def hello(self) -> dict:
        cpus = self.total_cpus()
        return {"protocol": PROTOCOL_VERSION, "role": "node", "name": self.name, "cpus": cpus,
                "free_cpus": cpus, "scheduler": True, **serialize.runtime_versions()}

    async def add_node(self, port: NodePort) -> bool:
        """Join a node once (at start); a node that does not answer is retried."""
        if await port.join(self.on_anchor_message, self.on_anchor_closed):
            self.node_ready(port)
            return True
        log.warning("node %s:%s: %s (retrying in the background)", port.host, port.port,
                    port.error)
        self.rejoin(port)
        return False

    def rejoin(self, port: NodePort) -> None:
        if port.rejoin is None and not port.closed:
            port.rejoin = self.spawn(port.keep_joining(self.on_anchor_message,
                                                       self.on_anchor_closed, self.node_ready))

    def node_ready(self, port: NodePort) -> None:
        log.info("node %s: %d CPUs", port.name, port.cpus)
        for client in list(self.clients):
            if client.options:
                client.open_leg(port)

    def on_anchor_message(self, link: Link, msg: Any, frames: list) -> None:
        if type(msg) is P.Draining:
            log.info("node %s is shutting down: no new jobs go there", link.port)
            link.port.draining = True

    def on_anchor_closed(self, link: Link, exc: BaseException | None) -> None:
        port = link.port
        if port.closed:
            return
        log.warning("lost node %s: %s", port, exc or "it closed the connection")
        for client in list(self.clients):
            leg = client.legs.get(port)
            if leg is not None:
                leg.abort()  # its close callback places its jobs again
        self.rejoin(port)

    # ------------------------------------------------------------- placement

    def place_soon(self) -> None:
        if not self._place_scheduled:
            self._place_scheduled = True
            asyncio.get_running_loop().call_soon(self.place)

    def place(self) -> None:
        """Fill every free CPU with a queued job, the policy choosing whose."""
        self._place_scheduled = False
        waiting = [client for client in self.clients if client.queue]
        if not waiting:
            return
        pick = self.policy.pick
        for port in self.ports:
            free = port.free()
            if free <= 0:
                continue
            batches: dict[ClientSession, list] = {}
            while free > 0:
                candidates = [c for c in waiting if c.queue and c.running < c.limit
                              and c.usable(port) is not None]
                if not candidates:
                    break
                client = pick(candidates)
                batch = batches.setdefault(client, [])
                if not client.take(port, client.legs[port], 1, batch):
                    waiting.remove(client)
                    continue
                free -= 1
            for client, batch in batches.items():
                if batch:
                    client.send(client.legs[port], batch)

    # ------------------------------------------------------------- clients

    def accept(self, conn: Connection) -> None:
        client = ClientSession(self, conn, next(self._sids))
        if self.draining:
            conn.abort()
            return
        self.clients.add(client)
        conn.set_receiver(client.on_message, client.on_close)
        self.watch.add(conn, liveness.Settings())  # Session comes within the default lease

    def status(self) -> dict:
        running = sum(client.running for client in self.clients)
        queued = sum(len(client.queue) for client in self.clients)
        cpus = self.total_cpus()
        return {"name": self.name, "scheduler": True, "pid": os.getpid(), "cpus": cpus,
                "free_cpus": max(0, cpus - running), "sessions": len(self.clients),
                "running": running, "queued": queued, "kept": 0,
                "nodes": [{"name": port.name, "cpus": port.cpus, "busy": port.busy,
                           "ready": port.ready} for port in self.ports]}

    # ------------------------------------------------------------- life

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self, host: str, port: int) -> Broker:
        await asyncio.gather(*(self.add_node(node) for node in self.ports))
        self.server = await start_server(self.accept, host, port, secret=self.secret,
                                         hello=self.hello, ssl=self.ssl)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    async def drain(self, grace: float) -> None:
        """Take no new clients; give the queued jobs back; let the running
        ones finish for up to ``grace`` seconds."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            if client.options:
                client.tell([P.encode(P.Draining, grace)])
                client.on_reclaim(P.Reclaim(len(client.queue)), [])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(client.placed for client in self.clients) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            client.end("scheduler shutting down")
        for port in self.ports:
            port.close()
        self.watch.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
