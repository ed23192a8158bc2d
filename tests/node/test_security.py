"""A dpool-node facing hostile or broken peers: nothing is unpickled before
authentication, bad peers lose only their own connection, limits hold."""
import asyncio
import os
import pickle
import socket
import struct
import subprocess
import sys
import time

import psutil
import pytest

import dpool
from dpool import protocol as P
from dpool.node.server import NodeServer
from dpool.errors import AuthenticationError, BrokenCluster
from dpool.transport import auth, connect
from dpool.transport.frames import encode as encode_frames
from helpers import (SystemOnUnpickle, authenticated_socket, cluster_on, node_env, poll_for,
                     read_marker, recv_until_closed)
from tasks import double, hold

pytestmark = pytest.mark.timeout(30)


def still_serves(node):
    assert node.proc.poll() is None, node.stderr()
    with cluster_on(node, double) as cluster:
        assert [cluster.submit(i)(timeout=10) for i in range(3)] == [0, 2, 4]


class _Open:
    """Unpickling this creates ``path`` with ``open(path, "w")``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def evil_pickles(marker):
    return [pickle.dumps(SystemOnUnpickle(f"touch {marker}-system")),
            pickle.dumps(_Open(f"{marker}-open"), protocol=2)]


def test_the_evil_pickles_are_live(tmp_path):
    """Self-check: unpickled here, each payload does create its marker."""
    marker = str(tmp_path / "pwned")
    for payload in evil_pickles(marker):
        result = pickle.loads(payload)
        if hasattr(result, "close"):
            result.close()
    assert sorted(os.listdir(tmp_path)) == ["pwned-open", "pwned-system"]


FRAMINGS = {
    "raw": lambda p: p,
    "frame": lambda p: b"".join(encode_frames([p])),
    "op-header": lambda p: b"".join(encode_frames([P.encode(P.Run, [P.run_item(1, 1, 1, 0)]), p])),
    "fake-magic": lambda p: auth.MAGIC + p,
    # a well-formed but wrong response, then a frame: the frame must never be read
    "bad-response-then-frame": lambda p: (auth.MAGIC + b"\0" * (auth.NONCE_SIZE + auth.DIGEST_SIZE)
                                          + b"".join(encode_frames([p]))),
    "oversized": lambda p: p * (1 + 4096 // len(p)),
}


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_unauthenticated_pickles_never_run(dpool_node, tmp_path, framing):
    marker = str(tmp_path / "pwned")
    for payload in evil_pickles(marker):
        with socket.create_connection(dpool_node.address, timeout=5) as sock:
            challenge = sock.recv(auth.CHALLENGE_SIZE)
            assert challenge.startswith(auth.MAGIC)
            try:
                sock.sendall(FRAMINGS[framing](payload))
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the node dropped us first
                pass
            reply = recv_until_closed(sock)
            # (the node proves first: its proof may come before the FAIL)
            assert reply[auth.PROOF_SIZE:] in (b"", auth.FAIL), reply  # never an OK
    # (the first rejection is logged at once, the second in a summary line later)
    poll_for(lambda: "rejected connection from 127.0.0.1" in dpool_node.stderr(),
             5, message="the node to log the rejections")
    still_serves(dpool_node)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("pwned")]


def test_wrong_secret_is_rejected_and_the_node_serves_others(dpool_node):
    with pytest.raises(BrokenCluster) as info:
        cluster_on(dpool_node, double, secret="not the secret")
    message = str(info.value)
    assert "secret" in message and f"127.0.0.1:{dpool_node.port}" in message
    assert isinstance(info.value.__context__, AuthenticationError) or "authentication" in message

    async def raw_connect():
        await connect("127.0.0.1", dpool_node.port, secret=b"wrong", hello={}, timeout=5)
    with pytest.raises(AuthenticationError, match="secret"):
        asyncio.run(raw_connect())
    poll_for(lambda: "AuthenticationError" in dpool_node.stderr(), 5,
             message="the node to log the failed authentication")
    still_serves(dpool_node)


GARBAGE = {
    "not-a-pickle": [b"\x00\x01 this is not a pickle"],
    "unknown-op": [pickle.dumps((99, "what"))],
    "wrong-shape": [pickle.dumps((int(P.Op.RUN), "what", "more"))],
    "not-a-tuple": [pickle.dumps(5)],
    "no-frames": [],
    "truncated-pickle": [P.encode(P.Run, [P.run_item(1, 1, 1, 0)])[:-3]],
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_after_auth_closes_only_that_session(dpool_node, tmp_path, kind):
    marker, gate = str(tmp_path / "marker"), str(tmp_path / "gate")
    with cluster_on(dpool_node, hold) as cluster:
        job = cluster.submit(marker, gate)
        (pid,), _ = read_marker(marker)
        with authenticated_socket(dpool_node.port, dpool_node.secret) as sock:
            sock.sendall(b"".join(encode_frames(GARBAGE[kind])))
            recv_until_closed(sock)
        open(gate, "w").close()
        assert job(timeout=10) == pid
        assert cluster.submit(marker + "2", gate)(timeout=10) > 0
    poll_for(lambda: "bad message" in dpool_node.stderr(), 5, message="the node to log it")
    still_serves(dpool_node)


@pytest.mark.parametrize("header", [
    struct.pack("<IQ", 1, 1 << 50),                  # one frame of a petabyte
    # each under the frame limit, not their sum:
    struct.pack("<IQQQ", 3, 3 << 30, 3 << 30, 3 << 30),
    struct.pack("<I", 0xFFFFFFFF),                   # four billion frames
], ids=["huge-frame", "huge-message", "huge-count"])
def test_oversized_declared_length_after_auth(dpool_node, header):
    node = psutil.Process(dpool_node.pid)
    before = node.memory_info().rss
    with authenticated_socket(dpool_node.port, dpool_node.secret) as sock:
        sock.sendall(header)
        recv_until_closed(sock)
    assert node.memory_info().rss - before < 50 * 2**20
    poll_for(lambda: "over the limit" in dpool_node.stderr(), 5, message="the node to log it")
    still_serves(dpool_node)


def test_silent_peer_is_dropped_after_the_auth_deadline(dpool_node):
    with socket.create_connection(dpool_node.address, timeout=5) as silent:
        t0 = time.monotonic()
        assert silent.recv(auth.CHALLENGE_SIZE).startswith(auth.MAGIC)
        still_serves(dpool_node)  # served while the silent peer hangs on
        recv_until_closed(silent, timeout=12)
        elapsed = time.monotonic() - t0
    assert 1 < elapsed < 12
    poll_for(lambda: "no authentication within" in dpool_node.stderr(), 5,
             message="the node to log the timeout")
    still_serves(dpool_node)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_non_loopback_without_secret_refuses_to_start(tmp_path, host):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dpool.daemons.node", "--host", host,
                           "--port", "0", "--cpus", "1"], env=node_env(None),
                          capture_output=True, text=True, timeout=15, cwd=tmp_path)
    assert time.monotonic() - t0 < 10
    assert proc.returncode != 0
    assert "DPOOL_SECRET" in proc.stderr and "--secret-file" in proc.stderr
    assert host in proc.stderr
    assert "serving" not in proc.stdout


def test_empty_secret_file_refuses_to_start(tmp_path):
    empty = tmp_path / "secret"
    empty.write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                           "--secret-file", str(empty)], env=node_env(None),
                          capture_output=True, text=True, timeout=15, cwd=tmp_path)
    assert proc.returncode != 0
    assert "secret" in proc.stderr and "empty" in proc.stderr


def test_node_server_refuses_non_loopback_without_secret():
    async def main():
        server = NodeServer("0.0.0.0", 0, cpus=1)
        try:
            with pytest.raises(ValueError, match="secret"):
                await server.start()
            assert server.server is None  # never bound
        finally:
            await server.close()
    asyncio.run(main())


def test_a_remote_client_cannot_choose_the_job_folder(dpool_node, tmp_path):
    """The 'cwd' session option is for the client's own embedded node only."""
    from dpool.core.client import Client

    client = Client([dpool_node.address], secret=dpool_node.secret,
                    session={"cwd": str(tmp_path)}, connect_timeout=5)
    with pytest.raises(BrokenCluster, match="only for embedded nodes"):
        client.start()
    # The node still serves a well-behaved client.
    with dpool.JobCluster(abs, nodes=[dpool_node.address], secret=dpool_node.secret,
                          loglevel=None) as cluster:
        assert cluster.submit(-3)(timeout=10) == 3
