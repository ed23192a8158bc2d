"""The client core: futures in the user's threads, the scheduler in our loop.

::

    user threads                       client loop thread (one per Client)
    ────────────                       ───────────────────────────────────
    submit(fn, args) ─► Job + Future
        serialize args (errors raise here, at the caller)
        append to `incoming` ──(one wake-up per batch)──► _drain: Scheduler.submit
                                                            │ Send actions
                                                            ▼
                                                  NodeLink.conn: FUNC once, RUN batches
                                                            │
    future.result() ◄── set_result/set_exception ◄─── DONE batches from the node

All three public APIs (Executor, Pool, JobCluster) are adapters over
:class:`Client`.  With no nodes given the client embeds a node runtime in
its own loop (workers are still separate processes, forked by a zygote), so
the local and the distributed case run the same code.

The Client keeps the per-job paths (submit, drain, send, results); its
other parts are objects of their own, each with the client as ``client``:
:class:`~dpool.core.joining.Joining` (nodes join),
:class:`~dpool.core.nodeevents.NodeEvents` (sessions open, change, end),
:class:`~dpool.core.directcalls.DirectCalls` (direct calls) and
:class:`~dpool.core.stopping.Stopping` (cancel, close).
"""
import collections
import itertools
import logging
import threading
import time
import traceback
from concurrent.futures._base import CANCELLED as _USER_CANCELLED  # (not told yet)
from typing import Any

from .. import liveness
from .. import protocol as P
from ..protocol import run_item
from .. import serialize
from ..errors import (BrokenCluster, ConnectionClosed, JobCancelled, NodeLost)
from .directcalls import DirectCalls
from .joining import Joining
from .stopping import Stopping
from .tcpline import NODE_FUNCTIONS, TcpLine
from .future import DONE, STARTED, Future, resolve, set_running
from .job import (ABANDONED, CANCELLED, CREATED, FINISHED, RUNNING,  # noqa: F401 (API)
                  TERMINATED, _KILLED, Job, _FunctionTable, count_killed, outcome_of)
from .links import Links, NodeLink, client_hello, describe, tls_context  # noqa: F401 (API)
from .loopthread import LoopThread, _fork_zygote
from .nodeevents import SCHEDULER_DEPTH, NodeEvents, ready_info  # noqa: F401 (API)
from .scheduler import Action, Cancelled, CancelRemote, Fail, Reclaim, Scheduler, Send

log = logging.getLogger("dpool")


def _when_cancelled(on_cancel, job):
    """A done-callback calling ``on_cancel(job)`` if the future was cancelled."""
    def done(future):
        if future.cancelled():
            on_cancel(job)
    return done


#: Jobs one wake-up of the loop thread takes in from the submitting threads
#: at most: the loop's other work (RUN messages, results, heartbeats) runs
#: between batches while a user thread submits a million jobs.
DRAIN_BATCH = 4096
#: Functions a node session keeps at most (see Client._forget).
_NODE_FUNCTIONS = NODE_FUNCTIONS


class Client:
    """Runs jobs on nodes; the engine behind every public API.

    ``nodes`` is a list of ``(host, port)`` to connect to; ``None`` embeds a
    local node with ``cpus`` CPUs.  ``session`` holds the per-session options
    sent to each node (capture, notify_start, max_tasks, cwd, cleanup, cpus);
    ``initializer``/``initargs`` run once in each worker process.
    ``on_event(kind, obj)`` is called in the loop thread; it must be quick.
    The kinds: "started" and "done" (obj a Job), "node" (obj a NodeLink that
    joined or was lost), "ready" (obj a NodeLink whose node said Ready again:
    a scheduler whose CPUs or nodes changed), and those of extensions (JobCluster's job
    environment, :mod:`dpool.dispy.env`, adds "provisional", "file" and
    "avail").
    ``heartbeat`` is ``(interval, deadline)`` in seconds (default
    ``$DPOOL_HEARTBEAT``, else 1 s and 10 s, see :mod:`dpool.liveness`):
    a node silent for longer than the deadline is lost (its jobs rerun
    elsewhere), then retried with backoff and used again when it answers.
    ``connect_timeout`` bounds connecting to a node and opening the session
    (default ``$DPOOL_CONNECT_TIMEOUT``, else 10 s).
    ``direct`` (no ``on_event``): a call submitted while nothing else is in
    flight goes from the calling thread straight to an idle worker of the
    embedded node (:mod:`dpool.core.direct`), or on the link to the
    client's only node, RUN written and DONE read by the calling thread
    (:mod:`dpool.core.tcpline`); False: always through the loop.

    An extension handles more message types (:meth:`register`), may hook
    each session's start (``prepare``) and uses :meth:`admit`,
    :meth:`leave_out`, :meth:`trusted`, :meth:`distrust` and :meth:`emit`.
    :meth:`recover` takes over the sessions a client gone away left on
    nodes (what dispy's ``recover_jobs`` runs on).
    """

    def __init__(self, nodes=None, *, secret=None, ssl=None, cpus=None, session=None,
                 initializer=None, initargs=(), on_event=None, max_retries=2,
                 connect_timeout=None, heartbeat=None, name="dpool-client", prepare=None,
                 discovery=None, direct=True):
        self.node_addresses = nodes
        self.discovery = discovery  # a core.discover.Discovery: more nodes found over UDP
        self.secret = secret
        self.ssl = ssl
        self.embedded_cpus = cpus
        self.session = dict(session or {})
        self.init_frames = serialize.dumps((initializer, tuple(initargs))) if initializer else []
        self.on_event = on_event
        self.listeners = []  # more on_event-like callables (monitors: dpool.dashboard)
        self.connect_timeout = liveness.connect_timeout(connect_timeout)
        self.liveness = liveness.settings(heartbeat)
        self.scheduler = Scheduler(max_retries=max_retries)
        self.functions = _FunctionTable()
        self.jobs = {}
        self.broken = None
        self.closed = False
        self._cancel_queued = False  # shutdown(cancel_futures=True): jobs given back are cancelled
        self.embedded = None
        self._ids = itertools.count(1)
        self._incoming: collections.deque[Job] = collections.deque()  # (not a tuple per job)
        self._cancel_early: set[int] = set()  # ids cancelled before the loop took them in
        self._revoked: set[int] = set()  # ids asked back to be cancelled (Stopping.revoke)
        self._wake_pending = False
        self._unfinished = set()  # futures not yet resolved (for close/wait)
        self._idle = threading.Condition(threading.Lock())  # notified when that set empties
        self._idle_waiters = 0  # threads in wait() (counted under _idle)
        self._outcomes = None  # while a DONE batch is read: [(future, value, error)]
        self._direct = None  # a DirectLine (embedded) or TcpLine (one node): direct calls
        # The embedded node's zygote, forked now, while this may be the only
        # thread (None: not safe here, the node starts one the slow way).
        self._zygote = _fork_zygote() if nodes is None and discovery is None else None
        self._thread = LoopThread(name)
        self.loop = self._thread.loop
        self.net = Links(self)  # the links to the nodes: sessions, heartbeats, re-joins
        self.events = events = NodeEvents(self)  # sessions opening, changing, ending
        self._trusted_items = events.trusted_items  # (bound once: read per Started/Done)
        self.register({P.Done: self._on_done, P.Started: self._on_started,
                       P.InitFail: events.on_initfail, P.GiveBack: events.on_giveback,
                       P.Draining: events.on_draining})
        self.net.handlers.update({P.Recall: self._on_channel_note,  # (no extension:
                                  P.ChannelLost: self._on_channel_note})  # direct calls stay)
        self._extended = False  # an extension registered handlers (no direct calls)
        # True: ``on_event`` takes a direct call's "done" in whichever thread
        # reads its answer, and the extension's messages may reach the loop
        # thread through a TCP line's hand-back (JobCluster without callbacks)
        self.direct_events = False
        self.joining = Joining(self)  # the embedded node, or those named, found, added
        self.stopping = stopping = Stopping(self)  # jobs cancelled, the client closed
        self._cancel, self._on_cancelled = stopping.cancel_in_loop, stopping.on_cancelled
        self.directs = directs = DirectCalls(self, direct)
        # (bound once: what the lines call, and submit, per direct call)
        self._submit_direct, self._direct_done = directs.submit, directs.done
        self._direct_failed, self._direct_adopt = directs.failed, directs.adopt
        # ``prepare(link)`` (loop thread, before SESSION) returns None to skip
        # the node, or (session options, [messages sent right after SESSION]);
        # it sets ``link.hold`` to keep the node from jobs until it is admitted.
        self.prepare = prepare

    def register(self, handlers):
        """Handle more message types: ``{record class: fn(link, msg, frames)}``,
        called in the loop thread (before :meth:`start`)."""
        self.net.handlers.update(handlers)
        self._extended = True

    @property
    def links(self):
        """Every NodeLink: ready, being opened, or lost (the last per address)."""
        return self.net.links

    @property
    def finder(self):
        """The discovery Finder, once discovery runs."""
        return self.net.finder

    # ------------------------------------------------------- user-side API

    def start(self):
        try:
            self._thread.run(self.joining.start(), self.connect_timeout + 5)
        except BaseException:
            self.close(wait=False, cancel=True)
            raise
        return self

    def submit(self, fn, args=(), kwargs=None, tag=None, pin=None, star=False,
               defer_errors=False, place=None):
        """Queue one job; returns its :class:`Job` (``job.future`` resolves).

        A function or arguments that can't be serialized raise here, or with
        ``defer_errors`` fail the returned job's future (not queued), as the
        stdlib's pools report them.

        With ``star=True`` (or ``protocol.Call.STARMAP``), ``args`` is a list of
        argument tuples and the job's result is ``[fn(*a) for a in args]``;
        with ``star=protocol.Call.MAP`` it is a list of items and the result
        ``[fn(x) for x in args]``: one message for a chunk of a map.
        ``tag`` is kept as ``job.tag``; ``pin`` names the only NodeLink
        the job may run on, and ``place`` (with ``pin`` a dpool-scheduler)
        the host of the node behind it that must run it (dispy's submit_node).
        """
        if self.closed:
            raise RuntimeError("cannot submit: the client is closed")
        if self.broken is not None:
            raise BrokenCluster(f"the cluster is broken: {describe(self.broken)}") from self.broken
        try:
            entry = self.functions.table.get(id(fn))  # (functions.get's hit, inline)
            if entry is not None and entry[0]() is fn:
                fn_id, blob = entry[1], entry[2]
            else:
                fn_id, blob = self.functions.get(fn)
            frames = serialize.dumps_call(args, kwargs)  # (Job keeps a lone frame as is)
        except Exception as exc:
            if not defer_errors:
                raise
            return self._unsent(exc, tag, star)
        line = self._direct
        if line is not None and not star and pin is None and not self._unfinished \
                and not self._incoming and line.free() and not self.listeners:
            job = self._submit_direct(line, fn_id, blob, frames, tag)
            if job is not None:
                return job
        job = Job(next(self._ids), fn_id, frames, tag, int(star))  # a plain int on the wire
        job.blob = blob
        job.place, job.pin = place, pin
        self._unfinished.add(job.future)  # the loop thread discards it when done
        self._incoming.append(job)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop closed under us: close() raced this submit
                self.stopping.fail_leftovers()
        return job

    def _unsent(self, exc, tag, star):
        """A job that could not be serialized: its future fails at once with
        the pickler's exception, the local traceback as its __cause__."""
        job = Job(next(self._ids), None, None, tag, star)
        job.status = ABANDONED
        job.error = exc
        exc.__cause__ = serialize.RemoteTraceback("".join(traceback.format_exception(exc)))
        job.future.set_running_or_notify_cancel()
        job.future.set_exception(exc)
        return job

    def wait(self, timeout=None):
        """Wait until every job submitted so far has finished; True if so."""
        with self._idle:  # (counted first: a direct call started after the look
            self._idle_waiters += 1  # at the line below sees the count, see DirectCalls.submit)
        try:
            line = self._direct
            if line is not None:
                job = line.job
                if job is not None:  # nobody may be reading its answer: the loop thread will
                    line.handoff(job.future)
            with self._idle:
                return self._idle.wait_for(lambda: not self._unfinished, timeout)
        finally:
            with self._idle:
                self._idle_waiters -= 1

    def _settle(self):
        """Wake wait() once no job is left (after the futures resolved).
        Nothing if nobody waits (each direct call ends here): a waiter
        counts itself under the lock before it looks at the set, and this
        looks at the count after the set changed, so one of the two sees
        the other (the waiter finds the set empty, or this notifies it once
        it waits)."""
        if not self._unfinished and self._idle_waiters:
            with self._idle:
                self._idle.notify_all()

    def cancel(self, job):
        self.stopping.cancel(job)

    def cancel_queued(self):
        self.stopping.cancel_queued()

    def revoke(self, futures):
        self.stopping.revoke(futures)

    def close(self, wait=True, cancel=False, timeout=None):
        self.stopping.close(wait, cancel, timeout)

    def nodes(self):
        return [link for link in self.links if link.ready]

    def unfinished(self):
        """The futures of the jobs not finished yet."""
        return list(self._unfinished)

    def in_loop_thread(self):
        """True when called from the client's own loop thread (where
        nothing may block on the client)."""
        return threading.current_thread() is self._thread.thread

    def call(self, fn, timeout=30):
        """Run ``fn()`` in the loop thread and return its result."""
        async def run():
            return fn()
        return self._thread.run(run(), timeout)

    def call_soon(self, fn):
        """Run ``fn()`` in the loop thread, later (never at once, even from
        there): without waiting for it."""
        self.loop.call_soon_threadsafe(fn)

    def pending(self):
        return len(self._unfinished)

    def incoming(self):
        """Jobs submitted that the loop thread has not taken in yet."""
        return len(self._incoming)

    @property
    def alive(self):
        """True while the client's loop thread runs (until close() ends it)."""
        return self._thread.thread.is_alive()

    # ---------------------------------------------------------- loop side

    # ------------------------------------------- the links' owner (net)
    # (and what extensions call: see NodeEvents)

    def opening(self, link):
        return self.events.opening(link)

    def link_ready(self, link):
        self.events.link_ready(link)

    def cpus_changed(self, link, info):
        self.events.cpus_changed(link, info)

    def link_lost(self, link):
        line = self._direct
        if isinstance(line, TcpLine):
            line.link_lost(link)
        self.events.link_lost(link)

    def link_back(self, link):
        self.events.link_back(link)

    def admit(self, link):
        self.events.admit(link)

    def trusted(self, link, job_ids, what):
        return self.events.trusted(link, job_ids, what)

    def distrust(self, link, what):
        self.events.distrust(link, what)

    def leave_out(self, link, what, frames):
        self.events.leave_out(link, what, frames)

    def claim(self, link):
        """(loop thread) True if the loop thread may use ``link`` now; False
        while a user thread holds it for a direct call (asked to hand it back).
        (A line lending the node's channel leaves the link to the loop thread.)"""
        line = self._direct
        return not isinstance(line, TcpLine) or not line.holds_link(link) or line.reclaim()

    def _take_line(self, link):
        """(loop thread) No more direct calls to ``link`` for now, on its
        channel either: :meth:`claim`, the channel taken back too."""
        line = self._direct
        return not isinstance(line, TcpLine) or line.link is not link or line.reclaim()

    def _on_channel_note(self, link, msg, frames):
        """Recall or ChannelLost: for the line's channel to that node."""
        line = self._direct
        if isinstance(line, TcpLine) and line.link is link:
            if type(msg) is P.Recall:
                line.chan.on_recall(msg.serial)
            else:
                line.chan.on_lost(msg.why, msg.serial)

    def add_nodes(self, addresses):
        return self.joining.add_nodes(addresses)

    def discover(self, patterns, secret=None, node_port=None, **options):
        self.joining.discover(patterns, secret, node_port, **options)

    async def start_discovery(self):
        await self.joining.start_discovery()

    def recover(self, sessions, terminate=False):
        return self.joining.recover(sessions, terminate)

    def knows(self, address):
        """Whether ``address`` is a node in use, or lost and being retried."""
        return self.net.knows(address)

    async def join(self, address):
        """Loop thread: connect to one more node (a lost one is retried)."""
        await self.net.join(address)

    def close_link(self, link, bye=True):
        """End the session with one node (any thread); its unfinished jobs
        are moved to other nodes as for a lost node.  With ``bye=False`` the
        node is not told: it handles it as a client gone away (a recoverable
        session is kept, for a later :meth:`recover`)."""
        def close():
            line = self._direct
            if isinstance(line, TcpLine) and not self._take_line(link):
                line.defer(close)  # a user thread holds the link: once it is back
            else:
                self.net.close_link(link, bye)
        self.call_soon(close)

    def set_cpus(self, link, cpus):
        """Use at most ``cpus`` of the CPUs a node granted (0: no new jobs,
        direct calls included: the parked link is taken back)."""
        def apply():
            if cpus <= 0:
                self._take_line(link)
            self._act(self.scheduler.set_cpus(link, min(cpus, link.cpus)))
        self.loop.call_soon_threadsafe(apply)

    @property
    def late_results(self):
        """Outcomes dropped because they were not from a job's current
        attempt (a node declared lost answered after all)."""
        return self.scheduler.stale

    def _wake(self) -> None:
        """Jobs were submitted: take up to DRAIN_BATCH of them, and come back
        for the rest after the loop's other work."""
        self._drain(DRAIN_BATCH)
        if self._incoming and not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon(self._wake)

    def _drain(self, limit: int = -1) -> bool:
        """Take the submitted jobs in (all of them, or up to ``limit``);
        False if a user thread holds the node's link (nothing taken: it
        waits for the hand-back)."""
        self._wake_pending = False
        incoming = self._incoming
        line = self._direct
        if line is not None and incoming and line.reclaim() is False:
            # A user thread holds the node's link: once it is back (no
            # wake-up meanwhile: the loop thread waits, never spins).
            self._wake_pending = True
            line.defer(self._wake)
            return False
        plain, now, early = [], time.monotonic(), self._cancel_early
        actions: list[Action] = []
        while incoming and limit:
            limit -= 1  # (from -1: no limit)
            job = incoming.popleft()
            pin = job.pin
            self.jobs[job.id] = job
            if early and job.id in early:  # (cancelled while queued here: never run)
                early.discard(job.id)
                actions.append(Cancelled(job.id))
            elif pin is None:
                plain.append(job.id)
            elif not pin.ready and pin.error is not None:  # lost: it won't come back
                error = NodeLost(f"node {pin.name} was lost: {describe(pin.error)}")
                actions.append(Fail(job.id, error))
            else:
                actions.extend(self.scheduler.submit([job.id], now, pin=pin))
        if plain:
            actions.extend(self.scheduler.submit(plain, now))
        if self.broken is not None and not self.net.any_ready():
            actions.extend(self.scheduler.fail_queued(
                BrokenCluster(f"no node left: {describe(self.broken)}")))
        self._act(actions)
        return True

    def _act(self, actions):
        todo = collections.deque(actions)  # (a worklist: a Send may lead to more actions)
        while todo:
            action = todo.popleft()
            kind = type(action)
            if kind is Send:
                todo.extend(self._send(action.node, action.jobs))
            elif kind is Fail:
                self._finish(self.jobs.pop(action.job, None), ABANDONED, error=action.error)
            elif kind is CancelRemote:
                try:
                    action.node.conn.send([P.encode(P.Cancel, action.jobs)])
                except ConnectionClosed:
                    pass  # closing: its close callback reports these jobs cancelled
            elif kind is Reclaim:
                try:
                    action.node.conn.send([P.encode(P.Reclaim, action.count)])
                except ConnectionClosed:
                    pass  # closing: its close callback moves its jobs
            elif kind is Cancelled:
                self._finish(self.jobs.pop(action.job, None), CANCELLED,
                             error=JobCancelled("job cancelled"))

    def _send(self, link, ids):
        """Send these jobs to the node; returns the actions that follow
        (jobs cancelled while queued are dropped: others take their place)."""
        conn, jobs, fns, in_flight = link.conn, self.jobs, link.fns, link.in_flight
        batch = [jobs[job_id] for job_id in ids]
        queued = bool(link.info.get("scheduler"))  # queued there: running once started
        dropped = self._set_running(batch, not queued, self._on_cancelled if queued else None)
        attempt = self.scheduler.attempt
        header, frames, functions = [], [], []
        last = None  # the function moved to the end of fns last (LRU order)
        for job in batch:
            job_id, fn_id = job.id, job.fn_id
            if dropped and job_id in dropped:
                continue
            count = fns.get(fn_id)
            if count is None:
                functions.append([P.encode(P.Func, fn_id), job.blob])
                fns[fn_id] = 1
            else:
                fns[fn_id] = count + 1
                if fn_id != last:
                    fns.move_to_end(fn_id)
            last = fn_id
            job.node = link
            in_flight.add(job_id)
            job.status = RUNNING
            call = job._frames  # (the slot: a lone frame as is, see Job.frames)
            if type(call) is bytes:
                item = run_item(job_id, fn_id, 1, job.star, attempt(job_id))
                frames.append(call)
            else:
                item = run_item(job_id, fn_id, len(call), job.star, attempt(job_id))
                frames.extend(call)
            header.append(item if job.place is None else (*item, job.place))
        try:
            for message in functions:
                conn.send(message)
            if header:
                conn.send([P.encode(P.Run, header), *frames])
        except ConnectionClosed as exc:
            # Closed under us (its close callback, which runs later, does the
            # rest): these jobs go elsewhere now, with the node's others.
            return self.scheduler.remove_node(link, time.monotonic(), str(exc))
        if len(link.fns) > _NODE_FUNCTIONS:
            self._forget(link)
        if not dropped:
            return []
        for job_id in [job_id for job_id in ids if job_id in dropped]:
            self.scheduler.done(link, job_id, dispatch=False)
            self._unfinished.discard(jobs.pop(job_id).future)
        self._settle()
        return self.scheduler.dispatch()

    @staticmethod
    def _set_running(batch, start=True, on_cancel=None):
        """The futures of the jobs not started before set running, under one
        lock; returns the ids of those the user cancelled while queued.
        With ``start=False`` (a dpool-scheduler's link) they stay pending
        until their job starts on a node; ``on_cancel(job)`` is then called
        if the user cancels one meanwhile (the scheduler must drop it)."""
        fresh = [job for job in batch if job.future._state != STARTED]  # (not running())
        if not fresh:
            return ()
        cancelled = set_running([job.future for job in fresh], start)
        for job in fresh:
            if on_cancel is not None and not job.sent:
                job.future.add_done_callback(_when_cancelled(on_cancel, job))
            job.sent = True
        if not cancelled:
            return ()
        gone = set(map(id, cancelled))
        dropped = set()
        for job in fresh:
            if id(job.future) in gone:
                job.sent = False
                dropped.add(job.id)
        return dropped

    def _forget(self, link):
        """Tell the node to drop the least recently used functions that no
        job in flight there needs (a lambda made per call is a new function
        each time: without this the node and its workers would keep them all)."""
        drop = link.forgettable(_NODE_FUNCTIONS * 3 // 4)
        link.forget(drop)
        if drop:
            link.conn.send([P.encode(P.Forget, drop)])

    def _on_started(self, link, msg, frames):
        if not self._trusted_items(link, msg.jobs, "a start"):
            return
        for job_id, start, *where in msg.jobs:  # (a scheduler adds the node's host)
            job = self.jobs.get(job_id)
            if job is not None:
                job.start_time = start
                job.where = where[0] if where else None
                job.status = RUNNING
                future = job.future
                if where and not future.running() and not future.done():  # a scheduler's
                    job.future.set_running_or_notify_cancel()
                self.emit("started", job)

    def _on_done(self, link, msg, frames):
        if not self._trusted_items(link, msg.results, "a result"):
            return
        jobs, finish = self.jobs, self.scheduler.finish
        outcomes: list[tuple[Future, Any, BaseException | None]] = []
        self._outcomes = outcomes  # resolved together, under one lock
        try:
            self._read_results(link, msg, frames, jobs, finish)
        finally:
            self._outcomes = None
            self.scheduler.sync(link)
            if self._direct is not None and len(self._unfinished) <= len(outcomes) \
                    and not self._incoming:
                self._direct.offer()  # idle now: the next lone call may go direct
            resolve(outcomes)
            discard = self._unfinished.discard
            for future, _, _ in outcomes:
                discard(future)
            self._settle()
        self._act(self.scheduler.dispatch())

    def _read_results(self, link, msg, frames, jobs, finish):
        in_flight, fns = link.in_flight, link.fns
        # (plain tuples, unpacked in protocol.Result's field order: no record
        # per job on this path)
        for (job_id, outcome, start, end, stdout, stderr, _, attempt), payload \
                in P.raw_results(msg, frames):
            duration = None if start is None or end is None else end - start
            if not finish(link, job_id, attempt, duration, False):  # counted as stale
                log.info("node %s: dropped a late outcome of job %s (attempt %s)",
                         link.name, job_id, attempt)
                continue
            in_flight.discard(job_id)
            job = jobs.pop(job_id, None)
            if job is None:
                continue
            count = fns.get(job.fn_id)
            if count:
                fns[job.fn_id] = count - 1
            if duration is not None:
                job.start_time, job.end_time, job.stdout, job.stderr = start, end, stdout, stderr
                link.jobs_done += 1
                link.cpu_time += duration
            elif outcome == _KILLED:
                count_killed(link, job)
            self._finish(job, *outcome_of(outcome, payload))

    def _finish(self, job, status, value=None, error=None):
        if job is None:
            return
        if self._revoked:  # (it started after all, or came back)
            self._revoked.discard(job.id)
        job.status = status
        job._frames = job.blob = None  # (the slot: no property call per job)
        job.value, job.error = value, error
        future = job.future
        outcome = None
        batched = False
        if future._state in DONE:  # (future.done(), without the call: every job's path)
            job.cancelled = future.cancelled()
            if future._state == _USER_CANCELLED:  # (a scheduler queued it): its waiters
                future.set_running_or_notify_cancel()  # told, as the stdlib's executors do
        elif not job.sent and not future.set_running_or_notify_cancel():
            job.cancelled = True
        elif self._outcomes is not None:  # a DONE batch: resolved at its end
            self._outcomes.append((future, value, error))
            batched = True
        else:
            outcome = (future, value, error)
        # The handlers first: what they copy (a DispyJob's fields) is there
        # for whoever the future wakes.
        if self.listeners:
            self.emit("done", job)
        elif self.on_event is not None:  # (emit's work, without its call: every job's path)
            try:
                self.on_event("done", job)
            except Exception:
                log.exception("dpool: event handler failed on done")
        if outcome is not None:
            resolve((outcome,))
        if not batched:  # (only once resolved: wait() returns when this set is empty)
            self._unfinished.discard(future)
            if self._outcomes is None:
                self._settle()

    def emit(self, kind, obj):
        if self.on_event is not None:
            try:
                self.on_event(kind, obj)
            except Exception:
                log.exception("dpool: event handler failed on %s", kind)
        for listener in self.listeners:
            try:
                listener(kind, obj)
            except Exception:
                log.exception("dpool: event listener failed on %s", kind)

