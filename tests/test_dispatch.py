"""Dispatch: one request in, its reply out, on bare frames and over Channel.pair() in-process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

import passrpc
from passrpc import (
    Channel,
    DecodeError,
    Peer,
    ProtocolError,
    RemoteError,
    TypeRegistry,
    UnknownMessage,
)
from passrpc._dispatch import Dispatcher, RawCall
from passrpc._protocol import (
    CALL,
    DESCRIBE,
    ERROR,
    ERROR_BAD_REQUEST,
    ERROR_REMOTE,
    ERROR_UNKNOWN_KIND,
    ERROR_UNKNOWN_MESSAGE,
    MESSAGE,
    BadRequest,
    parse_request,
)
from passrpc._registry import Handler

from .helpers import WAIT

PEER = Peer(pid=1, uid=2, gid=3)


def _dispatcher() -> Dispatcher:
    def add(a: int, b: int = 0) -> int:
        return a + b

    def pair() -> tuple[int, int]:
        return 1, 2

    def fail() -> None:
        raise ValueError("no")

    def unsendable() -> object:
        return object()

    def who() -> int:
        return passrpc.current_peer().uid

    def chat(channel: Channel, greeting: str) -> None:
        channel.write(greeting.upper())
        (answer,) = channel.read()
        channel.write(answer * 2)

    entries = [
        Handler("add", add, False),
        Handler("pair", pair, False),
        Handler("fail", fail, False),
        Handler("unsendable", unsendable, False),
        Handler("who", who, False),
        Handler("chat", chat, True),
    ]
    return Dispatcher({entry.name: entry for entry in entries})


class TestDispatchOnBareFrames:
    @pytest.mark.parametrize(
        ("kind", "payload", "reply"),
        [
            (MESSAGE, ["add", 1, 2], (MESSAGE, (3,))),
            (CALL, ["add", [1], {"b": 5}], (MESSAGE, (6,))),
            (MESSAGE, ["pair"], (MESSAGE, (1, 2))),
        ],
    )
    def test_a_request_gets_its_handlers_result(self, kind: int, payload: Any, reply: Any) -> None:
        """A MESSAGE or CALL runs the handler; a returned tuple is several values."""
        assert _dispatcher().dispatch(kind, payload) == reply

    @pytest.mark.parametrize(
        ("kind", "payload", "code"),
        [
            (MESSAGE, ["nope"], ERROR_UNKNOWN_MESSAGE),
            (MESSAGE, [1], ERROR_BAD_REQUEST),
            (CALL, ["add", 1, {}], ERROR_BAD_REQUEST),
            (10, ["add", 1], ERROR_UNKNOWN_KIND),
            (42, None, ERROR_UNKNOWN_KIND),
            (MESSAGE, ["fail"], ERROR_REMOTE),
        ],
    )
    def test_what_cannot_be_served_is_answered_with_an_error_frame(
        self, kind: int, payload: Any, code: str
    ) -> None:
        """Unknown names, malformed requests, unknown kinds and exceptions become ERROR frames."""
        reply_kind, reply = _dispatcher().dispatch(kind, payload)  # type: ignore[misc]
        assert reply_kind == ERROR
        assert reply["code"] == code

    def test_describe_answers_with_every_handler(self) -> None:
        """DESCRIBE gets the list of handler descriptions, raw ones marked."""
        kind, described = _dispatcher().dispatch(DESCRIBE, None)  # type: ignore[misc]
        assert kind == DESCRIBE
        assert {d["name"]: d["raw"] for d in described}["chat"] is True

    def test_describe_types_answers_the_dispatchers_registry(self) -> None:
        """DESCRIBE "types" names every registered code of the registry the server uses."""
        types = TypeRegistry()
        types.register_type(Decimal, 5, encode=str, decode=Decimal)
        dispatcher = Dispatcher({}, types)
        assert dispatcher.dispatch(DESCRIBE, "types") == (DESCRIBE, {5: "decimal.Decimal"})
        assert dispatcher.dispatch(DESCRIBE, None) == (DESCRIBE, [])

    @pytest.mark.parametrize(
        "payload",
        [
            ["add", 1, 2],
            ["add"],
            [],
            [1],
            ["add", {"k": 1}],
            "add",
            None,
            [b"add"],
            # dispatch's table lookup by the first value: unhashable ones,
            # and values that are no handler name, take the checked path.
            [["add"], 1],
            [{"add": 1}],
            [1.0],
            [True],
            [None],
            ["nope", 1],
            ["fail"],
            {"add": 1},
        ],
    )
    def test_the_inlined_message_path_matches_parse_request(self, payload: Any) -> None:
        """dispatch() takes a MESSAGE's name and arguments inline; it does what parse_request says."""
        dispatcher = _dispatcher()
        try:
            parsed = parse_request(MESSAGE, payload)
        except BadRequest as exc:
            expected: Any = exc.frame
        else:
            assert parsed is not None
            name, args, _ = parsed
            expected = dispatcher.dispatch(CALL, [name, args, {}])
        got = dispatcher.dispatch(MESSAGE, payload)
        if expected[0] == ERROR:  # the tracebacks differ by the path that ran the handler
            expected[1].pop("traceback")
            got[1].pop("traceback")  # type: ignore[index]
        assert got == expected

    def test_a_raw_handler_becomes_a_raw_call(self) -> None:
        """A raw handler is not run by dispatch: the caller runs it on the connection."""
        call = _dispatcher().dispatch(MESSAGE, ["chat", "hi"])
        assert isinstance(call, RawCall)
        assert call.args == ["hi"]


@pytest.fixture
def conversation() -> Iterator[Channel]:
    """A client Channel whose peer is Dispatcher.converse, running in a thread of this process."""
    client, server = Channel.pair(timeout=WAIT)
    thread = threading.Thread(target=_dispatcher().converse, args=(server, PEER))
    thread.start()
    try:
        yield client
    finally:
        client.close()
        thread.join(WAIT)
        server.close()
        assert not thread.is_alive()


class TestConverse:
    def test_requests_are_answered_in_order_and_the_connection_survives_errors(
        self, conversation: Channel
    ) -> None:
        """Errors of every kind leave the conversation going; replies come in request order."""
        c = conversation
        c.send_frame(MESSAGE, ["add", 2, 3])
        assert c.read() == (5,)
        c.write("fail")
        with pytest.raises(RemoteError, match="ValueError: no"):
            c.read()
        c.write("nope")
        with pytest.raises(UnknownMessage):
            c.read()
        c.send_frame(10, "a kind not in protocol version 1")
        with pytest.raises(ProtocolError, match="does not implement frame kind 10"):
            c.read()
        c.write("unsendable")
        with pytest.raises(RemoteError, match="handler 'unsendable' returned a value that cannot"):
            c.read()
        c.write("who")
        assert c.read() == (PEER.uid,)  # current_peer() is the connection's peer

    def test_a_request_that_cannot_be_decoded_is_answered_and_the_next_one_served(
        self, conversation: Channel
    ) -> None:
        """A tuple-keyed dict is skipped by the server with an "undecodable" error, in step."""
        c = conversation
        c.write("add", {(1, 2): 3})
        with pytest.raises(DecodeError, match=r"could not decode the request: .*map key"):
            c.read()
        c.write("add", 4)
        assert c.read() == (4,)

    def test_a_raw_handler_converses_then_requests_resume(self, conversation: Channel) -> None:
        """A raw handler talks on the channel itself; afterwards the next request is served."""
        c = conversation
        c.write("chat", "hi")
        assert c.read() == ("HI",)
        c.write("ab")
        assert c.read() == ("abab",)
        c.write("add", 1)
        assert c.read() == (1,)
