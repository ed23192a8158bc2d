"""Review findings: transport, serialization and node daemon edge cases."""
import pytest

from dpool.errors import RemoteError
from dpool.serialize import OUT_OF_BAND_THRESHOLD, dump_exception, dumps, load_exception, loads

pytestmark = pytest.mark.timeout(30)

BIG = b"x" * (2 * OUT_OF_BAND_THRESHOLD)


def test_shared_list_holding_a_large_buffer_stays_shared():
    shared = [BIG]
    out = loads(dumps((shared, shared)))
    assert out == (shared, shared)
    assert out[0] is out[1]
    out = loads(dumps(((shared,), {"k": shared})))    # an (args, kwargs) pair
    assert out[0][0] is out[1]["k"]


def test_shared_list_seen_first_below_the_scan_depth_stays_shared():
    inner = [BIG]
    obj = [[inner], inner]
    out = loads(dumps(obj))
    assert out == obj and out[0][0] is out[1]


def test_recursive_list_holding_a_large_buffer_keeps_its_cycle():
    rec = [BIG]
    rec.append(rec)
    out = loads(dumps(rec))
    assert out[0] == BIG and out[1] is out


class Key:
    """Default repr: ``<... Key object at 0x...>``, different in every process."""


def test_exception_with_an_object_in_its_message_keeps_its_type():
    try:
        {}[Key()]
    except KeyError as exc:
        frames = dump_exception(exc)
    out = load_exception(frames)
    assert type(out) is KeyError and not isinstance(out, RemoteError)
    assert isinstance(out.args[0], Key)


def test_node_daemon_names_the_folder_it_cannot_write_not_the_port(tmp_path):
    import subprocess
    import sys

    from helpers_engine import node_env

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    home = not_a_folder / "home"      # the node can't make its secret folder here
    proc = subprocess.run([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                           "--cpus", "1"], env=node_env(None, DPOOL_HOME=str(home)),
                          capture_output=True, text=True, timeout=15)
    assert proc.returncode == 1
    assert "cannot listen" not in proc.stderr, proc.stderr
    assert str(home) in proc.stderr, proc.stderr


def test_blocking_eof_mid_message_seen_by_poll_is_reported_as_such():
    import socket

    from dpool.errors import ConnectionClosed
    from dpool.transport import BlockingConnection, encode

    a, b = socket.socketpair()
    conn = BlockingConnection(b)
    try:
        a.sendall(b"".join(bytes(p) for p in encode([b"hello"]))[:-2])
        a.close()
        assert conn.poll(2.0)          # end of stream: recv() won't block
        with pytest.raises(ConnectionClosed, match="middle of a message"):
            conn.recv()
    finally:
        conn.close()
