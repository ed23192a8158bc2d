"""Which client's job runs next: the fair-share policy, pure.

Several clients (programs sharing one set of nodes through a scheduler)
each have a queue of pending jobs and a weight.  When a CPU frees up on a
node, :meth:`FairShare.pick` says whose job runs there next.  Nothing here
does I/O or reads the clock: the driver (``dpool-scheduler``) calls it and
carries out the answers, with :class:`dpool.core.scheduler.Scheduler`
deciding which node a picked job goes to.

::

    client submits ──► submit(client, ids)      client queues (FIFO each)
    a CPU frees   ──► pick(node) ──► (client, job) or None: "running"
    job ends      ──► done(job)                 running -1
    job comes back ─► requeue(job)              (unstarted, node lost)
                                                front of its client's queue
    client gone   ──► remove_client ──► Removed(queued, running): kill those

Contract:

- **Fair** (the default): the job goes to the client, among those with a
  job queued that may use ``node``, whose share after the pick would be
  smallest, ``(running + 1) / weight``; ties go to the job submitted first.
  So while clients keep work queued, every CPU that frees goes to the one
  furthest below its weighted share, and once the jobs that ran before
  (the last change of who has work) have ended, no client is more than
  one job ahead: ``running_i / w_i <= (running_j + 1) / w_j`` for every
  client ``j`` with work queued (D'Hondt's apportionment).  Nothing is
  preempted: a client arriving late gets CPUs as the others' jobs end.
- **Work-conserving**: ``pick(node)`` returns ``None`` only when no client
  allowed on ``node`` has a job queued.  A client without work takes no
  share; its share goes to the others.
- **FIFO** (``FairShare(fifo=True)``): the job submitted first, whoever
  submitted it (weights are ignored).
- A client may be limited to some nodes (``add_client(..., nodes=...)``);
  shares are then fair among the clients competing for the same node.
- ``running`` counts jobs picked and not yet ended: jobs sent to a node,
  whether they have started there or wait in its queue; a driver that wants
  shares of CPUs exactly keeps at most one job per CPU in flight.
- Job ids are any hashable, unique among the jobs this policy holds (a
  driver serving many clients can use ``(client, job_id)``).  Calls about
  unknown jobs (already ended, cancelled, their client removed) are ignored
  and say so in their return value, so late messages are harmless.
- Clients come and go at any time; :meth:`remove_client` hands back the
  ids of its queued and running jobs so that the driver kills them.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Collection, Container, Hashable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

ClientId = Hashable
JobId = Hashable
Node = Hashable


class Removed(NamedTuple):
    """What a removed client left: jobs to forget, and jobs to kill."""
    queued: list[JobId]
    running: list[JobId]


class Pick(NamedTuple):
    client: ClientId
    job: JobId


@dataclass(frozen=True)
class ClientCounts:
    """One client's numbers, for status pages."""
    weight: float
    queued: int
    running: int
    done: int


class _Client:
    __slots__ = ("id", "weight", "nodes", "queue", "back", "queued", "running", "done",
                 "head")

    def __init__(self, client: ClientId, weight: float, nodes: Container[Node] | None) -> None:
        self.id = client
        self.weight = weight
        self.nodes = nodes  # None: any node
        # (seq, job): seq is the job's submission number; entries of
        # cancelled jobs stay until they reach the head (see FairShare._head).
        self.queue: collections.deque[tuple[int, JobId]] = collections.deque()
        # Jobs requeued, a heap by seq: picked with the queue's jobs in
        # submission order, so a requeued job keeps its place.
        self.back: list[tuple[int, JobId]] = []
        self.queued = 0  # live entries in queue
        self.running: set[JobId] = set()
        self.done = 0
        self.head: tuple[int, JobId] | None = None  # the next job, once known (see _head)

    def allows(self, node: Node | None) -> bool:
        return node is None or self.nodes is None or node in self.nodes


class FairShare:
    """The fair-share policy over clients' job queues (see the module doc)."""

    def __init__(self, fifo: bool = False) -> None:
        self.fifo = fifo
        self.clients: dict[ClientId, _Client] = {}
        self._waiting: dict[ClientId, _Client] = {}  # clients with a job queued
        self._jobs: dict[JobId, tuple[_Client, int]] = {}  # every job held: client, seq
        self._seq = itertools.count()

    # ---------------------------------------------------------------- clients

    def add_client(self, client: ClientId, weight: float = 1.0,
                   nodes: Collection[Node] | None = None) -> None:
        """A new client, with its weight (> 0) and the nodes it may use
        (``None``: all).  Adding a known client changes its weight and nodes."""
        _check_weight(weight)
        limit = None if nodes is None else frozenset(nodes)
        known = self.clients.get(client)
        if known is None:
            self.clients[client] = _Client(client, float(weight), limit)
        else:
            known.weight, known.nodes = float(weight), limit

    def use_nodes(self, client: ClientId, nodes: Container[Node]) -> None:
        """The nodes ``client`` may use are those in ``nodes``, a container
        the driver keeps up to date (not copied: a driver whose clients'
        nodes change one at a time, as nodes join, pays nothing per change)."""
        self.clients[client].nodes = nodes

    def set_weight(self, client: ClientId, weight: float) -> None:
        _check_weight(weight)
        self.clients[client].weight = float(weight)

    def remove_client(self, client: ClientId) -> Removed:
        """Forget ``client``: its queued jobs (never started) and its running
        ones (the driver kills them), both in submission order."""
        c = self.clients.pop(client, None)
        if c is None:
            return Removed([], [])
        self._waiting.pop(client, None)
        queued = [job for seq, job in sorted(c.back) + list(c.queue) if self._live(c, seq, job)]
        running = sorted(c.running, key=lambda job: self._jobs[job][1])
        for job in itertools.chain(queued, running):
            del self._jobs[job]
        return Removed(queued, running)

    # ------------------------------------------------------------------- jobs

    def submit(self, client: ClientId, job_ids: Iterable[JobId]) -> None:
        """Queue jobs for ``client`` (an unknown client raises KeyError; a
        job id already held raises ValueError and queues nothing)."""
        c = self.clients[client]
        job_ids = list(job_ids)
        if len(set(job_ids)) != len(job_ids) or any(job in self._jobs for job in job_ids):
            raise ValueError("job ids must be unique among the jobs held")
        for job in job_ids:
            seq = next(self._seq)
            self._jobs[job] = (c, seq)
            c.queue.append((seq, job))
        self._queued(c, len(job_ids))

    def pick(self, node: Node | None = None) -> Pick | None:
        """A CPU is free on ``node`` (``None``: on a node any client may
        use): the job to run there, now counted as running; ``None`` only
        if no client allowed there has a job queued."""
        best: _Client | None = None
        best_share = best_seq = 0.0
        fifo = self.fifo
        for c in self._waiting.values():
            if node is not None and c.nodes is not None and node not in c.nodes:
                continue
            seq = (c.head or self._head(c))[0]
            share = 0.0 if fifo else (len(c.running) + 1) / c.weight
            if best is None or share < best_share or (share == best_share and seq < best_seq):
                best, best_share, best_seq = c, share, seq
        if best is None:
            return None
        seq, job = best.head or self._head(best)
        (heapq.heappop(best.back) if best.back and best.back[0][0] == seq
         else best.queue.popleft())
        best.head = None
        best.running.add(job)
        best.queued -= 1
        if not best.queued:
            del self._waiting[best.id]
        return Pick(best.id, job)

    def done(self, job: JobId) -> ClientId | None:
        """A running job ended (any outcome): its client, or ``None`` if the
        job is not running here (unknown, queued, or its client removed)."""
        held = self._jobs.get(job)
        if held is None or job not in held[0].running:
            return None
        c = held[0]
        c.running.discard(job)
        c.done += 1
        del self._jobs[job]
        return c.id

    def requeue(self, job: JobId) -> bool:
        """A running job came back unstarted (its node was lost, or gave it
        back): it goes to the front of its client's queue, keeping its place
        in FIFO order.  False if it was not running here."""
        held = self._jobs.get(job)
        if held is None or job not in held[0].running:
            return False
        c, seq = held
        c.running.discard(job)
        heapq.heappush(c.back, (seq, job))
        c.head = None
        self._queued(c, 1)
        return True

    def cancel(self, job: JobId) -> bool:
        """Drop a queued job (True), or nothing if it is not queued here: a
        running job is ended with :meth:`done` once the node says so."""
        held = self._jobs.get(job)
        if held is None or job in held[0].running:
            return False
        del self._jobs[job]
        held[0].head = None
        self._queued(held[0], -1)
        return True

    # ---------------------------------------------------------------- queries

    def counts(self, client: ClientId) -> ClientCounts:
        c = self.clients[client]
        return ClientCounts(c.weight, c.queued, len(c.running), c.done)

    def status(self) -> dict[ClientId, ClientCounts]:
        return {client: self.counts(client) for client in self.clients}

    def client_of(self, job: JobId) -> ClientId | None:
        held = self._jobs.get(job)
        return None if held is None else held[0].id

    def queued(self) -> int:
        """Jobs queued, all clients together."""
        return sum(c.queued for c in self._waiting.values())

    def running(self) -> int:
        return sum(len(c.running) for c in self.clients.values())

    def backlogged(self) -> int:
        """How many clients have a job queued."""
        return len(self._waiting)

    def has_work(self, node: Node | None = None) -> bool:
        """True if a job is queued that may run on ``node``."""
        return any(c.allows(node) for c in self._waiting.values())

    # ---------------------------------------------------------------- private

    def _queued(self, c: _Client, change: int) -> None:
        c.queued += change
        if c.queued > 0:
            self._waiting[c.id] = c
        else:
            self._waiting.pop(c.id, None)

    def _live(self, c: _Client, seq: int, job: JobId) -> bool:
        held = self._jobs.get(job)
        return held is not None and held[1] == seq and job not in c.running

    def _head(self, c: _Client) -> tuple[int, JobId]:
        """``c``'s first live queued job, (seq, job) (dropping cancelled
        ones on the way; kept in ``c.head`` until the queue changes); ``c``
        has one."""
        back, queue = c.back, c.queue
        while back and not self._live(c, *back[0]):
            heapq.heappop(back)
        while queue and not self._live(c, *queue[0]):
            queue.popleft()
        c.head = back[0] if back and (not queue or back[0][0] < queue[0][0]) else queue[0]
        return c.head


def _check_weight(weight: float) -> None:
    message = f"a client's weight must be a number > 0, not {weight!r}"
    try:
        positive = weight > 0
    except TypeError:  # a string, None, a complex number...
        raise TypeError(message) from None
    if not positive:  # also refuses NaN
        raise ValueError(message)
