"""relay.wire.frames, the sans-IO RFC 6455 framer, checked against wsproto and by hand.

wsproto is the independent reference: frames it builds (as a client: masked,
fragmented, with control frames between fragments) must come out of
:class:`FrameReader` as the same messages in any chunking, and frames
:func:`frame` builds must parse in a wsproto connection of the right role. Each
way a peer can break the protocol is pinned to the close code RFC 6455 gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import Connection, ConnectionType
from wsproto import events as ws
from wsproto.frame_protocol import FrameProtocol

from relay.wire.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Event,
    FrameReader,
    MaskKeys,
    Ping,
    Pong,
    ProtocolError,
    apply_mask,
    close_payload,
    frame,
)

BIG = 1 << 20
FIN = 0x80
KEY = b"\x37\xfa\x21\x3d"

#: Payload lengths on both sides of each length encoding's edge (7-bit, 16-bit, 64-bit).
EDGES = [0, 1, 125, 126, 127, 65535, 65536, 65537]


# -- helpers --------------------------------------------------------------------------


def xor(data: bytes, key: bytes) -> bytes:
    """Masking written out the slow, obvious way (the reference for apply_mask)."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def raw(b0: int, payload: bytes, *, masked: bool = True, length: int | None = None) -> bytes:
    """One frame built by hand: ``b0`` is FIN/RSV/opcode; ``length`` may lie about the payload."""
    n = len(payload) if length is None else length
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = bytes((b0, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | 127)) + n.to_bytes(8, "big")
    return head + KEY + xor(payload, KEY) if masked else head + payload


def drain(reader: FrameReader) -> list[Event]:
    events: list[Event] = []
    while (event := reader.next()) is not None:
        events.append(event)
    return events


def refused(data: bytes, *, masked: bool = True, max_message_bytes: int = BIG) -> ProtocolError:
    """The ProtocolError a reader raises on ``data`` (the test fails if it raises none)."""
    reader = FrameReader(masked=masked, max_message_bytes=max_message_bytes)
    reader.feed(data)
    with pytest.raises(ProtocolError) as caught:
        drain(reader)
    return caught.value


def read_all(data: bytes, *, masked: bool = True, max_message_bytes: int = BIG) -> list[Event]:
    reader = FrameReader(masked=masked, max_message_bytes=max_message_bytes)
    reader.feed(data)
    return drain(reader)


# -- strategies -------------------------------------------------------------------------


@st.composite
def payloads(draw: st.DrawFn) -> str | bytes:
    """A text or binary message whose encoded size is drawn from the length-encoding edges."""
    size = draw(st.one_of(st.sampled_from(EDGES), st.integers(0, 300)))
    if draw(st.booleans()):
        seed = draw(
            st.one_of(st.text(min_size=1, max_size=6), st.sampled_from(["é", "€", "😀", "中"]))
        )
        reps = size // len(seed.encode())
        text = seed * reps
        return text + "x" * (size - len(text.encode()))
    seed = draw(st.binary(min_size=1, max_size=8))
    return (seed * (size // len(seed) + 1))[:size]


control_payloads = st.one_of(st.binary(max_size=16), st.sampled_from([b"p" * 125, b"\x00" * 124]))


@dataclass
class Script:
    """wsproto-built client frames and what FrameReader must make of them."""

    wire: bytes
    expected: list[Event]


@st.composite
def client_scripts(draw: st.DrawFn) -> Script:
    fp = FrameProtocol(client=True, extensions=[])
    wire = bytearray()
    expected: list[Event] = []

    def controls() -> None:
        for _ in range(draw(st.integers(0, 2))):
            payload = draw(control_payloads)
            if draw(st.booleans()):
                wire.extend(fp.ping(payload))
                expected.append(Ping(payload))
            else:
                wire.extend(fp.pong(payload))
                expected.append(Pong(payload))

    for message in draw(st.lists(payloads(), min_size=1, max_size=4)):
        cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=3)))
        bounds = [0, *cuts, len(message)]
        pieces = [message[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            wire.extend(fp.send_data(piece, fin=last))
            if not last:
                controls()
        expected.append(message)
        controls()
    if draw(st.booleans()):
        code = draw(st.sampled_from([1000, 1001, 1011, 3000, 4999]))
        reason = draw(st.text(max_size=20))
        wire.extend(fp.close(code, reason))
        expected.append(Close(code, reason))
    return Script(bytes(wire), expected)


# -- round trips against wsproto --------------------------------------------------------


@settings(max_examples=60)
@given(script=client_scripts(), data=st.data())
def test_wsproto_client_frames_read_back_as_the_same_messages_in_any_chunking(
    script: Script, data: st.DataObject
) -> None:
    reader = FrameReader(masked=True, max_message_bytes=BIG)
    got: list[Event] = []
    at = 0
    small = data.draw(st.booleans())  # now and then, a stream cut into tiny pieces throughout
    while at < len(script.wire):
        if small:
            size = data.draw(st.integers(1, 7))
        else:
            size = data.draw(st.one_of(st.integers(1, 16), st.integers(1, 70_000)))
        reader.feed(script.wire[at : at + size])
        at += size
        got.extend(drain(reader))
    assert got == script.expected
    assert reader.buffered == 0


outgoing = st.one_of(
    payloads(),
    st.builds(Ping, control_payloads),
    st.builds(Pong, control_payloads),
)


@settings(max_examples=60)
@given(items=st.lists(outgoing, min_size=1, max_size=5), mask=st.booleans(), close=st.booleans())
def test_frames_built_here_parse_in_wsproto_as_the_same_messages(
    items: list[str | bytes | Ping | Pong], mask: bool, close: bool
) -> None:
    wire = bytearray()
    for item in items:
        if isinstance(item, str):
            wire += frame(OP_TEXT, item.encode(), mask=mask)
        elif isinstance(item, bytes):
            wire += frame(OP_BINARY, item, mask=mask)
        elif isinstance(item, Ping):
            wire += frame(OP_PING, item.payload, mask=mask)
        else:
            wire += frame(OP_PONG, item.payload, mask=mask)
    if close:
        wire += frame(OP_CLOSE, close_payload(4001, "done ✓"), mask=mask)
    # A client masks, so a server reads masked frames and a client unmasked ones.
    peer = Connection(ConnectionType.SERVER if mask else ConnectionType.CLIENT)
    peer.receive_data(bytes(wire))
    got: list[object] = []
    text: list[str] = []
    binary: list[bytes] = []
    for event in peer.events():
        if isinstance(event, ws.TextMessage):
            text.append(event.data)
            if event.message_finished:
                got.append("".join(text))
                text.clear()
        elif isinstance(event, ws.BytesMessage):
            binary.append(bytes(event.data))
            if event.message_finished:
                got.append(b"".join(binary))
                binary.clear()
        elif isinstance(event, ws.Ping):
            got.append(Ping(bytes(event.payload)))
        elif isinstance(event, ws.Pong):
            got.append(Pong(bytes(event.payload)))
        elif isinstance(event, ws.CloseConnection):
            got.append(Close(event.code, event.reason or ""))
        else:  # pragma: no cover - a failure's description
            raise AssertionError(f"unexpected wsproto event {event!r}")
    assert got == [*items, *([Close(4001, "done ✓")] if close else [])]


@pytest.mark.parametrize("size", EDGES)
def test_each_length_encoding_round_trips_through_the_reader(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    for mask in (True, False):
        assert read_all(frame(OP_BINARY, payload, mask=mask), masked=mask) == [payload]


def test_the_header_uses_the_shortest_length_encoding() -> None:
    assert len(frame(OP_BINARY, b"x" * 125, mask=False)) == 2 + 125
    assert len(frame(OP_BINARY, b"x" * 126, mask=False)) == 4 + 126
    assert len(frame(OP_BINARY, b"x" * 65535, mask=False)) == 4 + 65535
    assert len(frame(OP_BINARY, b"x" * 65536, mask=False)) == 10 + 65536
    assert len(frame(OP_BINARY, b"x" * 125, mask=True)) == 6 + 125


def test_a_frame_fed_one_byte_at_a_time_comes_out_only_when_whole() -> None:
    wire = frame(OP_TEXT, "héllo".encode(), mask=True)
    reader = FrameReader(masked=True, max_message_bytes=BIG)
    for byte in wire[:-1]:
        reader.feed(bytes((byte,)))
        assert reader.next() is None
    reader.feed(wire[-1:])
    assert reader.next() == "héllo"
    assert reader.next() is None


def test_buffered_counts_the_bytes_not_yet_returned() -> None:
    first = frame(OP_BINARY, b"abc", mask=True)
    second = frame(OP_BINARY, b"defgh", mask=True)
    reader = FrameReader(masked=True, max_message_bytes=BIG)
    reader.feed(first + second[:4])
    assert reader.buffered == len(first) + 4
    assert reader.next() == b"abc"
    assert reader.buffered == 4
    assert reader.next() is None
    reader.feed(second[4:])
    assert reader.next() == b"defgh"
    assert reader.buffered == 0


def test_a_character_split_across_fragments_is_decoded_whole() -> None:
    encoded = "a😀b".encode()  # the emoji is 4 bytes: cut it after its second byte
    wire = (
        raw(OP_TEXT, encoded[:3])
        + raw(FIN | OP_PING, b"")
        + raw(FIN | OP_CONTINUATION, encoded[3:])
    )
    assert read_all(wire) == [Ping(b""), "a😀b"]


def test_an_empty_close_frame_reads_as_1005() -> None:
    assert read_all(raw(FIN | OP_CLOSE, b"")) == [Close(1005, "")]


# -- protocol errors ----------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
@pytest.mark.parametrize("op", [OP_TEXT, OP_BINARY, OP_PING])
def test_reserved_bits_are_refused_with_1002(rsv: int, op: int) -> None:
    assert refused(raw(FIN | rsv | op, b"x")).code == 1002


@pytest.mark.parametrize("reader_masked", [True, False])
def test_masking_wrong_for_the_side_is_refused_with_1002(reader_masked: bool) -> None:
    wire = raw(FIN | OP_TEXT, b"hi", masked=not reader_masked)
    assert refused(wire, masked=reader_masked).code == 1002


@pytest.mark.parametrize("op", [OP_CLOSE, OP_PING, OP_PONG])
def test_a_control_frame_over_125_bytes_is_refused_with_1002(op: int) -> None:
    payload = b"\x03\xe8" + b"r" * 124 if op == OP_CLOSE else b"p" * 126
    assert refused(raw(FIN | op, payload)).code == 1002


@pytest.mark.parametrize("op", [OP_CLOSE, OP_PING, OP_PONG])
def test_a_fragmented_control_frame_is_refused_with_1002(op: int) -> None:
    assert refused(raw(op, b"\x03\xe8")).code == 1002


@pytest.mark.parametrize("op", [OP_PING, OP_PONG])
def test_a_control_frame_of_exactly_125_bytes_is_accepted(op: int) -> None:
    cls = Ping if op == OP_PING else Pong
    assert read_all(raw(FIN | op, b"p" * 125)) == [cls(b"p" * 125)]


@pytest.mark.parametrize("fin", [FIN, 0])
def test_a_continuation_with_no_message_to_continue_is_refused_with_1002(fin: int) -> None:
    assert refused(raw(fin | OP_CONTINUATION, b"x")).code == 1002


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (OP_TEXT, FIN | OP_TEXT),
        (OP_TEXT, FIN | OP_BINARY),
        (OP_BINARY, OP_TEXT),
        (OP_BINARY, OP_BINARY),
    ],
)
def test_a_new_message_inside_a_fragmented_one_is_refused_with_1002(
    first: int, second: int
) -> None:
    assert refused(raw(first, b"ab") + raw(second, b"cd")).code == 1002


@pytest.mark.parametrize("op", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_an_unknown_opcode_is_refused_with_1002(op: int) -> None:
    assert refused(raw(FIN | op, b"x")).code == 1002


INVALID_UTF8 = [b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"]


@pytest.mark.parametrize("payload", INVALID_UTF8)
def test_a_text_message_that_is_not_utf8_is_refused_with_1007(payload: bytes) -> None:
    assert refused(raw(FIN | OP_TEXT, payload)).code == 1007


@pytest.mark.parametrize("payload", INVALID_UTF8)
def test_a_fragmented_text_message_that_is_not_utf8_is_refused_with_1007(payload: bytes) -> None:
    wire = raw(OP_TEXT, b"ok ") + raw(OP_CONTINUATION, payload) + raw(FIN | OP_CONTINUATION, b"!")
    assert refused(wire).code == 1007


def test_a_binary_message_is_not_checked_for_utf8() -> None:
    assert read_all(raw(FIN | OP_BINARY, b"\xff\xfe")) == [b"\xff\xfe"]


@pytest.mark.parametrize("reason", INVALID_UTF8)
def test_a_close_reason_that_is_not_utf8_is_refused_with_1007(reason: bytes) -> None:
    assert refused(raw(FIN | OP_CLOSE, b"\x03\xe8" + reason)).code == 1007


def test_a_close_frame_with_a_one_byte_payload_is_refused_with_1002() -> None:
    assert refused(raw(FIN | OP_CLOSE, b"\x03")).code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_close_codes_that_may_not_be_sent_are_refused_with_1002(code: int) -> None:
    assert refused(raw(FIN | OP_CLOSE, code.to_bytes(2, "big") + b"why")).code == 1002


@pytest.mark.parametrize(
    "code",
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4999],
)
def test_close_codes_a_peer_may_send_are_read_with_their_reason(code: int) -> None:
    assert read_all(raw(FIN | OP_CLOSE, code.to_bytes(2, "big") + "bye ✓".encode())) == [
        Close(code, "bye ✓")
    ]


# -- the size limit ---------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("limit", [100, 125, 70_000])
def test_a_message_over_the_limit_is_refused_from_its_header_alone(
    masked: bool, limit: int
) -> None:
    wire = raw(FIN | OP_BINARY, b"", masked=masked, length=limit + 1)
    header = wire[: 2 if limit + 1 < 126 else 4 if limit + 1 < 65536 else 10]  # no key, no payload
    error = refused(header, masked=masked, max_message_bytes=limit)
    assert error.code == 1009


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("size", [101, 200])
def test_a_whole_text_frame_over_the_limit_read_at_once_is_refused_with_1009(
    masked: bool, size: int
) -> None:
    assert (
        refused(
            raw(FIN | OP_TEXT, b"x" * size, masked=masked), masked=masked, max_message_bytes=100
        ).code
        == 1009
    )


@pytest.mark.parametrize("size", [0, 125, 126, 6_500, 65_535])
def test_a_lone_unmasked_text_frame_is_kept_as_its_wire_bytes_when_canonical(size: int) -> None:
    """What a relay may forward as it is (:attr:`FrameReader.frame`): the one whole frame a
    read brought, if its length is written in the fewest bytes; else nothing."""
    for wire, kept in (
        (raw(FIN | OP_TEXT, b"x" * size, masked=False), True),
        (bytes((FIN | OP_TEXT, 126)) + size.to_bytes(2, "big") + b"x" * size, size > 125),
        (raw(FIN | OP_TEXT, b"x" * size, masked=True), False),  # (read by the other side)
        (raw(FIN | OP_BINARY, b"x" * size, masked=False), False),
    ):
        reader = FrameReader(masked=wire[1] & 0x80 != 0, max_message_bytes=BIG)
        reader.feed(wire)
        message = reader.next()
        assert message == ("x" * size if wire[0] & 0x0F == OP_TEXT else b"x" * size)
        assert (reader.frame == wire) if kept else reader.frame is None
        assert reader.next() is None and reader.buffered == 0


@settings(max_examples=60)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 125, 126, 300, 6_500, 65_535]), min_size=1, max_size=8),
    masked=st.booleans(),
    data=st.data(),
)
def test_several_text_frames_in_one_read_each_come_out_with_their_own_wire_bytes(
    sizes: list[int], masked: bool, data: st.DataObject
) -> None:
    """Under load one read holds several frames, and a read may end inside one: each message
    comes out whole, in order, and where the relay may forward its frame as it is, that
    frame is exactly the message's own wire bytes."""
    texts = [chr(65 + i % 26) * size for i, size in enumerate(sizes)]
    wires = [raw(FIN | OP_TEXT, text.encode(), masked=masked) for text in texts]
    stream = b"".join(wires)
    at_once = data.draw(st.booleans())
    reader = FrameReader(masked=masked, max_message_bytes=BIG)
    got: list[tuple[Event, bytes | None]] = []
    at = 0
    while at < len(stream):
        size = len(stream) if at_once else data.draw(st.integers(1, 70_000))
        reader.feed(stream[at : at + size])
        at += size
        while (event := reader.next()) is not None:
            got.append((event, None if reader.frame is None else bytes(reader.frame)))
    assert [event for event, _ in got] == texts
    frames = [frame for _, frame in got]
    if masked:  # (read by the other side: forwarded only once masked again)
        assert frames == [None] * len(wires)
    elif at_once:  # one read, every frame canonical: each is kept
        assert frames == wires
    else:  # a frame joined from two reads may not be kept, but one kept is its own
        pairs = zip(frames, wires, strict=True)
        assert all(frame is None or frame == wire for frame, wire in pairs)
    assert reader.buffered == 0


def test_a_64_bit_length_far_over_the_limit_is_refused_from_ten_bytes() -> None:
    header = bytes((FIN | OP_BINARY, 0x80 | 127)) + (1 << 40).to_bytes(8, "big")
    assert refused(header, max_message_bytes=BIG).code == 1009


def test_a_message_of_exactly_the_limit_is_accepted() -> None:
    assert read_all(raw(FIN | OP_TEXT, b"x" * 200), max_message_bytes=200) == ["x" * 200]


def test_fragments_adding_up_to_over_the_limit_are_refused_at_the_header_that_crosses_it() -> None:
    reader = FrameReader(masked=True, max_message_bytes=100)
    reader.feed(
        raw(OP_BINARY, b"a" * 60) + raw(OP_CONTINUATION, b"b" * 30) + raw(FIN | OP_PING, b"")
    )
    assert drain(reader) == [Ping(b"")]
    reader.feed(raw(FIN | OP_CONTINUATION, b"", length=11)[:2])  # the header: 60 + 30 + 11 > 100
    with pytest.raises(ProtocolError) as caught:
        reader.next()
    assert caught.value.code == 1009


def test_fragments_adding_up_to_exactly_the_limit_are_accepted() -> None:
    wire = (
        raw(OP_BINARY, b"a" * 60)
        + raw(OP_CONTINUATION, b"b" * 30)
        + raw(FIN | OP_CONTINUATION, b"c" * 10)
    )
    assert read_all(wire, max_message_bytes=100) == [b"a" * 60 + b"b" * 30 + b"c" * 10]


def test_the_limit_counts_each_message_afresh() -> None:
    wire = (
        raw(OP_BINARY, b"a" * 60)
        + raw(FIN | OP_CONTINUATION, b"b" * 40)
        + raw(FIN | OP_BINARY, b"c" * 100)
    )
    assert read_all(wire, max_message_bytes=100) == [b"a" * 60 + b"b" * 40, b"c" * 100]


def test_control_frames_do_not_count_against_a_small_limit() -> None:
    assert read_all(raw(FIN | OP_PING, b"p" * 50), max_message_bytes=10) == [Ping(b"p" * 50)]


# -- close_payload, masking ---------------------------------------------------------------------


@given(code=st.sampled_from([1000, 1011, 4999]), reason=st.text(max_size=130))
def test_close_payload_keeps_the_longest_whole_character_prefix_that_fits(
    code: int, reason: str
) -> None:
    payload = close_payload(code, reason)
    assert len(payload) <= 125
    assert int.from_bytes(payload[:2], "big") == code
    kept = payload[2:].decode()  # never a split character
    assert reason.startswith(kept)
    if len(kept) < len(reason):
        assert len(reason[: len(kept) + 1].encode()) > 123  # one more character would not fit
    assert read_all(raw(FIN | OP_CLOSE, payload)) == [Close(code, kept)]


def test_close_payload_cuts_a_long_reason_before_a_character_that_does_not_fit() -> None:
    payload = close_payload(1000, "é" * 100)  # 200 bytes of two-byte characters
    assert payload == b"\x03\xe8" + ("é" * 61).encode()
    assert close_payload(1000, "a" * 122 + "€") == b"\x03\xe8" + b"a" * 122  # 3-byte char at 122
    assert close_payload(1000, "a" * 120 + "€") == b"\x03\xe8" + ("a" * 120 + "€").encode()


@given(data=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
def test_apply_mask_is_xor_with_the_repeated_key(data: bytes, key: bytes) -> None:
    masked = apply_mask(data, key)
    assert masked == xor(data, key)
    assert apply_mask(bytearray(masked), key) == data
    assert apply_mask(memoryview(masked), key) == data


def test_mask_keys_are_four_fresh_bytes_each_across_refills() -> None:
    keys = MaskKeys()
    drawn = [keys.next() for _ in range(3000)]  # three refills of the 1,024-key pool
    assert all(len(key) == 4 for key in drawn)
    assert len(set(drawn)) > 2990


def test_each_masked_frame_gets_its_own_key() -> None:
    first, second = frame(OP_TEXT, b"same", mask=True), frame(OP_TEXT, b"same", mask=True)
    assert first[2:6] != second[2:6]
    assert xor(first[6:], first[2:6]) == b"same"
