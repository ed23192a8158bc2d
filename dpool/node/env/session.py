"""A session's job environment on the node: files, setup, env, cleanup.

Created by :class:`dpool.node.runtime.Session` on the first FILE or SETUP
message (``JobCluster`` sessions); Executor and Pool sessions never have one.

::

    client ── FILE name+data ──► write under the session folder ── FILEDONE ──► client
    client ── SETUP ──► fork the session's setup process (the zygote does), which
                         runs setup; SETUPDONE from it: the session's workers are
                         forked from it (they inherit setup's globals); once they
                         are up ── SETUPDONE ──► client, jobs flow
                         SETUPFAIL (or the setup process dies) ── SETUPFAIL ──► client,
                         and the session ends
    worker ── PROVISIONAL / SENDFILE ──► forwarded to the client, after the
                         STARTED/DONE records already waiting (order is kept)
    session end (client closed or gone): CLEANUP to a live worker, up to
                         CLEANUP_TIMEOUT s, then the workers are killed; files
                         sent into a shared dest_path are removed (cleanup=True)

File names from the client are relative to the session folder; absolute
names and names with ``..`` are refused (:func:`jobenv.safe_path`).
"""
import asyncio
import logging
import os

from ... import protocol as P
from ... import serialize
from ...errors import WorkerLost
from ...transport import wrap_socket
from .job import safe_path
from ..files import private_dir, write_private
from .. import platforminfo
from ..zygote import describe_exit

log = logging.getLogger("dpool.node")

CLEANUP_TIMEOUT = 10.0
WORKERS_WAIT = 5.0  # seconds SETUPDONE waits for the session's workers, at most


def avail_info(path=None):
    """dispy's DispyNodeAvailInfo fields, as dispy means them: CPU available
    in percent, memory and disk available in bytes, swap available in percent."""
    try:
        info = _avail_from_proc(path) if os.path.exists("/proc/meminfo") else None
        if info is None:
            info = _avail_from_psutil(path)
    except OSError:  # e.g. the folder is gone, or /proc is not readable here
        return None
    info["platform"] = platforminfo.get()
    return info


def _avail_from_psutil(path):
    import psutil

    return {"cpu": 100.0 - psutil.cpu_percent(None),
            "memory": psutil.virtual_memory().available,
            "disk": psutil.disk_usage(path or os.getcwd()).free,
            "swap": 100.0 - psutil.swap_memory().percent}


_last_cpu = None   # (busy, total) jiffies at the last _avail_from_proc


def _avail_from_proc(path):
    """The same figures as psutil gives, from /proc and statvfs (Linux): a
    session's first answer no longer imports psutil, ~10% of a fresh process's
    first pool (issue 13).  CPU busy since the last call, as
    ``psutil.cpu_percent(None)`` (0 at the first)."""
    global _last_cpu
    with open("/proc/meminfo", "rb") as f:
        mem = {fields[0]: int(fields[1]) * 1024 for fields in map(bytes.split, f)
               if len(fields) >= 2}
    if b"MemAvailable:" not in mem:
        return None
    with open("/proc/stat", "rb") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    ticks += [0] * (10 - len(ticks))
    total = sum(ticks) - ticks[8] - ticks[9]   # guest time is in user time already
    busy = total - ticks[3] - ticks[4]         # idle, iowait
    last, _last_cpu = _last_cpu, (busy, total)
    percent = 0.0
    if last is not None and total > last[1]:
        percent = min(100.0, max(0.0, round(100.0 * (busy - last[0]) / (total - last[1]), 1)))
    st = os.statvfs(path or os.getcwd())
    swap_total, swap_free = mem.get(b"SwapTotal:", 0), mem.get(b"SwapFree:", 0)
    swap_used = round(100.0 * (swap_total - swap_free) / swap_total, 1) if swap_total else 0.0
    return {"cpu": 100.0 - percent, "memory": mem[b"MemAvailable:"],
            "disk": st.f_bavail * st.f_frsize, "swap": 100.0 - swap_used}


def dest_dir(root, dest_path):
    """The folder for a client's ``dest_path``: always inside the node's job root."""
    return private_dir(safe_path(root, dest_path.strip().strip("/")))


class SessionEnv:
    def __init__(self, session):
        self.session = session
        self.setup_frames = None
        self.state = None  # None (no setup), "pending", "done", "failed"
        self.parked = []
        self.zygote = None  # the setup process, which forks the session's workers
        self.parent = None  # the node's zygote that forked it
        self._admitted = 0  # workers forked from the setup process so far
        self._announce = None  # the timer that sends SETUPDONE at the latest
        self._lock = asyncio.Lock()
        self.files = []
        self.cleaning = self.cleaned = False
        self.cleanup_worker = None

    # ------------------------------------------------------------ client side

    def on_client_message(self, msg, frames):
        if type(msg) is P.File:
            self.on_file(msg, frames)
        else:
            self.on_setup(frames)

    def on_file(self, msg, frames):
        req_id, name, mode = msg
        error = None
        try:
            path = safe_path(self.session.dir, name)
            write_private(path, frames[1], mode)
            self.files.append(path)
        except (OSError, ValueError) as exc:
            error = f"node {self.session.node.name} cannot write {name!r}: {exc}"
            log.warning("session %s: %s", self.session.sid, error)
        self.session.conn.send([P.encode(P.FileDone, req_id, error)])
        if error is not None and req_id is None:
            # A dependency of the session's start: the client leaves this node
            # out, so end the session here (a recoverable one would otherwise be
            # kept, its CPUs held, as if the client had gone away).
            self.session.end("a dependency could not be written")

    def on_setup(self, frames):
        """Start the session's setup process; the session's workers are
        forked from it once setup is done (the session started none)."""
        session = self.session
        self.setup_frames = tuple(frames[1:])
        self.state = "pending"
        self.parked.extend(session.workers)  # none, unless an old client
        session.workers.clear()
        task = asyncio.get_running_loop().create_task(self._start_setup())
        session.tasks.add(task)  # cancelled if the session ends first
        task.add_done_callback(session.tasks.discard)

    async def _start_setup(self):
        failure = await self._run_setup()
        if self.state != "pending":
            return
        if failure is None:
            self._setup_done()
        else:
            self._setup_failed(failure)

    async def _run_setup(self):
        """Fork a setup process and run setup in it: None if it succeeded,
        else the frames of the exception to report."""
        session = self.session
        try:
            parent, zygote, sock = await session.node.spawn_setup_process()
        except (ConnectionError, OSError, TimeoutError) as exc:
            return serialize.dump_exception(WorkerLost(f"cannot start the setup process: {exc}"))
        self.parent, self.zygote = parent, zygote  # killed by end() if it comes to that
        conn = await wrap_socket(sock, peer=f"setup process {zygote.pid}")
        reply = asyncio.get_running_loop().create_future()

        def answer(frames):
            if not reply.done():
                reply.set_result(frames)
        conn.set_receiver(answer, lambda exc=None: answer(None))
        try:
            conn.send([P.encode(P.Init, session.worker_options()), *session.init_frames])
            conn.send([P.encode(P.Setup), *self.setup_frames])
            frames = await reply
        finally:
            conn.close()
        if frames is None:  # it died
            code = await parent.exit_code(zygote.pid)
            exc = WorkerLost(f"the setup process (pid {zygote.pid}) {describe_exit(code)}")
            return serialize.dump_exception(exc)
        if type(P.decode(frames[0])) is P.SetupDone:
            return None
        return frames[1:]

    async def setup_process(self):
        """The live setup process to fork workers from.  If it died (the
        node's zygote died, say), setup runs again in a new one."""
        async with self._lock:
            if self.zygote.dead:
                log.warning("session %s: the setup process (pid %s) is gone; running setup "
                            "again in a new one", self.session.sid, self.zygote.pid)
                self.zygote.close_adopted()
                failure = await self._run_setup()
                if failure is not None:
                    error = serialize.load_exception(failure)
                    raise ConnectionError(f"setup failed in a new setup process: {error!r}")
        return self.zygote

    # ------------------------------------------------------------ worker side

    def admit(self, worker):
        """A new worker: True if it may take jobs now, False if parked."""
        if self.state == "done" and worker.zygote is self.zygote:
            if self.cleaning and self.cleanup_worker is None:
                self.send_cleanup(worker)  # the workers were killed: a new one runs it
            self._admitted += 1
            if self._admitted >= self.session.cpus:
                self._announce_done()
            return True
        if self.state is None:
            return True
        # Not forked from the setup process (an old client's session): parked
        # until setup is done, then replaced by one forked from it.
        self.parked.append(worker)
        if self.state == "done":
            self._replace_parked()
        return False

    def _replace_parked(self):
        for worker in self.parked:
            worker.zygote.kill(worker.pid)  # its exit starts a replacement
        self.parked.clear()

    def on_worker_message(self, worker, msg, frames):
        kind = type(msg)
        if kind is P.Provisional or kind is P.SendFile:
            if self.session.dispatcher.live(msg.job_id):
                self.session._flush()  # STARTED and earlier results first
                if not self.session.conn.closed:  # else: a detached session
                    self.session.conn.send(frames)
        elif kind is P.CleanupDone and self.cleaning:
            if msg.error:
                log.warning("session %s: cleanup failed:\n%s", self.session.sid, msg.error)
            self._finish_cleanup()

    def _setup_done(self):
        session = self.session
        self.state = "done"
        self._replace_parked()  # (their exits start replacements)
        if session.options.get("setup"):  # the session started no worker
            for _ in range(session.cpus):
                session._spawn()  # forked from the setup process
        # SETUPDONE once the workers are up (or after WORKERS_WAIT s): jobs
        # sent earlier would all go to the first worker, queued behind each
        # other (a worker takes several short jobs at once).
        self._announce = asyncio.get_running_loop().call_later(WORKERS_WAIT, self._announce_done)

    def _announce_done(self):
        if self._announce is None:
            return
        self._announce.cancel()
        self._announce = None
        session = self.session
        if not session.conn.closed and not session.ended:  # else: a detached session
            session.conn.send([P.encode(P.SetupDone, {"cpus": session.cpus})])

    def _setup_failed(self, exc_frames):
        self.state = "failed"
        log.warning("session %s: setup failed; ending the session", self.session.sid)
        if not self.session.conn.closed:
            self.session.conn.send([P.encode(P.SetupFail), *exc_frames])
        self.session.end("setup failed")

    def worker_exited(self, worker, code):
        if worker in self.parked:
            self.parked.remove(worker)
        if self.cleaning and worker is self.cleanup_worker:
            log.warning("session %s: the process running cleanup (pid %s) %s", self.session.sid,
                        worker.pid, describe_exit(code))
            self._finish_cleanup()

    # ---------------------------------------------------------------- ending

    def defer_end(self, why):
        """Run the user's cleanup before the session ends; True if deferred."""
        if why not in ("client closed the session", "client disconnected"):
            return False
        if self.cleaning:
            return not self.cleaned
        if self.state != "done" or not self.setup_frames:
            return False
        if not self.session.options.get("cleanup_fn"):
            return False
        live = [w for w in self.session.workers if not w.dead and w.killing is None]
        self.cleaning = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(CLEANUP_TIMEOUT, self._cleanup_timed_out)
        if live:
            idle = [w for w in live if not w.outstanding] or live
            self.send_cleanup(idle[0])
        # else: every worker is being killed (a cancel); its replacement runs cleanup
        return True

    def send_cleanup(self, worker):
        self.cleanup_worker = worker
        worker.conn.send([P.encode(P.Cleanup), *self.setup_frames])

    def _cleanup_timed_out(self):
        log.warning("session %s: cleanup did not finish in %ss", self.session.sid,
                    CLEANUP_TIMEOUT)
        self._finish_cleanup()

    def _finish_cleanup(self):
        if self.cleaning and not self.cleaned:
            self.cleaned = True
            self._timer.cancel()
            self.session.end("cleaned up")

    def end(self):
        """The session is ending: hand parked workers back to be killed, end
        the setup process, remove the files sent into a shared dest_path
        (cleanup=True)."""
        self.session.workers.extend(self.parked)
        self.parked.clear()
        if self._announce is not None:
            self._announce.cancel()
            self._announce = None
        if self.zygote is not None:
            self.zygote.close_adopted()
            self.parent.kill(self.zygote.pid, forget=True)  # if stuck in setup
        options = self.session.options
        if options.get("dest_path") and options.get("cleanup", True):
            for path in self.files:
                try:
                    os.unlink(path)
                except OSError:
                    pass
