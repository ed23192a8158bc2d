"""The node-worker link holds a 1 MB frame in flight each way (issue 15:
one job's fixed costs at 1 MB), as far as the kernel allows."""
import socket

from dpool.node import zygote


def _cap():
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            return int(f.read())
    except OSError:
        return 0


def test_a_worker_link_is_made_with_large_send_buffers():
    pair = zygote._link_pair()
    try:
        want = min(zygote.LINK_BUFFER, _cap() or zygote.LINK_BUFFER)
        for sock in pair:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= want
        pair[0].sendall(b"x" * 1000)
        assert pair[1].recv(2000) == b"x" * 1000
    finally:
        for sock in pair:
            sock.close()
