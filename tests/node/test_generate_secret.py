"""``dpool-node --generate-secret``: a strong secret, printed or in a new 0600 file."""
import os
import stat
import subprocess
import sys

import pytest

import dpool
from helpers import node_env, start_node
from tasks import double

pytestmark = pytest.mark.timeout(60)


def generate(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpool.daemons.node", "--generate-secret",
                           *args], env=node_env(None), capture_output=True, text=True,
                          timeout=15, cwd=cwd)


def test_prints_a_new_strong_secret_each_time():
    first, second = generate(), generate()
    assert first.returncode == second.returncode == 0, first.stderr
    a, b = first.stdout.strip(), second.stdout.strip()
    assert a != b and len(a) >= 43 and "\n" not in a       # 256 bits, URL-safe base64
    assert set(a) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_writes_a_new_private_file_a_node_and_clients_use(tmp_path):
    path = tmp_path / "cluster.secret"
    proc = generate("--secret-file", str(path))
    assert proc.returncode == 0, proc.stderr
    assert str(path) in proc.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = path.read_bytes().strip()
    assert len(secret) >= 43 and secret.decode() not in proc.stdout
    again = generate("--secret-file", str(path))        # never overwritten
    assert again.returncode != 0 and "never overwritten" in again.stderr
    assert path.read_bytes().strip() == secret
    node = start_node(tmp_path / "node", cpus=1, args=("--secret-file", str(path)))
    try:
        with dpool.JobCluster(double, nodes=[node.address], secret=secret.decode(),
                              loglevel=None) as cluster:
            assert cluster.submit(4)(timeout=10) == 8
    finally:
        assert node.terminate() == 0
