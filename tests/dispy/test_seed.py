"""examples/seed.py, dispy's classic example, run as a program.

The copy differs from the original in one place only: jobs sleep 0-1 s
instead of 5-10 s.  ``compute`` is defined in ``__main__`` there, so it
travels by value.
"""
import re
import subprocess
import sys

import pytest
from helpers import DEFAULT_PORT, REPO_ROOT, port_in_use, start_node


pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def seed(tmp_path):
    text = (REPO_ROOT / "examples" / "seed.py").read_text()
    assert text.count("random.randint(5,10)") == 1
    path = tmp_path / "seed.py"
    path.write_text(text.replace("random.randint(5,10)", "random.randint(0,1)"))
    return path


def run_seed(seed, env, cwd):
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(seed)], env=env, capture_output=True,
                          text=True, timeout=40, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " executed job " in line]
    assert len(lines) == 10, proc.stdout
    for n, line in enumerate(lines):
        match = re.fullmatch(r"(\S+) executed job (\d+) at ([\d.]+) with ([01])", line)
        assert match, line
        assert int(match.group(2)) == n
    assert re.search(r"Node\s+\|\s+CPUs\s+\|\s+Jobs\s+\|\s+Sec/Job\s+\|\s+Node Time Sec",
                     proc.stdout), proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("127.0.0.1")]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "10", proc.stdout
    assert "Total job time" in proc.stdout
    return proc


def test_seed_on_the_embedded_node(seed, tmp_path, dpool_home, monkeypatch):
    """No secret anywhere (empty DPOOL_HOME, no DPOOL_SECRET): the embedded node
    is used even if something listens on the default port."""
    import os

    env = dict(os.environ, DPOOL_HOME=str(tmp_path / "empty-home"))
    env.pop("DPOOL_SECRET", None)
    proc = run_seed(seed, env, tmp_path)
    assert "started an embedded local node" in proc.stderr, proc.stderr


def test_seed_on_a_dpool_node_at_the_default_port(seed, tmp_path, node_secret):
    import os

    if port_in_use(DEFAULT_PORT):
        pytest.skip(f"something listens on 127.0.0.1:{DEFAULT_PORT}")
    try:
        node = start_node(tmp_path / "node", port=DEFAULT_PORT, cpus=2, secret=node_secret)
    except AssertionError as exc:
        if "already in use" in str(exc):
            pytest.skip(f"127.0.0.1:{DEFAULT_PORT} was taken meanwhile")
        raise
    try:
        env = dict(os.environ, DPOOL_SECRET=node_secret.decode(),
                   DPOOL_HOME=str(tmp_path / "empty-home"))
        proc = run_seed(seed, env, tmp_path)
        assert f"using the dpool-node at 127.0.0.1:{DEFAULT_PORT}" in proc.stderr, proc.stderr
    finally:
        assert node.terminate() == 0
