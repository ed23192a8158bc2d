"""Helpers the tests share (fixtures are in the conftest.py files, task
functions in tasks.py): polling, a ``dpool-node`` subprocess, marker files,
a JobCluster on a test node, raw-socket clients."""
import asyncio
import os
import pathlib
import signal
import socket
import selectors
import subprocess
import sys
import threading
import time

import psutil

import dpool

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
DEFAULT_PORT = 51350


def load_bench(name, monkeypatch):
    """``bench/<name>.py`` loaded afresh as a module under test (bench/ on
    sys.path for the test's length: its ``_common``)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                  REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def poll_for(condition, timeout=10.0, interval=0.01, message="condition"):
    """Wait until condition() is truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def apoll(condition, timeout=10.0):
    """:func:`poll_for` in a running event loop (it runs while we wait)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- markers

def read_marker(path, timeout=10.0):
    """Wait for a marker written by :func:`hold`; return (pids, cwd)."""
    poll_for(lambda: os.path.exists(path), timeout, message=f"marker {path}")
    first, cwd = pathlib.Path(path).read_text().split("\n", 1)
    return [int(p) for p in first.split()], cwd


def pid_gone(pid):
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- node process

def node_env(secret=None, **extra):
    env = dict(os.environ)
    env.pop("DPOOL_SECRET", None)
    if secret is not None:
        env["DPOOL_SECRET"] = secret.decode() if isinstance(secret, bytes) else secret
    # test modules define some of the jobs; they live one level down, by component
    path = [str(TESTS_DIR)] + sorted(str(d) for d in TESTS_DIR.iterdir()
                                     if d.is_dir() and d.name.isidentifier()) + [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


class NodeProcess:
    """``python -m dpool.daemons.node`` in a subprocess; stdout/stderr in files."""

    def __init__(self, workdir, port=0, cpus=2, secret=None, args=(), env=None, prefix=()):
        self.secret = secret
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.workdir / "node.out"
        self.err_path = self.workdir / "node.err"
        # ``prefix``: e.g. ("ip", "netns", "exec", NS), which execs in place (same pid)
        cmd = [*prefix, sys.executable, "-m", "dpool.daemons.node", "--port", str(port),
               "--cpus", str(cpus), *args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=env or node_env(secret), cwd=self.workdir)
        self.pid = self.proc.pid
        self.port = None
        self.cpus = None

    def wait_serving(self, timeout=60.0):
        """Parse "dpool-node: serving N CPUs on HOST:PORT (pid P)".  The
        deadline grows with the machine's load: a start takes about 0.3 s of
        CPU (interpreter, imports, the secret's KDF) but 3.4-5.6 s of wall
        time at load average 22 on 2 cores, and 15 s was passed at 30-40."""
        def line():
            if self.proc.poll() is not None:
                raise AssertionError(f"dpool-node exited with {self.proc.returncode}: "
                                     f"{self.stderr()}")
            text = self.out_path.read_text()
            return text.split("\n", 1)[0] if "\n" in text else None
        first = poll_for(line, timeout, message="dpool-node to start serving")
        words = first.split()
        assert words[:2] == ["dpool-node:", "serving"], first
        self.cpus = int(words[2])
        self.port = int(words[5].rsplit(":", 1)[1])
        assert f"(pid {self.pid})" in first, first
        return self

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def descendants(self):
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout=10.0, sig=signal.SIGINT):
        """Stop it (SIGINT: at once, running jobs killed; SIGTERM would
        drain, letting them finish); return the exit code (kill and fail if
        it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"dpool-node did not exit within {timeout}s of "
                                 f"{signal.Signals(sig).name}") from None

    def kill(self):
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


def start_node(workdir, **kwargs):
    node = NodeProcess(workdir, **kwargs)
    try:
        return node.wait_serving()
    except BaseException:
        node.kill()
        raise


def port_in_use(port, host="127.0.0.1"):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def cluster_on(node, fn, **kwargs):
    """A JobCluster running ``fn`` on ``node`` (a NodeProcess) with its secret."""
    kwargs.setdefault("secret", node.secret)
    kwargs.setdefault("nodes", [node.address])
    return dpool.JobCluster(fn, **kwargs)


# ---------------------------------------------------------------- raw clients

class SystemOnUnpickle:
    """Unpickling this runs ``os.system(command)`` (an attacker's payload)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)



def recv_until_closed(sock, timeout=10.0):
    """Read until the peer closes; return what was read (fail on timeout)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError(
                f"the peer did not close the connection within {timeout}s") from None
        if not chunk:
            return data
        data += chunk


class SealedSocket:
    """A blocking socket past the handshake: ``sendall`` seals the bytes into
    records (as a real peer would), ``recv`` returns the raw stream."""

    def __init__(self, sock, keys):
        from dpool.transport.records import Sealer
        self.sock = sock
        self.keys = keys
        self.sealer = Sealer(keys.send)

    def sendall(self, data):
        import collections
        for piece in self.sealer.seal_all(collections.deque([bytes(data)])):
            self.sock.sendall(piece)

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.sock.close()


def authenticated_socket(port, secret, timeout=5.0):
    """A :class:`SealedSocket` that has passed the handshake (steps 1-8 of
    :mod:`dpool.transport.auth`) with a node, using its pure functions."""
    from dpool.serialize import runtime_versions
    from dpool.transport import PROTOCOL_VERSION, auth
    from dpool.transport.frames import FrameDecoder, encode
    from dpool.transport.records import SecureDecoder

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        def read(n):
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                data += chunk
            return data
        challenge = auth.parse_challenge(read(auth.CHALLENGE_SIZE))
        reply = auth.make_reply()
        sock.sendall(reply)
        transcript = challenge.raw + reply
        key = auth.stretch(secret, challenge.salt)
        auth.check_proof(key, b"S", transcript, read(auth.PROOF_SIZE))
        sock.sendall(auth.prove(key, b"C", transcript))
        auth.check_status(read(1))
        sealed = SealedSocket(sock, auth.derive_keys(key, transcript, server=False))
        hello = {"protocol": PROTOCOL_VERSION, "role": "client", **runtime_versions()}
        sealed.sendall(b"".join(encode([auth.encode_hello(hello)])))
        decoder = SecureDecoder(FrameDecoder(), sealed.keys.recv)
        messages = []
        while not messages:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the hello")
            messages = decoder.feed(chunk)
        hello = auth.decode_hello(messages[0], "node")
        assert hello["role"] == "node"
        sealed.decoder = decoder  # its record numbers go on: read later messages with it
        return sealed
    except BaseException:
        sock.close()
        raise


# ---------------------------------------------------------------- floods

class SilentFlood:
    """Keeps up to ``count`` silent connections from ``source`` (a loopback
    address of its own: loopback is the whole 127/8) to ``address`` open,
    opening a new one whenever the node closes one (at most ``rate`` opens
    a second), in a thread: the lock-out attack of issue 8."""

    def __init__(self, address, source="127.0.0.2", count=300, rate=2000):
        self.address, self.source, self.count, self.rate = address, source, count, rate
        self.opened = self.closed_by_node = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="silent-flood")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)

    def _open(self, sel):
        sock = socket.socket()
        sock.bind((self.source, 0))
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except BlockingIOError:
            pass
        sel.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self):
        sel = selectors.DefaultSelector()
        try:
            t0 = time.monotonic()
            while not self.stop.is_set():
                allowed = int((time.monotonic() - t0) * self.rate) + self.count
                while len(sel.get_map()) < self.count and self.opened < allowed:
                    self._open(sel)
                for key, _ in sel.select(0.01):
                    try:
                        data = key.fileobj.recv(4096)   # the challenge, then EOF
                    except OSError:
                        data = b""
                    if not data:
                        self.closed_by_node += 1
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()


def free_port_on(hosts):
    """A port number free for TCP and UDP on every address of ``hosts`` and
    on the loopback broadcast address (discovery tests bind nodes there)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        socks = []
        try:
            for host in (*hosts, "127.255.255.255"):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port")


def kill_once_ready(args, tmp_path, timeout):
    """Run the client program ``args`` (cwd ``tmp_path``) until it creates
    ``tmp_path/ready``, then SIGKILL it; its stderr goes to ``client.err``."""
    proc = subprocess.Popen(args, env=node_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "client.err", "wb"))
    try:
        poll_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, timeout,
                 message="the client to submit its jobs")
        assert proc.poll() is None, (tmp_path / "client.err").read_text()
    finally:
        proc.kill()
        proc.wait()


def memory_files(pid):
    """How many memory files (memfd) process pid holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return count


def fork_worker():
    """A dpool worker forked on one end of a socket pair: (its pid, a
    BlockingConnection on the other end), for tests that speak the node's
    side of the worker protocol themselves."""
    from dpool.transport.blocking import BlockingConnection

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            from dpool.node import worker

            worker.main(theirs.detach())
        finally:
            os._exit(99)
    theirs.close()
    return pid, BlockingConnection(ours)
