"""Shared helpers for the engine tests: a ``dpool-node`` subprocess fixture,
raw-socket clients, and small job functions.

The job functions live here (a module importable by the workers: the node
subprocess gets this folder on its PYTHONPATH, an embedded node inherits the
client's ``sys.path``), so they are pickled by reference and cheap to load.
They take the paths of marker files as arguments: a job that must be
"running" creates a file the test polls for; a job that must wait does so
until the test creates a "gate" file.
"""
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import poll_for

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
DEFAULT_PORT = 51350


# ---------------------------------------------------------------- job functions

def double(x):
    return 2 * x


def getpid(_=None):
    return os.getpid()


def echo_outputs(n):
    print(f"stdout of job {n}")
    print(f"stderr of job {n}", file=sys.stderr)
    return n


def nap(seconds, value=None):
    time.sleep(seconds)
    return value


def fails(n):
    raise ValueError(f"boom-{n}")


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


def write_file(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # the test never sees a half-written file


def hold(marker, gate=None, child=False, timeout=60.0):
    """Write "pid [child-pid] cwd" to ``marker``, then wait for ``gate`` to
    exist (forever if None, up to ``timeout`` s); return the pid."""
    pids = [str(os.getpid())]
    if child:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        pids.append(str(proc.pid))
    write_file(marker, " ".join(pids) + "\n" + os.getcwd())
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if gate is not None and os.path.exists(gate):
                return os.getpid()
            time.sleep(0.01)
        raise TimeoutError("the gate was never opened")
    finally:
        if child:
            proc.kill()
            proc.wait()


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

    def __init__(self, workdir, port=0, cpus=2, secret=None, args=(), env=None):
        self.secret = secret
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.workdir / "node.out"
        self.err_path = self.workdir / "node.err"
        cmd = [sys.executable, "-m", "dpool.daemons.node", "--port", str(port),
               "--cpus", str(cpus), *args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=env or node_env(secret), cwd=self.workdir)
        self.pid = self.proc.pid
        self.port = None
        self.cpus = None

    def wait_serving(self, timeout=15.0):
        """Parse "dpool-node: serving N CPUs on HOST:PORT (pid P)"."""
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

    def terminate(self, timeout=10.0):
        """SIGTERM; return the exit code (kill and fail if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"dpool-node did not exit within {timeout}s of SIGTERM")

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


@pytest.fixture
def node_secret():
    return ("test-" + secrets.token_hex(8)).encode()


@pytest.fixture
def dpool_node(tmp_path, node_secret):
    """A dpool-node subprocess with 2 CPUs and a secret, on a free port."""
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret)
    yield node
    code = node.terminate()
    assert code == 0, f"dpool-node exited with {code}: {node.stderr()}"


@pytest.fixture
def node1(tmp_path, node_secret):
    """A dpool-node subprocess with 1 CPU and a secret."""
    node = start_node(tmp_path / "node1", cpus=1, secret=node_secret)
    yield node
    code = node.terminate()
    assert code == 0, f"dpool-node exited with {code}: {node.stderr()}"


def port_in_use(port, host="127.0.0.1"):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


# ---------------------------------------------------------------- raw clients

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
            raise AssertionError(f"the peer did not close the connection within {timeout}s")
        if not chunk:
            return data
        data += chunk


def authenticated_socket(port, secret, timeout=5.0):
    """A blocking socket that has passed the handshake (steps 1-7 of
    :mod:`dpool.transport.auth`) with a node, using its pure functions."""
    from dpool.transport import PROTOCOL_VERSION, auth
    from dpool.transport.frames import FrameDecoder, encode

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
        nonce_s, nonce_c, response = auth.answer_challenge(secret, read(auth.CHALLENGE_SIZE))
        sock.sendall(response)
        auth.check_status(read(1))
        auth.verify_proof(secret, nonce_s, nonce_c, read(auth.PROOF_SIZE))
        sock.sendall(b"".join(encode([auth.encode_hello({"protocol": PROTOCOL_VERSION,
                                                          "role": "client"})])))
        decoder = FrameDecoder()
        messages = []
        while not messages:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the hello")
            messages = decoder.feed(chunk)
        hello = auth.decode_hello(messages[0], "node")
        assert hello["role"] == "node"
        return sock
    except BaseException:
        sock.close()
        raise


@pytest.fixture(scope="module")
def remote_node(tmp_path_factory):
    """A dpool-node subprocess (2 CPUs, a fixed secret) shared by a module's tests."""
    node = start_node(tmp_path_factory.mktemp("node"), cpus=2, secret=b"conformance-secret")
    yield node
    node.terminate()
