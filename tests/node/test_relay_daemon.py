"""``dpool-relay`` on loopback: command line, secret, a node's pong passed on
to a named client, SIGTERM.  Across subnets (root): tests/cluster."""
import select
import signal
import socket
import subprocess
import sys

import pytest

import dpool
from dpool.transport import discovery as D
from helpers import node_env, poll_for

pytestmark = pytest.mark.timeout(30)
SECRET = b"relay daemon secret, 32 bytes..."
KEY = D.discovery_key(SECRET)


def relay_cmd(*args):
    return [sys.executable, "-m", "dpool.daemons.relay", *args]


def test_help():
    proc = subprocess.run(relay_cmd("--help"), env=node_env(None), capture_output=True,
                          text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    for option in ("--client", "--host", "--port", "--node-port", "--listen-port",
                   "--interval", "--secret-file", "--loglevel", "--logfile", "--version"):
        assert option in proc.stdout
    assert "DPOOL_SECRET" in proc.stdout and "51352" in proc.stdout and "51351" in proc.stdout
    assert "``" not in proc.stdout


def test_version():
    proc = subprocess.run(relay_cmd("--version"), env=node_env(None), capture_output=True,
                          text=True, timeout=15)
    assert proc.returncode == 0 and proc.stdout.startswith(f"dpool-relay {dpool.__version__} (")


@pytest.mark.parametrize("args,message", [
    ((), "needs the nodes' secret"),
    (("--client", "host:port"), "invalid node"),
    (("--client", "no-such-host.invalid"), "cannot resolve 'no-such-host.invalid'"),
    (("--client", "[::1]:51351"), "IPv6"),          # sent over IPv4: it never got there
    (("--interval", "0"), "not a positive number"),
])
def test_bad_use_is_refused_with_a_message(args, message):
    proc = subprocess.run(relay_cmd("--port", "0", "--listen-port", "0", *args),
                          env=node_env(None), capture_output=True, text=True, timeout=15)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def udp(address):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def recv(sock):
    poll_for(lambda: select.select([sock], [], [], 0)[0], message="a datagram")
    return sock.recvfrom(2048)


def test_a_nodes_pong_reaches_the_named_client_then_sigterm_stops_it(tmp_path):
    """A node (raw sockets: one on 127.255.255.255 hears the relay's broadcast
    ping, one on 127.0.0.1 answers) is announced to the --client."""
    hear = udp(("127.255.255.255", 0))
    node_port = hear.getsockname()[1]
    answer, client = udp(("127.0.0.1", 0)), udp(("127.0.0.1", 0))
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    args = ["--host", "127.0.0.1", "--port", "0", "--listen-port", "0", "--node-port",
            str(node_port), "--client", "127.0.0.1:%d" % client.getsockname()[1],
            "--secret-file", str(secret_file), "--interval", "60"]
    proc = subprocess.Popen(relay_cmd(*args), env=node_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("dpool-relay: relaying on UDP 127.0.0.1:"), first
        assert f"(pid {proc.pid})" in first
        ping, relay_addr = recv(hear)
        msg = D.Verifier(KEY).check(ping)
        assert msg.kind == D.PING
        body = D.node_body("n1", 4242, 2, 1, ["127.0.0.1"], 2)
        answer.sendto(D.reply(KEY, msg, body), relay_addr)
        data, _ = recv(client)
        got = D.Verifier(KEY).check(data)
        assert got.kind == D.ANNOUNCE and got.body["name"] == "n1"
        assert got.body["port"] == 4242 and got.body["addrs"] == ["127.0.0.1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "1 announcements forwarded" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
        for sock in (hear, answer, client):
            sock.close()
