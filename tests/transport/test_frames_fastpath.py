"""FrameDecoder's whole-message fast path (``_whole_small``) against the
general path alone: on any byte stream, split anywhere, under any limits,
both give the same messages and fail at the same point with a
ProtocolError."""
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dpool.errors import ProtocolError
from dpool.transport import FrameDecoder, Limits, encode
from dpool.transport.frames import BYTES_FLAG, FILE_FLAG

LARGE = 1024  # small enough that large frames and big headers are cheap to make


class SlowDecoder(FrameDecoder):
    """The general path only."""

    def _whole_small(self, pos, end):
        return None


def run(decoder, stream, cuts):
    """Messages (as bytes lists) and the error, feeding ``stream`` cut at ``cuts``."""
    out, error = [], None
    bounds = [0, *sorted(set(c % (len(stream) + 1) for c in cuts)), len(stream)]
    try:
        for a, b in zip(bounds, bounds[1:]):
            out += [[bytes(f) for f in m] for m in decoder.feed(stream[a:b])]
    except ProtocolError:
        error = True
    return out, error, decoder.partial if error is None else None


def message_bytes(frames):
    return b"".join(bytes(p) for p in encode(frames))


frame = st.one_of(st.binary(max_size=40), st.binary(min_size=LARGE - 2, max_size=LARGE + 2))
messages = st.lists(st.lists(frame, max_size=5), max_size=5)


@st.composite
def raw_header(draw):
    """A header with a declared count/lengths that may be anything."""
    count = draw(st.one_of(st.integers(0, 4), st.sampled_from([129, 2**32 - 1])))
    n = min(count, 4)
    lengths = draw(st.lists(st.one_of(
        st.integers(0, 50), st.integers(LARGE - 2, LARGE + 2), st.integers(0, 2**61 - 1),
        st.sampled_from([BYTES_FLAG | 10, FILE_FLAG | 10, 2**64 - 1])),
        min_size=n, max_size=n))
    return struct.pack(f"<I{n}Q", count, *lengths)


pieces = st.one_of(messages.map(lambda ms: b"".join(map(message_bytes, ms))),
                   raw_header(), st.binary(max_size=64))
def _bound(small, big):
    return st.one_of(st.integers(0, small), st.integers(0, big))


limits = st.builds(Limits, max_frames=st.integers(0, 6), max_frame_bytes=_bound(50, 2000),
                   max_message_bytes=_bound(100, 4000))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(pieces, max_size=6), st.lists(st.integers(0, 10**6), max_size=8),
       st.one_of(st.none(), limits))
def test_fast_path_decodes_as_the_general_path(parts, cuts, lim):
    stream = b"".join(parts)
    fast = run(FrameDecoder(lim, buffer_size=2 * LARGE, large=LARGE), stream, cuts)
    slow = run(SlowDecoder(lim, buffer_size=2 * LARGE, large=LARGE), stream, cuts)
    assert fast == slow


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(messages, min_size=1, max_size=3), st.lists(st.integers(0, 10**6), max_size=4),
       limits)
@example([[[b"x" * 10]]], [], Limits(max_frames=1, max_frame_bytes=9, max_message_bytes=100))
@example([[[b"x" * 10]]], [], Limits(max_frames=1, max_frame_bytes=10, max_message_bytes=9))
@example([[[b"x", b"y"]]], [], Limits(max_frames=1))
@example([[[b"x" * (LARGE - 1)]]], [], Limits(max_frame_bytes=LARGE - 2))
@example([[[b"x" * LARGE]]], [], Limits(max_frame_bytes=LARGE - 1))
@example([[[], [b"a"]]], [], Limits(max_frames=0))
def test_fast_path_enforces_the_limits_as_the_general_path(batches, cuts, lim):
    stream = b"".join(message_bytes(m) for ms in batches for m in ms)
    fast = run(FrameDecoder(lim, buffer_size=2 * LARGE, large=LARGE), stream, cuts)
    slow = run(SlowDecoder(lim, buffer_size=2 * LARGE, large=LARGE), stream, cuts)
    assert fast == slow


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages, st.lists(st.integers(0, 10**6), max_size=8))
def test_fast_path_round_trips(ms, cuts):
    stream = b"".join(map(message_bytes, ms))
    got, error, partial = run(FrameDecoder(buffer_size=2 * LARGE, large=LARGE), stream, cuts)
    assert error is None and not partial
    assert got == ms


def test_message_split_at_the_boundary_of_the_fast_path():
    """Every split of two messages: the first whole in the buffer with the
    second's start, or cut anywhere."""
    stream = message_bytes([b"a" * 10, b"b" * 20]) + message_bytes([b"c" * 5])
    for cut in range(len(stream) + 1):
        fast = run(FrameDecoder(buffer_size=2 * LARGE, large=LARGE), stream, [cut])
        assert fast == ([[b"a" * 10, b"b" * 20], [b"c" * 5]], None, False)

