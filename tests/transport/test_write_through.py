"""A lone message is written at once; the ones that follow it in the same
loop iteration are corked to its end (issue 13's round trip)."""
import asyncio
import socket

import pytest

from dpool.transport import wrap_socket
from dpool.transport.frames import FrameDecoder

pytestmark = pytest.mark.timeout(30)


def waiting(sock):
    """The messages already in ``sock``'s receive buffer (no waiting)."""
    decoder, messages = FrameDecoder(), []
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return messages
        messages.extend(decoder.feed(data))


def test_first_message_of_an_iteration_goes_out_at_once_the_rest_at_its_end():
    async def main():
        ours, theirs = socket.socketpair()
        conn = await wrap_socket(ours)
        try:
            conn.send([b"one"])
            assert [[bytes(f) for f in m] for m in waiting(theirs)] == [[b"one"]]
            conn.send([b"two"])
            conn.send([b"three"])
            assert waiting(theirs) == []  # corked until this iteration ends
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert [[bytes(f) for f in m] for m in waiting(theirs)] == [[b"two"], [b"three"]]
            await asyncio.sleep(0)
            conn.send([b"four"])  # a new iteration: at once again
            assert [[bytes(f) for f in m] for m in waiting(theirs)] == [[b"four"]]
        finally:
            conn.abort()
            await conn.wait_closed()
            theirs.close()

    asyncio.run(main())


def test_a_write_error_closes_the_connection_later_not_inside_send():
    async def main():
        ours, theirs = socket.socketpair()
        conn = await wrap_socket(ours)
        closed = []
        conn.set_receiver(lambda frames: None, lambda exc=None: closed.append(exc))
        theirs.close()
        conn.send([b"x" * 100])  # EPIPE: reported from the loop, not raised here
        assert closed == []
        await conn.wait_closed()
        assert len(closed) == 1

    asyncio.run(main())
