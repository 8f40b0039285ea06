"""The codec's values beyond msgpack's own: datetimes, registered types, frames that cannot be rebuilt."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import struct
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passrpc import DecodeError, EncodeError, ProtocolError, TypeRegistry
from passrpc._decoder import Decoder
from passrpc._types import MAX_TYPE_NESTING
from passrpc._wire import Encoder, Kind, WireOptions, encode_frame

from .helpers import frame
from .model import Point, Record, Shape, Strict
from .strategies import datetimes, points, records, shapes
from .test_wire import FakeFd

UTC = datetime.timezone.utc
PARIS = datetime.timezone(datetime.timedelta(hours=1), "CET")


def round_trip(payload: tuple[Any, ...], wire: WireOptions | None = None) -> Any:
    """Encode one message and decode it alone (the decoder's fast path)."""
    data, _ = encode_frame(Kind.MESSAGE, payload, wire or WireOptions())
    decoder = Decoder(wire or WireOptions())
    decoder.receive_data(data)
    got = decoder.next_frame()
    assert got is not None
    assert got[0] == Kind.MESSAGE
    return got[1]


def decode_each(data: bytes, fds: list[FakeFd] | None = None) -> list[Any]:
    """Decode every frame of ``data``; a DecodeError counts as an outcome, not a failure."""
    decoder = Decoder()
    decoder.receive_data(data, fds or [])
    out: list[Any] = []
    while True:
        try:
            got = decoder.next_frame()
        except DecodeError as exc:
            out.append(("skipped", exc.kind))
            continue
        if got is None:
            return out
        out.append(got)


class _Aware(datetime.datetime):
    """A datetime subclass (as libraries make): msgpack packs only datetime itself."""


class TestBuiltinValues:
    @pytest.mark.parametrize(
        ("sent", "received"),
        [
            (None, None),
            (True, True),
            (False, False),
            (-(2**63), -(2**63)),
            (2**64 - 1, 2**64 - 1),
            (1.5, 1.5),
            ("text é", "text é"),
            (b"\x00\xff", b"\x00\xff"),
            (bytearray(b"ab"), b"ab"),
            (memoryview(b"ab"), b"ab"),
            ([1, [2]], [1, [2]]),
            ((1, (2,)), [1, [2]]),
            ({"a": 1, 2: "b", b"c": None, 1.5: 0, None: 1, True: 2}, None),
            (msgpack.ExtType(42, b"raw"), msgpack.ExtType(42, b"raw")),
        ],
    )
    def test_every_builtin_value_survives_a_trip(self, sent: Any, received: Any) -> None:
        """Each value of docs/protocol.md's table comes back as the table says."""
        expected = sent if received is None and sent is not None else received
        assert round_trip(("v", sent)) == ["v", expected]

    @pytest.mark.parametrize(
        "sent",
        [
            datetime.datetime(2024, 2, 29, 12, 30, 5, 123456, tzinfo=UTC),
            datetime.datetime(2024, 2, 29, 13, 30, tzinfo=PARIS),
            datetime.datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
            datetime.datetime(1, 1, 1, tzinfo=UTC),
            datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            _Aware(2020, 1, 1, tzinfo=UTC),
        ],
    )
    def test_aware_datetimes_arrive_in_utc_equal_to_what_was_sent(
        self, sent: datetime.datetime
    ) -> None:
        """A timezone-aware datetime travels as a Timestamp and comes back in UTC, equal."""
        (received,) = round_trip((sent,))
        assert type(received) is datetime.datetime
        assert received == sent
        assert received.tzinfo == UTC

    def test_a_datetime_travels_as_msgpack_timestamp(self) -> None:
        """On the wire it is extension type -1, which any msgpack library knows."""
        sent = datetime.datetime(2024, 1, 1, tzinfo=UTC)
        data, _ = encode_frame(Kind.MESSAGE, (sent,))
        body = msgpack.unpackb(data[4:])
        assert body == [0, 0, [msgpack.Timestamp.from_datetime(sent)]]

    @given(datetimes)
    def test_any_aware_datetime_round_trips(self, sent: datetime.datetime) -> None:
        """Whatever the instant and the zone, the datetime arrives equal to what was sent."""
        assert round_trip((sent,)) == [sent]

    def test_a_naive_datetime_is_refused_naming_the_fix(self) -> None:
        """A datetime without a timezone is refused before sending, saying how to attach one."""
        encoder = Encoder()
        with pytest.raises(EncodeError, match=r"naive datetime .* attach a timezone"):
            encoder.encode(Kind.MESSAGE, ("at", datetime.datetime(2024, 1, 1)))
        _, fds = encoder.encode(Kind.MESSAGE, ("ok",))  # still usable
        assert fds == []

    def test_an_unregistered_class_is_refused_naming_register_type(self) -> None:
        """An instance of a class nobody registered is refused, and the error says what to do."""

        @attrs.define
        class Loose:
            x: int

        with pytest.raises(EncodeError, match=r"Loose .*register_type"):
            Encoder().encode(Kind.MESSAGE, ("x", Loose(1)))

    def test_a_timestamp_out_of_datetimes_range_is_skipped(self) -> None:
        """A peer's timestamp beyond year 9999 cannot be a datetime: its frame is skipped."""
        data = frame(0, 0, ["t", msgpack.Timestamp(2**40, 0)]) + frame(0, 0, ["next"])
        assert decode_each(data) == [("skipped", 0), (0, ["next"])]


class TestRegisteredValues:
    def test_attrs_and_dataclass_values_nest_in_containers(self) -> None:
        """Registered values inside registered values, lists and dicts come back equal."""
        when = datetime.datetime(2024, 5, 1, tzinfo=UTC)
        shape = Shape("tri", [Point(0, 0), Point(1, 0)], {"best": Record(1, "a", 0.5, b"x")}, when)
        sent = ("draw", [shape, {"origin": Point(0, 0)}], {Point(1, 2): "as a key"})
        assert round_trip(sent) == [
            "draw",
            [shape, {"origin": Point(0, 0)}],
            {Point(1, 2): "as a key"},
        ]

    def test_a_class_with_functions_of_its_own_round_trips(self) -> None:
        """A class registered with encode and decode (Decimal, in tests.model) comes back."""
        assert round_trip((decimal.Decimal("1.10"),)) == [decimal.Decimal("1.10")]

    def test_a_private_field_round_trips_through_its_init_argument(self) -> None:
        """attrs' ``_note`` travels as ``_note`` and is passed back as ``note``."""
        record = Record(1, "a", 0.5, b"", "kept")
        (received,) = round_trip((record,))
        assert received == record

    @given(st.lists(st.one_of(points, records, shapes), max_size=4))
    def test_registered_values_survive_a_round_trip(self, sent: list[Any]) -> None:
        """Any mix of registered values, nested and in containers, arrives equal."""
        assert round_trip(("v", sent)) == ["v", sent]

    def test_an_unregistered_code_arrives_as_ext_type(self) -> None:
        """A code the receiver did not register arrives as msgpack.ExtType, data untouched."""

        @attrs.frozen
        class Only:
            x: int

        sender = TypeRegistry()
        sender.register_type(Only, 99)
        data, _ = encode_frame(Kind.MESSAGE, ("x", Only(5)), WireOptions(types=sender))
        [(_, payload)] = decode_each(data)
        assert payload == ["x", msgpack.ExtType(99, msgpack.packb({"x": 5}))]

    def test_a_raw_ext_type_of_a_registered_code_is_decoded(self) -> None:
        """The receiver decodes by code, whoever built the extension value."""
        raw = msgpack.ExtType(10, msgpack.packb({"x": 1, "y": 2}))
        assert round_trip((raw,)) == [Point(1, 2)]

    def test_descriptors_inside_registered_values_travel(self) -> None:
        """A descriptor inside a registered value is counted and placed like any other."""

        @dataclasses.dataclass
        class Holder:
            fd: Any
            name: str

        types = TypeRegistry()
        types.register_type(Holder, 30)
        wire = WireOptions(types=types)
        data, fds = encode_frame(Kind.MESSAGE, (Holder(FakeFd(7), "log"), FakeFd(8)), wire)
        assert fds == [7, 8]
        got = [FakeFd(70), FakeFd(80)]
        decoder = Decoder(wire)
        decoder.receive_data(data, got)
        assert decoder.next_frame() == (Kind.MESSAGE, [Holder(got[0], "log"), got[1]])
        assert not any(fd.closed for fd in got)

    def test_a_failing_encode_is_an_encode_error_naming_the_type(self) -> None:
        """An encode function that raises becomes EncodeError; the encoder stays usable."""

        class Odd:
            pass

        def broken(obj: Odd) -> None:
            raise RuntimeError("cannot")

        types = TypeRegistry()
        types.register_type(Odd, 31, encode=broken, decode=lambda v: Odd())
        encoder = Encoder(WireOptions(types=types))
        with pytest.raises(EncodeError, match=r"encoding a .*Odd \(extension type 31\) failed"):
            encoder.encode(Kind.MESSAGE, ("x", Odd()))
        assert encoder.encode(Kind.MESSAGE, ("ok",))[1] == []

    def test_a_value_inside_itself_is_refused_at_the_nesting_limit(self) -> None:
        """Registered values nest at most MAX_TYPE_NESTING deep: a cycle is refused, not a crash."""

        @dataclasses.dataclass
        class Node:
            next: Any

        types = TypeRegistry()
        types.register_type(Node, 32)
        node = Node(None)
        node.next = node
        with pytest.raises(EncodeError, match="nest more than"):
            Encoder(WireOptions(types=types)).encode(Kind.MESSAGE, (node,))

    def test_a_peer_nesting_too_deep_is_skipped(self) -> None:
        """A hand-made value nested past the limit is refused on arrival, the stream in step."""
        types = TypeRegistry()
        types.register_type(Point, 10)
        value: Any = {"x": 0, "y": 0}
        for _ in range(MAX_TYPE_NESTING + 1):
            value = {"x": msgpack.ExtType(10, msgpack.packb(value)), "y": 0}
        data = frame(0, 0, [msgpack.ExtType(10, msgpack.packb(value))]) + frame(0, 0, ["next"])
        decoder = Decoder(WireOptions(types=types))
        decoder.receive_data(data)
        with pytest.raises(DecodeError, match="nest more than"):
            decoder.next_frame()
        assert decoder.next_frame() == (0, ["next"])


def _strict(value: int) -> msgpack.ExtType:
    """A Strict value as a peer may send it, negative ones included (its decode refuses those)."""
    return msgpack.ExtType(13, msgpack.packb({"value": value}))


class TestFramesThatCannotBeRebuilt:
    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param([_strict(-1)], id="decode-raises"),
            pytest.param([msgpack.ExtType(10, b"\xc1")], id="data-not-msgpack"),
            pytest.param([msgpack.ExtType(10, msgpack.packb({"z": 1}))], id="unknown-field"),
            pytest.param([{(1, 2): "tuple key"}], id="tuple-key"),
            pytest.param([{"a": {(1,): 1}}], id="nested-tuple-key"),
        ],
    )
    @pytest.mark.parametrize("behind", [False, True], ids=["alone", "behind-another"])
    def test_the_frame_is_skipped_and_the_next_one_decodes(
        self, payload: list[Any], behind: bool
    ) -> None:
        """Skipped whole with DecodeError (fast path or general path alike); the stream stays in step."""
        lead = frame(0, 0, ["lead"]) if behind else b""
        data = lead + frame(0, 0, payload) + frame(3, 0, ["next", [], {}])
        got = decode_each(data)
        assert got[-2:] == [("skipped", 0), (3, ["next", [], {}])]

    def test_the_error_says_what_and_where(self) -> None:
        """The message names the stream offset, the type and the refusal; kind is the frame's."""
        decoder = Decoder()
        decoder.receive_data(frame(0, 0, [_strict(-5)]))
        with pytest.raises(DecodeError) as caught:
            decoder.next_frame()
        text = str(caught.value)
        assert "offset 0" in text
        assert "extension type 13 (tests.model.Strict)" in text
        assert "no negative value, got -5" in text
        assert "connection stays usable" in text
        assert caught.value.kind == 0

    def test_a_tuple_key_is_named_as_the_problem(self) -> None:
        """A dict keyed by tuples is refused saying which keys may travel."""
        decoder = Decoder()
        decoder.receive_data(frame(0, 0, [{(1, 2): 3}]))
        with pytest.raises(
            DecodeError, match=r"map key cannot be rebuilt .* tuple key arrives as a list"
        ):
            decoder.next_frame()

    @pytest.mark.parametrize("behind", [False, True])
    def test_a_skipped_frames_descriptors_are_closed(self, behind: bool) -> None:
        """Nobody can claim the descriptors of a skipped frame: they are closed, later ones kept."""
        lead = frame(0, 0, ["lead"]) if behind else b""
        fds = [FakeFd(1), FakeFd(2), FakeFd(3)]
        placeholder = msgpack.ExtType(1, b"\x00")
        data = (
            lead
            + frame(0, 2, [placeholder, _strict(-1), msgpack.ExtType(1, b"\x01")])
            + frame(0, 1, [placeholder])
        )
        got = decode_each(data, fds)
        assert got[-2:] == [("skipped", 0), (0, [fds[2]])]
        assert [fd.closed for fd in fds] == [True, True, False]

    def test_a_frame_with_descriptors_alone_in_the_buffer_is_skipped_too(self) -> None:
        """The fast path for messages with descriptors skips the same way, closing them."""
        fds = [FakeFd(1), FakeFd(2)]
        decoder = Decoder()
        decoder.receive_data(frame(0, 2, [msgpack.ExtType(1, b"\x00"), _strict(-1)]), fds)
        with pytest.raises(DecodeError, match=r"2 descriptor\(s\) closed"):
            decoder.next_frame()
        assert [fd.closed for fd in fds] == [True, True]
        decoder.receive_data(frame(0, 0, ["next"]))
        assert decoder.next_frame() == (0, ["next"])

    def test_a_body_whose_head_cannot_be_read_breaks_the_stream(self) -> None:
        """Skipping needs the frame's descriptor count; without it the stream is broken."""
        body = msgpack.packb([0, "x", [{(1,): 2}]])
        decoder = Decoder()
        decoder.receive_data(struct.pack(">I", len(body)) + body)
        with pytest.raises(ProtocolError) as caught:
            decoder.next_frame()
        assert not isinstance(caught.value, DecodeError)

    def test_before_authentication_no_registered_decode_runs(self) -> None:
        """Until the cap is lifted, registered codes stay ExtType and bad values break the stream."""
        decoder = Decoder()
        decoder.cap_frame_size(4096)
        decoder.receive_data(frame(2, 0, {"step": "hello", "v": _strict(-1)}))
        assert decoder.next_frame() == (2, {"step": "hello", "v": _strict(-1)})
        decoder.receive_data(frame(2, 0, {(1,): 2}))
        with pytest.raises(ProtocolError, match="map key cannot be rebuilt"):
            decoder.next_frame()

    def test_after_authentication_the_registry_decodes_again(self) -> None:
        """Lifting the cap brings the registry back."""
        decoder = Decoder()
        decoder.cap_frame_size(4096)
        decoder.cap_frame_size(None)
        decoder.receive_data(frame(0, 0, [_strict(3)]))
        assert decoder.next_frame() == (0, [Strict(3)])
