"""The node runtime: serves client sessions with worker processes.

::

    client ──(authenticated Connection)──► Session ──► Dispatcher ──► WorkerHandle ──► worker
       ▲                                     │  (I/O)      (pure)            │ (socketpair)
       └──────────── Done batches ◄──────────┴──── results ◄─────────────────┘

Everything here runs on one asyncio loop: the loop of ``dpool-node``, or the
client's private loop when the node is embedded.  A session owns the CPUs the
node granted it and one worker process per CPU, forked by the zygote.  Which
worker runs which job, and what happens when one dies or a cancel comes, is
decided by the session's :class:`~dpool.node.dispatch.Dispatcher`; the
session carries out its actions.  A worker that dies fails only the job it
was running and a new worker takes its place.  When the client goes away,
the session kills its workers (and their process groups), frees its CPUs and
removes its folder.

Reclaim and drain: the client may ask for jobs no worker has taken back
(``Reclaim``, to run them on a free CPU elsewhere); the node answers
``GiveBack``, with the jobs of its queue at once and with those waiting in
workers behind their running job once the workers have dropped them
(Dispatcher.ask_back: a worker holds its next job only to start it without
waiting for the node, and gives it back unstarted when asked).
:meth:`NodeRuntime.drain` (``dpool-node`` on SIGTERM) sends each client
``Draining`` and gives its queued jobs back; each session ends
when its running jobs have, or when the grace period is over.

Recovery (dispy's ``recover_jobs``): a session opened with the option
``recover_token`` whose client goes away without BYE is kept for a while, and
a new connection may take it over: see :mod:`dpool.node.recovery`.

Liveness: a TCP session sends Heartbeat when it sent nothing for the interval
the client asked for (Session's ``heartbeat`` option, see dpool.liveness),
and a client that sent nothing for the deadline (its lease) is treated as
gone: its connection is aborted, so its session ends (or is detached, if
recoverable) exactly as when the client disconnects.
"""
import asyncio
import collections
import functools
import itertools
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
import time

from .. import liveness
from .. import protocol as P
from ..protocol import Outcome
from ..protocol import RESULT_END as _END, RESULT_JOB_ID as _JOB_ID, RESULT_START as _START
from ..protocol import RESULT_NFRAMES as _NFRAMES
from .. import serialize
from ..errors import ConnectionClosed, WorkerLost
from ..transport import wrap_socket
from ..transport.forward import STALL, Forward
from ..transport.frames import BYTES_FLAG, Relayed
from ..transport.spool import SpooledFrame
from ..transport.streams import after_pass
from .channel import SessionChannel, open_channel
from .dispatch import Dispatcher, Forget, Kill, LoadFunction, Report, Revoke, Run, Worker
from .files import default_job_root, private_dir
from .lease import SessionLiveness
from .recovery import KEEP_RESULTS, Keeping, Kept, recoverable, take_over
from .status import node_status
from .zygote import Zygote, describe_exit

log = logging.getLogger("dpool.node")

MAX_INTERRUPT_GRACE = 30.0  # seconds a cancelled job may take to clean up, at most
MIN_PULSE = 0.1  # seconds: the shortest pulse_interval a session may ask for (as dispy)
_OUTCOMES = {Outcome.OK: "done", Outcome.ERROR: "raised", Outcome.WORKER_LOST: "worker lost",
             Outcome.CANCELLED: "cancelled", Outcome.KILLED: "killed"}


class NodeRuntime:
    """The part of a node that is not I/O setup: sessions, CPUs, workers."""

    def __init__(self, cpus, name=None, dest_root=None, embedded=False, keep_results=None,
                 zygote=None):
        self.cpus = cpus
        self.keep_results = KEEP_RESULTS if keep_results is None else keep_results
        self.detached = {}  # recover token -> Session whose client went away
        self.channels = {}  # channel token -> Session (see channel.py)
        self.keeping = Keeping()  # what they keep, together (within recovery's limits)
        self.embedded = embedded  # in the client's own process
        self.free_cpus = cpus
        self.name = name or socket.gethostname()
        # Random per node process: sent in each session's Ready (after the
        # authenticated handshake) and in discovery datagrams, so that one
        # node reached at two addresses is used once.
        self.node_id = secrets.token_hex(8)
        self.dest_root = dest_root  # the job root: see files.private_dir
        self.sessions = set()
        self.zygote = zygote or Zygote()  # (a client may hand over one it forked)
        self._zygote_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self.worker_numbers = itertools.count(1)  # names workers as the stdlib does
        self._started = False
        self.draining = False
        self._idle = None  # set when the last session ends, while draining
        # Shared sessions (a dpool-scheduler's, option ``shared``): together
        # they hold ``shared_cpus`` CPUs, taken by the first and freed with
        # the last; the scheduler decides how many of their jobs run at once.
        self.shared = 0
        self.shared_cpus = 0
        self.shared_group = None  # the value of their option ``shared``: their scheduler

    async def start(self):
        if not self._started:
            self.dest_root = private_dir(self.dest_root or default_job_root())
            self._started = True
            await self.zygote.start()

    def info(self):
        from .env.session import avail_info

        return {"name": self.name, "cpus": self.cpus, "free_cpus": self.free_cpus,
                "avail_info": avail_info(self.dest_root), "id": self.node_id}

    async def spawn_worker(self):
        """Fork a worker: (zygote, pid, socket).  If the zygote died (its
        workers die with it), a new one is started first, so the node keeps
        serving."""
        zygote, (pid, sock) = await self._with_zygote(Zygote.spawn)
        return zygote, pid, sock

    async def spawn_setup_process(self):
        """Fork a session's setup process: (zygote, its handle, socket)."""
        zygote, (handle, sock) = await self._with_zygote(Zygote.spawn_setup_process)
        return zygote, handle, sock

    async def _with_zygote(self, request):
        try:
            return await self._request(request)
        except ConnectionError:
            if not self.zygote.dead:
                raise
            # The zygote died while we waited for it: once more, with a new one.
            return await self._request(request)

    async def _request(self, request):
        if self.zygote.dead:
            async with self._zygote_lock:
                if self.zygote.dead:
                    old, self.zygote = self.zygote, Zygote()
                    log.warning("the worker zygote (pid %s) died; starting a new one",
                                old.proc.pid)
                    await old.close()
                    await self.zygote.start()
        zygote = self.zygote
        return zygote, await request(zygote)

    @property
    def log_level(self):
        """Session starts and ends: INFO on a node, DEBUG when embedded."""
        return logging.DEBUG if self.embedded else logging.INFO

    async def drain(self, grace):
        """Stop taking jobs; the running ones get ``grace`` seconds to finish
        (clients move the others).  Returns when every session has ended or
        the time is up; :meth:`close` ends the rest."""
        self.draining = True
        running = sum(session.dispatcher.running() for session in self.sessions)
        log.info("draining: %d sessions, %d jobs running; waiting up to %ss for them",
                 len(self.sessions), running, grace)
        self._idle = asyncio.Event()
        for session in list(self.sessions):
            session.drain(grace)
        if self.sessions:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("grace period of %ss over: killing %d running jobs", grace,
                            sum(session.dispatcher.running() for session in self.sessions))

    def accept(self, conn):
        """Take a new authenticated client connection."""
        session = Session(self, conn, next(self._ids))
        self.sessions.add(session)
        if not self.embedded:
            # A job's large argument goes on to the worker that runs it as
            # it arrives (transport/forward.py), or, when no worker takes it
            # at once, waits in a memory file, not in this process, and goes
            # to its worker by descriptor (transport/spool.py).
            conn.tap_large_messages(session.stream_argument)
            conn.spool_large_frames(_is_run)
        conn.set_receiver(session.on_message, session.on_close)
        if not self.embedded:  # a client must send Session within the default lease
            session.liveness.watch(liveness.Settings())
        return session

    def grant(self, options):
        """CPUs for a new session with these options (0: refused).  Shared
        sessions share CPUs only with those of the same scheduler (the
        option's value names it): another scheduler finds the node busy."""
        group = options.get("shared")
        if group and self.shared:
            if group != self.shared_group:
                return 0
            self.shared += 1
            return self.shared_cpus
        want = options.get("cpus") or self.free_cpus
        cpus = min(want, self.free_cpus)
        if cpus > 0:
            self.free_cpus -= cpus
            if group:
                self.shared, self.shared_cpus, self.shared_group = 1, cpus, group
        return max(cpus, 0)

    def release(self, session):
        if session in self.sessions:
            self.sessions.discard(session)
            if not session.options.get("shared") or session.cpus <= 0:
                self.free_cpus += session.cpus
            else:
                self.shared -= 1
                if not self.shared:
                    self.free_cpus += self.shared_cpus
                    self.shared_cpus, self.shared_group = 0, None
            if not self.sessions and self._idle is not None:
                self._idle.set()

    async def close(self):
        tasks = []
        for session in list(self.sessions):
            tasks.extend(session.tasks)
            session.end("node shutting down")  # (cancels its tasks)
        await self.zygote.close()
        # Done before the loop stops, else a task its cancel has not reached
        # yet (a worker's exit awaited) is "destroyed but pending" at exit.
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self.embedded:
            log.info("node %s shut down", self.name)


def _is_run(frame):
    """Whether a client's message (its first frame) is a Run: the messages
    whose large frames are spooled."""
    try:
        return type(P.decode(frame)) is P.Run
    except Exception:
        return False


def _send(worker, frames):
    """Send to a worker.  One whose connection is closing is skipped: its
    close callback (Session.on_worker_closed) reports or requeues the jobs
    it was given."""
    try:
        worker.conn.send(frames)
    except ConnectionClosed:
        pass


class WorkerHandle(Worker):
    """A worker process: the dispatcher's view of it plus its connection."""

    def __init__(self, pid, conn, max_tasks, zygote):
        super().__init__(pid=pid, tasks_left=max_tasks)
        self.zygote = zygote  # the one that forked it (and reports its exit)
        self.conn = conn
        self.relay = None  # a transport.Forward: its result, relayed as it arrives
        self.heard = False  # it sent something: past the session's initializer


class Session(P.Served):
    """One client's jobs on this node."""

    log = log

    def __init__(self, node, conn, sid):
        self.node = node
        self.conn = conn
        self.sid = sid
        self.cpus = 0
        self.options = {}
        self.dispatcher = Dispatcher()  # the queue and the workers' jobs
        self.workers = self.dispatcher.workers  # the job environment parks some
        self.fns = {}  # fn_id -> blob
        self.out = []  # DONE records waiting to be flushed to the client
        self.out_frames = []
        self.started = []
        self.dir = None
        self.ended = False
        self.init_frames = ()
        self.tasks = set()
        self.env = None  # a nodeenv.SessionEnv once the client sends FILE or SETUP
        self.liveness = SessionLiveness(self)  # heartbeats out, the client's lease
        self.handlers = {P.Session: self.on_session, P.Func: self.on_func, P.Run: self.on_run,
                         P.Cancel: self.on_cancel, P.Bye: self.on_bye, P.Forget: self.on_forget,
                         P.File: self.on_env, P.Setup: self.on_env, P.Recover: self.on_recover,
                         P.Status: self.on_status, P.Heartbeat: self.liveness.on_heartbeat,
                         P.Reclaim: self.on_reclaim, P.Channel: self.on_channel,
                         P.Halt: self.on_halt}
        self.counts = collections.Counter()  # jobs by outcome, for the log
        self.draining = False
        self.kept = None  # a recovery.Kept while detached (its client gone, recoverable)
        self.attempts = {}  # job id -> the attempt number the client gave it (Run)
        self.lent = None  # the worker lent to the embedding client (see lend)
        self.lent_forgotten = set()  # fn ids forgotten while it was (told at take_back)
        self.arg_relay = None  # (Forward, worker): a job's argument streamed to its worker
        self._streaming = None  # (lengths, flags) of the Run being streamed, while it is given
        self.channel = SessionChannel(self)  # a worker serving the client's channel

    # ------------------------------------------------------------ client side

    def __repr__(self):
        return f"session {self.sid} from {self.conn.peer}"

    def on_close(self, exc=None):
        if not self.ended and recoverable(self):
            self.liveness.unwatch()
            self.started = []
            self.kept = Kept(self, exc)
            return
        if not self.ended:
            log.info("session %s: client %s disconnected%s", self.sid, self.conn.peer,
                     f" ({exc})" if exc else "")
        self.end("client disconnected")

    def on_channel(self, msg, frames):
        """Channel instead of Session: this connection is to be served by a
        worker of the session the token names (channel.py); this session
        ends either way, taking no CPU."""
        if self.cpus or self.options or self.node.embedded:
            self.log.warning("%s: Channel after Session; closing it", self)
            self.end("protocol error")
            return
        lent = open_channel(self.node, self.conn, msg.token, msg.serial)
        self.end("channel" if lent else "refused")

    def on_halt(self, msg, frames):
        """The client cancelled the call its channel's worker runs: that
        worker is stopped as a cancelled running job's (ChannelLost follows).
        A Halt about an earlier channel (come late: its worker came back,
        then was lent again) stops nothing."""
        worker = self.channel.worker
        if worker is not None and not worker.dead and msg.serial == self.channel.serial:
            self._stop(worker)

    def on_status(self, msg, frames):
        """Status instead of Session: answer, take no CPU, end quietly."""
        if self.cpus == 0 and not self.options:
            self.conn.send([P.encode(P.Status, node_status(self.node))])
        self.end("status")

    def on_session(self, msg, frames):
        try:
            P.session_cpus(msg.options)
            pulse = msg.options.get("pulse_interval") or 0
            if isinstance(pulse, bool) or not isinstance(pulse, (int, float)):
                raise TypeError(f"pulse_interval={pulse!r}: a number of seconds")
            if not math.isfinite(pulse):
                raise ValueError(f"pulse_interval={pulse!r}: a finite number of seconds")
            heartbeat = liveness.peer_settings(msg.options["heartbeat"]) \
                if "heartbeat" in msg.options else None
        except (TypeError, ValueError) as exc:  # before any CPU is granted
            log.warning("session %s: client %s: bad session option %s", self.sid,
                        self.conn.peer, exc)
            self.conn.send([P.encode(P.Refused, f"bad session option {exc}")])
            self.end("refused")
            return
        options = self.options = msg.options
        self.cpus = self.node.grant(options)
        if self.cpus <= 0:  # the client tries again later (up to its connect timeout)
            self.conn.send([P.encode(P.Busy, f"node {self.node.name} has no free CPUs (all "
                                            f"{self.node.cpus} are in use by other clients)")])
            self.end("busy")
            return
        if heartbeat is not None and not self.node.embedded:
            self.liveness.watch(heartbeat)
        self.init_frames = tuple(frames[1:])
        try:
            self.dir = self._make_dir(options)
        except OSError as exc:
            self.conn.send([P.encode(P.Refused, f"cannot create the job folder: {exc}")])
            self.end("refused")
            return
        info = dict(self.node.info(), cpus=self.cpus, dir=self.dir, pid=os.getpid())
        if not self.node.embedded:
            info["channel"] = self.channel.token
            self.node.channels[self.channel.token] = self
        self.conn.send([P.encode(P.Ready, info)])
        log.log(self.node.log_level, "session %s: client %s, %d CPUs", self.sid, self.conn.peer,
                self.cpus)
        if not options.get("setup") and not options.get("anchor"):
            # (setup: forked from the setup process; a scheduler's anchor
            # session only holds the CPUs for its shared sessions)
            for _ in range(self.cpus):
                self._spawn()
        if options.get("pulse_interval"):
            task = asyncio.get_running_loop().create_task(
                self._pulse(max(MIN_PULSE, float(options["pulse_interval"]))))
            self.tasks.add(task)  # cancelled when the session ends
            task.add_done_callback(self.tasks.discard)

    async def _pulse(self, interval):
        """dispy's pulse: this node's cpu/memory/disk/swap every ``interval`` s."""
        from .env.session import avail_info

        while True:
            await asyncio.sleep(interval)
            if self.ended or self.conn.closed:
                return
            self.conn.send([P.encode(P.AvailInfo, avail_info(self.node.dest_root))])

    def _make_dir(self, options):
        if options.get("cwd"):
            # Running jobs in a folder of the client's choosing is for the
            # client's own embedded node only; over the network, jobs run in
            # a session folder under the node's job root.
            if not self.node.embedded:
                raise OSError("the 'cwd' session option is only for embedded nodes")
            return options["cwd"]
        root = private_dir(self.node.dest_root or default_job_root())
        if options.get("dest_path"):  # dispy's dest_path: relative to the job root
            from .env.session import dest_dir

            try:
                return dest_dir(root, options["dest_path"])
            except ValueError as exc:
                raise OSError(str(exc)) from None
        return tempfile.mkdtemp(prefix=f"dpool-session-{self.sid}-", dir=root)

    def on_func(self, msg, frames):
        self.fns[msg.fn_id] = frames[1]
        self.dispatcher.fns.add(msg.fn_id)

    def on_run(self, msg, frames):
        if type(frames[-1]) is Relayed:   # (its job went to a worker as it began)
            self._argument_streamed()
            return
        self.counts["received"] += len(msg.jobs)
        if self.draining:  # sent before the client heard Draining: back they go
            self._give_back([item[0] for item in msg.jobs])
            return
        items = P.run_items(msg, frames)
        attempts = self.attempts
        for item, _ in items:
            attempts[item.job_id] = item.attempt
        self._act(self.dispatcher.submit(items))
        if self.channel.worker is not None and self.dispatcher.queue:
            self.channel.recall()  # (jobs wait here: the channel's worker is wanted)

    def stream_argument(self, frames, lengths, flags):
        """A client's message with a large frame begins (frames.TapHook): a
        Run of one job that a worker without jobs takes at once is given to
        it now, and a transport.Forward streams the rest of the message to
        that worker as it arrives (the worker reads the argument while the
        client still sends it; this process holds a bounded part of it).
        Else None: the message is received whole (into memory files), as
        before.  Such a job's argument is not kept here: as for any job a
        worker runs first, its worker's death fails it (WorkerLost)."""
        if self.ended or self.draining or self.env is not None or self.arg_relay is not None \
                or self.conn.closed or recoverable(self) \
                or (flags is not None and any(flag & ~BYTES_FLAG for flag in flags)) \
                or any(type(frame) is SpooledFrame for frame in frames):
            return None   # (spooled: an earlier large frame of it came while no worker was free)
        try:
            msg = P.decode(frames[0])
            if type(msg) is not P.Run or len(msg.jobs) != 1:
                return None
            (item, _), = P.run_items(msg, frames)
            worker = self.dispatcher.runs_at_once(item.fn_id)
            hash(item.job_id)   # (a key of the dispatcher's maps)
        except Exception:
            return None   # (a malformed Run: the whole message's handling reports it)
        if item.nframes != len(lengths) - 1 or worker is None or worker.conn.closed \
                or worker.conn.relaying or (self.init_frames and not worker.heard):
            return None   # (an initializer may still run: the worker would read nothing)
        self.counts["received"] += 1
        self.attempts[item.job_id] = item.attempt
        self._streaming = (lengths, flags)
        try:
            self._act(self.dispatcher.submit([(item, frames[1:])]))
        finally:
            self._streaming = None
        return self.arg_relay[0] if self.arg_relay is not None else None

    def _stream_to(self, worker, frames):
        """Send a Run whose last frames are still coming from the client
        (stream_argument): the worker gets them as they arrive."""
        lengths, flags = self._streaming   # (its connection is open: stream_argument)
        relay = Forward(worker.conn, self.conn, frames, lengths, flags)
        self.arg_relay = (relay, worker)

    def holds_client_back(self):
        """True while the client is not read because the worker its job's
        argument streams to takes nothing more now (see lease.py)."""
        return self.arg_relay is not None and self.arg_relay[0].holding

    def _argument_streamed(self):
        """The whole of a streamed argument came: the worker's message ends."""
        if self.arg_relay is not None:
            relay, self.arg_relay = self.arg_relay[0], None
            relay.finish()

    def on_reclaim(self, msg, frames):
        """The client has a free CPU elsewhere: jobs no worker has go back.
        A scheduler's (its session ``shared``) also has those waiting in
        workers back, once the workers drop them: it reclaims to hand the
        CPUs to another client (fair shares), so the job after the running
        one must not start here.  A client with its own nodes reclaims to
        run a job sooner on a free CPU elsewhere: a job waiting in a worker
        would come back only as that worker's running job ends, when it
        starts here anyway, so it stays; unless the client asks for those
        too (``held``: shutdown(cancel_futures=True) cancels the jobs that
        have not started)."""
        given = self.dispatcher.give_back(msg.count)
        self._give_back(given)
        if len(given) < msg.count and (msg.held or self.options.get("shared")):
            self._act(self.dispatcher.ask_back(msg.count - len(given)))

    def _give_back(self, job_ids):
        if job_ids:
            self.counts["given back"] += len(job_ids)
            for job_id in job_ids:
                self.attempts.pop(job_id, None)
        if not self.conn.closed:
            self._flush()  # results first: the client's view stays in order
            self.conn.send([P.encode(P.GiveBack, job_ids)])

    def drain(self, grace):
        """The node is stopping: no new jobs, the queued ones go back to the
        client; the session ends when its running jobs have."""
        self.draining = True
        self.channel.recall()
        if not self.conn.closed:
            self.conn.send([P.encode(P.Draining, grace)])
            self._give_back(self.dispatcher.give_back())
            self._act(self.dispatcher.ask_back())
        # (a detached session's queued jobs run on: no client is there to move them)
        self._end_if_drained()

    def _end_if_drained(self):
        if self.draining and not self.dispatcher.running() and not self.dispatcher.queue \
                and self.channel.worker is None:  # (the channel's call too: it is Recalled)
            self.end("node shutting down")

    def on_forget(self, msg, frames):
        """The client needs these functions no more (none of their jobs is
        left here): drop them, and have the workers that loaded them drop them."""
        for fn_id in msg.fn_ids:
            self.fns.pop(fn_id, None)
        lent = self.channel.worker  # (it reads the Forget once it serves the node again)
        self._act(self.dispatcher.forget(msg.fn_ids, () if lent is None else (lent,)))
        if self.lent is not None:  # (its socket is the client's now: told at take_back)
            self.lent_forgotten.update(msg.fn_ids)

    def on_cancel(self, msg, frames):
        self._act(self.dispatcher.cancel(msg.job_ids))

    def _stop(self, worker):
        """Kill a worker whose running job was cancelled.  With the session
        option ``interrupt`` (JobCluster: dispy's cancel), the job first gets
        a KeyboardInterrupt (SIGINT) and that many seconds to clean up."""
        grace = self.options.get("interrupt")
        if not grace:
            worker.zygote.kill(worker.pid)
            return
        worker.zygote.interrupt(worker.pid)

        def kill():
            if not worker.dead:
                worker.zygote.kill(worker.pid)
        asyncio.get_running_loop().call_later(min(float(grace), MAX_INTERRUPT_GRACE), kill)

    def on_bye(self, msg, frames):
        self.end("client closed the session")

    def on_recover(self, msg, frames):
        """RECOVER on a new connection: take over a detached session."""
        take_over(self, msg)

    def on_env(self, msg, frames):
        """File and Setup: dispy's job environment (see node/env)."""
        if self.env is None:
            from .env.session import SessionEnv

            self.env = SessionEnv(self)
        self.env.on_client_message(msg, frames)

    # ----------------------------------------------------------- worker side

    def _spawn(self):
        task = asyncio.get_running_loop().create_task(self._start_worker())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _fork_worker(self):
        """A worker forked by the node's zygote, or by the session's setup
        process once it has one (dispy's job environment)."""
        if self.env is None or self.env.zygote is None:
            return await self.node.spawn_worker()
        zygote = await self.env.setup_process()
        return (zygote, *await zygote.spawn())

    def worker_options(self):
        """The INIT options of this session's worker processes."""
        return {"capture": self.options.get("capture", False), "cwd": self.dir,
                "max_tasks": self.options.get("max_tasks"),
                "process_name": self.options.get("process_name"),
                "process_index": next(self.node.worker_numbers)}

    async def _start_worker(self):
        try:
            zygote, pid, sock = await self._fork_worker()
        except (ConnectionError, OSError, TimeoutError) as exc:
            # Without workers this session can't serve: end it, so that the
            # client sees the node as lost and moves or fails its jobs.
            log.error("session %s: cannot start a worker process: %s", self.sid, exc)
            self.end(f"cannot start a worker process: {exc}")
            return
        if self.ended:
            zygote.kill(pid, forget=True)
            sock.close()
            return
        conn = await wrap_socket(sock, peer=f"worker {pid}")
        worker = WorkerHandle(pid, conn, self.options.get("max_tasks"), zygote)
        if not self.node.embedded:
            conn.tap_large_messages(functools.partial(self._relay, worker))
        conn.send([P.encode(P.Init, self.worker_options()), *self.init_frames])
        conn.set_receiver(functools.partial(self.on_worker_message, worker),
                          lambda exc=None: self.on_worker_closed(worker))
        if self.env is None or self.env.admit(worker):
            self._act(self.dispatcher.add_worker(worker))
        else:
            self.dispatch()

    # ------------------------------------- direct calls (embedded node only)

    def lend(self):
        """``(worker, socket)``: an idle worker the embedding client may talk
        to itself (dpool.core.direct), out of the dispatcher's hands, or None.
        Only a worker that already ran a job (its INIT went well) is lent, and
        only while nothing waits here; :meth:`take_back` returns it.  In a
        dispy session (``env``) only once its setup is done, and not with a
        user's cleanup (it runs in one of the session's own workers)."""
        if not self.node.embedded or self.ended or self.draining \
                or self.lent is not None or self.dispatcher.queue:
            return None
        env = self.env
        if env is not None and (env.state not in (None, "done") or env.cleaning
                                or self.options.get("cleanup_fn")):
            return None
        for worker in self.workers:
            if worker.fns and not worker.outstanding and not worker.dead \
                    and worker.killing is None:
                sock = worker.conn.lend()
                if sock is not None:
                    self.workers.remove(worker)
                    self.lent = worker
                    return worker, sock
        return None

    def take_back(self, worker, item=None, gone=False, messages=()):
        """The lent ``worker`` is the dispatcher's again; ``item`` (a RunItem)
        is a job the client gave it that is still its to answer: the session
        now waits for it as for its own (its result, or WORKER_LOST).  A
        worker known ``gone`` (its socket ended) gets no job: its connection
        is read again only to see the end, and it is replaced as usual.
        ``messages``: what the client read from the worker that is the
        session's (a job's provisional result, a file), handled first."""
        if self.lent is worker:
            self.lent = None
        forgotten, self.lent_forgotten = self.lent_forgotten, set()
        if self.ended or worker.dead:
            return
        if item is not None:
            worker.outstanding.append(item.job_id)
            self.dispatcher.given[item.job_id] = (worker, (item, ()))
            self.attempts[item.job_id] = item.attempt
        if not gone:
            self.workers.append(worker)
        worker.conn.take_back(messages)
        forgotten = [fn_id for fn_id in forgotten  # (unless sent again since)
                     if fn_id in worker.fns and fn_id not in self.dispatcher.fns]
        if forgotten and not gone:
            worker.fns.difference_update(forgotten)
            self._act([Forget(worker, forgotten)])
        self.dispatch()

    def dispatch(self):
        """Give queued jobs to workers with room: one RUN message per worker."""
        self._act(self.dispatcher.dispatch())

    def _act(self, actions):
        """Carry out the dispatcher's actions."""
        for action in actions:
            kind = type(action)
            if kind is Run:
                header, frames = [], [None]
                if SpooledFrame.live:
                    self._consumable(action.jobs)
                for item, payload in action.jobs:
                    header.append(tuple(item))
                    frames.extend(payload)
                frames[0] = P.encode(P.Run, header)
                if self._streaming is None:
                    _send(action.worker, frames)
                else:
                    self._stream_to(action.worker, frames)
                if action.worker.outstanding[0] == header[0][0]:  # it had no job: this one runs
                    self._starts(header[0][0])
            elif kind is LoadFunction:
                _send(action.worker, [P.encode(P.Func, action.fn_id), self.fns[action.fn_id]])
            elif kind is Report:
                error = () if action.error is None else serialize.dump_exception(action.error)
                self._report(action.job_id, action.outcome, error)
            elif kind is Kill:
                self._stop(action.worker)
            elif kind is Revoke:
                _send(action.worker, [P.encode(P.Cancel, action.job_ids)])
            elif kind is Forget:
                _send(action.worker, [P.encode(P.Forget, action.fn_ids)])

    def _consumable(self, jobs):
        """Spooled frames of jobs whose payload this node keeps no more (see
        Dispatcher.dispatch): the worker may free them as it reads them."""
        given = self.dispatcher.given
        for item, payload in jobs:
            if not given[item[0]][1][1]:
                for frame in payload:
                    if type(frame) is SpooledFrame:
                        frame.consume = True

    _dispatch_scheduled = False

    def _deferred_dispatch(self):
        self._dispatch_scheduled = False
        if not self.ended:
            self.dispatch()

    def on_worker_message(self, worker, frames):
        worker.heard = True
        msg = P.decode(frames[0])
        kind = type(msg)
        if kind is P.Done:
            relay = None
            if type(frames[-1]) is Relayed:  # (messages before it may be delivered after
                relay, worker.relay = worker.relay, None    # its relay began)
            if worker.killing is not None:
                # Its running job was cancelled (and interrupted): this worker's
                # results are dropped now; its exit reports the cancel.
                if relay is not None:
                    relay.abort()
                worker.zygote.kill(worker.pid)
                return
            # Once per loop iteration, after every worker's results of this
            # pass are in (in the same wake-up: after_pass): the freed room
            # goes out as one RUN per worker, before the results do (the
            # jobs that start then are told with them); nothing queued,
            # nothing to give.
            if not self._dispatch_scheduled and self.dispatcher.queue:
                self._dispatch_scheduled = True
                after_pass(self._deferred_dispatch)
            done, results = self.dispatcher.done, msg.results
            if relay is not None:
                self._relayed(worker, results[0], relay)
                results = ()
            # (what a worker sends: one result per job, as it ends; passed on as it came)
            items = ((results[0], frames[1:1 + results[0][_NFRAMES]]),) if len(results) == 1 \
                else P.raw_results(msg, frames) if results else ()
            head = worker.outstanding[0] if worker.outstanding else None
            revoking = self.dispatcher.revoking
            for record, payload in items:
                if revoking:
                    self._ran(record[_JOB_ID])
                if done(worker, record[_JOB_ID], record[_END] - record[_START]):
                    self._result(record, payload)
            self._next_starts(worker, head)
            if self.draining:
                self._end_if_drained()
        elif kind is P.GiveBack:
            self._revoked(worker, msg.job_ids)
        elif kind is P.Channel or kind is P.Returned:
            self.channel.on_worker_message(worker, msg)
        elif kind is P.InitFail:
            self._init_failed(frames[1:])
        elif self.env is not None:
            self.env.on_worker_message(worker, msg, frames)

    def _starts(self, job_id):
        """``job_id`` starts now in its worker (dispy's job_status, a
        scheduler's futures: the session option ``notify_start``): its
        Started goes out with this pass's results.  The node tells it, not
        the worker: a worker runs its jobs in the order given, so a job
        starts when it is given to a worker that had none, or when the
        result of the job before it comes; a message less per job from the
        worker, and the notice rides on the pass that reads that result."""
        if self.options.get("notify_start") and self.dispatcher.started(job_id):
            self.started.append((job_id, time.time()))
            if not self._flush_scheduled:
                self._schedule_flush()

    def _next_starts(self, worker, head):
        """The worker's first job was ``head`` before its results were
        taken: if another is first now, it starts (unless it was asked
        back: then its result, if it comes, tells, see _ran)."""
        outstanding = worker.outstanding
        if outstanding and outstanding[0] != head and not worker.dead \
                and worker.killing is None:
            if outstanding[0] not in self.dispatcher.revoking:
                self._starts(outstanding[0])
            elif self.dispatcher.cancelled_unanswered(worker):
                # Cancelled while it waited there, and the result before it
                # came without its GiveBack (a worker sends that first): the
                # worker has started it; stopped as a running job.
                self._act(self.dispatcher.stop_started(worker))

    def _ran(self, job_id):
        """A result came for ``job_id``: if it had been asked back, its
        start was not told (_next_starts): it is, just before the result."""
        if self.dispatcher.revoke_pending(job_id):
            self._starts(job_id)

    def _revoked(self, worker, job_ids):
        """The worker dropped these jobs unstarted, as asked (Revoke): those
        taken back for the client go to it (or, with no client to take
        them, to another worker here); the cancelled ones are reported."""
        head = worker.outstanding[0] if worker.outstanding else None
        back, actions = self.dispatcher.revoked(worker, job_ids)
        self._act(actions)
        self._next_starts(worker, head)
        if back:
            if self.conn.closed or self.ended:
                self.dispatcher.queue.extendleft(reversed(back))
            else:
                self._give_back([item.job_id for item, _ in back])
        if not self.ended:
            self.dispatch()
            if self.draining:
                self._end_if_drained()

    def on_worker_closed(self, worker):
        if self.arg_relay is not None and self.arg_relay[1] is worker:
            self.arg_relay[0].abort()   # (the rest of the argument is dropped as it comes)
        if not self.dispatcher.worker_closed(worker) or self.ended:
            return  # (ended: its workers are killed and forgotten, nothing to wait for)
        task = asyncio.get_running_loop().create_task(self._worker_exited(worker))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _worker_exited(self, worker):
        code = await worker.zygote.exit_code(worker.pid)
        if self.env is not None:
            self.env.worker_exited(worker, code)
        if self.channel.worker_exited(worker, describe_exit(code)):
            if self.draining:
                self._end_if_drained()
            if not self.ended:
                self._spawn()
            return
        if self.ended:
            if worker in self.workers:
                self.workers.remove(worker)
            return
        self._act(self.dispatcher.worker_exited(worker, describe_exit(code)))
        if self.draining:
            if not self.conn.closed:
                self._give_back(self.dispatcher.give_back())
            self._end_if_drained()
        if not self.ended:
            self.dispatch()  # the jobs it held: to a worker with room, now
            self._spawn()

    def _init_failed(self, exc_frames):
        # The client fails or moves the jobs it gave us; we just stop (a
        # client already gone, as a recoverable session's may be, hears nothing).
        if not self.conn.closed:
            self.conn.send([P.encode(P.InitFail), *exc_frames])
        self.end("initializer failed")

    # --------------------------------------------------------- to the client

    def _relay(self, worker, frames, lengths, flags):
        """A worker's message with a large frame begins (frames.TapHook): a
        transport.Forward that relays it to the client as it arrives, if it
        is the result of the job the worker runs and the client is there to
        take it; else None (it is received whole, as before)."""
        conn = self.conn
        if self.ended or conn.closed or conn.relaying or recoverable(self) \
                or worker.killing is not None or worker.relay is not None:
            return None
        try:
            msg = P.decode(frames[0])
        except Exception:
            return None   # (the whole message's decoding reports it)
        if type(msg) is not P.Done or len(msg.results) != 1:
            return None
        record = msg.results[0]
        job_id = record[_JOB_ID]
        if record[_NFRAMES] != len(lengths) - 1 or not self.dispatcher.live(job_id) \
                or self.dispatcher.given[job_id][0] is not worker:
            return None
        self._flush()  # the results before it go first
        head = P.encode(P.Done, [(*record[:-1], self.attempts.get(job_id))])
        worker.relay = Forward(conn, worker.conn, [head, *frames[1:]], lengths, flags,
                               stall=STALL)
        return worker.relay

    def _relayed(self, worker, record, relay):
        """The whole of a relayed result came: deliver it, or abandon it if
        it is not to be (the job was cancelled meanwhile); a relay cut for a
        stalled worker (Forward.cut) lost the result: WorkerLost."""
        job_id = record[_JOB_ID]
        head = worker.outstanding[0] if worker.outstanding else None
        self._ran(job_id)
        delivered = self.dispatcher.done(worker, job_id, record[_END] - record[_START])
        self._next_starts(worker, head)
        if not delivered:
            relay.abort()
        elif relay.cut:
            log.warning("session %s: job %s: the relay of its result was cut (worker %s "
                        "sent nothing for %s s)", self.sid, job_id, worker.pid, STALL)
            self._report(job_id, Outcome.WORKER_LOST, serialize.dump_exception(WorkerLost(
                f"the worker process (pid {worker.pid}) running this job stopped in the "
                f"middle of sending its result for {STALL} s: its relay was cut")))
        else:
            self.counts[_OUTCOMES.get(record[1], "other")] += 1
            self.attempts.pop(job_id, None)
            relay.finish()

    def _report(self, job_id, outcome, frames=()):
        """The result of a job that did not run to its end (no times, no output)."""
        self._result(P.result(job_id, outcome, len(frames)), frames)

    def _result(self, record, frames):
        """Queue a Result (as on the wire) and its payload for the next Done,
        with the attempt number the client gave the job."""
        self.counts[_OUTCOMES.get(record[1], "other")] += 1
        self.out.append((*record[:-1], self.attempts.pop(record[0], None)))
        self.out_frames.extend(frames)
        if not self.dispatcher.given:
            self._flush()  # no other job here: no other result to wait for
        elif not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            after_pass(self._flush)

    _flush_scheduled = False

    def _flush(self):
        self._flush_scheduled = False
        if self.ended or self.conn.closed:
            if self.kept is not None and not self.ended:
                self.kept.check()
            return
        messages = []
        if self.started:
            messages.append([P.encode(P.Started, self.started)])
            self.started = []
        if self.out:
            out, frames = self.out, self.out_frames
            self.out, self.out_frames = [], []
            messages.append([P.encode(P.Done, out), *frames])
        if len(messages) == 1:
            self.conn.send(messages[0])
        elif messages:  # (the jobs that start as these end: one write)
            self.conn.send_all(messages)

    # ---------------------------------------------------------------- ending

    def end(self, why):
        if self.ended:
            return
        if self.kept is not None:
            self.kept.stop()
            self.kept = None
        if self.env is not None:
            if self.env.defer_end(why):  # the user's cleanup runs first
                return
            self.env.end()
        self._flush()
        self.ended = True
        self.liveness.unwatch()
        self.arg_relay = None
        lent, self.lent = self.lent, None
        channel = self.channel.end()
        for worker in [*self.workers, *(w for w in (lent, channel) if w is not None)]:
            worker.dead = True
            worker.zygote.kill(worker.pid, forget=True)
            worker.conn.abort()
        self.dispatcher.clear()
        for task in list(self.tasks):
            task.cancel()
        if not self.conn.closed:
            self.conn.close()
        self.node.release(self)
        if self.dir and not self.options.get("cwd") and not self.options.get("dest_path") \
                and self.options.get("cleanup", True):
            shutil.rmtree(self.dir, ignore_errors=True)
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items()) or "no jobs"
        # A busy node's waiting clients ask again every second or so: not news.
        log.log(logging.DEBUG if why == "busy" else self.node.log_level,
                "session %s ended (%s): client %s; jobs: %s", self.sid, why, self.conn.peer,
                counts)
