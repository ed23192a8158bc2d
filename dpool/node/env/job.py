"""What a computation sees on the node: dispy's job environment.

Only sessions that ask for it (a SETUP message, sent by ``JobCluster``)
use this module; plain Executor/Pool jobs never touch it.

::

    node (asyncio)                          worker process (this module)
    ──────────────                          ────────────────────────────
    SETUP + (names, setup, args, cleanup) ─► the session's setup process:
                                               install the names, run
                                               setup(*args), keep the globals
                                               it bound
                                          ◄─ SETUPDONE, or SETUPFAIL + exception
    (workers forked from the setup process inherit the env)
    RUN ...                               ─► the job runs with the env in its
                                               function's globals, and may call
                                          ◄─ PROVISIONAL job_id + result
                                          ◄─ SENDFILE job_id name + data
    CLEANUP + (names, setup, args, cleanup) ► cleanup(*args) when the session ends
                                          ◄─ CLEANUPDONE error-or-None

The env is a dict of names: the client's ``depends`` functions and classes,
``dispy_node_name``, ``dispy_node_ip_addr``, ``dispy_job_path``,
``dispy_provisional_result``, ``dispy_send_file``, and the module-level
globals that ``setup`` created or rebound.  It is merged into the globals of
every function the worker loads (the computation, setup, cleanup), with the
modules dispynode imports (os, time, socket...: :data:`DISPYNODE_MODULES`)
where the function has no global of that name.  SETUP runs in the session's
*setup process* (forked by the zygote, see :func:`dpool.node.zygote`), and
the session's workers are forked from it afterwards: they inherit the env and
everything setup made (shared ``multiprocessing`` objects included), as job
processes inherit from dispynode's setup process.
"""
import functools
import os
import subprocess
import sys

from ... import protocol as P
from ... import serialize
from ..files import write_private

#: Files a job sends back with dispy_send_file are limited to this size.
MAX_SEND_FILE = 256 * 1024 * 1024

_conn = None  # the worker's connection to its node, once SETUP/ENV arrived
_job_id = None  # the job running now (None between jobs)


# ------------------------------------------------- called by the computation

def dispy_provisional_result(result, relay=False, timeout=None):
    """Send ``result`` to the client now; the job goes on.  0 if sent, -1 if not."""
    if _conn is None or _job_id is None:
        return -1
    try:
        frames = serialize.dumps(result)
    except Exception:
        return -1
    _conn.send([P.encode(P.Provisional, _job_id), *frames])
    return 0


def dispy_send_file(path, relay=False, timeout=None):
    """Send the file at ``path`` to the client's working directory.

    A path inside the job's folder keeps its relative path; any other file
    is saved under its base name.  0 if sent, -1 if not (no such file, or
    larger than :data:`MAX_SEND_FILE`).
    """
    if _conn is None or _job_id is None:
        return -1
    try:
        full = os.path.abspath(path)
        if os.path.getsize(full) > MAX_SEND_FILE:
            return -1
        with open(full, "rb") as f:
            data = f.read()
    except OSError:
        return -1
    here = _namespace.get("dispy_job_path") or os.getcwd()  # the job folder
    if full.startswith(here + os.sep):
        name = os.path.relpath(full, here)
    else:
        name = os.path.basename(full)
    _conn.send([P.encode(P.SendFile, _job_id, name), data])
    return 0


def use_connection(conn):
    """(the worker) Send what a job sends back on ``conn`` from now on (a
    client's channel while the worker serves it, node/worker.py
    ``on_channel``); returns the connection used until now."""
    global _conn
    previous, _conn = _conn, conn
    return previous


# ------------------------------------------------------- run by the cluster

def _interpreter(path):
    """What runs a program computation, as dispynode chooses it: a ``.py``
    file by the node's Python, a ``.java`` file by java (source launch),
    anything else as an executable."""
    if path.endswith(".py"):
        return [sys.executable]
    if path.lower().endswith(".java"):
        return ["java"]
    return []


def run_program(program, *args):
    """A program computation: run ``program`` with the job's arguments.

    The program was sent to the job folder as a dependency; its stdout and
    stderr become the job's, its exit code is the result.  It runs in the
    worker's process group, so cancelling the job kills it too.
    """
    path = os.path.join(os.getcwd(), program)
    if not os.path.isfile(path):
        path = program
    proc = subprocess.run([*_interpreter(path), path, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    # (bytes not UTF-8 kept as surrogates: the client gives back the bytes)
    sys.stdout.write(proc.stdout.decode(errors="surrogateescape"))
    sys.stderr.write(proc.stderr.decode(errors="surrogateescape"))
    return proc.returncode


def run_with_files(files, cleanup, args, kwargs, names=None):
    """A job with ``dispy_job_depends``: write its files and put its
    functions and classes (``names``) in the computation's globals, run,
    then remove them (the globals as they were before: dispy's are the
    job's only)."""
    written = []
    fn = _namespace["__dpool_computation__"]
    scope = _globals_of(fn) if names else None
    before = {} if scope is None else {k: scope[k] for k in names if k in scope}
    try:
        for name, mode, data in files:
            path = safe_path(os.getcwd(), name)
            write_private(path, data, mode)
            written.append(path)
        _inject(fn)
        if scope is not None:
            dict.update(scope, names)
            for value in names.values():  # (dispy's names in theirs too: as
                _inject(value)            # dispynode, one namespace for all)
        return fn(*args, **kwargs)
    finally:
        if scope is not None:
            for name in names:
                if name in before:
                    scope[name] = before[name]
                else:
                    scope.pop(name, None)
        if cleanup:
            for path in written:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def safe_path(root, name):
    """``root/name``, refusing absolute names and names that leave root."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise ValueError(f"invalid file name {name!r}: give a relative path")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts[:-1]) or parts[-1] in ("", ".", ".."):
        raise ValueError(f"invalid file name {name!r}: no '..', '.' or empty parts")
    path = os.path.join(root, *parts)
    if os.path.commonpath([os.path.realpath(root), os.path.realpath(path)]) != \
            os.path.realpath(root):
        raise ValueError(f"invalid file name {name!r}: it leaves the job folder")
    return path


# ------------------------------------------------------------ worker side

_namespace = {}


class JobEnv:
    """Installed in a :class:`dpool.node.worker.Worker` by SETUP or ENV."""

    def __init__(self, worker):
        global _conn
        _conn = worker.conn
        self.worker = worker
        self.loaded = set()
        self._load = worker._function
        self._run = worker.run
        worker._function = self.function
        worker.run = self.run

    def install(self, env):
        _namespace.update(env)
        self.loaded &= self.worker.fns.keys()  # some may have been forgotten
        for fn_id in self.loaded:
            _inject(self.worker.fns[fn_id])

    def function(self, fn_id):
        fn = self._load(fn_id)
        if fn_id not in self.loaded:
            self.loaded.add(fn_id)
            _inject(fn)
        return fn

    def run(self, job_id, fn_id, star, frames):
        global _job_id
        _job_id = job_id
        try:
            return self._run(job_id, fn_id, star, frames)
        finally:
            _job_id = None


#: The modules dispynode imports at its top level: a dispy computation runs
#: among dispynode's globals, so it may use these without importing them.
DISPYNODE_MODULES = ("os", "sys", "time", "stat", "socket", "multiprocessing", "threading",
                     "subprocess", "traceback", "marshal", "tempfile", "shutil", "glob",
                     "pickle", "io", "signal", "platform", "copy", "struct", "hashlib", "re",
                     "errno")


def _dispynode_globals():
    import importlib

    return {name: importlib.import_module(name) for name in DISPYNODE_MODULES}


def _globals_of(fn):
    """The globals of ``fn``, or of the function a functools.partial (or a
    partial of a partial) wraps; None for other callables."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__globals__", None)


def _inject(fn):
    g = _globals_of(fn)
    if g is not None:
        for name, module in _modules.items():  # the function's own globals win
            g.setdefault(name, module)
        dict.update(g, _namespace)  # (overwrites: serialize.SharedGlobals keeps)


def _base_names():
    return {"dispy_provisional_result": dispy_provisional_result,
            "dispy_send_file": dispy_send_file, "dispy_job_path": os.getcwd()}


def handle(worker, msg, frames):
    """SETUP, ENV and CLEANUP messages from the node."""
    env = getattr(worker, "jobenv", None)
    if env is None:
        env = worker.jobenv = JobEnv(worker)
    kind = type(msg)
    if kind is P.Env:
        env.install({**_base_names(), **serialize.loads(frames[1:])})
    elif kind is P.Setup:
        _setup(worker, env, frames[1:])
    elif kind is P.Cleanup:
        error = None
        try:
            names, _, setup_args, cleanup = serialize.loads(frames[1:])
            if callable(cleanup):
                _inject(cleanup)
                cleanup(*setup_args)
        except BaseException as exc:  # reported, the session ends anyway
            error = "".join(__import__("traceback").format_exception(exc))
        worker.conn.send([P.encode(P.CleanupDone, error)])


_setup_ok = False  # in a setup process: whether setup succeeded
_modules = {}  # DISPYNODE_MODULES, once SETUP arrived


def setup_succeeded():
    return _setup_ok


def inherit(worker):
    """A worker forked from a setup process: the job environment (setup's
    globals included) is already here, inherited; use it."""
    if _setup_ok:
        worker.jobenv = JobEnv(worker)


def _setup(worker, env, frames):
    """Run setup in this (setup) process; the session's workers are forked
    from it afterwards and inherit everything it made, picklable or not."""
    global _setup_ok
    try:
        names, setup, setup_args, _ = serialize.loads(frames)
        names = {**_base_names(), **names}
        _modules.update(_dispynode_globals())
        env.install(names)
        made = {}
        if setup is not None:
            _inject(setup)
            scope = _globals_of(setup) or {}   # (another callable sets no globals)
            before = dict(scope)
            status = setup(*setup_args)
            if status not in (None, 0, 1):
                raise RuntimeError(f"setup returned {status!r} (0 or None means success)")
            made = {k: v for k, v in scope.items()
                    if not k.startswith("__") and (k not in before or before[k] is not v)}
            env.install(made)
    except BaseException as exc:  # the node reports it and ends the session
        worker.conn.send([P.encode(P.SetupFail), *serialize.dump_exception(exc)])
        return
    _setup_ok = True
    worker.conn.send([P.encode(P.SetupDone, None)])
