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
"""
import asyncio
import collections
import itertools
import socket
import logging
import threading
import time
import traceback
import weakref
from operator import itemgetter
from typing import Any

from .. import liveness
from .. import protocol as P
from ..protocol import Outcome, run_item
from .. import serialize
from ..config import resolve_cpus
from ..errors import (AuthenticationError, BrokenCluster, ConnectionClosed, DpoolError,
                      JobCancelled, NodeLost, ProtocolError)
from ..transport import PROTOCOL_VERSION, client_ssl_context, connect, inproc_pair
from .future import Future, resolve
from .scheduler import Action, Cancelled, CancelRemote, Fail, Reclaim, Scheduler, Send

log = logging.getLogger("dpool")
_first = itemgetter(0)

# Job states (dispy's names; the dispy adapter exposes them as DispyJob.X).
CREATED, RUNNING, FINISHED, CANCELLED, TERMINATED, ABANDONED = (
    "Created", "Running", "Finished", "Cancelled", "Terminated", "Abandoned")


def describe(exc):
    """An exception's text, never empty (``TimeoutError()`` says nothing)."""
    text = str(exc)
    return text if text.strip() else type(exc).__name__


def _ignore(link, msg, frames):
    """Heartbeat: its bytes already counted as a sign of life."""


def client_hello():
    return {"protocol": PROTOCOL_VERSION, "role": "client", **serialize.runtime_versions()}


def tls_context(cafile=None, certfile=None, keyfile=None):
    """The TLS setup of every API: TLS to the nodes when any file is given.
    The nodes' certificates are checked against ``cafile`` (the system CAs if
    None); ``certfile`` and ``keyfile`` are this client's certificate, for
    nodes that require one.  None (no TLS) when no file is given."""
    if not (cafile or certfile):
        return None
    return client_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)


#: How often a busy node (its CPUs all taken by other clients) is asked again.
BUSY_POLL = 0.5
#: Functions a node session keeps at most (see Client._forget).
_NODE_FUNCTIONS = 1024


class Job:
    """The client's record of one job.  Fields are written by the loop thread
    before the future resolves, so they are safe to read after it has."""

    __slots__ = ("id", "fn_id", "frames", "future", "status", "node", "submit_time",
                 "start_time", "end_time", "stdout", "stderr", "sent", "tag", "star",
                 "value", "error", "cancelled", "blob", "where", "__weakref__")

    def __init__(self, job_id, fn_id, frames, tag=None, star=False):
        self.id = job_id
        self.fn_id = fn_id
        self.star = star
        self.frames = frames
        self.blob = None  # the function, serialized (set by Client.submit)
        self.future = Future()
        self.status = CREATED
        self.node = None
        self.where = None  # the host that ran it, when a scheduler (the node) says so
        self.submit_time = time.time()
        self.start_time = self.end_time = None
        self.stdout = self.stderr = None
        self.sent = False
        self.tag = tag  # whatever the adapter wants to keep with the job
        # The outcome, also readable without the future's lock once "done"
        # was emitted: value or error, or cancelled by the user's future.cancel().
        self.value = self.error = None
        self.cancelled = False  # True: the user's future.cancel() won before it ran


class NodeLink:
    """The client's side of one session with one node."""

    def __init__(self, address, conn=None):
        self.address = address  # (host, port) or "embedded"
        self.conn = conn
        self.info = {}
        self.fns = collections.OrderedDict()  # fn_id -> jobs in flight here (LRU order)
        self.ready = False
        self.error = None
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.ready_future = None
        # Job ids given to this node and not done there: the only ones it may
        # report on (results, starts, provisional results, files).
        self.in_flight = set()
        self.heartbeat = None  # a liveness.Heartbeat while the session is open (TCP only)
        self.retry = True  # False: the node refused us, or we closed it: don't re-join
        # (token, terminate): take over the session a client that went away
        # left there (Client.recover) instead of opening one.
        self.recover = None
        self.adopted = []  # the Jobs of that session, once READY

    hold = False  # True: READY but not given jobs until an extension admits it
    busy = False  # True: the node answered Busy (other clients hold its CPUs)
    refusal = None  # the node's reason, if it refused the session
    draining = False  # True: the node said it is shutting down

    @property
    def name(self):
        return self.info.get("name") or str(self.address)

    @property
    def cpus(self):
        return self.info.get("cpus", 0)

    @property
    def tx(self):
        """Bytes sent to the node on this session's connection."""
        return self.conn.bytes_sent if self.conn is not None else 0

    @property
    def rx(self):
        """Bytes received from the node on this session's connection."""
        return self.conn.bytes_received if self.conn is not None else 0

    def traffic(self):
        """(tx, rx) in one call (once per finished job for JobCluster)."""
        conn = self.conn
        return (0, 0) if conn is None else (conn.bytes_sent, conn.bytes_received)

    def __repr__(self):
        return f"<node {self.name} {self.address}>"


def _where(link):
    """host:port of a link (nodes on one host share a name)."""
    if isinstance(link.address, tuple):
        return "%s:%s" % tuple(link.address)
    return str(link.address)


class LoopThread:
    """One private asyncio loop in a daemon thread."""

    def __init__(self, name="dpool-client"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let callbacks scheduled during shutdown run, then close.
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def run(self, coro, timeout=None):
        """Run a coroutine on the loop and wait for it from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout=10):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)


class _FunctionTable:
    """Function -> (id, blob): each function is serialized once per client.

    The table remembers the last ``size`` functions; a job keeps its own
    reference to its function's blob until it is done, so a function that
    falls out of the table (many lambdas made per call) is still there to
    send to whichever node runs the job.
    """

    def __init__(self, size=4096):
        self.size = size
        self.table = collections.OrderedDict()  # id(fn) -> (weakref to fn, fn_id, blob)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    def get(self, fn):
        """(fn_id, blob).  The table holds functions by weak reference only:
        a callable the caller dropped (a bound method, a partial holding
        data) is freed, not kept alive by dpool; one that can't be weakly
        referenced is serialized on each call."""
        entry = self.table.get(id(fn))
        if entry is not None and entry[0]() is fn:
            return entry[1], entry[2]
        blob = serialize.dumps_function(fn)
        with self.lock:
            fn_id = next(self.ids)
            try:
                ref = weakref.ref(fn)
            except TypeError:
                return fn_id, blob
            self.table[id(fn)] = (ref, fn_id, blob)
            while len(self.table) > self.size:
                self.table.popitem(last=False)
        return fn_id, blob


class Client:
    """Runs jobs on nodes; the engine behind every public API.

    ``nodes`` is a list of ``(host, port)`` to connect to; ``None`` embeds a
    local node with ``cpus`` CPUs.  ``session`` holds the per-session options
    sent to each node (capture, notify_start, max_tasks, cwd, cleanup, cpus);
    ``initializer``/``initargs`` run once in each worker process.
    ``on_event(kind, obj)`` is called in the loop thread; it must be quick.
    The kinds: "started" and "done" (obj a Job), "node" (obj a NodeLink that
    joined or was lost), and those of extensions (JobCluster's job
    environment, :mod:`dpool.dispy.env`, adds "provisional", "file" and
    "avail").
    ``heartbeat`` is ``(interval, deadline)`` in seconds (default
    ``$DPOOL_HEARTBEAT``, else 1 s and 10 s, see :mod:`dpool.liveness`):
    a node silent for longer than the deadline is lost (its jobs rerun
    elsewhere), then retried with backoff and used again when it answers.
    ``connect_timeout`` bounds connecting to a node and opening the session
    (default ``$DPOOL_CONNECT_TIMEOUT``, else 10 s).

    An extension handles more message types (:meth:`register`), may hook
    each session's start (``prepare``) and uses :meth:`admit`,
    :meth:`leave_out`, :meth:`trusted`, :meth:`distrust` and :meth:`emit`.
    :meth:`recover` takes over the sessions a client gone away left on
    nodes (what dispy's ``recover_jobs`` runs on).
    """

    def __init__(self, nodes=None, *, secret=None, ssl=None, cpus=None, session=None,
                 initializer=None, initargs=(), on_event=None, max_retries=2,
                 connect_timeout=None, heartbeat=None, name="dpool-client", prepare=None,
                 discovery=None):
        self.node_addresses = nodes
        self.discovery = discovery  # a core.discover.Discovery: more nodes found over UDP
        self.finder = None
        self.secret = secret
        self.ssl = ssl
        self.embedded_cpus = cpus
        self.session = dict(session or {})
        self.init_frames = serialize.dumps((initializer, tuple(initargs))) if initializer else []
        self.on_event = on_event
        self.listeners = []  # more on_event-like callables (monitors: dpool.dashboard)
        self.connect_timeout = liveness.connect_timeout(connect_timeout)
        self.liveness = liveness.settings(heartbeat)
        self._ticker = None  # the heartbeat timer (call_later handle)
        self._rejoins = {}  # address -> task retrying a lost (or busy) node
        self._busy_until = {}  # address -> when to stop waiting for a busy node
        self._busy_given_up = set()  # addresses left for being busy (discovery asks again)
        self.scheduler = Scheduler(max_retries=max_retries)
        self.functions = _FunctionTable()
        self.jobs = {}
        self.links = []
        self.broken = None
        self.closed = False
        self.embedded = None
        self._ids = itertools.count(1)
        self._incoming: collections.deque[tuple[Job, Any]] = collections.deque()  # (job, pin)
        self._wake_pending = False
        self._unfinished = set()  # futures not yet resolved (for close/wait)
        self._idle = threading.Condition(threading.Lock())  # notified when that set empties
        self._outcomes = None  # while a DONE batch is read: [(future, value, error)]
        self._thread = LoopThread(name)
        self.loop = self._thread.loop
        self._handlers = {P.Ready: self._on_ready, P.Refused: self._on_refused,
                          P.Busy: self._on_busy,
                          P.Done: self._on_done, P.Started: self._on_started,
                          P.InitFail: self._on_initfail, P.Heartbeat: _ignore,
                          P.GiveBack: self._on_giveback, P.Draining: self._on_draining}
        # ``prepare(link)`` (loop thread, before SESSION) returns None to skip
        # the node, or (session options, [messages sent right after SESSION]);
        # it sets ``link.hold`` to keep the node from jobs until it is admitted.
        self.prepare = prepare

    def register(self, handlers):
        """Handle more message types: ``{record class: fn(link, msg, frames)}``,
        called in the loop thread (before :meth:`start`)."""
        self._handlers.update(handlers)

    # ------------------------------------------------------- user-side API

    def start(self):
        try:
            self._thread.run(self._start(), self.connect_timeout + 5)
        except BaseException:
            self.close(wait=False, cancel=True)
            raise
        return self

    def submit(self, fn, args=(), kwargs=None, tag=None, pin=None, star=False,
               defer_errors=False):
        """Queue one job; returns its :class:`Job` (``job.future`` resolves).

        A function or arguments that can't be serialized raise here, or with
        ``defer_errors`` fail the returned job's future (not queued), as the
        stdlib's pools report them.

        With ``star=True`` (or ``protocol.Call.STARMAP``), ``args`` is a list of
        argument tuples and the job's result is ``[fn(*a) for a in args]``;
        with ``star=protocol.Call.MAP`` it is a list of items and the result
        ``[fn(x) for x in args]``: one message for a chunk of a map.
        ``tag`` is kept as ``job.tag``; ``pin`` names the only NodeLink
        the job may run on.
        """
        if self.closed:
            raise RuntimeError("cannot submit: the client is closed")
        if self.broken is not None:
            raise BrokenCluster(f"the cluster is broken: {describe(self.broken)}") from self.broken
        try:
            fn_id, blob = self.functions.get(fn)
            frames = tuple(serialize.dumps_call(args, kwargs))  # (untracked by the GC)
        except Exception as exc:
            if not defer_errors:
                raise
            return self._unsent(exc, tag, star)
        job = Job(next(self._ids), fn_id, frames, tag, int(star))  # a plain int on the wire
        job.blob = blob
        self._unfinished.add(job.future)  # the loop thread discards it when done
        self._incoming.append((job, pin))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed under us: close() raced this submit
                self._fail_leftovers()
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

    def cancel(self, job):
        """Cancel a queued or running job; its future fails with JobCancelled.
        From any thread (from the loop thread it takes effect at once)."""
        if job.future.done():
            return
        if self.in_loop_thread():
            self._cancel(job)
        else:
            self.loop.call_soon_threadsafe(self._cancel, job)

    def wait(self, timeout=None):
        """Wait until every job submitted so far has finished; True if so."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._unfinished, timeout)

    def _settle(self):
        """Wake wait() once no job is left (after the futures resolved)."""
        if not self._unfinished:
            with self._idle:
                self._idle.notify_all()

    def close(self, wait=True, cancel=False, timeout=None):
        """Stop taking jobs; optionally wait for or cancel the rest; release all."""
        if self.closed and not self._thread.thread.is_alive():
            return
        if self.in_loop_thread():
            raise RuntimeError("a dpool client can't be closed from its own loop thread "
                               "(a done-callback or event handler runs there): close it "
                               "from another thread")
        self.closed = True
        if cancel:
            for future in list(self._unfinished):
                future.cancel()
            self.loop.call_soon_threadsafe(self._cancel_all)
        if wait:
            self.wait(timeout)
        if self._thread.thread.is_alive():
            try:
                # A caller that gave a timeout gets at most half a second more.
                self._thread.run(self._shutdown(2.0 if timeout is None else 0.5), 30)
            except (TimeoutError, RuntimeError) as exc:
                log.warning("client shutdown did not finish cleanly: %s", exc)
            self._thread.stop()
        self._fail_leftovers()

    def _fail_leftovers(self):
        """Jobs a submit racing close() queued after the loop's last drain."""
        error = BrokenCluster("the client was closed")
        while self._incoming:
            job, _ = self._incoming.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
            self._unfinished.discard(job.future)
        self._settle()

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

    def recover(self, sessions, terminate=False):
        """Take over sessions that a client gone away left on nodes (dispy's
        ``recover_jobs``; the client had given each a ``recover_token``).

        ``sessions`` is a list of ``((host, port), token)``.  Returns one
        NodeLink per session, its ``error`` set (and ``refusal`` if the node
        refused: it keeps nothing for that token) unless it is ready.  A ready
        link's ``adopted`` lists the session's jobs as :class:`Job` records
        with the ids the old client gave them (``fn_id`` and arguments
        unknown); their futures resolve as their outcomes arrive, as any
        job's do.  They run on that node only: one whose session is lost
        first fails with :class:`NodeLost` (the node keeps it again, for a
        later call).  ``terminate=True`` has the node cancel the jobs not
        finished yet.  Call it before submitting anything to this client.
        """
        async def take_over():
            links = [NodeLink(address) for address, _ in sessions]
            for link, (_, token) in zip(links, sessions):
                link.recover, link.retry = (token, bool(terminate)), False
            await asyncio.gather(*(self._connect(link.address, link, quiet=True)
                                   for link in links))
            return links
        links = self._thread.run(take_over(), self.connect_timeout + 5)
        top = max((job.id for link in links for job in link.adopted), default=0)
        self._ids = itertools.count(max(top + 1, next(self._ids)))  # no id taken twice
        return links

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

    async def _start(self):
        if self.node_addresses is None and self.discovery is None:
            await self._start_embedded()
            return
        await asyncio.gather(*(self._connect(addr) for addr in self.node_addresses or ()))
        if self.discovery is not None:
            await self.start_discovery()
        await self._wait_busy()
        if not any(link.ready for link in self.links):
            errors = "; ".join(f"{link.address[0]}:{link.address[1]}: {describe(link.error)}"
                               for link in self.links)
            if self.discovery is not None and not self.links:
                errors = self._nothing_found()
            raise BrokenCluster(f"no node could be used ({errors})")

    async def start_discovery(self):
        """Start looking for nodes over UDP (loop thread); wait for the first."""
        from .discover import Finder

        if self.finder is None:
            self.finder = Finder(self, self.discovery)
            await self.finder.start()
        await self.finder.settled(self.discovery.wait or self.connect_timeout)

    def _nothing_found(self):
        d = self.discovery
        wanted = ", ".join(f"{host}:{port}" for host, port in d.patterns)
        return (f"discovery found no node matching {wanted} within "
                f"{d.wait or self.connect_timeout} s: are dpool-nodes running with the same "
                f"secret, and is UDP port {'/'.join(map(str, sorted(d.ports())))} open to them "
                f"(see docs/discovery.md)?")

    async def _start_embedded(self):
        from ..node.runtime import NodeRuntime

        node = NodeRuntime(resolve_cpus(self.embedded_cpus), name=socket.gethostname(),
                           embedded=True)
        await node.start()
        self.embedded = node
        ours, theirs = inproc_pair()
        link = NodeLink("embedded", ours)
        node.accept(theirs)
        await self._open_session(link)

    async def _wait_busy(self):
        """No node is ready yet but some are busy with other clients: wait
        until one is ready or none is waited for (each at most its connect
        timeout; see :meth:`_connect`)."""
        while not any(link.ready for link in self.links):
            if not any(address in self._rejoins for address in self._busy_until):
                return
            # Any retry may end it: another node, down at first, that is back.
            await asyncio.wait(list(self._rejoins.values()),
                               return_when=asyncio.FIRST_COMPLETED)

    async def _connect(self, address, link=None, quiet=False, timeout=None):
        """Connect to a node and open a session, within connect_timeout.
        On failure the link keeps the error (never an empty text) and a node
        that may come back is retried in the background; a node busy with
        other clients is waited for (the user told once) up to the connect
        timeout from the first try."""
        host, port = address
        link = link or NodeLink(address)
        self._replace_link(link)
        timeout = timeout or self.connect_timeout
        start = self.loop.time()
        try:
            async with asyncio.timeout(timeout):
                link.conn = await connect(host, port, secret=self.secret or b"",
                                          hello=client_hello(), ssl=self.ssl, timeout=timeout)
                await self._open_session(link)
            self._busy_given_up.discard(address)
        except (OSError, DpoolError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and not str(exc):
                exc = TimeoutError(f"no answer from {host}:{port} within the connect "
                                   f"timeout of {timeout} s")
            link.error = link.error or exc
            if link.busy:
                self._on_busy_node(link, start)
            elif not quiet:
                log.warning("node %s:%s: %s", host, port, describe(link.error))
            if link.conn is not None:
                link.conn.abort()
            self._maybe_rejoin(link)

    def _on_busy_node(self, link, start):
        """``link``'s node is busy: say so once, and wait for it (the rejoin
        task retries) until the connect timeout from the first try."""
        if link.address not in self._busy_until:
            self._busy_until[link.address] = start + self.connect_timeout
            level = logging.DEBUG if link.address in self._busy_given_up else logging.WARNING
            log.log(level, "node %s:%s is busy with another client (%s); waiting for it up "
                    "to the connect timeout of %g s", *link.address, describe(link.error),
                    self.connect_timeout)

    def _replace_link(self, link):
        """Add ``link``; a lost link to the same address is replaced."""
        for i, old in enumerate(self.links):
            if old is link:
                return
            if old.address == link.address and not old.ready and old.error is not None:
                self.links[i] = link
                return
        self.links.append(link)

    async def _open_session(self, link):
        self._replace_link(link)
        link.ready_future = self.loop.create_future()
        link.conn.set_receiver(lambda frames: self._on_message(link, frames),
                               lambda exc=None: self._on_link_closed(link, exc))
        if link.address != "embedded":  # in-process links don't go silent
            link.conn.set_deadline(self.liveness.deadline)
            link.heartbeat = liveness.Heartbeat(self.liveness, self.loop.time(),
                                                link.conn.bytes_received, link.conn.bytes_sent)
            self._start_ticker()
        for message in self._opening(link):
            link.conn.send(message)
        await asyncio.wait_for(link.ready_future, self.connect_timeout)

    def _opening(self, link):
        """The messages that open a session: SESSION (its options from
        ``prepare``, if any) and what ``prepare`` adds, or RECOVER."""
        if link.recover is not None:
            return [[P.encode(P.Recover, *link.recover)]]
        session, preamble = self.session, ()  # type: tuple[Any, Any]
        if self.prepare is not None:
            plan = self.prepare(link)
            if plan is None:
                link.ready_future.cancel()  # nobody waits for it
                link.retry = False
                raise DpoolError("not used: the cluster's allocation gave it no CPUs")
            session, preamble = plan
        if link.address != "embedded":
            session = dict(session, heartbeat=self.liveness.as_option())
        return [[P.encode(P.Session, session), *self.init_frames], *preamble]

    def _on_message(self, link, frames):
        msg = P.decode(frames[0])
        handler = self._handlers.get(type(msg))
        if handler is None:  # e.g. a job-environment message with no JobEnv registered
            link.error = ProtocolError(f"node {link.name} sent {P.op_of(msg).name}, which "
                                       f"this client does not expect: closing its connection")
            log.error("%s", link.error)
            link.conn.abort()
            return
        handler(link, msg, frames)

    def trusted(self, link, job_ids, what):
        """True if every job in ``job_ids`` is in flight on ``link``; else a
        node reports on jobs it was not given (another node's, or none):
        its link is closed, with one log line, and nothing of it is taken."""
        strangers = [job_id for job_id in job_ids if job_id not in link.in_flight]
        if not strangers:
            return True
        shown = ", ".join(map(str, strangers[:5])) + (" ..." if len(strangers) > 5 else "")
        self.distrust(link, f"{what} for job {shown}, not given to it (or done there "
                             f"already)")
        return False

    def _trusted_items(self, link, items, what):
        """:meth:`trusted` for a message's items (tuples, the job id first),
        without a list of their ids when all are in flight (once per Done)."""
        return link.in_flight.issuperset(map(_first, items)) or \
            self.trusted(link, [item[0] for item in items], what)

    def distrust(self, link, what):
        """``link``'s node sent ``what`` (not its own to answer): log, close."""
        link.error = ProtocolError(f"node {link.name} sent {what}: closing its connection")
        log.error("%s", link.error)
        link.conn.abort()

    def _on_ready(self, link, msg, frames):
        if link.ready:  # again: a scheduler whose CPUs changed (nodes joined)
            old, link.info = link.cpus, {**link.info, **msg.info}
            state = self.scheduler.nodes.get(link)
            if state is not None and state.cpus == old:  # (not limited by set_cpus)
                self._act(self.scheduler.set_cpus(link, link.cpus))
            return
        link.info = msg.info
        link.ready = True
        if not link.ready_future.done():
            link.ready_future.set_result(None)
        if link.recover is not None:
            self._adopt(link, [*msg.info.get("kept", ()), *msg.info.get("pending", ())])
        elif not link.hold:
            self.admit(link)

    def _adopt(self, link, job_ids):
        """A recovered session's jobs: in flight on ``link``, which gets no
        new ones.  A job two nodes kept (its first node was cut off, not
        stopped) is one Job, resolved by the first outcome."""
        self.emit("node", link)
        self._act(self.scheduler.add_node(link, 0, time.monotonic()))
        fresh = [job_id for job_id in job_ids if job_id not in self.jobs]
        for job_id in fresh:
            job = self.jobs[job_id] = Job(job_id, None, None)
            job.future.set_running_or_notify_cancel()
            job.sent, job.status, job.node = True, RUNNING, link
            self._unfinished.add(job.future)
        self.scheduler.adopt(link, fresh)
        link.in_flight.update(job_ids)
        link.adopted = [self.jobs[job_id] for job_id in job_ids]

    def admit(self, link):
        self.emit("node", link)
        self._act(self.scheduler.add_node(link, link.cpus, time.monotonic()))

    def _on_refused(self, link, msg, frames):
        link.retry = False
        link.refusal = msg.reason
        link.error = DpoolError(msg.reason)
        if not link.ready_future.done():
            link.ready_future.set_exception(link.error)

    def _on_busy(self, link, msg, frames):
        link.busy = True
        link.error = DpoolError(msg.reason)
        if not link.ready_future.done():
            link.ready_future.set_exception(link.error)

    def _on_giveback(self, link, msg, frames):
        """Jobs the node did not run (we reclaimed them, or it is draining)."""
        for job_id in msg.job_ids:
            job = self.jobs.get(job_id)
            if job is None or not self.scheduler.current(link, job_id):
                continue  # not in flight there: the scheduler ignores it too
            link.in_flight.discard(job_id)
            if link.fns.get(job.fn_id):
                link.fns[job.fn_id] -= 1
        self._act(self.scheduler.given_back(link, msg.job_ids, time.monotonic()))

    def _on_draining(self, link, msg, frames):
        log.info("node %s is shutting down: no new jobs go there (its running jobs have "
                 "%ss to finish)", link.name, msg.grace)
        link.draining = True
        self._act(self.scheduler.drain(link, time.monotonic()))

    def _on_initfail(self, link, msg, frames):
        self.leave_out(link, "the initializer failed", frames)

    def leave_out(self, link, what, frames):
        """The node reported a failure (frames[1:]) that makes it unusable:
        record it as the link's error and drop the link (its jobs move on)."""
        exc = serialize.load_exception(frames[1:])
        link.error = BrokenCluster(f"{what} on node {link.name}: {exc!r}")
        link.retry = False
        link.error.__cause__ = exc
        log.error("node %s: %s (the node is left out)", link.name, link.error)
        link.conn.abort()

    def add_nodes(self, addresses):
        """Connect to more nodes (user thread); returns their NodeLinks."""
        async def connect_all():
            links = [NodeLink(address) for address in addresses]
            await asyncio.gather(*(self._connect(address, link) for address, link
                                   in zip(addresses, links)))
            if self.broken is not None and any(link.ready for link in links):
                self.broken = None
            return links
        return self._thread.run(connect_all(), self.connect_timeout + 5)

    def knows(self, address):
        """Whether ``address`` is a node in use, or lost and being retried."""
        return address in self._rejoins or any(link.address == address and link.ready
                                                for link in self.links)

    async def join(self, address):
        """Loop thread: connect to one more node (a lost one is retried)."""
        await self._connect(address)

    def discover(self, patterns, secret=None, node_port=None, **options):
        """Look for more nodes over UDP (user thread): ``patterns`` are
        ``(host pattern, port)``; matching nodes join as they answer;
        ``options`` those of :func:`dpool.core.discover.settings`."""
        from . import discover

        async def run():
            if self.discovery is None:
                self.discovery = discover.settings([], secret or self.secret, node_port,
                                                   **options)
            if self.finder is None:
                self.finder = discover.Finder(self, self.discovery)
                await self.finder.start()
            self.finder.add(patterns)
        self._thread.run(run(), 30)

    def close_link(self, link, bye=True):
        """End the session with one node (any thread); its unfinished jobs
        are moved to other nodes as for a lost node.  With ``bye=False`` the
        node is not told: it handles it as a client gone away (a recoverable
        session is kept, for a later :meth:`recover`)."""
        def close():
            link.retry = False
            if link.conn is not None and not link.conn.closed:
                if link.ready and bye:
                    link.conn.send([P.encode(P.Bye)])
                link.conn.close()
        self.call_soon(close)

    def set_cpus(self, link, cpus):
        """Use at most ``cpus`` of the CPUs a node granted (0: no new jobs)."""
        self.loop.call_soon_threadsafe(
            lambda: self._act(self.scheduler.set_cpus(link, min(cpus, link.cpus))))

    def _on_link_closed(self, link, exc):
        if link.error is None:
            link.error = exc or ConnectionClosed(f"node {link.name} closed the connection")
        link.heartbeat = None
        if link.ready_future is not None and not link.ready_future.done():
            link.ready_future.set_exception(link.error)
        was_ready, link.ready = link.ready, False
        if not was_ready:
            return
        self.emit("node", link)
        if not self.closed or self._unfinished:
            if link.draining:
                log.info("node %s (%s) has shut down", link.name, _where(link))
            else:
                log.warning("lost node %s (%s): %s", link.name, _where(link),
                            describe(link.error))
        self._act(self.scheduler.remove_node(link, time.monotonic(), describe(link.error)))
        if not any(other.ready for other in self.links):
            self.broken = link.error
            error = link.error if isinstance(link.error, BrokenCluster) else \
                BrokenCluster(f"no node left to run jobs (last error: {describe(link.error)})")
            self._act(self.scheduler.fail_queued(error))
        self._maybe_rejoin(link)

    # ------------------------------------------------ liveness and re-join

    @property
    def late_results(self):
        """Outcomes dropped because they were not from a job's current
        attempt (a node declared lost answered after all)."""
        return self.scheduler.stale

    def _start_ticker(self):
        if self._ticker is None and not self.closed:
            self._ticker = self.loop.call_later(self.liveness.tick, self._tick)

    def _tick(self):
        """Every ``liveness.tick`` s: heartbeats out, silent nodes lost."""
        now = self.loop.time()
        for link in list(self.links):
            hb, conn = link.heartbeat, link.conn
            if hb is None or conn is None or conn.closed:
                continue
            verdict = hb.tick(now, conn.bytes_received, conn.bytes_sent)
            if verdict is liveness.SEND:
                conn.send([P.encode(P.Heartbeat)])
            elif verdict is liveness.LOST:
                link.error = NodeLost(f"node {link.name} ({_where(link)}) sent nothing for "
                                      f"{hb.silence(now):.1f} s (heartbeat deadline "
                                      f"{self.liveness.deadline} s)")
                conn.abort()  # its close callback moves its jobs elsewhere
        self._ticker = self.loop.call_later(self.liveness.tick, self._tick)

    def _maybe_rejoin(self, link):
        """Retry a lost node in the background, unless it refused us, we
        closed it, or it can't be used anyway (wrong secret, protocol)."""
        address = link.address
        if self.closed or not link.retry or not isinstance(address, tuple) \
                or address in self._rejoins \
                or isinstance(link.error, (AuthenticationError, ProtocolError)):
            return
        self._rejoins[address] = self.loop.create_task(self._rejoin(address))

    async def _rejoin(self, address):
        backoff = liveness.Backoff(first=min(0.25, self.liveness.interval),
                                   cap=max(1.0, min(5.0, self.liveness.deadline / 2)))
        try:
            while not self.closed:
                until = self._busy_until.get(address)
                if until is not None and self.loop.time() >= until:
                    self._give_up_busy(address)
                    return
                await asyncio.sleep(backoff.next() if until is None else BUSY_POLL)
                link = NodeLink(address)
                timeout = None if until is None else max(0.5, until - self.loop.time())
                await self._connect(address, link, quiet=True, timeout=timeout)
                if link.ready:
                    if self._busy_until.pop(address, None) is not None:
                        log.info("node %s (%s:%s) is free now: using it", link.name, *address)
                    else:
                        log.warning("node %s (%s:%s) is back", link.name, *address)
                    self.broken = None
                    return
                if not link.retry or isinstance(link.error, (AuthenticationError, ProtocolError)):
                    log.warning("node %s:%s: %s (not retried)", *address, describe(link.error))
                    return
        finally:
            self._rejoins.pop(address, None)

    def _give_up_busy(self, address):
        """The connect timeout passed and the node is still busy: not used."""
        self._busy_until.pop(address, None)
        level = logging.DEBUG if address in self._busy_given_up else logging.WARNING
        self._busy_given_up.add(address)
        for link in self.links:
            if link.address == address and not link.ready and link.busy:
                link.error = DpoolError(f"{describe(link.error)}; still busy with another "
                                        f"client after the connect timeout of "
                                        f"{self.connect_timeout:g} s")
                log.log(level, "node %s:%s: %s (not used)", *address, link.error)

    def gave_up_busy(self, address):
        """Whether ``address`` was left for being busy and is not being
        waited for now (discovery, hearing from it again, asks again)."""
        return address in self._busy_given_up and address not in self._busy_until \
            and not self.knows(address)

    def _drain(self):
        self._wake_pending = False
        incoming = self._incoming
        plain, now = [], time.monotonic()
        actions: list[Action] = []
        while incoming:
            job, pin = incoming.popleft()
            self.jobs[job.id] = job
            if pin is None:
                plain.append(job.id)
            elif not pin.ready and pin.error is not None:  # lost: it won't come back
                error = NodeLost(f"node {pin.name} was lost: {describe(pin.error)}")
                actions.append(Fail(job.id, error))
            else:
                actions.extend(self.scheduler.submit([job.id], now, pin=pin))
        if plain:
            actions.extend(self.scheduler.submit(plain, now))
        if self.broken is not None and not any(link.ready for link in self.links):
            actions.extend(self.scheduler.fail_queued(
                BrokenCluster(f"no node left: {describe(self.broken)}")))
        self._act(actions)

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
        conn, jobs = link.conn, self.jobs
        header, frames, dropped, functions = [], [], [], []
        for job_id in ids:
            job = jobs[job_id]
            if not job.sent:
                if not job.future.set_running_or_notify_cancel():
                    dropped.append(job_id)  # cancelled by the user while queued
                    continue
                job.sent = True
            count = link.fns.get(job.fn_id)
            if count is None:
                functions.append([P.encode(P.Func, job.fn_id), job.blob])
                link.fns[job.fn_id] = 1
            else:
                link.fns[job.fn_id] = count + 1
                link.fns.move_to_end(job.fn_id)
            job.node = link
            link.in_flight.add(job_id)
            job.status = RUNNING
            header.append(run_item(job_id, job.fn_id, len(job.frames), job.star,
                                   self.scheduler.attempt(job_id)))
            frames.extend(job.frames)
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
        for job_id in dropped:
            self.scheduler.done(link, job_id, dispatch=False)
            self._unfinished.discard(jobs.pop(job_id).future)
        self._settle()
        return self.scheduler.dispatch()

    def _forget(self, link):
        """Tell the node to drop the least recently used functions that no
        job in flight there needs (a lambda made per call is a new function
        each time: without this the node and its workers would keep them all)."""
        fns, drop = link.fns, []  # type: Any, list[Any]
        excess = len(fns) - _NODE_FUNCTIONS * 3 // 4
        for fn_id, count in fns.items():
            if len(drop) >= excess:
                break
            if count == 0:
                drop.append(fn_id)
        for fn_id in drop:
            del fns[fn_id]
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
            resolve(outcomes)
            discard = self._unfinished.discard
            for future, _, _ in outcomes:
                discard(future)
            self._settle()
        self._act(self.scheduler.dispatch())

    def _read_results(self, link, msg, frames, jobs, finish):
        for res, payload in P.results(msg, frames):
            start, end = res.start, res.end
            duration = None if start is None or end is None else end - start
            if not finish(link, res.job_id, res.attempt, duration):  # counted as stale
                log.info("node %s: dropped a late outcome of job %s (attempt %s)",
                         link.name, res.job_id, res.attempt)
                continue
            link.in_flight.discard(res.job_id)
            job = jobs.pop(res.job_id, None)
            if job is None:
                continue
            count = link.fns.get(job.fn_id)
            if count:
                link.fns[job.fn_id] = count - 1
            if duration is not None:
                job.start_time, job.end_time, job.stdout, job.stderr = \
                    start, end, res.stdout, res.stderr
                link.jobs_done += 1
                link.cpu_time += duration
            self._resolve(job, res.outcome, payload)

    def _resolve(self, job, outcome, payload):
        if outcome == Outcome.OK:
            try:
                value = serialize.loads(payload)
            except Exception as exc:  # e.g. the result's class is not importable here
                self._finish(job, TERMINATED, error=exc)
            else:
                self._finish(job, FINISHED, value=value)
        elif outcome == Outcome.CANCELLED:
            self._finish(job, CANCELLED, error=JobCancelled("job cancelled before it ran"))
        elif outcome == Outcome.KILLED:
            self._finish(job, TERMINATED,
                         error=JobCancelled("job cancelled: its process was killed"))
        else:
            error = serialize.load_exception(payload)
            self._finish(job, TERMINATED if outcome == Outcome.ERROR else ABANDONED, error=error)

    def _finish(self, job, status, value=None, error=None):
        if job is None:
            return
        job.status = status
        job.frames = job.blob = None
        job.value, job.error = value, error
        future = job.future
        outcome = None
        batched = False
        if future.done():
            job.cancelled = future.cancelled()
        elif not job.sent and not future.set_running_or_notify_cancel():
            job.cancelled = True
        elif self._outcomes is not None:  # a DONE batch: resolved at its end
            self._outcomes.append((future, value, error))
            batched = True
        else:
            outcome = (future, value, error)
        # The handlers first: what they copy (a DispyJob's fields) is there
        # for whoever the future wakes.
        self.emit("done", job)
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

    def _cancel(self, job):
        if job.id not in self.jobs:
            # Not drained yet: drain first so the scheduler knows it.
            self._drain()
        self._act(self.scheduler.cancel(job.id))

    def _cancel_all(self):
        self._drain()
        for job_id in list(self.jobs):
            self._act(self.scheduler.cancel(job_id))

    async def _shutdown(self, grace=2.0):
        self._drain()
        if self.finder is not None:
            self.finder.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._rejoins.values()):
            task.cancel()
        error = BrokenCluster("the client was closed")
        self._act(self.scheduler.fail_queued(error))
        for link in self.links:
            if link.conn is not None and not link.conn.closed:
                if link.ready:
                    link.conn.send([P.encode(P.Bye)])
                link.ready = False
                link.conn.close()
        for job in list(self.jobs.values()):
            state = self.scheduler.jobs.get(job.id)
            if state is not None and state.cancelling:  # its node did not answer in time
                self._finish(job, TERMINATED, error=JobCancelled(
                    "job cancelled; its node did not confirm before the client closed"))
            else:
                self._finish(job, ABANDONED, error=error)
        self.jobs.clear()
        if self.embedded is not None:
            await self.embedded.close()
        # A graceful close (TLS's in particular) needs the loop for a moment
        # more: wait for it, briefly, then abort what is left.
        conns = [link.conn for link in self.links if link.conn is not None]
        if conns:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(conn.wait_closed()) for conn in conns], timeout=grace)
            for future in pending:
                future.cancel()
            for conn in conns:
                conn.abort()
        await asyncio.sleep(0)
