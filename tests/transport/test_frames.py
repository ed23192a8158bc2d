"""Pure tests of the wire format and the handshake steps (no I/O)."""
import array
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpool.errors import ProtocolError, VersionMismatch
from dpool.transport import FrameDecoder, Limits, encode, header
from dpool.transport import auth
from dpool.transport.blocking import sendmsg_all
from dpool.transport import inplace
from dpool.transport.frames import BYTES_FLAG, LARGE, RECV_BUFFER_SIZE, STREAM_FLAG


def wire(messages):
    return b"".join(bytes(p) for m in messages for p in encode(m))


def as_bytes(messages):
    return [[bytes(f) for f in m] for m in messages]


# -- encode/header ---------------------------------------------------------------

def test_header_layout():
    assert header([]) == struct.pack("<I", 0)
    assert header([b"ab", bytearray(5)]) == struct.pack("<IQQ", 2, 2, 5)
    doubles = memoryview(array.array("d", [1.0, 2.0, 3.0]))
    assert header([doubles]) == struct.pack("<IQ", 1, 24)


def test_encode_keeps_large_frames_by_reference():
    big = bytearray(1 << 20)
    parts = encode([b"small", big, b"tail"])
    assert any(isinstance(p, memoryview) and p.obj is big for p in parts)
    assert sum(len(p) for p in parts) == len(header([b"small", big, b"tail"])) + 5 + len(big) + 4
    assert all(len(p) for p in parts)


def test_encode_small_message_is_one_buffer():
    assert encode([b"a", b"bc"]) == [header([b"a", b"bc"]) + b"abc"]
    assert encode([]) == [struct.pack("<I", 0)]


def test_non_byte_formats_are_flattened():
    doubles = array.array("d", range(10000))
    [msg] = FrameDecoder().feed(wire([[memoryview(doubles)]]))
    assert bytes(msg[0]) == doubles.tobytes()


# -- decoder ---------------------------------------------------------------------------

def test_decode_mixed_sizes_and_types():
    big = bytes(range(256)) * 1000
    messages = [[], [b""], [b"x"], [big], [b"a", big, b"b", b""], [b"q"] * 100]
    out = FrameDecoder().feed(wire(messages))
    assert as_bytes(out) == messages
    assert isinstance(out[3][0], bytes if inplace.AVAILABLE else bytearray)  # large bytes
    assert isinstance(out[2][0], bytes)
    [[frame]] = FrameDecoder().feed(wire([[bytearray(big)]]))
    assert type(frame) is bytearray and frame == big   # large, not bytes: its own buffer


def test_header_flags_large_whole_bytes_frames():
    """A large frame that is a whole ``bytes`` object (or a view of all of one)
    is flagged, so the receiver can rebuild it as ``bytes`` without a copy."""
    big = b"b" * LARGE
    flagged = len(big) | BYTES_FLAG
    assert header([big]) == struct.pack("<IQ", 1, flagged)
    assert header([memoryview(big)]) == struct.pack("<IQ", 1, flagged)
    assert header([memoryview(big)[1:]]) == struct.pack("<IQ", 1, len(big) - 1)
    assert header([bytearray(big), b"x" * 10]) == struct.pack("<IQQ", 2, len(big), 10)


@pytest.mark.skipif(not inplace.AVAILABLE, reason="bytes filled in place: CPython only")
@pytest.mark.parametrize("chunk", [1, 1000, 65536, 1 << 20])
def test_bytes_frame_is_received_as_bytes_in_any_split(chunk):
    big = bytes(range(256)) * 3000
    data = wire([[b"head", big, bytearray(big), b"tail"]])
    dec, out = FrameDecoder(), []
    for i in range(0, len(data), chunk):
        out += dec.feed(data[i:i + chunk])
    [[head, frame, other, tail]] = out
    assert type(frame) is bytes and frame == big and hash(frame) == hash(big)
    assert type(other) is bytearray and other == big
    assert (head, tail) == (b"head", b"tail") and not dec.partial and dec.held == 0


@pytest.mark.skipif(not inplace.AVAILABLE, reason="bytes filled in place: CPython only")
def test_growing_bytes_frees_an_unfinished_frame():
    import tracemalloc
    data = bytearray(b"q" * (4 << 20))
    address, holder = inplace.address_of(data)
    tracemalloc.start()
    try:
        grown = inplace.GrowingBytes(10 << 20)
        grown.extend(address, len(data))
        assert len(grown) == 4 << 20
        assert tracemalloc.get_traced_memory()[0] >= 4 << 20
        with pytest.raises(ValueError, match="of its"):
            grown.finish()
        with pytest.raises(ValueError, match="do not fit"):
            grown.extend(address, 7 << 20)
        del grown
        assert tracemalloc.get_traced_memory()[0] < 1 << 20
    finally:
        tracemalloc.stop()


def test_large_frame_grows_as_its_bytes_arrive():
    """A declared length allocates nothing: the frame's buffer holds what has
    arrived, read through the reusable buffer (issue 8, finding 4)."""
    payload = bytes(range(256)) * 4096              # 1 MiB
    data = wire([[payload]])
    dec = FrameDecoder()
    buf = dec.get_buffer()
    buf[:20] = data[:20]
    assert dec.buffer_updated(20) == []
    assert dec.held == 8                            # only what arrived
    fed = 20
    while fed < len(data):
        target = dec.get_buffer()
        assert len(target) <= RECV_BUFFER_SIZE
        k = min(len(target), len(data) - fed)
        target[:k] = data[fed:fed + k]
        fed += k
        out = dec.buffer_updated(k)
        if fed < len(data):
            assert out == [] and dec.held == fed - 12
    [[frame]] = out
    assert type(frame) is (bytes if inplace.AVAILABLE else bytearray) and frame == payload
    assert not dec.partial and dec.held == 0


def test_huge_declared_frame_holds_only_the_bytes_sent():
    import tracemalloc
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.feed(struct.pack("<IQ", 1, 3 * 2**30) + b"x" * 100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dec.held == 100_000 and dec.partial
    assert peak < 2**20


def test_huge_declared_bytes_frame_holds_only_the_bytes_sent():
    """The same for a frame flagged as ``bytes`` (received into a bytes object)."""
    import tracemalloc
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.feed(struct.pack("<IQ", 1, 3 * 2**30 | BYTES_FLAG) + b"x" * 100_000)
        for _ in range(8):
            dec.feed(b"y" * (1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dec.held == 100_000 + (8 << 20) and dec.partial
    assert peak < 8 * 2**20 * 9 // 8 + 2 * 2**20


_OUT_OF_MEMORY = r"""
import resource, struct, sys
from dpool.errors import ProtocolError
from dpool.transport import frames, inplace
flag = frames.BYTES_FLAG if sys.argv[1] == "bytes" else 0
dec = frames.FrameDecoder()
dec.feed(struct.pack("<IQ", 1, (1 << 31) | flag))
chunk = b"z" * (1 << 20)
vm = int(open("/proc/self/statm").read().split()[0]) * 4096
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
for _ in range(2048):
    try:
        dec.feed(chunk)
    except BaseException as exc:
        print(type(exc).__name__, flush=True)
        break
for _ in range(3):   # fed again (asyncio calls the reader again after an error)
    try:
        dec.feed(chunk)
        print("fed", flush=True)
    except BaseException as exc:
        print(type(exc).__name__, flush=True)
if inplace.AVAILABLE:   # the object itself, used again after a failed resize
    src = bytearray(1 << 20)
    address, holder = inplace.address_of(src)
    grown = inplace.GrowingBytes(1 << 40)
    for _ in range(2):
        try:
            grown.extend(address, 1 << 39)
        except MemoryError:
            print("MemoryError", flush=True)
    for call in (lambda: grown.extend(address, 10), grown.finish):
        try:
            call()
        except (MemoryError, ValueError) as exc:
            print(type(exc).__name__, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc")
@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_a_frame_the_receiver_has_no_memory_for_fails_the_decoder(kind):
    """Running out of memory while a large frame grows ends the stream with a
    ProtocolError, and the decoder stays failed: fed again, it neither crashes
    (a bytes frame's object is gone after a failed resize: it segfaulted) nor
    carries on with a chunk missing (a bytearray frame)."""
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY, kind], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.split()
    assert lines[:4] == ["ProtocolError"] * 4, proc.stdout
    if inplace.AVAILABLE:
        assert lines[4:] == ["MemoryError", "MemoryError", "MemoryError", "ValueError"]


@pytest.mark.skipif(not inplace.AVAILABLE, reason="bytes filled in place: CPython only")
def test_growing_bytes_interrupted_in_finish_does_not_own_the_object_any_more(monkeypatch):
    """A KeyboardInterrupt (SIGINT: dispy's cancel, Ctrl-C) raised as
    finish() hands the object over must not leave GrowingBytes owning an
    object whose reference it gave away: dropping it would free the object a
    second time (heap corruption)."""
    src = bytearray(b"q" * 200)
    address, holder = inplace.address_of(src)
    grown = inplace.GrowingBytes(len(src))
    grown.extend(address, len(src))
    real, raised = grown._api.decref, []

    def decref_then_interrupted(ptr):
        real(ptr)
        if not raised:   # as a signal handler does when the call returns
            raised.append(1)
            raise KeyboardInterrupt

    monkeypatch.setattr(grown._api, "decref", decref_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        grown.finish()
    owns = grown._ptr.value
    grown._ptr.value = None   # (so that this test itself frees nothing twice)
    assert not owns


def test_big_header_goes_through_own_buffer():
    messages = [[b"%d" % i for i in range(20000)]]   # 160 KB of lengths
    assert as_bytes(FrameDecoder().feed(wire(messages))) == messages


@pytest.mark.parametrize("raw, pattern", [
    (struct.pack("<I", 65537), r"65537 frames.*max_frames=65536"),
    (struct.pack("<IQ", 1, 2**59), r"frame length 576460752303423488.*max_frame_bytes"),
    (struct.pack("<IQQQ", 3, 2**32, 2**32, 2**32),
     r"message length 12884901888.*max_message_bytes"),
])
def test_limits_checked_before_allocating(raw, pattern):
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match=pattern):
        dec.feed(raw)
    with pytest.raises(ProtocolError):              # stays failed
        dec.feed(b"\x00\x00\x00\x00")


def test_partial_tracks_incomplete_messages():
    dec = FrameDecoder()
    data = wire([[b"hello"]])
    assert dec.feed(data[:3]) == [] and dec.partial
    assert dec.feed(data[3:-1]) == [] and dec.partial
    assert as_bytes(dec.feed(data[-1:])) == [[b"hello"]] and not dec.partial


frames_st = st.one_of(
    st.binary(max_size=40),
    st.integers(0, 3 * LARGE).map(lambda n: bytes((i * 7) & 255 for i in range(n))
                                  if n < 300 else b"\xab" * n),
)
messages_st = st.lists(st.lists(frames_st, max_size=6), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=messages_st, data=st.data())
def test_arbitrary_splits_reproduce_messages(messages, data):
    stream = wire(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec = FrameDecoder()
    out, prev = [], 0
    for cut in cuts + [len(stream)]:
        out += dec.feed(stream[prev:cut])
        prev = cut
    assert as_bytes(out) == messages
    assert not dec.partial


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=messages_st, sizes=st.lists(st.integers(1, 200_000), min_size=1))
def test_buffered_protocol_style_reads(messages, sizes):
    """Reading at most k bytes into get_buffer(), as a socket would."""
    stream = memoryview(wire(messages))
    dec = FrameDecoder()
    out, pos, i = [], 0, 0
    while pos < len(stream):
        buf = dec.get_buffer()
        assert len(buf) > 0
        k = min(len(buf), sizes[i % len(sizes)], len(stream) - pos)
        buf[:k] = stream[pos:pos + k]
        out += dec.buffer_updated(k)
        pos, i = pos + k, i + 1
    assert as_bytes(out) == messages


SMALL = Limits(max_frames=100, max_frame_bytes=10_000, max_message_bytes=20_000)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=2000), chunk=st.integers(1, 64))
def test_garbage_only_raises_protocol_error_within_limits(garbage, chunk):
    dec = FrameDecoder(SMALL)
    try:
        for i in range(0, len(garbage), chunk):
            for msg in dec.feed(garbage[i:i + chunk]):
                assert len(msg) <= SMALL.max_frames
                assert sum(len(f) for f in msg) <= SMALL.max_message_bytes
    except ProtocolError:
        pass
    if dec._big is not None:
        assert len(dec._big) <= max(SMALL.max_frame_bytes, 8 * SMALL.max_frames)


@given(count=st.integers(65537, 2**32 - 1))
def test_huge_counts_rejected(count):
    with pytest.raises(ProtocolError, match="max_frames"):
        FrameDecoder().feed(struct.pack("<I", count))


@given(length=st.integers(4 * 2**30 + 1, STREAM_FLAG - 1),
       flag=st.sampled_from([0, BYTES_FLAG, STREAM_FLAG, STREAM_FLAG | BYTES_FLAG]))
def test_huge_lengths_rejected(length, flag):
    # (bit 60 and up are flags: 2**60 is a streamed frame of length 0, not a huge length)
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        FrameDecoder().feed(struct.pack("<IQ", 1, length | flag))


# -- sendmsg_all with partial sends -----------------------------------------------------

class PartialSocket:
    """Accepts a pseudo-random number of bytes per sendmsg; checks IOV chunking."""

    def __init__(self):
        self.data = bytearray()
        self.calls = 0

    def sendmsg(self, buffers):
        assert len(buffers) <= 1024
        self.calls += 1
        budget = (self.calls * 7919) % 5000 + 1
        sent = 0
        for b in buffers:
            take = min(len(b), budget - sent)
            self.data += bytes(b[:take])
            sent += take
            if sent == budget:
                break
        return sent


def test_sendmsg_all_handles_partial_sends_and_many_buffers():
    frames = [bytes([i % 251]) * (i % 50 + LARGE // 2) for i in range(3000)]
    parts = encode(frames)
    assert len(parts) > 1024
    sock = PartialSocket()
    sendmsg_all(sock, parts)
    assert bytes(sock.data) == b"".join(bytes(p) for p in parts)
    assert as_bytes(FrameDecoder().feed(sock.data)) == [frames]


# -- handshake steps -----------------------------------------------------------------------

def test_hello_decoding_and_versions():
    assert auth.decode_hello([b'{"protocol": 1, "x": 2}'], "p") == {"protocol": 1, "x": 2}
    for bad in ([b"[]"], [b"nope"], [b'{"protocol": "1"}'], [b"{}", b"{}"], [b"\xff"]):
        with pytest.raises(ProtocolError):
            auth.decode_hello(bad, "p")
    with pytest.raises(VersionMismatch, match=r"this side speaks 1, peer at h:1 speaks 2"):
        auth.check_versions(1, 2, "h:1")
    assert auth.own_hello(lambda: {"a": 1}) == {"a": 1, "protocol": auth.PROTOCOL_VERSION}
    with pytest.raises(TypeError):
        auth.check_secret("text")


@pytest.mark.skipif(not inplace.AVAILABLE, reason="bytes filled in place: CPython only")
@pytest.mark.parametrize("array", [False, True])
@pytest.mark.parametrize("first", [1, 2, 3])
@pytest.mark.parametrize("how", ["extend", "room"])
def test_a_growing_object_takes_its_first_one_or_two_bytes(array, first, how):
    """The first bytes of a large frame may be only 1 or 2 (a read that
    ended just past its header): a new ``bytes`` object already has room
    for 2, and they go into it (before, to address 0: a segfault)."""
    data = bytes(range(256)) * 400
    grown = inplace.GrowingBytes(len(data), array=array)
    source = bytearray(data)
    address, holder = inplace.address_of(source)
    for start, end in ((0, first), (first, len(data))):
        if how == "extend":
            grown.extend(address + start, end - start)
        else:
            while len(grown) < end:
                room = grown.room(end - len(grown))
                room[:] = data[len(grown):len(grown) + len(room)]
                grown.advance(len(room))
    assert grown.finish() == data
    del holder


@pytest.mark.parametrize("first", [1, 2])
def test_a_large_bytes_frame_whose_first_bytes_end_a_read(first):
    """A large frame flagged as a whole ``bytes`` object whose first 1 or 2
    bytes are all of it that the first read brings (the crash seen in
    test_buffered_protocol_style_reads, there by chance)."""
    big = bytes(range(256)) * (LARGE // 128)
    stream = wire([[b"head", big]])
    cut = stream.index(big[:64]) + first
    dec = FrameDecoder()
    out = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
    assert as_bytes(out) == [[b"head", big]]
    assert type(out[0][1]) is (bytes if inplace.AVAILABLE else bytearray)


@pytest.mark.skipif(not inplace.AVAILABLE, reason="bytes filled in place: CPython only")
@pytest.mark.parametrize("array", [False, True])
@pytest.mark.parametrize("finish", [True, False])
def test_a_large_object_is_filled_in_place_with_its_pages_faulted_in_ahead(array, finish):
    """``room``/``advance`` fill the object itself; past THREAD_AFTER bytes of
    a large one a thread faults its pages in ahead (a hint: the bytes are the
    same either way) and ends with the object, finished or dropped."""
    import threading
    size = inplace.THREAD_MIN + 12345
    piece = bytes(range(256)) * 1024
    grown = inplace.GrowingBytes(size, array=array)
    threads = set()
    while len(grown) < (size if finish else size // 2):
        room = grown.room(RECV_BUFFER_SIZE)
        n = min(len(room), len(piece))
        room[:n] = piece[:n]
        grown.advance(n)
        threads |= {t.name for t in threading.enumerate()}
    if inplace._madvise is not None:
        assert "dpool-populate" in threads
    if finish:
        data = grown.finish()
        assert type(data) is (bytearray if array else bytes) and len(data) == size
        whole = piece * (size // len(piece) + 1)
        assert data == whole[:size]
    del grown
    # (the autouse fixture checks that the thread ended)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_child_forked_while_a_populator_counted_itself_can_count_its_own():
    """A fork while one of the page-faulting threads held the count's lock
    (it starts or ends): the child has no such thread, and its own large
    frames must not wait for that lock forever."""
    import os
    import time

    populator = inplace._Populator
    populator._count.acquire()          # (as a thread in the middle of _counted)
    try:
        pid = os.fork()
        if pid == 0:                    # the child: count a thread of its own
            try:
                populator._counted(1)
                populator._counted(-1)
                os._exit(0 if populator.live == 0 else 2)
            finally:
                os._exit(3)
    finally:
        populator._count.release()
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the count's lock")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
