"""The node runtime: serves client sessions with worker processes.

::

    client ──(authenticated Connection)──► Session ──► queue ──► WorkerHandle ──► worker process
       ▲                                     │                       │ (socketpair)
       └──────────── DONE batches ◄──────────┴──── results ◄─────────┘

Everything here runs on one asyncio loop: the loop of ``dpool-node``, or the
client's private loop when the node is embedded.  A session owns the CPUs the
node granted it and one worker process per CPU, forked by the zygote.  Jobs
wait in the session's queue until a worker has room; a worker gets more than
one job at a time only while jobs are short (so tiny jobs stream, long jobs
balance).  A worker that dies fails only the job it was running; the jobs
queued behind it go back to the queue and a new worker takes its place.
When the client goes away, the session kills its workers (and their process
groups), frees its CPUs and removes its folder.

Recovery (dispy's ``recover_jobs``): a session opened with the option
``recover_token`` whose client goes away without BYE is *detached*: its jobs
go on, their results are kept (at most KEEP_MAX_RESULTS results and
KEEP_MAX_BYTES bytes), and its CPUs stay allocated, for ``keep_results``
seconds.  A new connection sending ``RECOVER token`` takes the session over:
it gets the kept results, then the others as they come, and ends it with BYE.
When the time passes (or the limits are exceeded) the session ends, its
results and unfinished jobs are discarded, with one log line.
"""
import asyncio
import collections
import itertools
import logging
import os
import shutil
import socket
import tempfile

from .. import protocol as P
from .. import serialize
from ..errors import WorkerLost
from ..transport import wrap_socket
from .zygote import Zygote, describe_exit

log = logging.getLogger("dpool.node")

_SHORT_JOB = 0.002  # seconds: below this a worker gets several jobs at once
_MAX_DEPTH = 32
_PREFETCH_JOB = 0.05  # below this a worker also holds the job after its current one
MIN_PULSE = 0.1  # seconds: the shortest pulse_interval a session may ask for (as dispy)
KEEP_RESULTS = 3600.0  # seconds a detached (recoverable) session is kept
KEEP_MAX_RESULTS = 100_000  # results kept for a detached session, at most
KEEP_MAX_BYTES = 1 << 30  # bytes of results kept for a detached session, at most


class NodeRuntime:
    """The part of a node that is not I/O setup: sessions, CPUs, workers."""

    def __init__(self, cpus, name=None, dest_root=None, embedded=False, keep_results=None):
        self.cpus = cpus
        self.keep_results = KEEP_RESULTS if keep_results is None else keep_results
        self.detached = {}  # recover token -> Session whose client went away
        self.embedded = embedded  # in the client's own process
        self.free_cpus = cpus
        self.name = name or socket.gethostname()
        self.dest_root = dest_root
        self.sessions = set()
        self.zygote = Zygote()
        self._zygote_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._started = False

    async def start(self):
        if not self._started:
            self._started = True
            await self.zygote.start()

    def info(self):
        from .env.session import avail_info

        return {"name": self.name, "cpus": self.cpus, "free_cpus": self.free_cpus,
                "avail_info": avail_info(self.dest_root)}

    async def spawn_worker(self):
        """Fork a worker: (zygote, pid, socket).  If the zygote died (its
        workers die with it), a new one is started first, so the node keeps
        serving."""
        try:
            return await self._spawn_worker()
        except ConnectionError:
            if not self.zygote.dead:
                raise
            # The zygote died while we waited for it: once more, with a new one.
            return await self._spawn_worker()

    async def _spawn_worker(self):
        if self.zygote.dead:
            async with self._zygote_lock:
                if self.zygote.dead:
                    old, self.zygote = self.zygote, Zygote()
                    log.warning("the worker zygote (pid %s) died; starting a new one",
                                old.proc.pid)
                    await old.close()
                    await self.zygote.start()
        zygote = self.zygote
        pid, sock = await zygote.spawn()
        return zygote, pid, sock

    def accept(self, conn):
        """Take a new authenticated client connection."""
        session = Session(self, conn, next(self._ids))
        self.sessions.add(session)
        conn.set_receiver(session.on_message, session.on_close)
        return session

    def release(self, session):
        if session in self.sessions:
            self.sessions.discard(session)
            self.free_cpus += session.cpus

    async def close(self):
        for session in list(self.sessions):
            session.end("node shutting down")
        await self.zygote.close()


class WorkerHandle:
    __slots__ = ("pid", "conn", "zygote", "outstanding", "fns", "tasks_left", "dead", "killing")

    def __init__(self, pid, conn, max_tasks, zygote):
        self.pid = pid
        self.zygote = zygote  # the one that forked it (and reports its exit)
        self.conn = conn
        self.outstanding = collections.deque()  # job ids, the first is running
        self.fns = set()
        self.tasks_left = max_tasks
        self.dead = False
        self.killing = None  # job id whose cancel killed this worker


class Session:
    """One client's jobs on this node."""

    def __init__(self, node, conn, sid):
        self.node = node
        self.conn = conn
        self.sid = sid
        self.cpus = 0
        self.options = {}
        self.workers = []
        self.queue = collections.deque()  # (job_id, fn_id, frames)
        self.fns = {}
        self.given = {}  # job id -> (WorkerHandle, job), for jobs given to a worker
        self._ghosts = set()  # cancelled after being given: drop their results
        self.out = []  # DONE records waiting to be flushed to the client
        self.out_frames = []
        self.started = []
        self.ema = None
        self.depth = 1
        self.dir = None
        self.ended = False
        self.init_frames = ()
        self.tasks = set()
        self.env = None  # a nodeenv.SessionEnv once the client sends FILE or SETUP
        self.handlers = {P.SESSION: self.on_session, P.FUNC: self.on_func, P.RUN: self.on_run,
                         P.CANCEL: self.on_cancel, P.BYE: self.on_bye, P.FORGET: self.on_forget,
                         P.FILE: self.on_env, P.SETUP: self.on_env, P.RECOVER: self.on_recover}
        self.detached_at = None  # loop time the client went away (recoverable sessions)
        self._expiry = None

    # ------------------------------------------------------------ client side

    def on_message(self, frames):
        if self.ended:
            return
        try:
            header = P.decode(frames[0])
            handler = self.handlers[header[0]]
        except Exception as exc:  # an authenticated peer sent nonsense
            log.warning("session %s from %s: bad message (%s); closing it", self.sid, self.conn.peer, exc)
            self.end("protocol error")
            return
        handler(header, frames)

    def on_close(self, exc=None):
        if not self.ended and self.cpus > 0 and self.options.get("recover_token") \
                and not self.node.embedded:
            self._detach(exc)
            return
        if not self.ended:
            log.info("session %s: client %s disconnected%s", self.sid, self.conn.peer,
                     f" ({exc})" if exc else "")
        self.end("client disconnected")

    def on_session(self, header, frames):
        options = self.options = header[1]
        want = options.get("cpus") or self.node.free_cpus
        self.cpus = min(want, self.node.free_cpus)
        if self.cpus <= 0:
            self.conn.send([P.encode(P.REFUSED, f"node {self.node.name} has no free CPUs "
                                                f"(all {self.node.cpus} are in use by other clients)")])
            self.end("refused")
            return
        self.node.free_cpus -= self.cpus
        self.init_frames = tuple(frames[1:])
        try:
            self.dir = self._make_dir(options)
        except OSError as exc:
            self.conn.send([P.encode(P.REFUSED, f"cannot create the job folder: {exc}")])
            self.end("refused")
            return
        info = dict(self.node.info(), cpus=self.cpus, dir=self.dir, pid=os.getpid())
        self.conn.send([P.encode(P.READY, info)])
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
            self.conn.send([P.encode(P.AVAILINFO, avail_info(self.node.dest_root))])

    def _make_dir(self, options):
        if options.get("cwd"):
            # Running jobs in a folder of the client's choosing is for the
            # client's own embedded node only; over the network, jobs run in
            # a session folder under the node's job root.
            if not self.node.embedded:
                raise OSError("the 'cwd' session option is only for embedded nodes")
            return options["cwd"]
        root = self.node.dest_root or tempfile.gettempdir()
        os.makedirs(root, exist_ok=True)
        if options.get("dest_path"):  # dispy's dest_path: relative to the job root
            from .env.session import dest_dir

            try:
                return dest_dir(root, options["dest_path"])
            except ValueError as exc:
                raise OSError(str(exc)) from None
        return tempfile.mkdtemp(prefix=f"dpool-session-{self.sid}-", dir=root)

    def on_func(self, header, frames):
        self.fns[header[1]] = frames[1]

    def on_run(self, header, frames):
        i = 1
        queue = self.queue
        for job_id, fn_id, n, star in header[1]:
            queue.append((job_id, fn_id, frames[i:i + n], star))
            i += n
        self.dispatch()

    def on_forget(self, header, frames):
        """The client needs these functions no more (none of their jobs is
        left here): drop them, and have the workers that loaded them drop them."""
        ids = header[1]
        for fn_id in ids:
            self.fns.pop(fn_id, None)
        for worker in self.workers:
            gone = [fn_id for fn_id in ids if fn_id in worker.fns]
            if gone and not worker.dead:
                worker.fns.difference_update(gone)
                worker.conn.send([P.encode(P.FORGET, gone)])

    def on_cancel(self, header, frames):
        ids = set(header[1])
        kept = collections.deque()
        for job in self.queue:
            if job[0] in ids:
                self._result(job[0], P.CANCELLED, None, None, None, None, ())
            else:
                kept.append(job)
        self.queue = kept
        for job_id in ids:
            worker = self.given.get(job_id, (None,))[0]
            if worker is None or job_id in self._ghosts:
                continue
            if worker.outstanding[0] == job_id:
                if worker.dead:  # its exit reports it (_worker_exited)
                    continue
                worker.killing = job_id  # its result is sent when the worker is gone
                worker.zygote.kill(worker.pid)
            else:
                # Queued inside the worker but not started (only short jobs are
                # queued there): report it cancelled now, drop its result later.
                self._ghosts.add(job_id)
                self._result(job_id, P.CANCELLED, None, None, None, None, ())

    def on_bye(self, header, frames):
        self.end("client closed the session")

    # ---------------------------------------------------------- recovery

    def _detach(self, exc):
        loop = asyncio.get_running_loop()
        keep = self.node.keep_results
        log.info("session %s: client %s disconnected%s; its jobs go on and their results "
                 "are kept for %ss (recover_jobs)", self.sid, self.conn.peer,
                 f" ({exc})" if exc else "", keep)
        self.detached_at = loop.time()
        self.started = []
        self._kept_bytes = self._kept_counted = 0
        self.node.detached[self.options["recover_token"]] = self
        self._expiry = loop.call_later(keep, self._discard,
                                       f"the client did not come back within {keep}s")

    def _check_kept(self):
        """While detached: results are kept, within limits."""
        self.started = []
        frames = self.out_frames
        for frame in frames[self._kept_counted:]:
            self._kept_bytes += memoryview(frame).nbytes
        self._kept_counted = len(frames)
        if len(self.out) > KEEP_MAX_RESULTS or self._kept_bytes > KEEP_MAX_BYTES:
            self._discard(f"more results than a session may keep ({KEEP_MAX_RESULTS} "
                          f"results, {KEEP_MAX_BYTES} bytes)")

    def _discard(self, why):
        if self.detached_at is None or self.ended:
            return
        self.detached_at = None
        self.node.detached.pop(self.options["recover_token"], None)
        log.warning("session %s: %s; discarding %d kept results and %d unfinished jobs",
                    self.sid, why, len(self.out), len(self.queue) + len(self.given))
        self.end(why)

    def on_recover(self, header, frames):
        """RECOVER on a new connection: take over a detached session."""
        _, token, terminate = header
        old = self.node.detached.pop(token, None) if self.cpus == 0 else None
        if old is None or old.ended:
            self.conn.send([P.encode(P.REFUSED, f"node {self.node.name} keeps no results for "
                                                f"that session (unknown, or the time to "
                                                f"recover it has passed)")])
            self.end("refused")
            return
        self.ended = True  # this session only hands its connection over
        self.node.release(self)
        old._reattach(self.conn, terminate)

    def _reattach(self, conn, terminate):
        self._expiry.cancel()
        self._expiry = self.detached_at = None
        self.conn = conn
        conn.set_receiver(self.on_message, self.on_close)
        pending = [job[0] for job in self.queue]
        pending += [job_id for job_id in self.given if job_id not in self._ghosts]
        kept = [record[0] for record in self.out]
        log.info("session %s: recovered by %s: %d results kept, %d jobs unfinished%s",
                 self.sid, conn.peer, len(kept), len(pending),
                 " (terminated)" if terminate and pending else "")
        conn.send([P.encode(P.READY, dict(self.node.info(), recovered=True, kept=kept,
                                          pending=pending))])
        self._schedule_flush()
        if terminate and pending:
            self.on_cancel((P.CANCEL, pending), ())

    def on_env(self, header, frames):
        """FILE and SETUP: dispy's job environment (see nodeenv)."""
        if self.env is None:
            from .env.session import SessionEnv

            self.env = SessionEnv(self)
        self.env.on_client_message(header, frames)

    # ----------------------------------------------------------- worker side

    def _spawn(self):
        task = asyncio.get_running_loop().create_task(self._start_worker())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _start_worker(self):
        try:
            zygote, pid, sock = await self.node.spawn_worker()
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
        options = {"capture": self.options.get("capture", False), "cwd": self.dir,
                   "notify_start": self.options.get("notify_start", False),
                   "max_tasks": self.options.get("max_tasks")}
        conn.send([P.encode(P.INIT, options), *self.init_frames])
        if self.env is None or self.env.admit(worker):
            self.workers.append(worker)
        conn.set_receiver(lambda frames: self.on_worker_message(worker, frames),
                          lambda exc=None: self.on_worker_closed(worker))
        self.dispatch()

    def dispatch(self):
        """Give queued jobs to workers with room: one RUN message per worker."""
        queue = self.queue
        batches = {}
        while queue:
            worker = self._free_worker()
            if worker is None:
                break
            job = queue.popleft()
            job_id, fn_id, frames, star = job
            if fn_id not in worker.fns:
                blob = self.fns.get(fn_id)
                if blob is None:
                    self._result(job_id, P.ERROR, None, None, None, None,
                                 serialize.dump_exception(LookupError(f"unknown function id {fn_id}")))
                    continue
                worker.fns.add(fn_id)
                worker.conn.send([P.encode(P.FUNC, fn_id), blob])
            batch = batches.get(worker)
            if batch is None:
                batch = batches[worker] = ([], [None])
            batch[0].append((job_id, fn_id, star, len(frames)))
            batch[1].extend(frames)
            worker.outstanding.append(job_id)
            self.given[job_id] = (worker, job)
        for worker, (header, frames) in batches.items():
            frames[0] = P.encode(P.RUN, header)
            worker.conn.send(frames)

    _dispatch_scheduled = False

    def _deferred_dispatch(self):
        self._dispatch_scheduled = False
        if not self.ended:
            self.dispatch()

    def _free_worker(self):
        best = None
        for worker in self.workers:
            n = len(worker.outstanding)
            if n >= self.depth or worker.dead or worker.killing is not None:
                continue
            if worker.tasks_left is not None and n >= worker.tasks_left:
                continue
            if best is None or n < len(best.outstanding):
                best = worker
                if n == 0:
                    break
        return best

    def on_worker_message(self, worker, frames):
        header = P.decode(frames[0])
        op = header[0]
        if op == P.DONE:
            i = 1
            for job_id, status, start, end, out, err, n in header[1]:
                if worker.outstanding and worker.outstanding[0] == job_id:
                    worker.outstanding.popleft()
                if worker.tasks_left is not None:
                    worker.tasks_left -= 1
                if self.given.pop(job_id, None) is not None and job_id not in self._ghosts:
                    self._result(job_id, status, start, end, out, err, frames[i:i + n])
                self._ghosts.discard(job_id)
                self._learn(end - start)
                i += n
            # Once per loop iteration, after every worker's results of this
            # pass are in: the freed room goes out as one RUN per worker.
            if not self._dispatch_scheduled:
                self._dispatch_scheduled = True
                asyncio.get_running_loop().call_soon(self._deferred_dispatch)
        elif op == P.STARTED:
            if header[1] not in self._ghosts:
                self.started.append((header[1], header[2]))
                self._schedule_flush()
        elif op == P.INITFAIL:
            self._init_failed(frames[1:])
        elif self.env is not None:
            self.env.on_worker_message(worker, header, frames)

    def _learn(self, duration):
        self.ema = duration if self.ema is None else 0.8 * self.ema + 0.2 * duration
        if self.ema < _SHORT_JOB:
            self.depth = min(_MAX_DEPTH, max(2, int(_SHORT_JOB / max(self.ema, 1e-5))))
        elif self.ema < _PREFETCH_JOB:
            self.depth = 2  # the next job waits in the worker's socket: no gap
        else:
            self.depth = 1

    def on_worker_closed(self, worker):
        if worker.dead:
            return
        worker.dead = True
        task = asyncio.get_running_loop().create_task(self._worker_exited(worker))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _worker_exited(self, worker):
        code = await worker.zygote.exit_code(worker.pid)
        if self.env is not None:
            self.env.worker_exited(worker, code)
        if worker in self.workers:
            self.workers.remove(worker)
        if self.ended:
            return
        if worker.outstanding:
            running = worker.outstanding.popleft()
            self.given.pop(running, None)
            if worker.killing == running:
                self._result(running, P.KILLED, None, None, None, None, ())
            elif running in self._ghosts:
                self._ghosts.discard(running)
            else:
                exc = WorkerLost(f"the worker process (pid {worker.pid}) running this job "
                                 f"{describe_exit(code)}")
                self._result(running, P.WORKER_LOST, None, None, None, None, serialize.dump_exception(exc))
            self._requeue(worker)
        self._spawn()

    def _requeue(self, worker):
        """Jobs given to a dead worker but never started go back to the queue."""
        for job_id in reversed(worker.outstanding):
            _, job = self.given.pop(job_id)
            if job_id in self._ghosts:
                self._ghosts.discard(job_id)
            else:
                self.queue.appendleft(job)
        worker.outstanding.clear()

    def _init_failed(self, exc_frames):
        # The client fails or moves the jobs it gave us; we just stop (a
        # client already gone, as a recoverable session's may be, hears nothing).
        if not self.conn.closed:
            self.conn.send([P.encode(P.INITFAIL), *exc_frames])
        self.end("initializer failed")

    # --------------------------------------------------------- to the client

    def _result(self, job_id, status, start, end, out, err, frames):
        self.out.append((job_id, status, start, end, out, err, len(frames)))
        self.out_frames.extend(frames)
        self._schedule_flush()

    def _schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    _flush_scheduled = False

    def _flush(self):
        self._flush_scheduled = False
        if self.ended or self.conn.closed:
            if self.detached_at is not None and not self.ended:
                self._check_kept()
            return
        if self.started:
            self.conn.send([P.encode(P.STARTED, self.started)])
            self.started = []
        if self.out:
            out, frames = self.out, self.out_frames
            self.out, self.out_frames = [], []
            self.conn.send([P.encode(P.DONE, out), *frames])

    # ---------------------------------------------------------------- ending

    def end(self, why):
        if self.ended:
            return
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
            self.node.detached.pop(self.options.get("recover_token"), None)
        if self.env is not None:
            if self.env.defer_end(why):  # the user's cleanup runs first
                return
            self.env.end()
        self._flush()
        self.ended = True
        for worker in self.workers:
            worker.dead = True
            worker.zygote.kill(worker.pid, forget=True)
            worker.conn.abort()
        self.workers.clear()
        self.queue.clear()
        for task in list(self.tasks):
            task.cancel()
        if not self.conn.closed:
            self.conn.close()
        self.node.release(self)
        if self.dir and not self.options.get("cwd") and not self.options.get("dest_path") \
                and self.options.get("cleanup", True):
            shutil.rmtree(self.dir, ignore_errors=True)
        log.debug("session %s ended: %s", self.sid, why)
