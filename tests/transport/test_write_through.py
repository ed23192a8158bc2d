"""A lone message is written at once; the ones that follow it in the same
loop iteration are corked to its end (issue 13's round trip).  On the
default loop a callback marks the iteration's end; on dpool-node's loop
(``streams.new_event_loop``, a CountingSelector) the selector's count does,
and a callback is scheduled only for what waits."""
import asyncio
import socket

import pytest

from dpool.transport import wrap_socket
from dpool.transport.frames import FrameDecoder
from dpool.transport.streams import new_event_loop

pytestmark = pytest.mark.timeout(30)

LOOPS = pytest.mark.parametrize("factory", [None, new_event_loop], ids=["default", "counting"])


def run(main, factory):
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def waiting(sock):
    """The messages already in ``sock``'s receive buffer (no waiting)."""
    decoder, messages = FrameDecoder(), []
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return messages
        messages.extend(decoder.feed(data))


@LOOPS
def test_first_message_of_an_iteration_goes_out_at_once_the_rest_at_its_end(factory):
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

    run(main, factory)


@LOOPS
def test_a_write_error_closes_the_connection_later_not_inside_send(factory):
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

    run(main, factory)


@LOOPS
def test_what_the_socket_does_not_take_at_once_follows_and_order_is_kept(factory):
    async def main():
        ours, theirs = socket.socketpair()
        conn = await wrap_socket(ours)
        big = b"x" * (8 * 2**20)  # more than the socket buffer takes at once
        got = []
        try:
            conn.send([big])
            conn.send([b"after"])
            await asyncio.sleep(0)
            conn.send([b"later"])  # a new iteration, but behind what waits
            decoder = FrameDecoder()
            theirs.setblocking(False)
            while len(got) < 3:
                try:
                    data = theirs.recv(2**20)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    continue
                got.extend(decoder.feed(data))
        finally:
            conn.abort()
            await conn.wait_closed()
            theirs.close()
        assert [len(m[0]) for m in got] == [len(big), 5, 5]
        assert bytes(got[1][0]) == b"after" and bytes(got[2][0]) == b"later"

    run(main, factory)


@LOOPS
def test_write_records_seals_each_piece_at_once_in_order(factory):
    """``write_records`` (a relayed chunk, forward.py): what was written
    before goes first, each piece is sealed at once in records of its own
    (the receiver decrypts a chunk straight into its frame), and the
    caller's buffer may be reused as soon as it returns."""
    from dpool.transport.frames import header
    from dpool.transport.records import HEAD, TAG, SecureDecoder, Sealer

    key = b"k" * 32
    payload = bytes(range(256)) * 1000

    async def main():
        ours, theirs = socket.socketpair()
        conn = await wrap_socket(ours)
        conn._stream.set_sealer(Sealer(key))
        try:
            conn.send([b"first"])
            conn.send([b"second"])          # corked: still plaintext
            reused = bytearray(payload)
            conn.relay_records([header([reused]), memoryview(reused)])
            reused[:] = bytes(len(reused))  # the caller's buffer, reused at once
            conn.send([b"last"])
            wire, decoder, got = bytearray(), SecureDecoder(FrameDecoder(), key), []
            while len(got) < 4:
                await asyncio.sleep(0.01)
                try:
                    data = theirs.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                wire += data
                got += decoder.feed(data)
            assert [[bytes(f) for f in m] for m in got] == [[b"first"], [b"second"],
                                                            [payload], [b"last"]]
            sizes, pos = [], 0
            while pos < len(wire):
                size = int.from_bytes(wire[pos:pos + HEAD], "little")
                sizes.append(size - TAG)
                pos += HEAD + size
            assert len(payload) in sizes     # the piece in a record of its own
        finally:
            conn.abort()
            await conn.wait_closed()
            theirs.close()

    run(main, factory)


@LOOPS
def test_messages_corked_in_timer_and_threadsafe_callbacks_and_before_a_close_go_out(factory):
    """A write from a timer callback or a call_soon_threadsafe callback
    (not a reader's) is corked and flushed as any; what is corked when the
    connection closes goes out before the socket closes."""
    import threading

    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        conn = await wrap_socket(ours)
        done = asyncio.Event()

        def burst(*names):
            for name in names:
                conn.send([name])
            done.set()

        try:
            loop.call_later(0, burst, b"t1", b"t2")
            await done.wait()
            done.clear()
            thread = threading.Thread(
                target=lambda: loop.call_soon_threadsafe(burst, b"s1", b"s2"))
            thread.start()
            await done.wait()
            thread.join()
            burst(b"c1", b"c2")   # (the second corked) then a close
            conn.close()
            await conn.wait_closed()
            decoder, got = FrameDecoder(), []
            while data := theirs.recv(65536):
                got.extend(decoder.feed(data))
            assert [bytes(m[0]) for m in got] == [b"t1", b"t2", b"s1", b"s2", b"c1", b"c2"]
        finally:
            conn.abort()
            theirs.close()

    run(main, factory)
