"""The fixtures every component's tests share: isolated state, the leak
check after every test, ``dpool-node`` subprocesses.

Helpers (polling, NodeProcess, ...) are in helpers.py and task functions in
tasks.py: import those by name; never import this module (each component
folder may have its own conftest.py, and they all are ``conftest``)."""
import os
import secrets
import signal
import threading
import time
import warnings

import psutil
import pytest

from helpers import start_node


@pytest.fixture(autouse=True)
def dpool_home(tmp_path, monkeypatch):
    """Each test gets its own ~/.dpool (secret files) and no DPOOL_SECRET."""
    home = tmp_path / "dpool-home"
    monkeypatch.setenv("DPOOL_HOME", str(home))
    monkeypatch.delenv("DPOOL_SECRET", raising=False)
    monkeypatch.delenv("DPOOL_NODES", raising=False)
    return home


@pytest.fixture
def node_secret():
    return ("test-" + secrets.token_hex(8)).encode()


def _serve(workdir, cpus, secret):
    yield from _serve_node(start_node(workdir, cpus=cpus, secret=secret))


def _serve_node(node):
    yield node
    code = node.terminate()
    assert code == 0, f"dpool-node exited with {code}: {node.stderr()}"


@pytest.fixture
def dpool_node(tmp_path, node_secret):
    """A dpool-node subprocess with 2 CPUs and a secret, on a free port."""
    yield from _serve(tmp_path / "node", 2, node_secret)


@pytest.fixture
def pki(tmp_path):
    """A CA (trustme), a node certificate for 127.0.0.1/localhost signed by
    it, a client certificate, and another CA's certificate: paths."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "node", "client", "other_ca")}
    ca.cert_pem.write_to_path(paths["ca"])
    node = ca.issue_cert("127.0.0.1", "localhost")
    node.private_key_and_cert_chain_pem.write_to_path(paths["node"])
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(paths["client"])
    trustme.CA().cert_pem.write_to_path(paths["other_ca"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def tls_node(tmp_path, pki, node_secret):
    """A dpool-node (1 CPU) that speaks TLS and requires client certificates."""
    yield from _serve_node(start_node(tmp_path / "tls-node", cpus=1, secret=node_secret,
                                      args=("--certfile", pki["node"], "--cafile", pki["ca"])))


@pytest.fixture
def node1(tmp_path, node_secret):
    """A dpool-node subprocess with 1 CPU and a secret."""
    yield from _serve(tmp_path / "node1", 1, node_secret)


def _snapshot():
    proc = psutil.Process()
    return ({t.ident for t in threading.enumerate()},
            {p.pid for p in proc.children(recursive=True)},
            proc.num_fds())


def _alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_SESSION_PID = os.getpid()
_WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


@pytest.fixture(autouse=True)
def signal_handlers_kept(request):
    """After each test: the signal handlers it found, in the process that
    started the session.  A full CI run (bytecode cached, load ~5) once found
    SIGINT ignored (SIG_IGN, as dpool's zygote sets it) from some test on,
    failing every later test that sends itself a SIGINT; which test set it
    did not show.  A changed handler is put back and named in a warning."""
    before = {sig: signal.getsignal(sig) for sig in _WATCHED_SIGNALS}
    yield
    assert os.getpid() == _SESSION_PID, "a forked child returned into the test session"
    for sig, handler in before.items():
        now = signal.getsignal(sig)
        if now is not handler:
            signal.signal(sig, handler)
            warnings.warn(f"{request.node.nodeid} left {sig!r} with {now!r} "
                          f"(was {handler!r}): put back", stacklevel=2)


@pytest.fixture(autouse=True)
def no_leaks(request):
    """After each test: no new threads, child processes or file descriptors."""
    threads, children, fds = _snapshot()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    proc = psutil.Process()

    def clean():
        now_threads, now_children, now_fds = _snapshot()
        extra_threads = [t for t in threading.enumerate()
                         if t.ident not in threads and t.is_alive()]
        extra_children = [p for p in proc.children(recursive=True)
                          if p.pid not in children and _alive(p)]
        return not extra_threads and not extra_children and now_fds <= fds, \
            (extra_threads, extra_children, now_fds - fds)

    deadline = time.monotonic() + 10
    while True:
        ok, detail = clean()
        if ok:
            return
        if time.monotonic() > deadline:
            threads_left, children_left, fds_left = detail
            for child in children_left:
                try:
                    child.kill()
                except psutil.Error:
                    pass
            pytest.fail(f"test leaked threads={[t.name for t in threads_left]} "
                        f"processes={[c.pid for c in children_left]} fds=+{fds_left}")
        time.sleep(0.02)


def pytest_runtest_setup(item):
    """Tests marked ``root`` need root (network namespaces): outside CI they
    are skipped without it; in CI (CI=true) a missing privilege is a failure."""
    if item.get_closest_marker("root") and os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("this test needs root, and CI must run it as root")
        pytest.skip("needs root (network namespaces)")
