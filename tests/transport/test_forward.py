"""A message relayed as it arrives (transport/forward.py): a decoder's tap
writes it on as streamed frames, and the receiving decoder rebuilds it, or
drops it whole when the relay is abandoned, and reads on."""
import random

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dpool.errors import ProtocolError
from dpool.transport.forward import Forward
from dpool.transport.records import RECORD_DATA, SecureDecoder, Sealer
from dpool.transport.frames import (CHUNK, CHUNK_END, MIN_TAP, STREAM_FLAG, FrameDecoder,
                                    Relayed, encode)

BIG = b"".join(bytes([i]) * 4096 for i in range(256)) * 2   # 2 MiB, not one repeated byte


class Dest:
    """What a Forward writes to (a Connection's relay methods), recording bytes."""

    def __init__(self):
        self.wire = bytearray()
        self.relay = None
        self.held = []
        self.write_paused = False

    def begin_relay(self, relay):
        self.relay = relay

    def relay_write(self, parts):
        for part in parts:
            self.wire += part

    relay_records = relay_write

    def end_relay(self):
        self.relay = None
        for frames in self.held:
            self.send(frames)
        self.held = []

    def send(self, frames):
        if self.relay is not None:
            self.held.append(frames)
            self.relay.nudge()
            return
        for part in encode(frames):
            self.wire += part

    def when_writable(self, callback):
        self.resume = callback


class Source:
    paused = False

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


def relaying_decoder(dest, source, rewrite=b"HEAD"):
    """A decoder whose messages with a large frame are relayed to ``dest``,
    their first frame replaced by ``rewrite``."""
    decoder = FrameDecoder()
    relays = []

    def tap(frames, lengths, flags):
        relays.append(Forward(dest, source, [rewrite, *frames[1:]], lengths, flags))
        return relays[-1]
    decoder.tap = tap
    return decoder, relays


def feed_in_pieces(decoder, data, piece=100_000):
    out = []
    for i in range(0, len(data), piece):
        out += decoder.feed(data[i:i + piece])
    return out


def wire(frames):
    return b"".join(bytes(p) for p in encode(frames))


@pytest.mark.parametrize("frames", [
    [b"first", BIG],
    [b"first", b"small before", BIG, b"after", BIG[:MIN_TAP + 5], b""],
])
def test_a_relayed_message_arrives_whole_and_as_sent(frames):
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    got = feed_in_pieces(decoder, wire(frames))
    assert len(got) == 1 and all(type(f) is Relayed for f in got[0][len(got[0]) - 1:])
    assert sum(type(f) is Relayed for f in got[0]) == len(frames) - frames.index(BIG)
    assert decoder.held == 0
    dest.send([b"sent meanwhile"])       # waits for the relayed message's end
    relays[0].finish()
    client = FrameDecoder()
    received = feed_in_pieces(client, dest.wire, 65_537)
    assert received == [[b"HEAD", *frames[1:]], [b"sent meanwhile"]]
    assert type(received[0][frames.index(BIG)]) is bytes   # a whole bytes, rebuilt as one
    assert not client.partial


def test_an_abandoned_relay_is_dropped_and_the_stream_reads_on():
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    data = wire([b"first", BIG])
    assert feed_in_pieces(decoder, data[:len(data) // 2]) == []
    dest.send([b"the job's fate"])
    decoder.discard()       # the worker's connection ended in the middle
    dest.send([b"next"])
    client = FrameDecoder()
    assert feed_in_pieces(client, dest.wire, 4096) == [[b"the job's fate"], [b"next"]]
    assert client.held == 0 and not client.partial


def test_a_silent_source_still_shows_the_relay_alive():
    """Each message held behind a relay whose source wrote nothing since
    makes it write an empty chunk (bytes the peer's liveness check counts)."""
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    data = wire([b"first", BIG])
    feed_in_pieces(decoder, data[:MIN_TAP])
    before = len(dest.wire)
    dest.send([b"heartbeat"])
    assert len(dest.wire) == before        # bytes were relayed since
    dest.send([b"heartbeat"])
    assert len(dest.wire) == before + CHUNK.size
    decoder.feed(data[MIN_TAP:])
    relays[0].finish()
    got = FrameDecoder().feed(dest.wire)
    assert got == [[b"HEAD", BIG], [b"heartbeat"], [b"heartbeat"]]


def test_the_source_pauses_while_the_destination_is_full():
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    data = wire([b"first", BIG])
    dest.write_paused = True
    feed_in_pieces(decoder, data[:MIN_TAP])
    assert source.paused
    dest.write_paused = False
    dest.resume()
    assert not source.paused


def test_a_source_resumed_by_another_is_paused_again_while_the_destination_is_full():
    """Something else (a node's receive budget) resumes the source while the
    relay holds it back: its next bytes pause it again, so what waits for
    the destination stays bounded."""
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    data = wire([b"first", BIG])
    dest.write_paused = True
    decoder.feed(data[:300_000])
    assert source.paused
    source.resume_reading()   # (the budget's resume)
    decoder.feed(data[300_000:400_000])
    assert source.paused
    dest.write_paused = False
    dest.resume()
    assert not source.paused


def test_more_bytes_than_announced_do_not_reach_the_relayed_message():
    """A source that sends past its declared lengths: the relayed message is
    exactly what was declared; the excess is a framing error on the source's
    own link only."""
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    got = feed_in_pieces(decoder, wire([b"first", BIG]))
    relays[0].finish()
    with pytest.raises(ProtocolError):
        decoder.feed(b"\xff" * 64)
    dest.send([b"next"])
    assert FrameDecoder().feed(dest.wire) == [[b"HEAD", BIG], [b"next"]]
    assert len(got) == 1


def _streamed(size, chunks, end=CHUNK_END):
    head = (1).to_bytes(4, "little") + (size | STREAM_FLAG).to_bytes(8, "little")
    body = b"".join(CHUNK.pack(len(c)) + c for c in chunks)
    return head + body + CHUNK.pack(end)


@pytest.mark.parametrize("data, why", [
    (_streamed(10, [b"x" * 11]), "overruns"),
    (_streamed(10, [b"x" * 6, b"y" * 5]), "overruns"),
    (_streamed(10, [b"x" * 9]), "ended after 9"),
])
def test_a_malformed_streamed_frame_is_a_protocol_error(data, why):
    with pytest.raises(ProtocolError, match=why):
        FrameDecoder().feed(data)


def test_a_streamed_frame_may_be_small_and_chunked_any_way():
    data = _streamed(10, [b"", b"abc", b"", b"defghij"]) + wire([b"next"])
    assert FrameDecoder().feed(data) == [[b"abcdefghij"], [b"next"]]


def test_a_relay_begins_only_after_earlier_messages_are_returned():
    """A message completed in the same read as the beginning of a large
    frame: it is returned first, and the tap is asked only at the next read
    (its owner must not pass the large message on before having seen the
    earlier one, e.g. a worker's Started after that job's Done, or a client's
    Func before the Run that needs it); the large frame's first bytes wait
    in the receive buffer meanwhile and are relayed with the rest."""
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    data = wire([b"started"]) + wire([b"first", BIG])
    assert decoder.feed(data[:100_000]) == [[b"started"]] and not relays
    got = feed_in_pieces(decoder, data[100_000:])
    assert len(relays) == 1 and len(got) == 1 and type(got[0][1]) is Relayed
    relays[0].finish()
    assert FrameDecoder().feed(bytes(dest.wire)) == [[b"HEAD", BIG]]


def _sealed_decoder():
    """A SecureDecoder whose inner decoder's tap records, each time it is
    asked, the messages the decoder had returned by then; and a Sealer."""
    key = bytes(range(32))
    decoder = SecureDecoder(FrameDecoder(), key)
    returned, asked = [], []

    def tap(frames, lengths, flags):
        asked.append(list(returned))
        return None
    decoder.inner.tap = tap
    return decoder, Sealer(key), returned, asked


def _read(decoder, data, returned):
    """``data`` arrives in one read (as asyncio's BufferedProtocol feeds it)."""
    dst = decoder.get_buffer()
    dst[:len(data)] = data
    returned += decoder.buffer_updated(len(data))


def test_a_tap_is_asked_only_after_earlier_records_messages_are_returned():
    """A message ending one record and a large frame beginning in the next,
    both opened in the same read: the message is returned before the tap
    is asked (else, e.g., a Run given at once overtakes the client's Run
    just before it)."""
    decoder, sealer, returned, asked = _sealed_decoder()
    data = wire([b"earlier"]) + wire([b"first", BIG])
    records = b"".join(sealer.seal(data[:len(wire([b"earlier"]))])
                       + sealer.seal(data[len(wire([b"earlier"])):][:1000]))
    _read(decoder, records, returned)
    assert returned == [[b"earlier"]]
    rest = data[len(wire([b"earlier"])) + 1000:]
    for i in range(0, len(rest), 100_000):
        _read(decoder, b"".join(sealer.seal(rest[i:i + 100_000])), returned)
    assert asked == [[[b"earlier"]]]
    assert returned == [[b"earlier"], [b"first", BIG]]


def test_a_tap_is_asked_only_after_earlier_messages_of_a_record_fed_in_pieces():
    """A record that doesn't fit the inner decoder's room is fed in pieces:
    a message completed by one piece is returned before a later piece's
    large frame is offered to the tap."""
    decoder, sealer, returned, asked = _sealed_decoder()
    earlier = wire([b"e" * 60_000])
    data = earlier + wire([b"first", BIG])
    _read(decoder, b"".join(sealer.seal(data[:30_000])), returned)   # (half of it)
    _read(decoder, b"".join(sealer.seal(data[30_000:30_000 + RECORD_DATA])), returned)
    assert returned == [[b"e" * 60_000]]
    rest = data[30_000 + RECORD_DATA:]
    for i in range(0, len(rest), 100_000):
        _read(decoder, b"".join(sealer.seal(rest[i:i + 100_000])), returned)
    assert asked == [[[b"e" * 60_000]]]
    assert returned == [[b"e" * 60_000], [b"first", BIG]]


def test_a_long_relay_reads_larger_pieces_and_arrives_whole():
    """Past 8x frames.LARGE_READ relayed, the decoder reads a relayed
    frame up to LARGE_READ at a time into a buffer of its own, handed to
    the tap as is: fewer, larger chunks, the same bytes; and an abandoned
    relay there is dropped as before."""
    from dpool.transport.frames import LARGE_READ, RECV_BUFFER_SIZE
    payload = BIG * 12          # 24 MiB, distinct bytes every 4 KiB
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    sizes = []

    def tap(frames, lengths, flags):
        relay = Forward(dest, source, [b"HEAD", *frames[1:]], lengths, flags)
        data = relay.data
        relay.data = lambda view: (sizes.append(len(view)), data(view))
        relays.append(relay)
        return relay
    decoder.tap = tap
    got = feed_in_pieces(decoder, wire([b"first", payload, b"tail"]), 3 << 20)
    assert len(got) == 1 and all(type(f) is Relayed for f in got[0][1:])
    relays[0].finish()
    assert max(sizes) == LARGE_READ and sizes.count(LARGE_READ) >= 12
    assert max(sizes[:8]) <= RECV_BUFFER_SIZE       # (small reads first)
    assert decoder._relay is None                   # (freed with the message)
    client = FrameDecoder()
    assert feed_in_pieces(client, dest.wire, 1 << 20) == [[b"HEAD", payload, b"tail"]]

    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    data = wire([b"first", payload])
    assert feed_in_pieces(decoder, data[:20 << 20], 3 << 20) == []
    assert decoder._relay is not None
    decoder.discard()       # the worker's connection ended in the middle
    dest.send([b"next"])
    client = FrameDecoder()
    assert feed_in_pieces(client, dest.wire, 1 << 20) == [[b"next"]]
    assert decoder._relay is None and not client.partial


def test_a_relay_buffer_is_taken_only_past_8_large_reads():
    """The relay's buffer of its own (frames.LARGE_READ bytes) comes once
    8 times that much of the frame was relayed, as documented: a frame of
    2 to 8 MiB relayed through the 256 KiB receive buffer holds no 1 MiB
    buffer besides (it did from 2 MiB on: up to half the bytes relayed)."""
    from dpool.transport.frames import LARGE_READ, RECV_BUFFER_SIZE
    payload = BIG * 4           # 8 MiB
    dest, source = Dest(), Source()
    decoder, relays = relaying_decoder(dest, source)
    held = []

    def tap(frames, lengths, flags):
        relay = Forward(dest, source, [b"HEAD", *frames[1:]], lengths, flags)
        data = relay.data
        relay.data = lambda view: (held.append((len(view), decoder._relay is not None)),
                                   data(view))
        relays.append(relay)
        return relay
    decoder.tap = tap
    got = feed_in_pieces(decoder, wire([b"first", payload, BIG * 5]), 3 << 20)
    assert len(got) == 1
    relays[0].finish()
    tapped = 0
    for size, buffer in held:
        assert not buffer or tapped >= 8 * LARGE_READ, (tapped, size)
        assert size <= (LARGE_READ if buffer else RECV_BUFFER_SIZE)
        tapped += size
    assert (LARGE_READ, True) in held           # (and 1 MiB reads past 8 MiB)
    assert decoder._relay is None
    client = FrameDecoder()
    assert feed_in_pieces(client, dest.wire, 1 << 20) == [[b"HEAD", payload, BIG * 5]]


def _read_in_pieces(decoder, data, pieces, relays=()):
    """Read ``data`` through ``decoder``'s get_buffer/buffer_updated, each
    read at most the next of ``pieces`` (cycled) bytes, as a socket would;
    each relayed message's relay is finished as the message is returned
    (as a node delivers it)."""
    out, view, i, k = [], memoryview(data), 0, 0
    while i < len(data):
        dst = decoder.get_buffer()
        n = min(len(dst), len(data) - i, pieces[k % len(pieces)])
        dst[:n] = view[i:i + n]
        i, k = i + n, k + 1
        for frames in decoder.buffer_updated(n):
            out.append(frames)
            if frames and type(frames[-1]) is Relayed:
                relays[sum(type(f[-1]) is Relayed for f in out if f) - 1].finish()
    return out


_SIZES = [0, 5, 70_000, MIN_TAP, MIN_TAP + 1, (2 << 20) + 3, (8 << 20) - 1, 8 << 20,
          (8 << 20) + 1, (9 << 20) + 7]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.generate])
@given(sizes=st.lists(st.lists(st.sampled_from(_SIZES), max_size=3), min_size=1, max_size=3),
       pieces=st.lists(st.integers(4096, 3 << 20), min_size=1, max_size=5),
       records=st.none() | st.lists(st.integers(1000, RECORD_DATA), min_size=1, max_size=4),
       seed=st.integers(0, 2**32))
def test_relayed_messages_split_at_any_boundary_arrive_as_sent(sizes, pieces, records, seed):
    """Reads and records cut anywhere (the receive buffer's 256 KiB, the
    relay's 1 MiB pieces past 8 MiB, frame and record ends): each message
    is relayed, or received, whole and as sent, and nothing is held after."""
    rng = random.Random(seed)
    messages = [[b"m%d" % i, *(rng.randbytes(n) for n in frame_sizes)]
                for i, frame_sizes in enumerate(sizes)]
    data = b"".join(wire(frames) for frames in messages)
    dest, source = Dest(), Source()
    inner, relays = relaying_decoder(dest, source)
    decoder = inner
    if records is not None:
        key, sealed, i, k = bytes(32), bytearray(), 0, 0
        sealer = Sealer(key)
        while i < len(data):
            n = records[k % len(records)]
            sealed += b"".join(sealer.seal(data[i:i + n]))
            i, k = i + n, k + 1
        data, decoder = bytes(sealed), SecureDecoder(inner, key)
    got = _read_in_pieces(decoder, data, pieces, relays)
    assert len(got) == len(messages) and not decoder.partial
    relayed = [m for m, frames in zip(messages, got) if type(frames[-1]) is Relayed]
    assert [frames for frames in got if type(frames[-1]) is not Relayed] == \
        [m for m, frames in zip(messages, got) if type(frames[-1]) is not Relayed]
    assert len(relays) == len(relayed) and inner._relay is None and dest.relay is None
    client = FrameDecoder()
    assert _read_in_pieces(client, bytes(dest.wire), pieces[::-1]) == \
        [[b"HEAD", *m[1:]] for m in relayed]
    assert not client.partial
