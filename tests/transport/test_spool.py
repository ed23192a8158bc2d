"""Large frames in memory files between a node and its workers (issue 15):
transport/spool.py, frames.FILE_FLAG, descriptors over a Unix socket."""
import asyncio
import collections
import os
import socket
import struct
import threading

import pytest

from dpool.errors import ProtocolError
from dpool.transport import BlockingConnection, wrap_socket
from dpool.transport import spool
from dpool.transport.frames import BYTES_FLAG, FILE_FLAG, FrameDecoder, encode
from dpool.transport.records import Sealer, SecureDecoder

pytestmark = pytest.mark.skipif(not spool.AVAILABLE, reason="no memfd_create/fallocate")

SIZE = 3 * spool.MIN_SPOOL + 12345


def spooled_messages(*messages, spool_if=lambda first: first == b"RUN"):
    """The messages as a spooling decoder receives them."""
    dec = FrameDecoder()
    dec.spool = spool_if
    return dec.feed(b"".join(b"".join(encode(m)) for m in messages))


def test_large_frames_of_chosen_messages_go_to_memory_files():
    data = os.urandom(SIZE)
    run, other = spooled_messages([b"RUN", data, b"small"], [b"FUNC", data])
    assert type(run[1]) is spool.SpooledFrame and run[1].whole_bytes and len(run[1]) == SIZE
    assert run[0] == b"RUN" and run[2] == b"small"
    assert os.pread(run[1].fd, SIZE, 0) == data
    assert type(other[1]) is bytes and other[1] == data     # not a Run: in memory
    assert spool.SpooledFrame.live == 1
    del run
    assert spool.SpooledFrame.live == 0                     # its descriptor closed


def test_only_records_that_pass_authentication_reach_a_memory_file():
    """A node spools what it decrypts record by record: a changed record
    fails before its bytes are written, and the frame never completes."""
    key = os.urandom(32)
    sealer = Sealer(key)
    stream = b"".join(encode([b"RUN", os.urandom(SIZE)]))
    records = bytearray(b"".join(sealer.seal_all(collections.deque([stream]))))
    records[len(records) // 2] ^= 1
    dec = SecureDecoder(FrameDecoder(), key)
    dec.inner.spool = lambda first: True
    with pytest.raises(ProtocolError, match="authentication"):
        dec.feed(records)
    assert dec.inner.held < SIZE


def test_a_decoder_without_descriptors_refuses_file_frames():
    """A client can't make its node read a file: only the worker's side of
    the node-worker link takes frames in memory files."""
    for flags in (FILE_FLAG, FILE_FLAG | BYTES_FLAG):
        with pytest.raises(ProtocolError, match="memory file"):
            FrameDecoder().feed(struct.pack("<IQQ", 2, 3, SIZE | flags) + b"abc")


def test_a_file_frame_without_its_descriptor_is_refused():
    a, b = socket.socketpair()
    conn = BlockingConnection(b, fds=True)
    try:
        with a:
            a.sendall(struct.pack("<IQQ", 2, 3, SIZE | FILE_FLAG) + b"abc")
            with pytest.raises(ProtocolError, match="without its descriptor"):
                conn.recv()
    finally:
        conn.close()


async def _send_to_worker(messages, consume):
    a, b = socket.socketpair()
    conn = await wrap_socket(a, peer="worker")
    worker = BlockingConnection(b, fds=True)
    got = []
    thread = threading.Thread(target=lambda: got.extend(worker.recv() for _ in messages))
    thread.start()
    frames = [f for m in messages for f in m if type(f) is spool.SpooledFrame]
    for frame in frames:
        frame.consume = consume
    for message in messages:
        conn.send(message)
    while thread.is_alive():
        await asyncio.sleep(0.01)
    blocks = [os.fstat(f.fd).st_blocks for f in frames]
    conn.close()
    await conn.wait_closed()
    worker.close()
    return got, blocks


@pytest.mark.parametrize("consume", [False, True])
def test_a_worker_gets_spooled_frames_by_descriptor(consume):
    """Bytes come back as bytes, a bytearray's as a bytearray; with
    ``consume`` the worker frees the file's pages as it reads them (the
    node kept no copy), else it leaves them for the node to send again."""
    data = os.urandom(SIZE)
    first, second = spooled_messages([b"RUN", data, b"tail"],
                                     [b"RUN", memoryview(bytearray(data)), data[:10]])
    assert type(second[1]) is spool.SpooledFrame and not second[1].whole_bytes
    got, blocks = asyncio.run(_send_to_worker([first, second], consume))
    assert got[0] == [b"RUN", data, b"tail"] and type(got[0][1]) is bytes
    assert got[1] == [b"RUN", bytearray(data), data[:10]] and type(got[1][1]) is bytearray
    if consume:
        assert all(b * 512 <= 8192 for b in blocks)   # (a partial last page stays)
    else:
        assert all(b * 512 >= SIZE for b in blocks)


def test_descriptors_waiting_in_a_worker_are_not_inherited():
    """A message's descriptors arrive with its first bytes and may wait in the
    worker while the job before it runs: a process that job starts
    (os.system, Popen(close_fds=False)) must not inherit them."""
    a, b = socket.socketpair()
    conn = BlockingConnection(b, fds=True)
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    try:
        with a:   # the start of a message whose first frame is still on its way
            socket.send_fds(a, [struct.pack("<IQ", 1, 100) + b"abc"], [fd])
            assert not conn.poll(0.5) and len(conn._fds) == 1
            assert not os.get_inheritable(conn._fds[0])
    finally:
        os.close(fd)
        conn.close()
