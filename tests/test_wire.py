"""The pure wire codec: frames, descriptors placeholders, limits, garbage."""

from __future__ import annotations

import re
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passrpc import DecodeError, EncodeError, FrameTooLarge, Limits, ProtocolError
from passrpc._decoder import Decoder
from passrpc._wire import (
    DEFAULT_LIMITS,
    FD_EXT_CODE,
    Encoder,
    Kind,
    WireOptions,
    encode_frame,
)

from .helpers import frame
from .strategies import messages, values


class FakeFd:
    """Stands in for a descriptor object: has fileno() and remembers close()."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def fileno(self) -> int:
        return self.number

    def close(self) -> None:
        self.closed = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeFd) and other.number == self.number

    def __hash__(self) -> int:
        return self.number

    def __repr__(self) -> str:
        return f"FakeFd({self.number})"


class _NoFileno:
    """Says it has no descriptor the way some classes do: ``fileno = None``."""

    fileno = None


def normalize(value: Any) -> Any:
    """What a value looks like after a trip: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def decode_all(
    data: bytes, fds: list[FakeFd] | None = None, limits: Limits = DEFAULT_LIMITS
) -> list[Any]:
    decoder = Decoder(WireOptions(limits))
    decoder.receive_data(data, fds or [])
    frames = []
    while (got := decoder.next_frame()) is not None:
        frames.append(got)
    return frames


class TestRoundTrip:
    @given(messages)
    def test_message_survives_a_round_trip(self, message: tuple[Any, ...]) -> None:
        """Every msgpack type comes back equal, tuples as lists."""
        data, fds = encode_frame(Kind.MESSAGE, message)
        assert fds == []
        assert decode_all(data) == [(Kind.MESSAGE, normalize(message))]

    @settings(max_examples=50)
    @given(st.lists(messages, min_size=1, max_size=4), st.data())
    def test_every_split_decodes_the_same(
        self, batch: list[tuple[Any, ...]], data: st.DataObject
    ) -> None:
        """Feeding the stream in arbitrary pieces yields the same frames."""
        stream = b"".join(encode_frame(Kind.MESSAGE, m)[0] for m in batch)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        decoder = Decoder()
        got = []
        last = 0
        for cut in [*cuts, len(stream)]:
            decoder.receive_data(stream[last:cut])
            last = cut
            while (frame_ := decoder.next_frame()) is not None:
                got.append(frame_[1])
        assert got == [normalize(m) for m in batch]

    def test_one_byte_at_a_time_gives_nothing_early(self) -> None:
        """Nothing comes out until the frame's last byte is in."""
        data, _ = encode_frame(Kind.MESSAGE, ("hello", "Joe", "Dalton"))
        decoder = Decoder()
        for byte in data[:-1]:
            decoder.receive_data(bytes([byte]))
            assert decoder.next_frame() is None
        decoder.receive_data(data[-1:])
        assert decoder.next_frame() == (Kind.MESSAGE, ["hello", "Joe", "Dalton"])

    @given(st.lists(values, max_size=3), st.integers(1, 6))
    def test_descriptor_placeholders_come_back_as_the_objects_received(
        self, payload: list[Any], nfds: int
    ) -> None:
        """Each placeholder resolves to the descriptor object of its own frame."""
        sent = [FakeFd(100 + i) for i in range(nfds)]
        data, numbers = encode_frame(Kind.MESSAGE, ("x", *payload, sent))
        assert numbers == [100 + i for i in range(nfds)]
        received = [FakeFd(200 + i) for i in range(nfds)]
        [(_kind, got)] = decode_all(data, received)
        assert got[-1] == received
        assert not any(fd.closed for fd in received)

    def test_descriptors_go_to_their_own_frame_when_read_ahead(self) -> None:
        """A later frame's descriptors arriving with earlier bytes wait for their frame."""
        plain, _ = encode_frame(Kind.MESSAGE, ("plain",))
        with_fd, _ = encode_frame(Kind.MESSAGE, ("fd", FakeFd(5)))
        decoder = Decoder()
        early = FakeFd(42)
        decoder.receive_data(plain + with_fd[:3], [early])
        assert decoder.next_frame() == (Kind.MESSAGE, ["plain"])
        assert decoder.next_frame() is None
        decoder.receive_data(with_fd[3:])
        assert decoder.next_frame() == (Kind.MESSAGE, ["fd", early])

    def test_unmentioned_descriptors_are_closed(self) -> None:
        """A frame's descriptors that its payload does not name are closed, not leaked."""
        data = frame(Kind.MESSAGE, 2, ["x", msgpack.ExtType(FD_EXT_CODE, b"\x00")])
        fds = [FakeFd(1), FakeFd(2)]
        [(_, payload)] = decode_all(data, fds)
        assert payload[1] is fds[0]
        assert fds[1].closed
        assert not fds[0].closed

    def test_placeholder_in_a_frame_without_descriptors_is_an_ext_type(self) -> None:
        """Extension code 1 means a descriptor only in a frame that carries descriptors."""
        data = frame(Kind.MESSAGE, 0, ["x", msgpack.ExtType(FD_EXT_CODE, b"\x00")])
        assert decode_all(data) == [(Kind.MESSAGE, ["x", msgpack.ExtType(FD_EXT_CODE, b"\x00")])]

    def test_descriptors_no_frame_claims_are_refused(self) -> None:
        """Descriptors left over once every byte is decoded belong to no frame: refused, closed."""
        data = frame(Kind.MESSAGE, 0, ["x"])
        stray = [FakeFd(1), FakeFd(2)]
        with pytest.raises(ProtocolError, match="no frame claims"):
            decode_all(data, stray)
        assert all(fd.closed for fd in stray)

    def test_a_large_header_alone_does_not_reserve_its_body(self) -> None:
        """A header announcing 60 MiB grows the buffer only as bytes arrive."""
        decoder = Decoder()
        decoder.receive_data(struct.pack(">I", 60 << 20) + b"\x93")
        assert len(decoder.get_buffer()) <= 2 << 20

    def test_users_extension_types_pass_through(self) -> None:
        """Extension types under other codes are not mistaken for descriptors."""
        data, _ = encode_frame(Kind.MESSAGE, ("x", msgpack.ExtType(42, b"abc")))
        assert decode_all(data) == [(Kind.MESSAGE, ["x", msgpack.ExtType(42, b"abc")])]

    def test_control_frames_are_told_apart_from_messages(self) -> None:
        """A user message whose name looks like a control frame stays a message."""
        for payload in (["HANDSHAKE"], ["__describe__"], [1, 2, 3]):
            data, _ = encode_frame(Kind.MESSAGE, payload)
            assert decode_all(data) == [(Kind.MESSAGE, payload)]
        data, _ = encode_frame(Kind.DESCRIBE, None)
        assert decode_all(data) == [(Kind.DESCRIBE, None)]

    def test_large_frame_intact(self) -> None:
        """A 32 MiB bytes value comes through whole, fed in 1 MiB pieces."""
        blob = bytes(range(256)) * (32 * 4096)
        data, _ = encode_frame(Kind.MESSAGE, ("blob", blob))
        decoder = Decoder()
        step = 1 << 20
        for i in range(0, len(data), step):
            decoder.receive_data(data[i : i + step])
        assert decoder.next_frame() == (Kind.MESSAGE, ["blob", blob])


class TestLimits:
    def test_huge_length_prefix_refused_at_once(self) -> None:
        """A 4 GiB length prefix raises FrameTooLarge from the header alone."""
        decoder = Decoder()
        decoder.receive_data(b"\xff\xff\xff\xff")
        with pytest.raises(FrameTooLarge, match="4294967295 bytes"):
            decoder.next_frame()

    def test_huge_length_prefix_refused_by_get_buffer(self) -> None:
        """get_buffer never sizes a buffer from an oversized header."""
        decoder = Decoder()
        decoder.receive_data(b"\xff\xff\xff\xff")
        with pytest.raises(FrameTooLarge):
            decoder.get_buffer()

    @pytest.mark.parametrize(("size", "ok"), [(100, True), (101, False)])
    def test_frame_size_limit_at_n_and_n_plus_one(self, size: int, ok: bool) -> None:
        """A body of exactly max_frame_size is accepted; one byte more is refused."""
        limits = Limits(max_frame_size=100)
        filler = 100 - len(msgpack.packb([0, 0, ["", b""]]))
        body = msgpack.packb([0, 0, ["", b"x" * filler]])
        body += b"" if ok else b"\xc0"
        assert len(body) == size
        data = struct.pack(">I", len(body)) + body
        decoder = Decoder(WireOptions(limits))
        decoder.receive_data(data)
        if ok:
            assert decoder.next_frame() is not None
        else:
            with pytest.raises(FrameTooLarge):
                decoder.next_frame()

    def test_encoder_refuses_a_frame_over_the_limit(self) -> None:
        """The sender finds out before anything is sent."""
        with pytest.raises(FrameTooLarge, match="over the limit"):
            Encoder(WireOptions(Limits(max_frame_size=50))).encode(Kind.MESSAGE, ("x", b"y" * 100))

    @pytest.mark.parametrize(("nfds", "ok"), [(3, True), (4, False)])
    def test_descriptor_limit_at_n_and_n_plus_one(self, nfds: int, ok: bool) -> None:
        """max_fds descriptors pass; one more is refused on both sides."""
        limits = Limits(max_fds=3)
        payload = ("x", [FakeFd(i) for i in range(nfds)])
        if ok:
            Encoder(WireOptions(limits)).encode(Kind.MESSAGE, payload)
        else:
            with pytest.raises(FrameTooLarge, match="descriptors"):
                Encoder(WireOptions(limits)).encode(Kind.MESSAGE, payload)
        data = frame(Kind.MESSAGE, nfds, ["x"])
        fds = [FakeFd(i) for i in range(nfds)]
        if ok:
            decode_all(data, fds, limits)
        else:
            with pytest.raises(ProtocolError, match="descriptor count"):
                decode_all(data, fds, limits)
            assert all(fd.closed for fd in fds)

    def test_msgpack_array_limit(self) -> None:
        """msgpack's own limits are honoured."""
        data = frame(Kind.MESSAGE, 0, list(range(11)))
        with pytest.raises(ProtocolError):
            decode_all(data, limits=Limits(max_array_len=10))
        assert decode_all(frame(Kind.MESSAGE, 0, list(range(10))), limits=Limits(max_array_len=10))

    @pytest.mark.parametrize(
        "bad", [{"max_frame_size": 0}, {"max_frame_size": 2**32}, {"max_fds": 254}]
    )
    def test_limits_are_validated(self, bad: dict[str, int]) -> None:
        """Limits that the wire cannot carry are refused when made."""
        with pytest.raises(ValueError):
            Limits(**bad)


class TestGarbage:
    @pytest.mark.parametrize("kind", [5, 9, 99, 127])
    def test_unknown_kinds_decode_for_the_layer_above_to_answer(self, kind: int) -> None:
        """A kind this side does not know decodes (protocol version 1 leaves room to grow)."""
        decoder = Decoder()
        decoder.receive_data(frame(kind, 0, ["x"]))
        assert decoder.next_frame() == (kind, ["x"])

    @pytest.mark.parametrize(
        ("body", "match"),
        [
            (b"\xc1", "not valid"),  # 0xc1 is never used by msgpack
            (msgpack.packb("text"), "must be an array"),
            (msgpack.packb([0, 0]), "must be an array"),
            (msgpack.packb([128, 0, []]), "frame kind 128 is not an integer from 0 to 127"),
            (msgpack.packb([-1, 0, []]), "frame kind -1 is not an integer"),
            (msgpack.packb(["0", 0, []]), "frame kind '0' is not an integer"),
            (msgpack.packb([0, -1, []]), "descriptor count"),
            (msgpack.packb([0, 2, []]), "only 0 arrived"),
            (
                msgpack.packb([0, 1, [msgpack.ExtType(FD_EXT_CODE, b"\x00")]]),
                "only 0 arrived",
            ),
            (msgpack.packb([0, 0, []]) + b"\x00", "not valid"),  # trailing bytes
            (b"\x93\x00\x00" + b"\x91" * 5000 + b"\xc0", "not valid"),  # nested too deep
        ],
    )
    def test_garbage_raises_protocol_error_saying_what_and_where(
        self, body: bytes, match: str
    ) -> None:
        """Malformed bodies raise ProtocolError naming the problem and the offset."""
        data = frame(Kind.MESSAGE, 0, ["ok"]) + struct.pack(">I", len(body)) + body
        decoder = Decoder()
        decoder.receive_data(data)
        assert decoder.next_frame() == (Kind.MESSAGE, ["ok"])
        with pytest.raises(ProtocolError, match=match) as info:
            decoder.next_frame()
        assert "offset" in str(info.value)

    def test_decoder_stays_broken_and_closes_descriptors(self) -> None:
        """After garbage, every later call raises and held descriptors are closed."""
        decoder = Decoder()
        held = FakeFd(9)
        decoder.receive_data(struct.pack(">I", 1) + b"\xc1", [held])
        with pytest.raises(ProtocolError):
            decoder.next_frame()
        assert held.closed
        with pytest.raises(ProtocolError):
            decoder.next_frame()

    def test_placeholder_index_beyond_the_frames_count(self) -> None:
        """A placeholder that points past the frame's own descriptors is refused."""
        data = frame(Kind.MESSAGE, 1, [msgpack.ExtType(FD_EXT_CODE, b"\x01")])
        fds = [FakeFd(1), FakeFd(2)]
        with pytest.raises(ProtocolError, match="carries only 1"):
            decode_all(data, fds)
        assert all(fd.closed for fd in fds)

    @given(st.binary(max_size=64))
    def test_random_bytes_never_escape_as_other_errors(self, body: bytes) -> None:
        """Whatever the body, the decoder answers a frame, DecodeError (skipped) or ProtocolError."""
        data = struct.pack(">I", len(body)) + body
        try:
            decode_all(data)
        except (ProtocolError, DecodeError):
            pass

    @pytest.mark.parametrize("value", [object(), {1, 2}, 2**64, "\ud800", _NoFileno()])
    def test_unencodable_values_raise_encode_error(self, value: object) -> None:
        """Values msgpack cannot carry raise EncodeError (a TypeError) naming the problem."""
        with pytest.raises(EncodeError):
            Encoder().encode(Kind.MESSAGE, ("x", value))
        with pytest.raises(TypeError):
            Encoder().encode(Kind.MESSAGE, ("x", value))

    def test_encoder_recovers_after_an_error(self) -> None:
        """A failed encode leaves the encoder usable and forgets its descriptors."""
        encoder = Encoder()
        with pytest.raises(EncodeError):
            encoder.encode(Kind.MESSAGE, (FakeFd(3), object()))
        _, fds = encoder.encode(Kind.MESSAGE, ("ok",))
        assert fds == []


class TestLargeValuesAndDescriptorCounts:
    @pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
    def test_out_of_line_value_gives_the_same_bytes(self, kind: type) -> None:
        """A large top-level binary value, sent as its own buffer, makes the very same frame."""
        blob = bytes(range(256)) * 1024  # 256 KiB
        message = ("echo", 1, kind(blob), {"k": [1, 2]}, kind(blob[:70000]))
        buffers, fds = Encoder().encode(Kind.MESSAGE, message)
        assert fds == []
        assert len(buffers) > 1
        expected = frame(Kind.MESSAGE, 0, ["echo", 1, blob, {"k": [1, 2]}, blob[:70000]])
        assert b"".join(bytes(b) for b in buffers) == expected
        assert decode_all(expected) == [
            (Kind.MESSAGE, ["echo", 1, blob, {"k": [1, 2]}, blob[:70000]])
        ]

    def test_out_of_line_value_with_descriptors(self) -> None:
        """Descriptors in a message with a large value are counted and placed."""
        blob = b"z" * 100_000
        buffers, fds = Encoder().encode(Kind.MESSAGE, ("x", FakeFd(7), blob, [FakeFd(8)]))
        assert fds == [7, 8]
        got = [FakeFd(70), FakeFd(80)]
        [(_, payload)] = decode_all(b"".join(bytes(b) for b in buffers), got)
        assert payload == ["x", got[0], blob, [got[1]]]

    @pytest.mark.parametrize("kind", [0, 1, 3, 9, 127, 128, 300])
    @pytest.mark.parametrize("nfds", [0, 1, 127, 128, 253])
    def test_head_is_what_msgpack_packs(self, kind: int, nfds: int) -> None:
        """The body's head, written beside msgpack, is msgpack's own ``[kind, nfds, ...]``."""
        limits = Limits(max_fds=253)
        payload = ["head", [FakeFd(i) for i in range(nfds)], {"k": 1}]
        data, _ = encode_frame(kind, payload, WireOptions(limits))
        placeholders = [_placeholder(i) for i in range(nfds)]
        assert data == frame(kind, nfds, ["head", placeholders, {"k": 1}])

    @pytest.mark.parametrize("inner", [1, {1: 2}], ids=["fast-path", "general-path"])
    def test_the_deepest_payload_the_encoder_takes_decodes(self, inner: Any) -> None:
        """What the encoder packs, to msgpack's nesting limit, the decoder rebuilds on every path.

        A map with an int key takes the decoder's general path; a plain one the fast path.
        """

        def nested(depth: int) -> Any:
            value = inner
            for _ in range(depth):
                value = [value]
            return value

        def takes(depth: int) -> bool:
            try:
                Encoder().encode(Kind.MESSAGE, (nested(depth),))
            except EncodeError:
                return False
            return True

        low, high = 1, 4096  # takes(low), not takes(high)
        assert takes(low)
        assert not takes(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if takes(middle) else (low, middle)
        data, _ = encode_frame(Kind.MESSAGE, (nested(low),))
        [(kind, [value])] = decode_all(data)
        assert kind == Kind.MESSAGE
        for _ in range(low):  # unwrapped by hand: == would recurse past Python's limit
            [value] = value
        assert value == inner

    @pytest.mark.parametrize("nfds", [1, 127, 128, 200])
    def test_descriptor_count_is_written_for_any_count(self, nfds: int) -> None:
        """Counts below 128 take one byte, larger ones msgpack's uint 8: both decode."""
        limits = Limits(max_fds=253)
        sent = [FakeFd(i) for i in range(nfds)]
        data, numbers = encode_frame(Kind.MESSAGE, ("fds", sent), WireOptions(limits))
        assert numbers == list(range(nfds))
        got = [FakeFd(1000 + i) for i in range(nfds)]
        [(_, payload)] = decode_all(data, got, limits)
        assert payload == ["fds", got]


def _placeholder(index: int, width: int = 1) -> msgpack.ExtType:
    return msgpack.ExtType(FD_EXT_CODE, index.to_bytes(width, "big"))


def _outcome(data: bytes, nfds_sent: int, after_another_frame: bool) -> tuple[Any, ...]:
    """Decode ``data`` alone (the decoder's one-whole-frame fast path) or behind
    another frame (the general path); say what came out and what was closed."""
    fds = [FakeFd(100 + i) for i in range(nfds_sent)]
    lead = frame(Kind.MESSAGE, 0, ["lead"]) if after_another_frame else b""
    decoder = Decoder()
    decoder.receive_data(lead + data, fds)
    if lead:
        assert decoder.next_frame() == (Kind.MESSAGE, ["lead"])
    try:
        got = decoder.next_frame()
    except ProtocolError as exc:
        result: Any = ("error", re.sub(r"offset \d+", "offset N", str(exc)))
    else:
        result = ("frame", repr(normalize(got)))
    return result, [fd.closed for fd in fds]


class TestBothDecodingPathsAgree:
    """A frame alone in the buffer takes a fast path; behind another, the general
    one. Whatever the frame, both give the same payload, close the same
    descriptors and raise the same error."""

    @pytest.mark.parametrize(
        ("body", "nfds_sent"),
        [
            pytest.param([0, 1, ["x", _placeholder(0)]], 1, id="one-descriptor"),
            pytest.param([0, 2, ["x", _placeholder(1)]], 2, id="one-unmentioned"),
            pytest.param([0, 2, [_placeholder(0), _placeholder(0)]], 2, id="one-named-twice"),
            pytest.param([0, 2, [{1: _placeholder(0), "a": _placeholder(1)}]], 2, id="int-keys"),
            pytest.param([0, 1, [_placeholder(0), msgpack.ExtType(42, b"ok")]], 1, id="user-ext"),
            pytest.param([0, 1, [_placeholder(0, 4)]], 1, id="wide-placeholder"),
            pytest.param([0, 1, [_placeholder(0, 5)]], 1, id="too-wide-placeholder"),
            pytest.param([0, 1, [_placeholder(1)]], 2, id="placeholder-past-count"),
            pytest.param([0, 1, [_placeholder(2)]], 2, id="placeholder-past-arrived"),
            pytest.param([0, 2, [_placeholder(0)]], 1, id="count-over-arrived"),
            pytest.param([0, 1, []], 2, id="fewer-counted-than-arrived"),
            pytest.param([0, 0, ["plain"]], 1, id="stray-with-plain"),
            pytest.param([0, 1, [_placeholder(0), b"\xff".decode("latin-1")]], 1, id="str"),
        ],
    )
    def test_same_outcome(self, body: list[Any], nfds_sent: int) -> None:
        packed = msgpack.packb(body)
        data = struct.pack(">I", len(packed)) + packed
        assert _outcome(data, nfds_sent, False) == _outcome(data, nfds_sent, True)

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b"\x93\x00\x01\x91\xd4\x01\x00\xc0", id="trailing-byte"),
            pytest.param(b"\x93\x00\x01\x92\xd4\x01\x00\xa1\xff", id="bad-utf8"),
            pytest.param(b"\x93\x00\x01\x91\xd4\x01", id="cut-short"),
        ],
    )
    def test_same_outcome_for_broken_bodies(self, raw: bytes) -> None:
        data = struct.pack(">I", len(raw)) + raw
        outcomes = _outcome(data, 1, False), _outcome(data, 1, True)
        assert outcomes[0] == outcomes[1]
        assert outcomes[0][0][0] == "error"
        assert outcomes[0][1] == [True]  # the descriptor did not leak

    @pytest.mark.parametrize(
        ("payload", "nfds"),
        [(["plain", {"k": 1}], 0), (["x", FakeFd(3)], 1), ([{1: FakeFd(3)}, FakeFd(4)], 2)],
    )
    def test_a_frame_alone_takes_the_fast_path(self, payload: list[Any], nfds: int) -> None:
        """The comparison above means something only if the fast path runs: it does."""
        data, _ = encode_frame(Kind.MESSAGE, payload)
        decoder = Decoder()

        def general(*args: Any) -> Any:
            raise AssertionError("the general path ran")

        decoder._next_general = general  # type: ignore[method-assign]
        decoder.receive_data(data, [FakeFd(100 + i) for i in range(nfds)])
        assert decoder.next_frame() is not None
