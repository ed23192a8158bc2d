"""Which job goes to which node: a pure state machine.

Events come in as method calls (jobs submitted, a node joined or was lost, a
job finished, a cancel), with the current time passed in; each call returns
a list of actions for the driver (:mod:`dpool.core.client`) to carry out.
Nothing here does I/O, reads the clock or sleeps, so every policy (in-flight
limits, retries, node loss) is tested without sockets or waiting.

Policies:

- No CPU idles while a job waits.  Jobs go first one per free CPU, to every
  node; only then does a node get more, up to ``limit(node)``: two per CPU
  plus a read-ahead that grows as jobs get shorter (measured), so that a node
  never idles waiting for the client.  When nothing is left to send and a node
  has a free CPU while another holds jobs it has not started (jobs not known
  to be tiny), the scheduler asks that node to give them back
  (:class:`Reclaim`); those it returns (:meth:`Scheduler.given_back`) go to
  the free CPUs.
- A draining node (:meth:`Scheduler.drain`) gets no new jobs; the jobs it
  gives back run elsewhere, those it runs finish there.
- A job whose node is lost goes back to the front of the queue, at most
  ``max_retries`` times; after that it fails with :class:`NodeLost`.  Errors
  raised by the job itself are results, never retried here.
- A job may be pinned to one node (``submit_node``); it then waits for that
  node only, and fails if that node is lost.
- Each dispatch of a job is a new attempt (numbered from 1, sent with the
  job); only the outcome of the current attempt on the node it was sent to
  resolves the job.  A late outcome (from a node declared lost that answers
  after all, or from an earlier attempt) is dropped and counted in
  ``stale``: a job is delivered exactly once.
- A job taken over with its node's session (:meth:`Scheduler.adopt`, dispy's
  ``recover_jobs``) is pinned to that node, whatever attempt its outcome
  carries; it can't be sent anywhere else (the driver has no arguments for
  it), so it fails if that node is lost or gives it back.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Container, Hashable, Iterable
from ..errors import NodeLost
from ..records import Record, Value

#: A node as the driver names it (the client uses its link objects).
Node = Hashable
JobId = int


# (records, not dataclasses: see dpool.records)

class Send(Record):
    __slots__ = _fields = ("node", "jobs")

    def __init__(self, node: Node, jobs: list[JobId]) -> None:
        self.node = node
        self.jobs = jobs


class Fail(Value):
    __slots__ = _fields = ("job", "error")

    def __init__(self, job: JobId, error: BaseException) -> None:
        self.job = job
        self.error = error


class CancelRemote(Value):
    __slots__ = _fields = ("node", "jobs")

    def __init__(self, node: Node, jobs: list[JobId]) -> None:
        self.node = node
        self.jobs = jobs


class Cancelled(Value):
    __slots__ = _fields = ("job",)

    def __init__(self, job: JobId) -> None:
        self.job = job


class Reclaim(Value):
    """Ask ``node`` to give back up to ``count`` jobs it has not started."""
    __slots__ = _fields = ("node", "count")

    def __init__(self, node: Node, count: int) -> None:
        self.node = node
        self.count = count


Action = Send | Fail | CancelRemote | Cancelled | Reclaim


#: Jobs measured shorter than this (seconds) are not reclaimed: moving them
#: would cost more than the wait it saves.
RECLAIM_MIN = 0.01


class NodeState(Record):
    __slots__ = _fields = ("cpus", "inflight", "ema", "done", "reclaiming", "draining", "depth",
                           "seq", "free_seen", "heap_free")

    def __init__(self, cpus: int, inflight: set[JobId] | None = None, ema: float | None = None,
                 done: int = 0, reclaiming: int = 0, draining: bool = False, depth: int = 2,
                 seq: int = 0, free_seen: int = 0, heap_free: int = 0) -> None:
        self.cpus = cpus
        self.inflight = set() if inflight is None else inflight
        self.ema = ema  # moving average of job durations on this node
        self.done = done
        # Jobs a Reclaim asked back: no other Reclaim goes to this node until the
        # answer gives them all back, or (a shorter answer) a job ends here.
        self.reclaiming = reclaiming
        self.draining = draining  # stopping: no new jobs
        self.depth = depth  # jobs per CPU held, before the read-ahead (see limit)
        # Kept by the Scheduler's indexes (see Scheduler._sync): the node's place
        # in add order, its free CPUs as last counted, and those of its valid
        # entry in the free-CPU heap (0: none).
        self.seq = seq
        self.free_seen = free_seen
        self.heap_free = heap_free

    def limit(self) -> int:
        """Jobs this node may hold: two per CPU (the next job is always there
        when one ends), more as measured jobs get shorter (up to 63 more).
        A dpool-scheduler gets a larger ``depth`` (client.SCHEDULER_DEPTH):
        it keeps two per CPU on its nodes and queues the rest, to refill a
        node the moment a job ends there."""
        if self.ema is None:
            per_cpu = self.depth
        else:
            per_cpu = self.depth + min(63, int(0.02 / max(self.ema, 1e-6)))
        return self.cpus * per_cpu

    def room(self) -> int:
        if self.draining:
            return 0
        return self.limit() - len(self.inflight)

    def free_cpus(self) -> int:
        if self.draining:
            return 0
        return max(0, self.cpus - len(self.inflight))

    def waiting(self) -> int:
        """Jobs here beyond one per CPU: they wait on the node, not started."""
        return max(0, len(self.inflight) - self.cpus)


class _Job(Record):
    __slots__ = _fields = ("node", "pin", "tries", "returned", "cancelling", "adopted")

    def __init__(self, node: Node | None = None, pin: Node | None = None, tries: int = 0,
                 returned: int = 0, cancelling: bool = False, adopted: bool = False) -> None:
        self.node = node  # where it runs, None while queued
        self.pin = pin  # the only node it may run on
        self.tries = tries  # dispatches (the attempt number of the latest)
        self.returned = returned  # dispatches given back unstarted: not retries
        self.cancelling = cancelling  # a cancel was sent to its node
        self.adopted = adopted  # taken over on its node: its attempt is not known


class _Queued(_Job):
    """The record of every job queued unpinned and never dispatched: one
    shared, read-only instance (a million queued jobs are not a million
    GC-tracked records; :meth:`Scheduler._fill` makes a job its own record
    as it dispatches it)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"the shared queued record is read-only ({name})")


_QUEUED = object.__new__(_Queued)
for _name, _default in (("node", None), ("pin", None), ("tries", 0), ("returned", 0),
                        ("cancelling", False), ("adopted", False)):
    object.__setattr__(_QUEUED, _name, _default)


class Scheduler:
    def __init__(self, max_retries: int = 2) -> None:
        self.max_retries = max_retries
        self.nodes: dict[Node, NodeState] = {}
        self.jobs: dict[JobId, _Job] = {}
        self.queue: collections.deque[JobId] = collections.deque()  # stale ids are skipped
        self.pinned: collections.defaultdict[Node, collections.deque[JobId]] = \
            collections.defaultdict(collections.deque)
        self.stale = 0  # outcomes dropped: not from the job's current attempt
        self.ema: float | None = None  # moving average of job durations on any node
        # Indexes over the nodes, so that placing a job or ending one costs
        # the same with 10 nodes or 10,000 (no scan of every node):
        self._seqs = itertools.count()
        self._free_heap: list[tuple[int, int, Node]] = []  # (-free CPUs, seq, node), lazy
        self._free_total = 0  # free CPUs on all nodes
        self._open: dict[Node, NodeState] = {}  # nodes with room for more jobs
        self._waiting: dict[Node, NodeState] = {}  # nodes holding jobs they have not started

    # ----------------------------------------------------------------- events

    def submit(self, job_ids: Iterable[JobId], now: float = 0.0,
               pin: Node | None = None) -> list[Action]:
        jobs = self.jobs
        if pin is None:
            queue = self.queue
            for job_id in job_ids:
                jobs[job_id] = _QUEUED
                queue.append(job_id)
        else:
            queue = self.pinned[pin]
            for job_id in job_ids:
                jobs[job_id] = _Job(None, pin)
                queue.append(job_id)
        return self._dispatch()

    def add_node(self, node: Node, cpus: int, now: float = 0.0, depth: int = 2) -> list[Action]:
        """A node joined with ``cpus``; one held already only changes its
        CPUs and depth (its jobs stay in flight there)."""
        held = self.nodes.get(node)
        if held is not None:
            held.depth = depth
            return self.set_cpus(node, cpus)
        state = self.nodes[node] = NodeState(cpus, depth=depth)
        state.seq = next(self._seqs)
        self._sync(node, state)
        return self._dispatch()

    def set_cpus(self, node: Node, cpus: int) -> list[Action]:
        state = self.nodes.get(node)
        if state is not None:
            state.cpus = cpus
            self._sync(node, state)
        return self._dispatch()

    def remove_node(self, node: Node, now: float = 0.0,
                    reason: str | None = None) -> list[Action]:
        """The node is gone: move or fail its jobs."""
        state = self.nodes.pop(node, None)
        actions: list[Action] = []
        if state is None:
            return actions
        self._unindex(node, state)
        error = NodeLost(reason or f"node {node} was lost")
        for job_id in sorted(state.inflight, reverse=True):
            job = self.jobs[job_id]
            job.node = None
            if job.cancelling:
                del self.jobs[job_id]
                actions.append(Cancelled(job_id))
            elif job.pin is not None or job.tries - job.returned > self.max_retries:
                del self.jobs[job_id]
                actions.append(Fail(job_id, error))
            else:
                self.queue.appendleft(job_id)
        for job_id in self.pinned.pop(node, ()):
            if self.jobs.pop(job_id, None) is not None:
                actions.append(Fail(job_id, error))
        actions.extend(self._dispatch())
        return actions

    def done(self, node: Node, job_id: JobId, duration: float | None = None, now: float = 0.0,
             dispatch: bool = True, attempt: int | None = None) -> list[Action]:
        """A job finished on ``node`` (result, error or cancel: all final).

        An outcome that is not the job's current attempt (see :meth:`current`;
        ``attempt=None`` checks the node only) changes nothing but ``stale``.
        With ``dispatch=False`` nothing is sent yet: a driver that takes many
        results at once calls :meth:`dispatch` after the last one.
        """
        if not self.finish(node, job_id, attempt, duration) or not dispatch:
            return []
        return self._dispatch()

    def finish(self, node: Node, job_id: JobId, attempt: int | None = None,
               duration: float | None = None, sync: bool = True) -> bool:
        """:meth:`done` without the dispatch, for a driver that takes many
        results at once (it calls :meth:`dispatch` after the last one):
        True if this is the job's current attempt (:meth:`current`), which
        is now finished; False (counted in ``stale``) if not.  With
        ``sync=False`` the node's indexes are brought up to date only by
        :meth:`sync` (once per batch of results: until then they show it
        with less room than it has, which delays no placement past that)."""
        job = self.jobs.get(job_id)
        if job is None or job.node != node or \
                (attempt is not None and attempt != job.tries and not job.adopted):
            self.stale += 1
            return False
        del self.jobs[job_id]
        state = self.nodes.get(node)
        if state is not None:
            state.inflight.discard(job_id)
            state.done += 1
            state.reclaiming = 0
            if duration is not None:
                state.ema = duration if state.ema is None else 0.8 * state.ema + 0.2 * duration
                self.ema = duration if self.ema is None else 0.8 * self.ema + 0.2 * duration
            if sync:
                self._sync(node, state)
        return True

    def sync(self, node: Node) -> None:
        """Bring the indexes up to date with ``node`` (after :meth:`finish`
        with ``sync=False``)."""
        state = self.nodes.get(node)
        if state is not None:
            self._sync(node, state)

    def adopt(self, node: Node, job_ids: Iterable[JobId], pinned: bool = True) -> None:
        """Jobs already on ``node`` (sent there by another client, whose
        session this driver took over): in flight there, pinned to it.
        ``pinned=False``: sent there by this driver's own thread as a first
        attempt (a direct call): in flight there as if dispatched."""
        state = self.nodes[node]
        for job_id in job_ids:
            self.jobs[job_id] = _Job(node=node, pin=node, adopted=True) if pinned \
                else _Job(node=node, tries=1)
            state.inflight.add(job_id)
        self._sync(node, state)

    def dispatch(self) -> list[Action]:
        """Send what the nodes have room for."""
        return self._dispatch()

    def given_back(self, node: Node, job_ids: list[JobId], now: float = 0.0,
                   cancel: bool = False, cancelled: Container[JobId] = ()) -> list[Action]:
        """``node`` gave these jobs back unstarted (a Reclaim's answer, or
        it is draining): they go to the front of the queue (``cancel``, or
        those in ``cancelled``: they are cancelled instead)."""
        state = self.nodes.get(node)
        actions: list[Action] = []
        if state is not None and len(job_ids) >= state.reclaiming:
            state.reclaiming = 0
        for job_id in reversed(job_ids):
            job = self.jobs.get(job_id)
            if job is None or job.node is not node:
                continue
            if state is not None:
                state.inflight.discard(job_id)
            job.node = None
            job.returned += 1  # it never ran: not a retry (its next dispatch is a new attempt)
            if job.cancelling or cancel or job_id in cancelled:
                del self.jobs[job_id]
                actions.append(Cancelled(job_id))
            elif job.adopted:  # nothing here to send it with
                del self.jobs[job_id]
                actions.append(Fail(job_id, NodeLost(f"node {node} gave back a job it had "
                                                     f"kept, unstarted")))
            else:
                (self.pinned[job.pin] if job.pin is not None else self.queue).appendleft(job_id)
        if state is not None:
            self._sync(node, state)
        actions.extend(self._dispatch())
        return actions

    def drain(self, node: Node, now: float = 0.0) -> list[Action]:
        """``node`` is stopping: no new jobs for it (it gives back its queued ones)."""
        state = self.nodes.get(node)
        if state is not None:
            state.draining = True
            self._sync(node, state)
        return self._dispatch()

    def cancel(self, job_id: JobId) -> list[Action]:
        job = self.jobs.get(job_id)
        if job is None:
            return []
        if job.node is None:  # still queued here: the stale id is skipped later
            del self.jobs[job_id]
            return [Cancelled(job_id)]
        if job.cancelling:
            return []
        job.cancelling = True
        return [CancelRemote(job.node, [job_id])]

    def fail_queued(self, error: BaseException) -> list[Action]:
        """Fail every job not on a node (e.g. no node is left to run them)."""
        actions: list[Action] = []
        for job_id in list(self.jobs):
            if self.jobs[job_id].node is None:
                del self.jobs[job_id]
                actions.append(Fail(job_id, error))
        self.queue.clear()
        self.pinned.clear()
        return actions

    # ---------------------------------------------------------------- queries

    def attempt(self, job_id: JobId) -> int:
        """The number of the job's latest dispatch (1 for the first)."""
        return self.jobs[job_id].tries

    def current(self, node: Node, job_id: JobId, attempt: int | None = None) -> bool:
        """True if an outcome of ``job_id`` from ``node`` (for ``attempt``)
        is the one to deliver: the job is in flight there, in that attempt
        (any attempt for an adopted job)."""
        job = self.jobs.get(job_id)
        return job is not None and job.node == node and \
            (attempt is None or attempt == job.tries or job.adopted)

    def pending(self) -> int:
        """Jobs not finished yet (queued here or on a node)."""
        return len(self.jobs)

    def queued(self) -> int:
        return sum(1 for job in self.jobs.values() if job.node is None)

    # ---------------------------------------------------------------- private

    def _dispatch(self) -> list[Action]:
        if not self.queue and not self.pinned and (self._free_total <= 0 or not self._waiting):
            return []  # nothing to send or reclaim (the common case as a job ends)
        batches: dict[Node, list[JobId]] = {}
        for node, queue in list(self.pinned.items()) if self.pinned else ():
            state = self.nodes.get(node)
            if state is not None and queue:
                self._fill(node, state, queue, batches, state.room())
                self._sync(node, state)
            if not queue:
                del self.pinned[node]
        if self.queue:
            # One job per free CPU everywhere first (most free CPUs first),
            # then the read-ahead (most room first); ties in add order.
            self._fill_free(batches)
            if self.queue:
                self._fill_room(batches)
        actions: list[Action] = [Send(node, ids) for node, ids in batches.items()]
        if self._free_total > 0 and self._waiting and not self._has_queued():
            actions.extend(self._reclaim())
        return actions

    def _fill_free(self, batches: dict[Node, list[JobId]]) -> None:
        heap, nodes = self._free_heap, self.nodes
        while self.queue and heap:
            minus_free, seq, node = heapq.heappop(heap)
            state = nodes.get(node)
            if state is None or state.seq != seq or state.heap_free != -minus_free:
                continue  # stale: the node's free CPUs changed since, or it left
            state.heap_free = 0
            self._fill(node, state, self.queue, batches, -minus_free)
            self._sync(node, state)

    def _fill_room(self, batches: dict[Node, list[JobId]]) -> None:
        for node, state in sorted(self._open.items(), key=lambda kv: (-kv[1].room(), kv[1].seq)):
            self._fill(node, state, self.queue, batches, state.room())
            self._sync(node, state)
            if not self.queue:
                break

    def _sync(self, node: Node, state: NodeState) -> None:
        """Bring the indexes up to date with ``state`` (call after any change
        to its jobs in flight, CPUs, measured durations or draining)."""
        held, cpus = len(state.inflight), state.cpus
        if state.draining:
            free, has_room = 0, False
        elif held < cpus:
            free, has_room = cpus - held, True
        else:  # the limit is at least two per CPU
            free, has_room = 0, held < 2 * cpus or state.limit() > held
        if free != state.free_seen:
            self._free_total += free - state.free_seen
            state.free_seen = free
        if free != state.heap_free:  # the entry in the heap (if any) goes stale
            state.heap_free = free
            if free > 0:
                heap = self._free_heap
                heapq.heappush(heap, (-free, state.seq, node))
                if len(heap) > 4 * len(self.nodes) + 64:
                    self._rebuild_heap()
        opened, waiting = self._open, self._waiting
        if has_room:
            opened[node] = state
        elif node in opened:
            del opened[node]
        if held > cpus:
            waiting[node] = state
        elif node in waiting:
            del waiting[node]

    def _unindex(self, node: Node, state: NodeState) -> None:
        """``node`` leaves: out of every index (its heap entries go stale)."""
        self._free_total -= state.free_seen
        state.free_seen = state.heap_free = 0
        self._open.pop(node, None)
        self._waiting.pop(node, None)

    def _rebuild_heap(self) -> None:
        """Drop the stale entries (too many piled up)."""
        heap = self._free_heap = []
        for node, state in self.nodes.items():
            free = state.heap_free = state.free_cpus()
            if free > 0:
                heap.append((-free, state.seq, node))
        heapq.heapify(heap)

    def _has_queued(self) -> bool:
        jobs = self.jobs
        while self.queue:
            job = jobs.get(self.queue[0])
            if job is not None and job.node is None:
                return True
            self.queue.popleft()  # stale: cancelled or already sent
        return False

    def _reclaim(self) -> list[Action]:
        """Free CPUs and nothing to send: ask nodes holding jobs they have
        not started to give them back."""
        free = self._free_total
        actions: list[Action] = []
        if free <= 0 or not self._waiting:
            return actions
        for node, state in sorted(self._waiting.items(), key=lambda kv: kv[1].seq):
            if free <= 0:
                break
            ema = self.ema if state.ema is None else state.ema
            if state.waiting() and not state.reclaiming and not state.draining \
                    and (ema is None or ema >= RECLAIM_MIN):
                count = min(self._movable(state), free)
                if count > 0:
                    state.reclaiming = count
                    free -= count
                    actions.append(Reclaim(node, count))
        return actions

    def _movable(self, state: NodeState) -> int:
        """Jobs waiting on a node that could run elsewhere (not pinned to it)."""
        jobs = self.jobs
        movable = sum(1 for job_id in state.inflight
                      if job_id in jobs and jobs[job_id].pin is None)
        return min(movable, state.waiting())

    def _fill(self, node: Node, state: NodeState, queue: collections.deque[JobId],
              batches: dict[Node, list[JobId]], room: int) -> None:
        jobs = self.jobs
        while room > 0 and queue:
            job_id = queue.popleft()
            job = jobs.get(job_id)
            if job is None or job.node is not None:
                continue
            if job is _QUEUED:
                jobs[job_id] = _Job(node, None, 1)
            else:
                job.node = node
                job.tries += 1
            state.inflight.add(job_id)
            batches.setdefault(node, []).append(job_id)
            room -= 1
