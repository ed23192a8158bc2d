"""Shared fixtures: leak checks after every test, polling, isolated state."""
import os
import threading
import time

import psutil
import pytest


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


@pytest.fixture(autouse=True)
def dpool_home(tmp_path, monkeypatch):
    """Each test gets its own ~/.dpool (secret files) and no DPOOL_SECRET."""
    home = tmp_path / "dpool-home"
    monkeypatch.setenv("DPOOL_HOME", str(home))
    monkeypatch.delenv("DPOOL_SECRET", raising=False)
    monkeypatch.delenv("DPOOL_NODES", raising=False)
    return home


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
