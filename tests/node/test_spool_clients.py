"""A dpool-node's memory files (issue 15, transport/spool.py) against its
clients: a Run whose large frame stops, turns to garbage, or comes from a
client that goes away mid-frame leaves no memory file (descriptor) behind
in the node."""
import os
import socket
import struct

import pytest

from dpool import protocol as P
from dpool.transport import spool
from helpers import authenticated_socket, memory_files, poll_for, start_node

pytestmark = pytest.mark.skipif(not spool.AVAILABLE, reason="no memfd_create/fallocate")

SIZE = 4 * spool.MIN_SPOOL


@pytest.fixture
def node(tmp_path, node_secret):
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret)
    yield node
    assert node.terminate() == 0, node.stderr()


@pytest.mark.parametrize("ending", ["close", "garbage", "reset"])
def test_a_run_cut_mid_frame_leaves_no_memory_file(node, node_secret, ending):
    frame0 = P.encode(P.Run, [P.run_item(1, 1, 1, 0)])
    for _ in range(3):
        sock = authenticated_socket(node.port, node_secret)
        with sock:
            sock.sendall(struct.pack("<IQQ", 2, len(frame0), SIZE) + frame0
                         + b"x" * (SIZE // 2))
            poll_for(lambda: memory_files(node.pid) == 1, 30,
                     message="the node to spool the frame")
            if ending == "garbage":
                sock.sock.sendall(os.urandom(4096))
            elif ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        poll_for(lambda: memory_files(node.pid) == 0, 30,
                 message="the node to close the memory file")
