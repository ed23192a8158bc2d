"""Issue 8, finding 6: files a node writes for clients, its job root, and
the client's recover file."""
import os
import stat
import subprocess
import sys

import pytest

import dpool as dispy
from helpers import cluster_on, node_env, start_node

pytestmark = pytest.mark.timeout(60)

OTHER_UID = 4242    # we are root: folders can be given to someone else


def modes(*names):
    """Job: the permission bits of files in the job folder."""
    import os
    import stat

    return [stat.S_IMODE(os.stat(name).st_mode) for name in names]


def job_root():
    """Job: (owner, mode) of the folder the job folder is in."""
    import os
    import stat

    st = os.stat(os.path.dirname(os.getcwd()))
    return st.st_uid, stat.S_IMODE(st.st_mode)


def test_sent_files_are_never_world_writable_or_set_id(dpool_node, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("dep.bin", "per-job.bin", "sent.bin"):
        (tmp_path / name).write_bytes(b"data")
        os.chmod(tmp_path / name, 0o7777)
    with cluster_on(dpool_node, modes, loglevel=None, depends=["dep.bin"]) as cluster:
        assert cluster.send_file("sent.bin", cluster.status().nodes[0]) == 0
        job = cluster.submit("dep.bin", "per-job.bin", "sent.bin",
                             dispy_job_depends=["per-job.bin"])
        result = job(timeout=10)
        assert result is not None, job.exception
    for mode in result:
        assert mode & (stat.S_IWOTH | stat.S_IWGRP | stat.S_ISUID | stat.S_ISGID
                       | stat.S_ISVTX) == 0, oct(mode)
        assert mode & 0o700 == 0o700, oct(mode)     # the owner's bits are kept


def test_the_default_job_root_is_private(dpool_node):
    with cluster_on(dpool_node, job_root, loglevel=None) as cluster:
        uid, mode = cluster.submit()(timeout=10)
    assert uid == os.getuid() and mode == 0o700, oct(mode)


def test_a_job_root_owned_by_someone_else_is_refused(tmp_path):
    root = tmp_path / "jobs"
    root.mkdir(mode=0o777)
    os.chown(root, OTHER_UID, OTHER_UID)
    proc = subprocess.run([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                           "--cpus", "1", "--dest-path", str(root)],
                          env=node_env(b"secret"), capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode != 0
    assert str(root) in proc.stderr and "owned by uid 4242" in proc.stderr, proc.stderr
    assert "serving" not in proc.stdout


def test_an_own_job_root_is_made_private(tmp_path, node_secret):
    root = tmp_path / "jobs"
    root.mkdir()
    os.chmod(root, 0o777)
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret,
                      args=("--dest-path", str(root)))
    try:
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    finally:
        assert node.terminate() == 0


def test_a_dest_path_folder_owned_by_someone_else_is_refused(tmp_path, node_secret):
    root = tmp_path / "jobs"
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret,
                      args=("--dest-path", str(root)))
    try:
        planted = root / "shared"
        planted.mkdir()
        os.chown(planted, OTHER_UID, OTHER_UID)
        with pytest.raises(dispy.BrokenCluster, match="owned by uid 4242"):
            cluster_on(node, modes, loglevel=None, dest_path="shared")
    finally:
        assert node.terminate() == 0


# ------------------------------------------------------------ the recover file

def test_recover_file_is_created_exclusively_and_private(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0)
    try:
        existing = tmp_path / "_dispy_existing"
        existing.write_text("someone's data\n")
        os.chmod(existing, 0o644)
        with pytest.raises(FileExistsError, match="recover file"):
            dispy.JobCluster(abs, recover_file=str(existing), loglevel=None)
        assert existing.read_text() == "someone's data\n"

        target = tmp_path / "target"
        target.write_text("precious\n")
        link = tmp_path / "_dispy_link"
        link.symlink_to(target)
        with pytest.raises(FileExistsError):
            dispy.JobCluster(abs, recover_file=str(link), loglevel=None)
        assert target.read_text() == "precious\n"

        fresh = tmp_path / "_dispy_fresh"
        with dispy.JobCluster(abs, recover_file=str(fresh), loglevel=None) as cluster:
            assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
            assert cluster.submit(-1)(timeout=10) == 1
    finally:
        os.umask(old)


def test_default_recover_file_name_is_unpredictable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clusters = [dispy.JobCluster(abs, recover_file=True, loglevel=None) for _ in range(2)]
    try:
        names = sorted(n for n in os.listdir(tmp_path) if n != "dpool-home")
    finally:
        for cluster in clusters:
            cluster.close()
    assert len(names) == 2 and all(name.startswith("_dispy_") for name in names), names
    for name in names:
        random_part = name.rsplit("_", 1)[1]
        assert len(random_part) >= 16, name    # >= 64 random bits


def test_a_loopback_nodes_secret_file_never_follows_a_link(tmp_path, monkeypatch):
    """A loopback node with no secret leaves its secret in the dpool home
    (``<home>/node-<port>.secret``) through a temporary file named after its
    pid: a link or a readable file planted there beforehand must be neither
    written through nor kept (its mode would be kept, secret and all)."""
    from dpool import config

    monkeypatch.setenv(config.HOME_ENV, str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    tmp = f"{config.local_secret_path(4000)}.{os.getpid()}.tmp"
    os.symlink(victim, tmp)
    path = config.write_local_secret(4000, b"s" * 32)
    assert victim.read_bytes() == b"precious", "the secret was written through a link"
    assert config.read_secret_file(path) == b"s" * 32
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    os.unlink(path)
    with open(tmp, "wb"):
        pass
    os.chmod(tmp, 0o644)                               # a readable file planted there
    path = config.write_local_secret(4000, b"t" * 32)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert config.read_secret_file(path) == b"t" * 32


@pytest.mark.root
def test_a_dpool_home_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    """The dpool home holds loopback nodes' secrets: whoever owns the folder
    can swap a node's secret file for one of their own, and a local client
    would then authenticate a rogue node listening on that port (which can
    run code on the client through results).  ``DPOOL_HOME`` in a shared
    folder someone else created beforehand must be refused, as a job root is."""
    from dpool import config

    home = tmp_path / "shared-home"
    home.mkdir(mode=0o777)
    os.chown(home, OTHER_UID, OTHER_UID)
    monkeypatch.setenv(config.HOME_ENV, str(home))
    with pytest.raises(PermissionError, match=f"owned by uid {OTHER_UID}"):
        config.write_local_secret(4000, b"s" * 32)
    with pytest.raises(PermissionError, match=f"owned by uid {OTHER_UID}"):
        config.find_local_secret(4000)
    assert not list(home.iterdir())
    own = tmp_path / "own-home"
    own.mkdir(mode=0o777)
    os.chmod(own, 0o777)                       # ours, but anyone could plant files there
    monkeypatch.setenv(config.HOME_ENV, str(own))
    config.write_local_secret(4000, b"s" * 32)
    assert stat.S_IMODE(own.stat().st_mode) & 0o022 == 0
