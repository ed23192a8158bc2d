"""The zygote: a clean, single-threaded process that forks worker processes.

Worker processes must not be forked from a process that has threads (the
client always has its event-loop thread, a node may have resolver threads):
locks held by other threads at fork time stay locked forever in the child.
So each node starts one zygote with ``subprocess`` (a fresh interpreter),
which imports the worker code once and then forks a worker per request.
A client whose process has no other thread yet (a script making its pool)
forks its embedded node's zygote instead, before it starts its loop thread
(:meth:`Zygote.fork`): ready at once, where a fresh interpreter's start-up
and imports held up the first task (issue 13).

::

    node (asyncio, :class:`Zygote`)             zygote process (:func:`main`)
    ─────────────────────────────────           ─────────────────────────────
    b"S" + one fd (worker's socket end)  ──►    fork; the child runs worker.main
                                         ◄──    b"P" pid      (one per request, in order)
                                         ◄──    b"X" pid status  (a child exited)
    close the control socket             ──►    SIGKILL every child, exit

Control records are fixed 16-byte structs.  The zygote ignores SIGINT (a
Ctrl-C in the user's terminal is the client's business) and dies with its
node through PR_SET_PDEATHSIG; workers die with the zygote the same way, and
each runs in its own process group (in the node's session) so a job's own
children can be killed with it.  The zygote and each worker are child subreapers (see
:mod:`dpool.node.reaper`): a process a job started that left the group
(``setsid``, double fork) comes back to the worker, or to the zygote once
the worker is gone, and is killed: nothing of a job outlives it.
"""
import collections
import logging
import os
import signal
import socket
import struct
import subprocess
import sys

from . import reaper

log = logging.getLogger("dpool.node")
_RECORD = struct.Struct("<cxxxiq")  # kind, pid, status


def _set_pdeathsig(sig=signal.SIGKILL):
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG


#: Each way of a node-worker link holds this much in flight: a 1 MB frame
#: goes in one write and is read without waiting for the writer (at the
#: default ~208 KiB, five writer/reader wake-up pairs per MB).  The kernel
#: caps it (net.core.wmem_max).
LINK_BUFFER = 2 << 20


def _link_pair():
    pair = socket.socketpair()
    for sock in pair:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_BUFFER)
        except OSError:
            pass
    return pair


# ---------------------------------------------------------------- zygote side

#: The parent's ``multiprocessing`` authkey, for a zygote started as a fresh
#: interpreter (as ``spawn`` hands it to its children).
_AUTHKEY_ENV = "DPOOL_MP_AUTHKEY"


def main(argv=None):
    """The zygote started as a fresh interpreter (``subprocess``)."""
    argv = sys.argv[1:] if argv is None else argv
    authkey = os.environ.pop(_AUTHKEY_ENV, None)  # (not in its workers' environment)
    if authkey:
        import multiprocessing.process as mpp

        mpp.current_process().authkey = bytes.fromhex(authkey)
    _run(socket.socket(fileno=int(argv[0])), int(argv[1]))


def _run(ctl, parent):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_pdeathsig()
    if os.getppid() != parent:  # the node died before we armed the signal
        os._exit(0)
    reaper.set_subreaper()  # a dead worker's leftovers come to us, to be killed
    from . import worker  # noqa: F401  (preloaded so every fork has it)
    # and cloudpickle, which a job's function pickled by value (one from
    # ``__main__``, a lambda) needs: a client imports it only when it pickles
    # such a function (dpool.serialize), after it forked this zygote, which
    # imports it here, off the client's path, for all its workers
    import cloudpickle  # noqa: F401

    _serve(ctl)


def _forked_main(ctl, parent):
    """The zygote as a fork of the client (see :meth:`Zygote.fork`): left
    with what a fresh interpreter would have of the client's process (its
    standard streams, environment and signal dispositions), never returns."""
    try:
        _forget_the_client(ctl.fileno())
        _run(ctl, parent)
    finally:
        os._exit(1)


def _forget_the_client(ctl_fd):
    """In a fork of the client, as ``multiprocessing``'s fork start method
    leaves its children: stdin from /dev/null, the user's Python signal
    handlers back to their defaults (an ignored signal stays ignored, as
    across exec), none of the client's multiprocessing children, and the
    client's objects frozen (``gc.freeze``): never collected here, so no
    finalizer of the user's runs in the zygote or a worker.  Its files
    stay open, as in any fork (a module's open file still works in a
    worker), but not its pipes and sockets (see :func:`_drop_pipes_and_sockets`)."""
    import gc

    gc.freeze()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    _drop_pipes_and_sockets(null, keep={0, 1, 2, ctl_fd, *_multiprocessing_fds()})
    os.close(null)
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    mpp = sys.modules.get("multiprocessing.process")
    if mpp is not None:
        mpp._children = set()


def _multiprocessing_fds():
    """The client's multiprocessing resource tracker's pipe, which its fork
    children share (as ``fork`` children do)."""
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    fd = getattr(getattr(tracker, "_resource_tracker", None), "_fd", None)
    return [fd] if isinstance(fd, int) else []


def _drop_pipes_and_sockets(null, keep):
    """Put /dev/null (``null``) in place of every pipe and socket of the
    client's but ``keep``: held here, a pipe's write end the client closes
    would never give its reader end of file, a listening socket would keep
    its port and a connection would never be closed, for as long as the
    pool lives.  Replaced, not closed: the number stays taken, so a Python
    object of the client's that still owns it never closes another file."""
    import stat

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd == null:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # (the listing's own descriptor, gone)
            continue
        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
            os.dup2(null, fd, inheritable=False)


def _serve(ctl, kept=frozenset()):
    """Fork a worker per request on ``ctl`` until it closes; never returns.
    ``kept``: children that are not workers and stay (a setup's)."""
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children = set()
    import select

    while True:
        try:
            ready, _, _ = select.select([ctl, rfd], [], [])
        except InterruptedError:
            ready = []
        if rfd in ready:
            os.read(rfd, 4096)
        _reap(ctl, children, kept)
        if ctl in ready and not _serve_request(ctl, children):
            break
    for pid in children:
        _kill_group(pid)
        try:  # a child forked just now may not lead its group yet (setpgid)
            os.kill(pid, signal.SIGKILL)  # not reaped, so the pid is still ours
        except ProcessLookupError:
            pass
    reaper.kill_children()  # the workers, and whatever they left to us
    os._exit(0)


def _serve_request(ctl, children):
    try:
        msg, fds, _, _ = socket.recv_fds(ctl, 1, 2)
    except OSError:
        return False
    if not msg or len(fds) != (2 if msg == b"Z" else 1):
        for fd in fds:
            os.close(fd)
        return False
    pid = os.fork()
    if pid == 0:
        ctl.close()
        # Its own process group (a cancel kills the group), in the zygote's
        # session: a session of its own would also make it a scheduling
        # group of its own where the kernel groups sessions (autogroup), and
        # under load each wake-up of the worker then waits for its group's
        # turn, milliseconds (measured: round trip p90 3-5 ms instead of
        # 70-250 us at load average 30).  Not the terminal's foreground
        # group: SIGTTOU ignored so that output is never stopped (tostop).
        os.setpgid(0, 0)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # KeyboardInterrupt, as in any Python program: a cancelled dispy job
        # gets one (SIGINT) before its process is killed.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _set_pdeathsig()
        reaper.set_subreaper()  # what its jobs leave comes back to it
        from . import worker

        _after_fork_as_multiprocessing()
        if msg == b"Z":
            _setup_process(*fds)
        worker.main(fds[0])
    for fd in fds:
        os.close(fd)
    children.add(pid)
    try:
        ctl.sendall(_RECORD.pack(b"P", pid, 0))
    except OSError:
        return False  # the node is gone (or closing): kill the children and exit
    return True


def _after_fork_as_multiprocessing():
    """Run ``multiprocessing``'s after-fork hooks, as its fork children do:
    a Manager proxy's connection cached by the process forked from is
    dropped (its socket is not this process's), locks are reset."""
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util._run_after_forkers()


def _setup_process(ctl_fd, data_fd):
    """A session's setup process (dispy's): runs the session's setup (over
    ``data_fd``, as a worker would), then forks the session's workers on
    ``ctl_fd`` as the zygote does, so that what setup made (a
    ``multiprocessing.Value``, a lock, an open file...) is inherited by every
    job process of the session on this node, as with dispynode."""
    from . import worker

    if not worker.run_setup(data_fd):
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The processes setup started (a multiprocessing Manager, a server) stay.
    _serve(socket.socket(fileno=ctl_fd), frozenset(reaper.children()))


def _reap(ctl, children, kept=frozenset()):
    """Reap what exited; report workers; kill what dead workers left us."""
    orphans = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid not in children:
            orphans = True  # something a worker left behind (already dead)
            continue
        children.discard(pid)
        orphans = True  # its leftovers, if any, are ours now
        try:
            ctl.sendall(_RECORD.pack(b"X", pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            pass  # the node is gone; we exit on the next select
    if orphans:
        reaper.kill_children(keep=children | kept)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ node side

def _asyncio():
    """asyncio, for the node side only: the zygote process (``main``) never
    uses it, and importing it would add to every pool's start-up (the first
    task waits for the zygote to start; issue 13)."""
    import asyncio

    return asyncio


def describe_exit(code):
    """Exit code as waitstatus_to_exitcode gives it, in words."""
    if code is None:
        return "exited (status unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class Zygote:
    """The node's handle on its zygote process (asyncio, one loop)."""

    def __init__(self):
        self.proc = None
        self.ctl = None
        self._pending = collections.deque()  # futures waiting for b"P" replies
        self._exits = {}  # pid -> future of the exit code
        self._buf = b""
        self.dead = False  # the zygote process is gone (its workers with it)
        self.pid = None  # a setup process's pid (see adopt)
        self.forked = False  # True: a fork of the client (see fork), not a fresh interpreter

    async def start(self):
        """Start the zygote (unless :meth:`fork` did) and listen to it."""
        if self.ctl is None:
            self._exec()
        _asyncio().get_running_loop().add_reader(self.ctl.fileno(), self._on_readable)

    def _exec(self):
        """The zygote as a fresh interpreter: safe from any thread, but the
        first worker waits for its start-up and imports (tens of ms)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        mpp = sys.modules.get("multiprocessing.process")
        if mpp is not None:  # its workers get this process's authkey, as its
            # multiprocessing children do (a Manager's proxies work in them)
            env[_AUTHKEY_ENV] = mpp.current_process().authkey.hex()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from dpool.node.zygote import main; main()",
             str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        self.ctl = ours

    @classmethod
    def fork(cls):
        """A zygote forked from this process, ready at once (its imports are
        this process's), or None where that is not safe: anywhere but Linux,
        from a thread other than the main one (the zygote dies with the
        thread that forked it, PR_SET_PDEATHSIG), or while the process has
        any other thread (a lock one holds would stay locked in the fork).
        Call it before starting the loop thread that :meth:`start` runs on."""
        if not can_fork_here():
            return None
        from . import worker  # noqa: F401  (imported once here, not in every zygote)

        zygote = cls()
        ours, theirs = socket.socketpair()
        for stream in (sys.stdout, sys.stderr):  # (or the fork writes them again)
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:  # (out of processes or memory: the node tries the usual way)
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()
            _forked_main(theirs, parent)
        theirs.close()
        ours.setblocking(False)
        zygote.ctl, zygote.proc, zygote.forked = ours, _Forked(pid), True
        return zygote

    def _on_readable(self):
        try:
            data = self.ctl.recv(64 * _RECORD.size)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._buf += data
        while len(self._buf) >= _RECORD.size:
            kind, pid, status = _RECORD.unpack_from(self._buf)
            self._buf = self._buf[_RECORD.size:]
            if kind == b"P":
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_result(pid)
            else:
                fut = self._exits.get(pid)  # None once forgotten
                if fut is not None and not fut.done():
                    fut.set_result(status)

    def _lost(self):
        self.dead = True
        loop = _asyncio().get_running_loop()
        loop.remove_reader(self.ctl.fileno())
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("the worker zygote died"))
        for fut in self._exits.values():
            if not fut.done():
                fut.set_result(None)

    def _exit_future(self, pid):
        fut = self._exits.get(pid)
        if fut is None:
            fut = self._exits[pid] = _asyncio().get_running_loop().create_future()
        return fut

    @classmethod
    def adopt(cls, ctl, pid):
        """The handle on a session's setup process (which forks that
        session's workers) through its control socket ``ctl``."""
        zygote = cls()
        zygote.pid = pid
        ctl.setblocking(False)
        zygote.ctl = ctl
        _asyncio().get_running_loop().add_reader(ctl.fileno(), zygote._on_readable)
        return zygote

    async def spawn(self):
        """Fork a worker; return (pid, our end of its socketpair)."""
        pid, (ours,) = await self._request(b"S", 1)
        return pid, ours

    async def spawn_setup_process(self):
        """Fork a session's setup process: return (its handle, our end of the
        socketpair on which it takes INIT and SETUP, as a worker)."""
        pid, (ctl, data) = await self._request(b"Z", 2)
        return Zygote.adopt(ctl, pid), data

    async def _request(self, kind, count):
        if self.dead or self.ctl is None:
            raise ConnectionError("the worker zygote is gone")
        pairs = [_link_pair() for _ in range(count)]
        fut = _asyncio().get_running_loop().create_future()
        try:
            socket.send_fds(self.ctl, [kind], [theirs.fileno() for _, theirs in pairs])
        except OSError as exc:
            for ours, _ in pairs:
                ours.close()
            if self.ctl is not None and self.pid is None:  # gone (its EOF may not be read yet)
                self._lost()
            raise ConnectionError(f"cannot reach the worker zygote: {exc}") from exc
        finally:
            for _, theirs in pairs:
                theirs.close()
        self._pending.append(fut)  # only once the request is sent: replies come in order
        try:
            pid = await _asyncio().wait_for(fut, 30)
        except BaseException:
            for ours, _ in pairs:
                ours.close()
            raise
        self._exit_future(pid)
        return pid, [ours for ours, _ in pairs]

    async def exit_code(self, pid, timeout=2.0):
        """The exit code of a worker, once the zygote has reaped it."""
        fut = self._exit_future(pid)
        if self.dead and not fut.done():
            self._exits.pop(pid, None)
            return None  # the zygote died and took the report with it
        try:
            return await _asyncio().wait_for(_asyncio().shield(fut), timeout)
        except TimeoutError:
            return None
        finally:
            self._exits.pop(pid, None)

    def interrupt(self, pid):
        """SIGINT to a worker (not its group): KeyboardInterrupt in its job."""
        try:
            os.kill(pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, pid, forget=False):
        """SIGKILL a worker's process group; with forget, drop its exit report."""
        _kill_group(pid)
        if forget:
            self._exits.pop(pid, None)

    def close_adopted(self):
        """Close a setup process's control socket: it kills its workers and
        exits (its own zygote reaps it; the caller kills it if it is stuck)."""
        if self.ctl is None:
            return
        self.dead = True
        self._close_ctl()

    def _close_ctl(self):
        try:
            _asyncio().get_running_loop().remove_reader(self.ctl.fileno())
        except (ValueError, OSError, RuntimeError):
            pass
        self.ctl.close()
        self.ctl = None

    async def close(self):
        if self.ctl is None:
            return
        self._close_ctl()
        if not await _exited(self.proc, 2.0):
            self.proc.kill()
            self.proc.wait(5)


def can_fork_here():
    """True where :meth:`Zygote.fork` may fork this process: Linux, the main
    thread, and no other thread, Python's or not (/proc/self/task)."""
    if not sys.platform.startswith("linux") or os.environ.get("DPOOL_ZYGOTE") == "exec":
        return False
    import threading

    if threading.current_thread() is not threading.main_thread() \
            or threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class _Forked:
    """What :class:`Zygote` uses of a ``Popen``, for a zygote it forked."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout=None):
        pid, status = os.waitpid(self.pid, 0)  # (after kill: at once)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


async def _exited(proc, timeout):
    """Wait up to ``timeout`` s for ``proc`` to exit (reaped); True if it
    did.  Woken by a pidfd where there is one (Linux 5.3+), else polled."""
    asyncio = _asyncio()
    if proc.poll() is not None:
        return True
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is None:
        for _ in range(int(timeout / 0.01)):
            await asyncio.sleep(0.01)
            if proc.poll() is not None:
                return True
        return False
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.poll() is not None
