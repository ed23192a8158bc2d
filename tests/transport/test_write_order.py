"""Write-through (f4a51c1) keeps the order of messages: the first of a loop
iteration written at once, partly or wholly, the rest corked, over a socket
whose buffers are small enough for partial sends."""
import asyncio
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpool.transport import wrap_socket
from dpool.transport.frames import FrameDecoder

pytestmark = pytest.mark.timeout(120)


def read_all(sock, count, out):
    decoder = FrameDecoder()
    while len(out) < count:
        data = sock.recv(1 << 16)
        if not data:
            return
        out.extend(bytes(m[0]) for m in decoder.feed(data))


steps = st.lists(st.tuples(st.sampled_from([1, 10, 3000, 40_000, 200_000]), st.booleans()),
                 min_size=1, max_size=30)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps)
def test_messages_arrive_in_the_order_sent(plan):
    sent = [bytes([i % 251]) * size for i, (size, _) in enumerate(plan)]

    async def main():
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        got = []
        reader = threading.Thread(target=read_all, args=(theirs, len(sent), got))
        reader.start()
        conn = await wrap_socket(ours)
        try:
            for message, (_, next_iteration) in zip(sent, plan):
                conn.send([message])
                if next_iteration:
                    await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, reader.join)
        finally:
            conn.abort()
            await conn.wait_closed()
            theirs.close()
        return got

    assert asyncio.run(main()) == sent
