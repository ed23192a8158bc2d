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
       │   jobs, the share policy (core/share.py: FairShare) picks the job
       │   (equal or weighted shares, work conserving; or FIFO); a node never
       │   runs more jobs than it has CPUs
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
import math
import os
import socket
from collections.abc import Sequence
from typing import Any

from .. import liveness
from .. import protocol as P
from .. import serialize
from ..errors import BrokenCluster, NodeLost
from ..protocol import Outcome
from ..transport import PROTOCOL_VERSION, Connection, start_server
from ..transport.budget import ReceiveBudget
from ..transport.streams import after_pass
from .computation import Computation
from .keep import KEEP_RESULTS, Keeping, Kept
from .nodecalls import NodeCalls
from .nodelist import NodeList
from .resultmerge import ResultMerge
from .nodeport import Link, NodePort, Watch
from .discover import MAX_FOUND
from .schedfind import FORGET_AFTER, start_finder
from .share import FairShare

log = logging.getLogger("dpool.scheduler")

#: Session options a leg does not pass on to its node: the scheduler answers
#: those itself (heartbeats) or does not offer them through a scheduler.
_NOT_FORWARDED = ("heartbeat", "cpus", "recover_token", "pulse_interval", "nodes", "weight",
                  "exclusive")
#: Seconds a new client waits, at most, for its sessions on the nodes before
#: Ready (well within a client's connect timeout).
LEG_WAIT = 5.0
#: Seconds new clients are turned away (Busy) after an exclusive client was
#: told to wait for the others, so that it gets in once they are done (it
#: asks again every BUSY_POLL s, core/client.py).
EXCLUSIVE_QUEUE = 2.0
#: Clients gone with a recover_file whose sessions are kept at once, at most
#: (past it, the one gone longest is let go): with KEEP_MAX_RESULTS and
#: KEEP_MAX_BYTES (keep.py) what a churn of such clients leaves is bounded.
MAX_DETACHED = 1024
#: Found nodes forgotten (lost for long) remembered, at most, the oldest
#: dropped first: as many as a client's Finder remembers (discover.MAX_FOUND).
MAX_FORGOTTEN = MAX_FOUND
#: Seconds over which changes to a client's nodes (joined, lost) are
#: gathered into one Ready (ClientSession.tell_ready_soon).
READY_COALESCE = 0.1
_ENV = (P.SetupDone, P.SetupFail, P.FileDone)  # the computation's (computation.py)
_PASSED_ON = (P.Provisional, P.SendFile)


def _pinned_share(session: ClientSession) -> tuple[float, int]:
    return (session.running + 1) / session.weight, session.sid


def session_limits(options: Any) -> tuple[float, int]:
    """A Session's fair-share weight (finite, > 0; default 1) and job limit
    (its ``cpus``: a whole number > 0, or none/0 for no limit), else
    ValueError/TypeError naming the option and the value."""
    cpus = P.session_cpus(options) or 1 << 62
    weight = options.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not 0 < weight < math.inf:
        raise ValueError(f"weight={weight!r}: a finite number > 0")
    return float(weight), cpus


class ClientSession(P.Served):
    """One client of the scheduler."""

    log = log

    def __init__(self, broker: Broker, conn: Connection, sid: int) -> None:
        self.broker, self.conn, self.sid = broker, conn, sid
        self.options: dict = {}
        self.init_frames: list = []
        self.legs: dict[NodePort, Link] = {}
        self.env = Computation(self)  # depends, setup, files: to every leg
        self.calls = NodeCalls(self)  # its own use of each node (SharedJobCluster's node methods)
        self.fns: dict[int, Any] = {}  # fn_id -> blob
        self.sent_fns: dict[Link, set[int]] = collections.defaultdict(set)
        # Queued jobs: job id -> (item, payload frames); their order is the policy's.
        self.pending: dict[int, tuple[tuple, list]] = {}
        self.placed: dict[int, tuple[Link, tuple, list]] = {}  # job id -> (leg, item, payload)
        self.tries: collections.Counter = collections.Counter()
        self.cancelling: set[int] = set()  # placed jobs the client cancelled
        self.running = 0
        self.weight = 1.0
        self.limit = 1 << 62
        self.told_cpus = 0  # the CPUs the last Ready announced (0: none sent yet)
        # The nodes where its leg is open and set up (for the policy:
        # FairShare.use_nodes), and what its Ready messages told of them.
        self.node_list = NodeList(self.calls.cpus_on)
        self._ready_timer: asyncio.TimerHandle | None = None  # tell_ready_soon
        self._sync_scheduled = False  # sync_soon
        # Jobs pinned to a node (dispy's submit_node): job id -> the node's
        # host, while queued or placed; host -> its queued job ids, in order.
        self.pin_of: dict[int, str] = {}
        self.pinned: dict[str, dict[int, None]] = {}
        self.ended = False
        self.kept: Kept | None = None  # while detached (gone, recoverable): its results
        self.counts: collections.Counter = collections.Counter()
        self.refused: set[Link] = set()  # legs that spoke of jobs not theirs (logged once)
        self.merge = ResultMerge(self)  # the nodes' Done of one pass: one to the client
        self.handlers = {P.Session: self.on_session, P.Func: self.on_func, P.Run: self.on_run,
                         P.Cancel: self.on_cancel, P.Bye: self.on_bye, P.Forget: self.on_forget,
                         P.File: self.env.on_file, P.Setup: self.env.on_setup,
                         P.Heartbeat: lambda msg, frames: None, P.Reclaim: self.on_reclaim,
                         P.Status: self.on_status, P.Recover: self.on_recover,
                         P.NodeCall: self.calls.on_call}

    def __repr__(self) -> str:
        return f"client {self.sid} ({self.conn.peer})"

    # ------------------------------------------------------------ from the client

    def on_close(self, exc: BaseException | None = None) -> None:
        if not self.ended and self.options.get("recover_token") and self.kept is None \
                and not self.broker.draining:
            self.detach(exc)
            return
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
        try:
            self.weight, self.limit = session_limits(msg.options)
            heartbeat = liveness.peer_settings(msg.options["heartbeat"]) \
                if "heartbeat" in msg.options else None
        except (TypeError, ValueError) as exc:
            log.warning("%s: session refused: %s", self, exc)
            self.tell([P.encode(P.Refused, f"bad session option {exc}")])
            self.end("refused")
            return
        self.options = dict(msg.options)
        self.init_frames = list(frames[1:])
        if heartbeat is not None:
            broker.watch.add(self.conn, heartbeat)
        broker.fair.add_client(self, self.weight, nodes=())
        busy = broker.busy_for(self)
        if busy:  # the client asks again, up to its connect timeout
            self.tell([P.encode(P.Busy, busy)])
            self.end("busy")
            return
        ports = [port for port in broker.ready_nodes() if self.wants(port)]
        if not ports:
            self.tell([P.encode(P.Refused, f"no node of scheduler {broker.name} matches "
                                           f"nodes={self.options.get('nodes')!r}")])
            self.end("refused")
            return
        broker.spawn(self._ready_when_open([self.open_leg(port) for port in ports]))

    async def _ready_when_open(self, tasks: list) -> None:
        """Ready once the legs are open (or failed), within LEG_WAIT: the
        client then sees the nodes' CPUs at once; a slower leg joins later."""
        await asyncio.wait([task for task in tasks if task is not None], timeout=LEG_WAIT)
        if self.ended:
            return
        self.tell_ready()
        log.info("%s: session open, %d of %d nodes", self,
                 sum(1 for leg in self.legs.values() if leg.ready), len(self.broker.ports))

    def tell_ready(self) -> None:
        """Ready: the scheduler's CPUs (up to the client's ``cpus``) and the
        nodes its jobs may run on now: the first lists them (``nodes``:
        host, port, name, cpus), the later ones say what changed
        (``nodes_added``, ``nodes_removed``; core.client.ready_info).  Sent
        again when nodes join, so the client sends jobs for those CPUs too,
        and when that list changes (never announcing fewer CPUs: the
        client's jobs would wait in the client instead of failing here),
        at most every READY_COALESCE s (tell_ready_soon), and before any
        other message to the client, so that it never hears of a job or a
        setup before the nodes it concerns."""
        self._ready_timer = None
        if self.ended:
            return
        self.node_list.changed = False
        first = not self.told_cpus
        info = self.broker.info()
        cpus = max(min(info["cpus"], self.limit), self.told_cpus)
        if first:
            info["nodes"] = self.node_list.tell_all()
        else:
            info["nodes_added"], info["nodes_removed"] = self.node_list.changes()
            if cpus == self.told_cpus and not info["nodes_added"] \
                    and not info["nodes_removed"]:
                return  # nothing new
        info["cpus"] = info["free_cpus"] = self.told_cpus = cpus
        self.tell([P.encode(P.Ready, info)])

    def tell_ready_soon(self) -> None:
        """Ready again, once, READY_COALESCE s from now: nodes joining in a
        burst (a scheduler's start, discovery) make one message, not one
        each (with thousands of nodes, one each of every node is quadratic)."""
        if self._ready_timer is None and self.told_cpus and not self.ended:
            self._ready_timer = asyncio.get_running_loop().call_later(READY_COALESCE,
                                                                      self.tell_ready)

    def on_func(self, msg: Any, frames: list) -> None:
        self.fns[msg.fn_id] = frames[1]

    def on_run(self, msg: Any, frames: list) -> None:
        pending, ids = self.pending, []
        for item, payload in P.run_items(msg, frames):
            job_id = item[0]
            if job_id in pending or job_id in self.placed:
                log.warning("%s: job %s sent twice; closing the session", self, job_id)
                self.end("protocol error")
                return
            if len(item) > 5:  # pinned to a node (dispy's submit_node)
                self.pin(job_id, tuple(item[:5]), list(payload), item[5])
                continue
            pending[job_id] = (tuple(item), list(payload))
            ids.append((self, job_id))
        self.broker.fair.submit(self, ids)
        if self.broker.draining:  # straight back: this scheduler is stopping
            self.on_reclaim(P.Reclaim(len(pending)), [])
        self.broker.place_soon()

    def on_cancel(self, msg: Any, frames: list) -> None:
        by_leg: dict[Link, list[int]] = collections.defaultdict(list)
        for job_id in msg.job_ids:
            where = self.placed.get(job_id)
            if where is not None:
                by_leg[where[0]].append(job_id)
                self.cancelling.add(job_id)
            elif self.broker.fair.cancel((self, job_id)) or self.unqueue_pin(job_id):
                item, _ = self.pending.pop(job_id)
                self.pin_of.pop(job_id, None)
                self.report(job_id, Outcome.CANCELLED, attempt=item[4])
        for leg, ids in by_leg.items():
            leg.send([P.encode(P.Cancel, ids)])

    def on_reclaim(self, msg: Any, frames: list) -> None:
        given: list[int] = []
        for job_id in reversed(list(self.pending)):  # the last submitted first
            if len(given) >= msg.count:
                break
            if self.broker.fair.cancel((self, job_id)):
                del self.pending[job_id]
                given.append(job_id)
        self.tell([P.encode(P.GiveBack, given)])

    def on_forget(self, msg: Any, frames: list) -> None:
        for fn_id in msg.fn_ids:
            self.fns.pop(fn_id, None)
        for leg, sent in self.sent_fns.items():
            drop = [fn_id for fn_id in msg.fn_ids if fn_id in sent]
            if drop:
                sent.difference_update(drop)
                leg.send([P.encode(P.Forget, drop)])

    def on_status(self, msg: Any, frames: list) -> None:
        if not self.options:
            self.tell([P.encode(P.Status, self.broker.status())])
        self.end("status")

    def on_recover(self, msg: Any, frames: list) -> None:
        """Recover instead of Session: take over a detached session (keep.py)."""
        broker = self.broker
        old = broker.detached.pop(msg.token, None) if not self.options else None
        if old is not None:  # results read in this pass: kept, told after Ready
            old.merge.flush()
        if old is None or old.ended:
            self.tell([P.encode(P.Refused, f"scheduler {broker.name} keeps no results for "
                                           f"that session (unknown, or the time to recover "
                                           f"it has passed)")])
            self.end("refused")
            return
        self.ended = True  # this session only hands its connection over
        broker.clients.discard(self)
        old.reattach(self.conn, msg.terminate)

    # ------------------------------------------------- a client gone away (keep.py)

    def detach(self, exc: BaseException | None) -> None:
        keep = self.broker.keep_results
        log.info("%s disconnected%s; its jobs go on and their results are kept for %ss "
                 "(recover_jobs)", self, f" ({exc})" if exc else "", keep)
        self.broker.watch.discard(self.conn)
        self.kept = Kept(keep, lambda: self.end(f"the client did not come back within "
                                                f"{keep}s"), self.broker.keeping)
        detached = self.broker.detached
        detached[self.options["recover_token"]] = self
        while len(detached) > MAX_DETACHED:  # the one gone longest is let go
            next(iter(detached.values())).end(f"more than {MAX_DETACHED} clients gone "
                                              f"with a recover_file at once")

    def reattach(self, conn: Connection, terminate: bool) -> None:
        """``recover_jobs`` is here: Ready with the kept and unfinished jobs,
        the kept results; the others follow as they end."""
        kept, self.kept = self.kept, None
        if kept is None:
            return
        kept.cancel()
        self.conn = conn
        conn.set_receiver(self.on_message, self.on_close)
        unfinished = [*self.placed, *self.pending]
        log.info("%s: recovered by %s: %d results kept, %d jobs unfinished", self, conn.peer,
                 len(kept.job_ids), len(unfinished))
        if self._ready_timer is not None:  # this Ready says it all: none before it
            self._ready_timer.cancel()
            self._ready_timer = None
        nodes = self.node_list.tell_all()
        info = self.broker.info()
        info["cpus"] = info["free_cpus"] = self.told_cpus = \
            max(min(info["cpus"], self.limit), self.told_cpus)
        self.tell([P.encode(P.Ready, dict(info, recovered=True, kept=kept.job_ids,
                                          pending=unfinished, nodes=nodes))])
        for frames in kept.messages:
            self.tell(frames)
        if terminate and unfinished:
            self.on_cancel(P.Cancel(unfinished), [])

    def on_bye(self, msg: Any, frames: list) -> None:
        self.end("client closed the session")

    # ---------------------------------------------------------------- legs

    def wants(self, port: NodePort) -> bool:
        """The client's ``nodes`` option (host patterns) admits ``port``."""
        if port.host in self.calls.closed:  # (close_node)
            return False
        patterns = self.options.get("nodes")
        if not patterns or port.host in self.calls.extra:  # (extra: allocate_node)
            return True
        names = (port.host, str((port.anchor.info if port.anchor else {}).get("name", "")))
        return any(fnmatch.fnmatchcase(name, str(pattern))
                   for pattern in patterns for name in names)

    def open_leg(self, port: NodePort) -> asyncio.Task | None:
        if self.ended or port in self.legs or not self.wants(port):
            return None
        leg = self.legs[port] = Link(port)
        self.recheck(port)  # (a leg closed here by nodecalls.py may have been usable)
        self.env.leg_opening(leg)
        options = {key: value for key, value in self.options.items()
                   if key not in _NOT_FORWARDED}
        options["shared"] = port.group
        return self.broker.spawn(self._open(leg, options))

    async def _open(self, leg: Link, options: dict) -> None:
        try:
            await leg.open(options, self.init_frames, lambda: list(self.env.preamble),
                           self.on_leg_message, self.on_leg_closed)
        except Exception as exc:
            leg.abort()
            if self.legs.get(leg.port) is leg:
                del self.legs[leg.port]
            if not self.ended:
                log.warning("%s: node %s: %s", self, leg.port, exc)
                self.env.leg_gone(leg)
            return
        if self.ended:
            leg.bye()
            return
        self.recheck(leg.port)
        self.sync_soon()
        if not self.pending and self.broker.ahead:  # its jobs waiting on busy nodes: here
            self.broker._reclaim_ahead([self])
        self.broker.place_soon()

    def usable(self, port: NodePort) -> Link | None:
        leg = self.legs.get(port)
        if leg is None or not leg.ready or leg in self.env.held:
            return None
        return leg

    def on_leg_message(self, leg: Link, msg: Any, frames: list) -> None:
        kind = type(msg)
        if kind is P.Done:
            self.on_done(leg, msg, frames)
        elif kind is P.Started:
            if self.options.get("notify_start"):
                self.on_started(leg, msg)
        elif kind is P.GiveBack:
            self.requeue(leg, self.placed_on(leg, msg.job_ids, "a give-back"))
        elif kind in _ENV:
            self.env.on_leg_message(leg, kind, msg, frames)
        elif kind in _PASSED_ON:  # for the client's job, as they came
            if self.placed_on(leg, [msg.job_id], f"a {kind.__name__} message"):
                self.tell(list(frames))
        elif kind is P.InitFail:
            self.tell(list(frames))
            self.end("initializer failed")
        # Draining, AvailInfo: the node's anchor tells the scheduler; nothing to pass on

    def on_done(self, leg: Link, msg: Any, frames: list) -> None:
        port, placed = leg.port, self.placed
        results, foreign = P.raw_results(msg, frames), None
        for item in results:
            job_id = item[0][0]
            where = placed.get(job_id)
            if where is None or where[0] is not leg:  # (not its job: refused below)
                foreign = foreign or []  # (appended to: a long forged list costs no copies)
                foreign.append(item)
                continue
            del placed[job_id]
            if self.pin_of:
                self.pin_of.pop(job_id, None)
            port.busy -= 1
            self.running -= 1
            self.tries.pop(job_id, None)
            self.broker.reopen(port)
            self.cancelling.discard(job_id)
            self.broker.fair.done((self, job_id))
        if foreign:  # (by record: a job's own result, then its id again, keeps the first)
            self.refuse(leg, [item[0][0] for item in foreign], "a result")
            dropped = set(map(id, foreign))
            results = [item for item in results if id(item) not in dropped]
            if not results:
                return
            msg = P.Done([record for record, _ in results])
            frames = [P.encode(P.Done, msg.results),
                      *(frame for _, payload in results for frame in payload)]
        self.counts["done"] += len(msg.results)
        if self.limit < 1 << 62 or self.calls.caps:
            self.sync()
        self.merge.done(msg.results, frames)
        self.broker.place_soon()

    def placed_on(self, leg: Link, job_ids: list, what: str) -> list:
        """Those of ``job_ids`` placed on ``leg`` (the others refused)."""
        placed = self.placed
        own = [job_id for job_id in job_ids
               if (where := placed.get(job_id)) is not None and where[0] is leg]
        if len(own) < len(job_ids):
            self.refuse(leg, [job_id for job_id in job_ids if job_id not in own], what)
        return own

    def refuse(self, leg: Link, job_ids: list, what: str) -> None:
        """A node is trusted with its own jobs only: what it says of others
        (another node's, or none) is dropped, with one log line per leg,
        and their own nodes' jobs go on."""
        if leg not in self.refused:
            self.refused.add(leg)
            log.error("node %s sent %s for job %s of client %s, not placed there (or done "
                      "there already): ignored (logged once per node and client)", leg.port,
                      what, ", ".join(map(str, job_ids[:5])), self.sid)

    def on_started(self, leg: Link, msg: Any) -> None:
        jobs = msg.jobs
        own = self.placed_on(leg, [job[0] for job in jobs], "a start")
        if len(own) < len(jobs):
            jobs = [job for job in jobs if job[0] in own]
        self.merge.started(jobs, leg.port.host)

    def on_leg_closed(self, leg: Link, exc: BaseException | None) -> None:
        """The leg (or its node) went away: its jobs are placed again."""
        if self.legs.get(leg.port) is leg:
            del self.legs[leg.port]
        self.refused.discard(leg)
        self.recheck(leg.port)
        self.sent_fns.pop(leg, None)
        if self.ended:
            return
        self.requeue(leg, [job_id for job_id, where in self.placed.items() if where[0] is leg],
                     lost=True)
        self.fail_pinned(leg.port.host, f"node {leg.port} was lost")
        self.sync()
        self.env.leg_gone(leg)

    def requeue(self, leg: Link, job_ids: list, lost: bool = False) -> None:
        fair = self.broker.fair
        for job_id in job_ids:
            where = self.placed.pop(job_id, None)
            if where is None:
                continue
            leg.port.busy -= 1
            self.broker.reopen(leg.port)
            self.running -= 1
            if job_id in self.cancelling:  # (its node was lost before it ended)
                self.cancelling.discard(job_id)
                self.report(job_id, Outcome.CANCELLED, attempt=where[1][4])
                fair.done((self, job_id))
                continue
            if job_id in self.pin_of:  # back to its node's queue, or failed with it
                self.requeue_pin(job_id, where, lost, leg.port)
                continue
            if lost:
                self.tries[job_id] += 1
                if self.tries[job_id] > self.broker.max_retries:
                    self.report(job_id, Outcome.WORKER_LOST, serialize.dump_exception(NodeLost(
                        f"node {leg.port} was lost while running the job (tried "
                        f"{self.tries.pop(job_id)} times)")), attempt=where[1][4])
                    fair.done((self, job_id))
                    continue
            self.pending[job_id] = (where[1], where[2])
            fair.requeue((self, job_id))
        if self.broker.draining:  # back to the client, to run elsewhere
            self.on_reclaim(P.Reclaim(len(self.pending)), [])
        self.sync()
        self.broker.place_soon()

    # ------------------------------------------------------------- to the client

    def tell(self, frames: list) -> None:
        """Send a message to the client (or keep it, while detached): after
        the results waiting to be passed on, so that the order holds."""
        merge = self.merge
        if merge.out or merge.starts:
            merge.flush()
        self._tell(frames)

    def _tell(self, frames: list) -> None:
        self._tell_all((frames,))

    def _tell_all(self, messages: Sequence[list]) -> None:
        """Send ``messages`` in order, in one write (a pass's Started and Done)."""
        if self._ready_timer is not None or (self.node_list.changed and self.told_cpus):
            if self._ready_timer is not None:  # a change of its nodes goes first (SetupDone...)
                self._ready_timer.cancel()
            self.tell_ready()
        if self.kept is not None:  # gone, recoverable: its results are kept
            for frames in messages:
                if not self.kept.add(frames):
                    self.end("more results than the scheduler may keep for the clients gone")
                    return
            return
        if not self.conn.closed:
            if len(messages) == 1:
                self.conn.send(messages[0])
            else:
                self.conn.send_all(messages)

    def report(self, job_id: int, outcome: int, frames: Any = (),
               attempt: int | None = None) -> None:
        self.tries.pop(job_id, None)  # (ended here: cancelled, failed, lost too often)
        self.tell([P.encode(P.Done, [P.result(job_id, outcome, len(frames),
                                                   attempt=attempt)]), *frames])

    def uses_nodes(self) -> bool:
        """An open session, unless detached with no job running or queued
        (then it only keeps results for recover_jobs: exclusive clusters
        need not wait for it)."""
        return bool(self.options) and not (self.kept is not None and not self.placed
                                           and not self.pending)

    def stranded(self) -> bool:
        """Jobs queued and no node to run them (all lost, or none matches)."""
        return bool(self.pending) and not any(leg.ready for leg in self.legs.values())

    def fail_pending(self, error: BaseException) -> None:
        frames = serialize.dump_exception(error)
        for job_id, (item, _) in list(self.pending.items()):
            self.broker.fair.cancel((self, job_id)) or self.unqueue_pin(job_id)
            self.pin_of.pop(job_id, None)
            del self.pending[job_id]
            self.report(job_id, Outcome.WORKER_LOST, frames, attempt=item[4])

    def take(self, port: NodePort, job_id: int, batch: list) -> None:
        """The policy picked this queued job for ``port``: into ``batch``."""
        item, payload = entry = self.pending.pop(job_id)
        self.placed[job_id] = (self.legs[port], item, payload)
        batch.append(entry)
        port.busy += 1
        self.running += 1
        if self.running >= self.limit or port.host in self.calls.caps:
            self.sync()

    def sync(self) -> None:
        """Tell the policy which nodes this client's jobs may go to now: those
        where its leg is ready and set up (none while it runs its ``cpus``);
        and the client, when they changed since its last Ready."""
        if self.ended:
            return
        fair = self.broker.fair
        if self.running >= self.limit:
            fair.use_nodes(self, ())
            return
        calls = self.calls
        # (the live set: nothing to copy as legs open; a copy, filtered,
        # while node calls hold some nodes back: nodecalls.py)
        node_list = self.node_list
        fair.use_nodes(self, calls.placeable(node_list.ports()) if calls.active
                       else node_list.usable)
        if self.told_cpus and node_list.changed:
            self.tell_ready_soon()

    def recheck(self, port: NodePort) -> None:
        """Whether its leg on ``port`` is usable (open, its setup done) may
        have changed: keep its node list so."""
        self.node_list.recheck(port, self.usable(port) is not None)

    def sync_soon(self) -> None:
        """:meth:`sync`, then placement, once the event loop's current
        callbacks have run: legs opening together (nodes joining in a burst)
        cost one pass over this client's legs, not one each."""
        if not self._sync_scheduled:
            self._sync_scheduled = True
            asyncio.get_running_loop().call_soon(self._sync_now)

    def _sync_now(self) -> None:
        self._sync_scheduled = False
        self.sync()
        self.broker.place_soon()

    # ------------------------------------------- jobs pinned to a node (submit_node)

    def pin(self, job_id: int, item: tuple, payload: list, host: Any) -> None:
        """A job for the node at ``host`` only: queued for it, or failed
        (NodeLost) at once when this client has no session there."""
        if not any(port.host == host and port.ready for port in self.legs):
            self.report(job_id, Outcome.WORKER_LOST, serialize.dump_exception(NodeLost(
                f"node {host} is not a node of scheduler {self.broker.name} this client "
                f"may use (or it was lost)")), attempt=item[4])
            return
        self.pending[job_id] = (item, payload)
        self.pin_of[job_id] = host
        self.pinned.setdefault(host, {})[job_id] = None
        self.broker.pinned += 1

    def unqueue_pin(self, job_id: int) -> bool:
        """Take a queued pinned job out of its node's queue (True), if it is there."""
        host = self.pin_of.get(job_id)
        queue = None if host is None else self.pinned.get(host)
        if host is None or queue is None or job_id not in queue:
            return False
        del queue[job_id]
        if not queue:
            del self.pinned[host]
        self.broker.pinned -= 1
        return True

    def requeue_pin(self, job_id: int, where: tuple, lost: bool, port: NodePort) -> None:
        """A pinned job given back (queued again for its node) or whose node
        was lost (it fails: no other node may run it)."""
        if lost:
            del self.pin_of[job_id]
            self.report(job_id, Outcome.WORKER_LOST, serialize.dump_exception(NodeLost(
                f"node {port} was lost while running the job")), attempt=where[1][4])
            return
        self.pending[job_id] = (where[1], where[2])
        self.pinned.setdefault(self.pin_of[job_id], {})[job_id] = None
        self.broker.pinned += 1

    def fail_pinned(self, host: str, why: str) -> None:
        """The jobs queued for ``host`` fail (NodeLost) when this client has
        no session left there."""
        if host not in self.pinned or any(port.host == host for port in self.legs):
            return
        frames = serialize.dump_exception(NodeLost(why))
        for job_id in list(self.pinned[host]):
            self.unqueue_pin(job_id)
            del self.pin_of[job_id]
            item, _ = self.pending.pop(job_id)
            self.report(job_id, Outcome.WORKER_LOST, frames, attempt=item[4])

    def take_pinned(self, port: NodePort, batch: list) -> bool:
        """One of this client's jobs pinned to ``port``'s host into
        ``batch``; False if it has none it may place there now."""
        queue = self.pinned.get(port.host)
        if (not queue or self.running >= self.limit or self.usable(port) is None
                or not self.calls.may_place(port)):
            return False
        job_id = next(iter(queue))
        self.unqueue_pin(job_id)
        self.take(port, job_id, batch)
        return True

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
        if self.merge.out:  # the results read in this pass are the client's (or kept)
            self.merge.flush()
            if self.ended:  # (past what may be kept for the clients gone)
                return
        self.ended = True
        broker = self.broker
        if broker.exclusive is self:
            broker.exclusive = None
        if self.kept is not None:
            self.kept.cancel()
            broker.detached.pop(self.options["recover_token"], None)
            log.warning("%s: %s; discarding %d kept results and %d unfinished jobs", self,
                        why, len(self.kept.job_ids), len(self.placed) + len(self.pending))
        if self._ready_timer is not None:
            self._ready_timer.cancel()
        broker.watch.discard(self.conn)
        broker.fair.remove_client(self)
        broker.clients.discard(self)
        for leg, _, _ in self.placed.values():
            leg.port.busy -= 1
            broker.reopen(leg.port)
        self.placed.clear()
        self.pending.clear()
        broker.pinned -= sum(len(queue) for queue in self.pinned.values())
        self.pinned.clear()
        for leg in list(self.legs.values()):
            leg.bye()
        self.legs.clear()
        if not self.conn.closed:
            self.conn.close()
        if self.options:
            log.info("%s ended (%s): %d results", self, why, self.counts["done"])
        broker.place_soon()


#: A node's jobs ahead (one client alone: a second job per CPU, waiting
#: there so that no CPU idles for a round trip to the scheduler) are topped
#: up once this share of its CPUs has room for one, not at each result: one
#: Run for several jobs, so the node (and this process) reads, wakes and
#: sends a message less per job, while the node still holds a job ahead for
#: all but a quarter of its CPUs (each of those is running one: its next one
#: comes with the next top-up, a few results later).  A CPU free to run a
#: job now is always filled at once (placement's first pass).
TOP_UP_SHARE = 4


def _top_up(port: NodePort) -> int:
    """How many jobs ahead a node must have room for before it is given more."""
    return max(1, port.cpus // TOP_UP_SHARE)


class Broker:
    """The scheduler: accepts clients as a node does, drives the nodes."""

    def __init__(self, nodes: list[tuple[str, int]], *, secret: bytes, ssl: Any = None,
                 node_ssl: Any = None, name: str | None = None, heartbeat: Any = None,
                 connect_timeout: float | None = None, max_retries: int = 2,
                 fifo: bool = False, receive_budget: int | None = None,
                 keep_results: float = KEEP_RESULTS, discovery: Any = None) -> None:
        self.name = name or socket.gethostname()
        self.secret = secret
        self.ssl = ssl
        self.receive_budget = receive_budget  # bytes; None: the transport's default
        self.keep_results = keep_results  # seconds a gone client's session is kept (keep.py)
        self.detached: dict[str, ClientSession] = {}  # recover token -> detached session
        self.keeping = Keeping()  # what the detached sessions keep, together
        self.max_retries = max_retries
        self.fair = FairShare(fifo=fifo)
        self.watch = Watch()
        settings = liveness.settings(heartbeat)
        self.deadline = settings.deadline  # how long jobs wait for a node, at most
        self._stranded: asyncio.TimerHandle | None = None
        self.connect_timeout = timeout = liveness.connect_timeout(connect_timeout)
        group = os.urandom(8).hex()  # a node shares its CPUs among this scheduler's sessions only
        self._port_options = dict(secret=secret, ssl=node_ssl, watch=self.watch,
                                  settings=settings, connect_timeout=timeout, group=group)
        self.ports = [NodePort(host, port, **self._port_options) for host, port in nodes]
        self.given = {port.address for port in self.ports}  # (retried for ever, never forgotten)
        # The nodes that may have a free CPU (placement looks at those only):
        # a node joins it when it is ready and as its jobs end, and leaves it
        # once full (so placing a job costs the same with 10 nodes or 10,000).
        self.open_ports: dict[NodePort, None] = {}
        self.discovery = discovery  # a core.discover.Discovery: nodes found over UDP join
        self.finder: Any = None
        # Found nodes lost, then forgotten (the oldest first past MAX_FORGOTTEN).
        self.forgotten: dict[tuple[str, int], None] = {}
        # One node at several addresses is used once (the first to join):
        # node id -> its port; another address of it -> that port.
        self.by_id: dict[str, NodePort] = {}
        self._id_of: dict[NodePort, str] = {}  # (a node restarted has a new id)
        self.aliases: dict[tuple[str, int], NodePort] = {}
        # The ready nodes' CPUs (total_cpus), kept as nodes join and leave.
        self._counted: dict[NodePort, int] = {}
        self._total = 0
        self.closing = False
        self.clients: set[ClientSession] = set()
        self.tasks: set[asyncio.Task] = set()
        self.server: Any = None
        self._sids = iter(range(1, 1 << 62))
        self._place_scheduled = False
        self.pinned = 0  # jobs pinned to a node (submit_node) queued, all clients
        self.exclusive: ClientSession | None = None  # the client that has the nodes to itself
        self._exclusive_waits_until = 0.0  # new clients wait behind an exclusive one till then
        self.ahead = False  # one client alone: nodes hold a job more per CPU (see place)
        self.draining = False

    # ------------------------------------------------------------- nodes

    def ready_nodes(self) -> list[NodePort]:
        return [port for port in self.ports if port.ready]

    def total_cpus(self) -> int:
        """The CPUs of the ready nodes, kept as nodes join (node_ready) and
        are lost (on_anchor_closed, forget): not counted for each client's
        Ready (with 10,000 nodes joining that was quadratic)."""
        return self._total

    def _count(self, port: NodePort, cpus: int) -> None:
        self._total += cpus - self._counted.pop(port, 0)
        if cpus:
            self._counted[port] = cpus

    def info(self) -> dict:
        cpus = self.total_cpus()
        return {"name": self.name, "cpus": cpus, "free_cpus": cpus, "pid": os.getpid(),
                "scheduler": True}

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
            port.rejoin = self.spawn(port.keep_joining(
                self.on_anchor_message, self.on_anchor_closed, self.node_ready,
                give_up=FORGET_AFTER * self.deadline if port.found else None,
                on_gone=self.forget))

    async def add_found(self, address: tuple[str, int]) -> None:
        """A node discovery found: joined as one given by address (a busy or
        unreachable one is retried, then forgotten until it answers again)."""
        if self.closing or address in self.aliases \
                or any(port.address == address for port in self.ports):
            return
        port = NodePort(*address, **self._port_options)
        port.found = True
        self.forgotten.pop(address, None)
        self.ports.append(port)
        await self.add_node(port)

    def forget(self, port: NodePort) -> None:
        """A found node that stayed lost: dropped (discovery joins it again)."""
        log.info("node %s: not back within %g s; forgotten until discovery finds it again",
                 port, FORGET_AFTER * self.deadline)
        if port in self.ports:
            self.ports.remove(port)
        port.close()
        self._count(port, 0)
        self.open_ports.pop(port, None)
        self._register(port, None)
        for address in [a for a, of in self.aliases.items() if of is port]:
            del self.aliases[address]  # discovery may join them now
            if address in self.given:  # a given node's twin: retried, as given nodes are
                again = NodePort(*address, **self._port_options)
                self.ports.append(again)
                self.rejoin(again)
        self.forgotten[port.address] = None
        while len(self.forgotten) > MAX_FORGOTTEN:
            del self.forgotten[next(iter(self.forgotten))]

    def reopen(self, port: NodePort) -> None:
        """``port`` may have a free CPU (a job ended there, or it joined)."""
        if not port.closed:
            self.open_ports[port] = None

    def node_ready(self, port: NodePort) -> None:
        if self._twin(port):
            return
        log.info("node %s: %d CPUs", port.name, port.cpus)
        self._count(port, port.cpus if port.ready else 0)  # (its anchor may be gone already)
        self.reopen(port)
        for client in list(self.clients):
            client.node_list.touch(port)  # back: its entry may differ (cpus, name)
            if client.options:
                client.open_leg(port)
            if client.told_cpus and client.limit > client.told_cpus:
                client.tell_ready_soon()   # more CPUs than it was told: it may send more jobs

    def _twin(self, port: NodePort) -> bool:
        """Whether ``port`` is a node already in use at another address (its
        id says so): then it is dropped, and its address remembered."""
        node_id = port.node_id
        if node_id is None:
            return False
        first = self.by_id.get(node_id, port)
        if first is port or not first.ready or first.closed:
            self._register(port, node_id)
            return False
        log.warning("node %s is the same node as %s (node id %s): using it once", port,
                    first, node_id)
        port.close()
        if port in self.ports:
            self.ports.remove(port)
        self.aliases[port.address] = first
        return True

    def _register(self, port: NodePort, node_id: str | None) -> None:
        """``port`` is the node of id ``node_id`` now (None: of none)."""
        old = self._id_of.pop(port, None)
        if old is not None and self.by_id.get(old) is port:
            del self.by_id[old]
        if node_id is not None:
            self.by_id[node_id] = port
            self._id_of[port] = node_id

    def on_anchor_message(self, link: Link, msg: Any, frames: list) -> None:
        if type(msg) is P.Draining:
            log.info("node %s is shutting down: no new jobs go there", link.port)
            link.port.draining = True

    def on_anchor_closed(self, link: Link, exc: BaseException | None) -> None:
        port = link.port
        self._count(port, 0)
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
            after_pass(self.place)

    def place(self) -> None:
        """Fill every free CPU with a queued job, the policy choosing which:
        first one job per CPU on every node, then (one client alone) one
        more per CPU."""
        self._place_scheduled = False
        if self.draining:
            return
        active = [client for client in self.clients if client.pending or client.placed]
        ahead = len(active) <= 1
        if self.ahead and not ahead:
            self._reclaim_ahead(active)
        if ahead and not self.ahead:  # room for one more per CPU on every node
            self.open_ports.update(dict.fromkeys(self.ports))
        self.ahead = ahead
        open_ports = self.open_ports
        if self.fair.backlogged() or self.pinned:
            for extra in (False, True) if ahead else (False,):
                for port in list(open_ports):
                    free = port.free(extra)
                    if extra and free < _top_up(port):
                        continue  # (its CPUs all have their next job: topped up later)
                    self._fill(port, free)
            for port in [port for port in open_ports
                         if port.free(ahead) < (_top_up(port) if ahead else 1)]:
                del open_ports[port]  # full (or not ready, draining): back as jobs end
        if self._stranded is None and any(client.stranded() for client in active):
            self._stranded = asyncio.get_running_loop().call_later(self.deadline,
                                                                   self._fail_stranded)

    def _fail_stranded(self) -> None:
        """Jobs that had no node to go to for the heartbeat deadline fail
        (BrokenCluster), as a client's do when it has no node left."""
        self._stranded = None
        error = BrokenCluster(f"no node of scheduler {self.name} could run the job for "
                              f"{self.deadline} s (all lost, or none matches the client's "
                              f"nodes)")
        for client in list(self.clients):
            if client.stranded():
                log.warning("%s: %d jobs with no node to run them fail", client,
                            len(client.pending))
                client.fail_pending(error)

    def _fill(self, port: NodePort, free: int) -> None:
        if self.pinned:  # jobs pinned to this node go first
            free = self._fill_pinned(port, free)
        fair = self.fair
        if free <= 0 or not fair.has_work(port):
            return
        batches: dict[ClientSession, list] = {}
        while free > 0:
            picked = fair.pick(port)
            if picked is None:
                break
            client: Any = picked.client
            job: Any = picked.job  # (client, job id)
            client.take(port, job[1], batches.setdefault(client, []))
            free -= 1
        for client, batch in batches.items():
            client.send(client.legs[port], batch)

    def _fill_pinned(self, port: NodePort, free: int) -> int:
        """Jobs pinned to ``port``'s host, one CPU at a time to the client
        furthest below its weighted share, ``(running + 1) / weight`` (the
        fair share's rule; ties to the client that came first); the CPUs left."""
        host = port.host
        waiting = [session for session in self.clients if session.pinned.get(host)]
        batches: dict[ClientSession, list] = {}
        while free > 0 and waiting:
            session = min(waiting, key=_pinned_share)
            if session.take_pinned(port, batches.setdefault(session, [])):
                free -= 1
            else:
                waiting.remove(session)
        for session, batch in batches.items():
            if batch:
                session.send(session.legs[port], batch)
        return free

    def _reclaim_ahead(self, active: list[ClientSession]) -> None:
        """A second client has work: the jobs the first one had waiting on
        the nodes (beyond one per CPU) come back, to be shared."""
        for client in active:
            for port, leg in client.legs.items():
                if port.busy > port.cpus and client.placed:
                    leg.send([P.encode(P.Reclaim, port.busy - port.cpus)])

    # ------------------------------------------------------------- clients

    def accept(self, conn: Connection) -> None:
        client = ClientSession(self, conn, next(self._sids))
        if self.draining:
            conn.abort()
            return
        self.clients.add(client)
        conn.set_receiver(client.on_message, client.on_close)
        self.watch.add(conn, liveness.Settings())  # Session comes within the default lease

    def busy_for(self, session: ClientSession) -> str | None:
        """Why ``session`` must wait (dispy's exclusive clusters), or None.
        An exclusive client has the scheduler to itself: it starts once no
        other client has a session, and until it ends the others wait; while
        it waits, new clients wait behind it."""
        now = asyncio.get_running_loop().time()
        if self.exclusive is not None and not self.exclusive.uses_nodes():
            self.exclusive = None  # gone (detached), its jobs ended: only its results kept
        if self.exclusive is not None:
            return f"scheduler {self.name} is held by an exclusive cluster"
        if session.options.get("exclusive"):
            others = sum(1 for client in self.clients
                         if client is not session and client.uses_nodes())
            if others:
                self._exclusive_waits_until = now + EXCLUSIVE_QUEUE
                log.info("%s: an exclusive cluster waits for the %d other clients", session,
                         others)
                return (f"an exclusive cluster waits for the {others} other clients of "
                        f"scheduler {self.name} to finish")
            self.exclusive = session
            return None
        if now < self._exclusive_waits_until:
            return f"an exclusive cluster is waiting for scheduler {self.name}"
        return None

    def status(self) -> dict:
        running = sum(client.running for client in self.clients)
        queued = sum(len(client.pending) for client in self.clients)
        cpus = self.total_cpus()
        return {"name": self.name, "scheduler": True, "pid": os.getpid(), "cpus": cpus,
                "free_cpus": max(0, cpus - running), "sessions": len(self.clients),
                "running": running, "queued": queued,
                # sessions kept for recover_jobs (as a node's "kept"), and their results
                "kept": len(self.detached), "kept_results": self.keeping.results,
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
        if self.discovery is not None:
            self.finder = await start_finder(self, self.discovery,
                                             self.discovery.wait or self.connect_timeout)
        budget = ReceiveBudget(self.receive_budget) if self.receive_budget else None
        self.server = await start_server(self.accept, host, port, secret=self.secret,
                                         hello=self.hello, ssl=self.ssl, receive_budget=budget)
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
                client.on_reclaim(P.Reclaim(len(client.pending)), [])
                for leg in client.legs.values():  # and those waiting on the nodes
                    leg.send([P.encode(P.Reclaim, leg.port.cpus)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(client.placed for client in self.clients) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.closing = True
        if self.finder is not None:
            self.finder.close()
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            client.end("scheduler shutting down")
        for port in self.ports:
            port.close()
        self.watch.close()
        if self._stranded is not None:
            self._stranded.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
