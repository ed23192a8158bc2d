"""The task functions every test runs: jobs, setups and cleanups.

They live in one module the workers can import by name (``tests/`` is on
``sys.path`` under pytest and on a node subprocess's PYTHONPATH, see
``helpers.node_env``), so they are pickled by reference and cheap to load,
and the stdlib pools of the conformance suites can run them too.

Jobs that must be seen "running" write a marker file the test polls for;
jobs that must wait do so until the test creates a "gate" file.  The
dispy-style ones use the names dispy puts in a computation's globals
(``dispy_node_name``, ``dispy_provisional_result``, ...), which dpool injects
on the node, and a setup's globals (``data``; ``helper`` comes from a
computation's ``depends``).
"""
import os
import signal
import subprocess
import sys
import threading
import time

_initialized = None


# ------------------------------------------------------------ plain results

def identity(x):
    return x


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def size_of(data):
    return len(data)


def make_bytes(n):
    return b"x" * n


def getpid(_=None):
    return os.getpid()


def nap(seconds, value=None):
    time.sleep(seconds)
    return value


def hostname_after(seconds):
    """The seed program's compute: sleep, then the node's host name."""
    import socket
    time.sleep(seconds)
    return socket.gethostname()


def nap_for(seconds):
    """Sleep ``seconds``, then return them."""
    return nap(seconds, seconds)


def echo_outputs(n):
    print(f"stdout of job {n}")
    print(f"stderr of job {n}", file=sys.stderr)
    return n


def echo_some(n):
    """Prints for n % 3 == 0, nothing for 1, and closes its stdout for 2."""
    if n % 3 == 0:
        print(f"stdout of job {n}")
    elif n % 3 == 2:
        sys.stdout.close()
    return n


# ----------------------------------------------------------------- failures

def fails(n):
    raise ValueError(f"boom-{n}")


def raise_value_error(message):
    raise ValueError(message)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def fail_on_3(x):
    return fail_on(x, 3)


def raise_timeout_error():
    raise TimeoutError("raised by the task, not a wait")


class Unpicklable:
    """An object no pickler can serialize (it holds a lock)."""

    def __init__(self):
        self.lock = threading.Lock()


def return_unpicklable(_=None):
    return Unpicklable()


class ReduceError(Exception):
    pass


class RaisesOnReduce:
    """An object whose __reduce__ raises its own exception."""

    def __reduce__(self):
        raise ReduceError("this object refuses to be pickled")


class Weakrefable:
    def method(self, x):
        return x


def process_name(_=None):
    import multiprocessing

    return multiprocessing.current_process().name, os.getpid()


# ------------------------------------------------------------ worker deaths

def dies(how):
    """Kill the worker process running this job in one of several ways."""
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        import ctypes

        ctypes.string_at(0)
    return how


def die_or_pid(how):
    """``dies(how)`` for a truthy ``how``, else the worker's pid."""
    if how:
        dies(how)
    return os.getpid()


def die_or_value(x):
    if x == "die":
        os._exit(7)
    return x


def exit_worker(code=1):
    os._exit(code)


def kill_worker(_=None):
    os.kill(os.getpid(), signal.SIGKILL)


def killed_mid_result(n):
    """Return ``n`` bytes; a thread SIGKILLs this worker once its main
    thread has sealed and sent 16 records of them (it looks at the
    sender's record count in its frame: ``_send_sealed``, a channel's
    sealed send): dies in the middle of sending its result."""
    import threading

    main = threading.main_thread().ident

    def sealer():
        frame = sys._current_frames().get(main)
        while frame is not None and frame.f_code.co_name != "_send_sealed":
            frame = frame.f_back
        return None if frame is None else frame.f_locals.get("sealer")

    def kill():
        while (found := sealer()) is None:
            time.sleep(0.001)
        first = found.seq
        while found.seq < first + 16:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    return b"r" * n


def counted(outdir, i, seconds=0.0):
    """Job ``i`` of a fault test: each execution leaves a file
    ``<i>-<pid>-<ns>`` in ``outdir`` (helpers_faults counts them), then
    sleeps ``seconds``; returns ``i``."""
    with open(os.path.join(outdir, f"{i}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    time.sleep(seconds)
    return i


# ------------------------------------------------------- markers and gates

def write_file(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"  # two processes may write one marker
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # the test never sees a half-written file


def hold(marker, gate=None, child=False, timeout=60.0):
    """Write "pid [child-pid]\\ncwd" to ``marker`` (read it with
    ``helpers.read_marker``), then wait for ``gate`` to exist (forever if
    None, up to ``timeout`` s); once it does, create ``marker + ".done"``
    and return the pid."""
    pids = [str(os.getpid())]
    if child:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        pids.append(str(proc.pid))
    write_file(marker, " ".join(pids) + "\n" + os.getcwd())
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if gate is not None and os.path.exists(gate):
                open(marker + ".done", "w").close()
                return os.getpid()
            time.sleep(0.01)
        raise TimeoutError("the gate was never opened")
    finally:
        if child:
            proc.kill()
            proc.wait()


def hold_through_interrupt(marker, gate=None):
    """:func:`hold`, but a KeyboardInterrupt (a JobCluster's cancel) ends
    it with the value "interrupted"."""
    try:
        return hold(marker, gate)
    except KeyboardInterrupt:
        return "interrupted"


def count_and_hold(log, gate, value=None, timeout=60.0):
    """Append this run's pid to ``log`` (one line per execution), wait for
    ``gate`` to exist (up to ``timeout`` s), return ``value``."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate was never opened")
        time.sleep(0.01)
    return value


def hold_data(data, log, gate, timeout=60.0):
    """:func:`count_and_hold` holding ``data``; return its length."""
    count_and_hold(log, gate, timeout=timeout)
    return len(data)


# ------------------------------------------- initializers (Executor, Pool)

def set_initialized(value):
    global _initialized
    _initialized = value


def get_initialized(_=None):
    return _initialized


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")


# ------------------------------------------ dispy: globals, setup, cleanup

def where(x):
    return x, dispy_node_name, dispy_node_ip_addr, dispy_job_path, os.getcwd()  # noqa: F821


def provisional(n):
    for i in range(n):
        dispy_provisional_result(("step", i))  # noqa: F821
    return ("final", n)


def provisional_then_hold(marker, gate=None):
    """A provisional result, then :func:`hold`."""
    dispy_provisional_result("holding")  # noqa: F821
    return hold(marker, gate)


def send_back(name, text):
    with open(name, "w") as f:
        f.write(text)
    return dispy_send_file(name)  # noqa: F821


def read_file(name):
    with open(name) as f:
        return f.read()


def read_file_where(name):
    with open(name) as f:
        return f.read(), os.getcwd(), dispy_job_path  # noqa: F821


def setup_reads(path, marker):
    global data
    with open(path) as f:
        data = f.read().strip()
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    return 0


def uses_setup(x, rendezvous=None):
    """With ``rendezvous`` (a folder), wait (up to 10 s) until two worker
    processes have both started a job, so that both are seen to run."""
    if rendezvous:
        open(os.path.join(rendezvous, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 10
        while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    return helper(data, x), os.getpid()  # noqa: F821 (setup_reads, depends)


def cleanup_writes(path, marker):
    write_file(marker + ".cleanup", data)


def setup_raises():
    raise RuntimeError("setup broke on purpose")


def setup_two(a, b):
    return 0


def counter_setup(marker):
    with open(marker, "a") as f:
        f.write("setup\n")
    return 0


def cleanup_marks(marker):
    write_file(marker, str(os.getpid()))


def cleanup_dies(marker):
    os._exit(7)


def stop_on(x, bad):
    """Raises StopIteration at ``bad``: a map must not take it for the end."""
    if x == bad:
        raise StopIteration(f"stop at {x}")
    return x


class IntSub(int):
    """An int subclass: must come back from a map as itself, not as an int."""


class FloatSub(float):
    """A float subclass (as IntSub)."""
