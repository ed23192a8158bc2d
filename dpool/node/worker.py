"""The worker process: runs jobs one after another, blocking, no asyncio.

::

    node (asyncio)                      worker process (this module)
    ──────────────                      ────────────────────────────
    INIT options + initializer  ──►  set cwd, run initializer
    FUNC fn_id + blob           ──►  cache the function under fn_id
    RUN [RunItem(job_id, fn_id, n, star)] + payloads ──► for each: load, run, dump
                                ◄──  DONE [Result(job_id, outcome, start, end,
                                              stdout, stderr, n)] + payloads
    CANCEL [job_id] (not started yet) ──► dropped when it comes up
                                ◄──  GIVEBACK [job_id]  sent before the DONE of
                                     the job before it (one whose CANCEL came
                                     after that DONE starts: its DONE comes as
                                     usual)

A worker is forked by the zygote (:mod:`dpool.node.zygote`) with one end of a
socketpair; its only peer is its node.  It runs in its own process group so
that killing the group also kills whatever the job started, and is a child
subreaper (:mod:`dpool.node.reaper`): after each batch of jobs it kills the
processes they left (their own children, and orphans that left the group
with ``setsid``), keeping only those that existed before (e.g. a setup's);
in a burst of short jobs (the next batch already read) at most every
``REAP_EVERY`` seconds.
It exits when the node closes the socket, or after ``max_tasks`` jobs.
"""
import collections
import io
import os
import pickle
import sys
import time

from .. import protocol as P
from ..errors import ProtocolError
from ..protocol import Call, Outcome
from .. import serialize
from ..transport import BlockingConnection
from . import reaper


_OK, _ERROR = int(Outcome.OK), int(Outcome.ERROR)
_loads, _dumps = pickle.loads, pickle.dumps
_ATOMS, _PROTOCOL = serialize._ATOMS, serialize.PROTOCOL  # (as serialize.dumps's fast path)

#: While more work is already in hand when a batch of jobs ends, the check
#: for what its jobs left (reaper.kill_children: a failing ``waitid``, ~1 us
#: and a syscall) waits for the end of the batch that leaves nothing in
#: hand, or this many seconds after the last check, whichever comes first.
REAP_EVERY = 0.005


class _Capture:
    """sys.stdout/sys.stderr swapped for buffers around each job.  A buffer
    a job left empty and open serves the next job too (two new StringIO per
    job cost more than a no-op job itself); one written to, or closed, is
    replaced."""

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()
        self.text = (None, None)

    def call(self, fn, args, kwargs, star):
        """``_call`` with the output captured: ``self.text`` is then the
        job's (stdout, stderr), each None if it wrote nothing."""
        self.text = (None, None)
        saved = sys.stdout, sys.stderr
        out, err = sys.stdout, sys.stderr = self.out, self.err
        try:
            return _call(fn, args, kwargs, star)
        finally:
            sys.stdout, sys.stderr = saved
            text_out, reuse = _taken(out)
            if not reuse:
                self.out = io.StringIO()
            text_err, reuse = _taken(err)
            if not reuse:
                self.err = io.StringIO()
            self.text = text_out, text_err


def _taken(buf):
    """(what a job wrote to ``buf``: None if nothing, or if it closed it;
    whether the next job may have ``buf``): open, empty, at its start (a job
    that wrote and truncated it stays past the end: NULs would pad the next
    job's output), and held by nothing but the capture (a reference the job
    kept, e.g. in a thread or a logging handler, could write into the next
    job's output).  The references counted: self.out/err, the caller's
    local, ``buf`` and getrefcount's argument."""
    if buf.closed:
        return None, False
    text = buf.getvalue()
    if text:
        return text, False
    return None, not buf.tell() and sys.getrefcount(buf) <= 4


class SessionGone(Exception):
    """The session this worker was started for has ended (its directory is
    gone): nothing to serve, so the worker exits quietly."""


class Worker:
    def __init__(self, conn):
        self.conn = conn
        self.fns = {}
        self.capture = None  # a _Capture when the session captures output
        self.max_tasks = None
        self.done = 0
        self.kept = frozenset()  # child processes that outlive jobs (a setup's)
        self.handlers = {P.Init: self.on_init, P.Func: self.on_func, P.Run: self.on_run,
                         P.Forget: self.on_forget, P.Cancel: self.on_cancel,
                         P.Setup: self.on_env, P.Env: self.on_env, P.Cleanup: self.on_env,
                         P.Channel: self.on_channel}
        self.given_back = set()  # jobs received, not started, given back to the node
        self.backlog = collections.deque()  # (msg, frames) read while looking for Cancels
        self.reaped = 0.0  # time.monotonic() of the last look for what jobs left

    def serve(self):
        recv = self.conn.recv
        handlers = self.handlers
        backlog = self.backlog
        while self.max_tasks is None or self.done < self.max_tasks:
            if backlog:
                msg, frames = backlog.popleft()
            else:
                frames = recv()
                msg = P.decode(frames[0])
            handlers[type(msg)](msg, frames)

    def on_cancel(self, msg, frames):
        """The node asks back jobs it gave this worker (Cancel), read while
        idle or between batches: every job received is started or given
        back already, nothing to drop.  (Those read as a job ends are taken
        by _give_back.)"""

    def _give_back(self, jobs, after):
        """A job has ended, its result not sent yet: the jobs held here (those
        of ``jobs``, the batch's items, from index ``after``, and those of
        the Runs read meanwhile) that the node asked back (Cancel) are given
        back now, AHEAD of that result, in their own GiveBack.  So the node,
        which reads in order, knows when it takes the result that a held job
        it asked back and got no GiveBack for has started (a Cancel read
        after the result went out comes too late: that job starts): no wait,
        no guess.  What else the node sent meanwhile is kept for after the
        jobs in hand.  One non-blocking check (a poll) per job."""
        conn = self.conn
        if not conn.take_in():
            return
        asked = set()
        while conn.has_data:
            frames = conn.recv()
            msg = P.decode(frames[0])
            if type(msg) is P.Cancel:
                asked.update(msg.job_ids)
            else:
                self.backlog.append((msg, frames))
        if not asked:
            return
        held = [job[0] for job in jobs[after:]]
        for msg, _ in self.backlog:
            if type(msg) is P.Run:
                held.extend(job[0] for job in msg.jobs)
        back = [job_id for job_id in held if job_id in asked and job_id not in self.given_back]
        if back:
            self.given_back.update(back)
            conn.send([P.encode(P.GiveBack, back)])

    def on_init(self, msg, frames):
        options = msg.options
        self.capture = _Capture() if options.get("capture", False) else None
        self.max_tasks = options.get("max_tasks")
        _name_process(options)
        cwd = options.get("cwd")
        if cwd:
            try:
                os.chdir(cwd)
            except FileNotFoundError:  # the session ended while we started
                raise SessionGone(cwd) from None
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
        if len(frames) > 1:
            try:
                initializer, initargs = serialize.loads(frames[1:])
                if initializer is not None:
                    initializer(*initargs)
            except BaseException as exc:  # reported to the node, then we exit
                self.conn.send([P.encode(P.InitFail), *serialize.dump_exception(exc)])
                self.conn.close()
                os._exit(3)
            self.kept = frozenset(reaper.children())  # an initializer's may stay

    def on_func(self, msg, frames):
        self.fns[msg.fn_id] = frames[1]

    def on_env(self, msg, frames):
        """dispy's job environment (JobCluster sessions only): see jobenv."""
        from .env import job as jobenv

        jobenv.handle(self, msg, frames)
        self.kept = frozenset(reaper.children())

    def on_forget(self, msg, frames):
        for fn_id in msg.fn_ids:
            self.fns.pop(fn_id, None)

    def _function(self, fn_id):
        fn = self.fns[fn_id]
        if isinstance(fn, (bytes, bytearray, memoryview)):
            fn = self.fns[fn_id] = serialize.loads_function(fn)
        return fn

    def on_run(self, msg, frames):
        """Run a batch of jobs.  Each result is sent as soon as its job ends,
        before the next job starts: if a later job kills this process, the
        results already made are safe with the node, and the node knows that
        the job it has no result for is the one that was running."""
        send = self.conn.send
        jobs, given_back = msg.jobs, self.given_back
        for index, (item, payload) in enumerate(P.run_items(msg, frames), 1):
            if given_back and item.job_id in given_back:  # (given back unstarted)
                given_back.discard(item.job_id)
                continue
            record, payload = self.run(item.job_id, item.fn_id, item.star, payload)
            self._give_back(jobs, index)  # (before the result: see _give_back)
            send([P.done_frame([record]), *payload])
        self._reap()

    def _reap(self):
        """Kill what the jobs left (nothing of a job outlives it): after each
        batch of jobs, but while more work is in hand already (a burst of
        short jobs: the node's next Run read), at most every REAP_EVERY
        seconds, at the latest when a batch ends with nothing in hand."""
        now = time.monotonic()
        if (self.backlog or self.conn.has_data) and now - self.reaped < REAP_EVERY:
            return
        self.reaped = now
        reaper.kill_children(self.kept)

    # ------------------------------------------------- a client's channel

    def on_channel(self, msg, frames):
        """The node lends this worker a client's channel: its socket came
        with this message, its record state (handoff.RecordState) is frame
        1.  The worker says it has it (Channel back), serves the client's
        lone calls on it until the client releases it or it ends, then
        serves the node again (Returned), without the functions only the
        channel sent it.  What the node sends meanwhile waits on the
        socketpair."""
        import socket

        from ..transport.handoff import RecordState

        sock = socket.socket(fileno=self.conn.take_fd())
        channel = BlockingConnection(sock, records=RecordState.unpack(frames[1]))
        self.conn.send([P.encode(P.Channel, "")])  # taken: the node closes its copy
        known = set(self.fns)
        # (dispy's job environment: a job's provisional results and files go
        # on the channel, ahead of its DONE there, as on the node's link)
        jobenv = sys.modules.get("dpool.node.env.job") \
            if getattr(self, "jobenv", None) is not None else None
        node_conn = jobenv.use_connection(channel) if jobenv is not None else None
        try:
            self.serve_channel(channel)
        finally:
            if jobenv is not None:
                jobenv.use_connection(node_conn)
            channel.close()
            # (the node never learns of the channel's functions: no Forget
            # would reach them, and the next channel sends its own)
            for fn_id in self.fns.keys() - known:
                del self.fns[fn_id]
        self.conn.send([P.encode(P.Returned)])

    def serve_channel(self, channel):
        """Tell the client the channel is served (Ready), then run each Run
        it sends, answering on it with the attempt its Run gave, until
        Release or the channel's end.  A record that fails its tag, a
        message a client does not send on a channel, or one of the wrong
        shape (checked by the node on its link), ends it, not this worker
        (the client then runs its call through the node)."""
        try:
            channel.send([P.encode(P.Ready, {"pid": os.getpid()})])
            while True:
                frames = channel.recv()
                msg = P.decode(frames[0])
                kind = type(msg)
                if kind is P.Run:
                    self._run_for_channel(channel, msg, frames)
                elif kind is P.Func:
                    self.on_func(msg, frames)
                else:  # Release, or what has no place here
                    return
        except (OSError, EOFError, ProtocolError):  # the client went, or broke the stream
            return
        except (LookupError, TypeError, ValueError):  # a Func or Run of the wrong shape
            return

    def _run_for_channel(self, channel, msg, frames):
        for item, payload in P.run_items(msg, frames):
            record, payload = self.run(item.job_id, item.fn_id, item.star, payload)
            channel.send([P.encode(P.Done, [(*record[:-1], item.attempt)]), *payload])
        reaper.kill_children(self.kept)  # nothing of a job outlives it

    def run(self, job_id, fn_id, star, frames):
        start = time.time()
        out = err = None
        try:
            fn = self.fns[fn_id]
            if type(fn) is bytes:  # (its first job here: loaded, kept loaded)
                fn = self._function(fn_id)
            # (serialize.loads / _call / _dump_result inline for the common
            # case: a lone frame, a plain call, a plain value back)
            args, kwargs = _loads(frames[0]) if len(frames) == 1 else serialize.loads(frames)
            if self.capture:
                capture = self.capture
                try:
                    result = capture.call(fn, args, kwargs, star)
                finally:
                    out, err = capture.text
            elif star:
                result = _call(fn, args, kwargs, star)
            else:
                result = fn(*args, **kwargs)
            payload = [_dumps(result, _PROTOCOL)] if type(result) in _ATOMS \
                else _dump_result(result)
            outcome = _OK
        except BaseException as exc:  # the job's failure is its result
            outcome = _ERROR
            payload = serialize.dump_exception(exc, exc.__traceback__)
            del exc
        self.done += 1
        return P.result(job_id, outcome, len(payload), start, time.time(), out, err), payload


#: Attribute set on the exception of a result that could not be serialized:
#: the result's repr (dpool.Pool reports it as multiprocessing's
#: MaybeEncodingError; the Executor raises the exception itself).
RESULT_REPR = "dpool_result_repr"


def _dump_result(result):
    try:
        return serialize.dumps(result)
    except Exception as exc:
        try:
            setattr(exc, RESULT_REPR, repr(result))
        except Exception:
            pass
        raise


def _name_process(options):
    """Name this worker as the stdlib names its pools' workers (e.g.
    ``ForkProcess-3``, ``ForkPoolWorker-3``): code that checks
    ``multiprocessing.current_process().name`` sees a worker, not
    ``MainProcess``."""
    prefix, index = options.get("process_name"), options.get("process_index")
    if not prefix or not index:
        return
    import multiprocessing.process as mpp

    current = mpp.current_process()
    current._identity = (index,)
    current.name = f"{prefix}-{index}"


def _call(fn, args, kwargs, star):
    if not star:
        return fn(*args, **kwargs)
    if star == Call.MAP:  # a chunk of a map: args is a list (or a range) of items
        return [fn(x) for x in args]  # (a little quicker than list(map(fn, args)))
    # Call.STARMAP: a list of argument tuples.  (A comprehension, not
    # list(starmap()): fn raising StopIteration is an error, not the end.)
    return [fn(*a) for a in args]


def run_setup(fd):
    """In a session's setup process (see zygote): take INIT and SETUP on
    ``fd`` as a worker would, run setup, reply; True if it succeeded.  The
    workers forked from this process afterwards inherit its job environment."""
    import socket

    from .env import job as jobenv

    conn = BlockingConnection(socket.socket(fileno=fd), fds=True)
    worker = Worker(conn)
    try:
        while True:
            frames = conn.recv()
            msg = P.decode(frames[0])
            worker.handlers[type(msg)](msg, frames)
            if type(msg) is P.Setup:
                return jobenv.setup_succeeded()
    except (ConnectionError, EOFError):
        return False
    finally:
        conn.close()


def _fresh_random_state():
    """A worker forked from a process that had imported numpy (a client
    that forked the zygote, a setup process) would share its global random
    state with every other worker: reseeded from the OS, as a fresh import
    of numpy would be (the stdlib's ``random`` is, by Python, at each fork)."""
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception:  # (a numpy too old or too new for this: left as it is)
            pass


def main(fd):
    """Entry point in a freshly forked worker; never returns."""
    import socket

    conn = BlockingConnection(socket.socket(fileno=fd), fds=True)
    code = 0
    _fresh_random_state()
    try:
        worker = Worker(conn)
        if "dpool.node.env.job" in sys.modules:  # forked from a setup process
            sys.modules["dpool.node.env.job"].inherit(worker)
        worker.serve()
    except (ConnectionError, EOFError, KeyboardInterrupt, SessionGone):
        pass  # the node or our session went away (or interrupted us between jobs)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
