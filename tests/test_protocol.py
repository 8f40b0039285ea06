"""The pure protocol layer: what requests, replies, errors and descriptions mean."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from passrpc import (
    AuthenticationError,
    DecodeError,
    ProtocolError,
    RemoteError,
    TypeRegistry,
    UnknownMessage,
)
from passrpc._channel import Channel
from passrpc._client import proxy_class
from passrpc._protocol import (
    CALL,
    DESCRIBE,
    ERROR,
    ERROR_AUTHENTICATION,
    ERROR_BAD_REQUEST,
    ERROR_REMOTE,
    ERROR_UNDECODABLE,
    ERROR_UNKNOWN_KIND,
    ERROR_UNKNOWN_MESSAGE,
    HANDSHAKE,
    MAX_ERROR_TEXT,
    MESSAGE,
    STATUS,
    BadRequest,
    OutOfStep,
    describe_handlers,
    describe_reply,
    described_by_name,
    error_from_payload,
    error_payload,
    exception_reply,
    parse_described,
    parse_request,
    reply,
    reply_result,
    request,
    route,
    undecodable,
)
from passrpc._registry import Handler
from passrpc._wire import RESERVED_KINDS


class TestRequests:
    @pytest.mark.parametrize(
        ("args", "kwargs", "frame"),
        [
            (("Joe",), {}, (MESSAGE, ("hello", "Joe"))),
            ((), {}, (MESSAGE, ("hello",))),
            (("Joe",), {"last": "Dalton"}, (CALL, ("hello", ("Joe",), {"last": "Dalton"}))),
        ],
    )
    def test_request_uses_call_only_for_keyword_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], frame: tuple[int, Any]
    ) -> None:
        """A request is a MESSAGE without keyword arguments and a CALL with them."""
        assert request("hello", args, kwargs) == frame

    @pytest.mark.parametrize(
        ("kind", "payload", "parsed"),
        [
            (MESSAGE, ["hello", 1, 2], ("hello", [1, 2], None)),
            (CALL, ["hello", [1], {"x": 2}], ("hello", [1], {"x": 2})),
            (DESCRIBE, None, None),
            (DESCRIBE, "ignored", None),
            (STATUS, None, None),
        ],
    )
    def test_parse_request_returns_name_args_kwargs(
        self, kind: int, payload: Any, parsed: Any
    ) -> None:
        """A well-formed request parses to (name, args, kwargs); DESCRIBE to None."""
        assert parse_request(kind, payload) == parsed

    @pytest.mark.parametrize(
        ("kind", "payload"),
        [
            (MESSAGE, []),
            (MESSAGE, [1, 2]),
            (MESSAGE, "hello"),
            (CALL, ["hello", [1]]),
            (CALL, ["hello", {}, {}]),
            (CALL, ["hello", [], {1: 2}]),
            (ERROR, {}),
            (HANDSHAKE, {}),
        ],
    )
    def test_malformed_requests_are_answered_with_bad_request(
        self, kind: int, payload: Any
    ) -> None:
        """A frame that is not a request gets a bad_request ERROR frame, naming what came."""
        with pytest.raises(BadRequest) as info:
            parse_request(kind, payload)
        answer_kind, answer = info.value.frame
        assert answer_kind == ERROR
        assert answer["code"] == ERROR_BAD_REQUEST
        assert f"kind {kind!r}" in answer["message"]

    @pytest.mark.parametrize("kind", [*RESERVED_KINDS, 42, 127])
    def test_unknown_kinds_are_answered_with_unknown_kind(self, kind: int) -> None:
        """A kind the server does not implement gets an unknown_kind ERROR, not a closed connection."""
        with pytest.raises(BadRequest) as info:
            parse_request(kind, None)
        assert info.value.frame[1]["code"] == ERROR_UNKNOWN_KIND
        assert isinstance(error_from_payload(info.value.frame[1]), ProtocolError)

    def test_the_proxys_inlined_request_matches_request(self) -> None:
        """Proxy._call builds its request inline (the hot path); it sends what request() gives."""
        client, server = Channel.pair(timeout=5)
        proxy = proxy_class([{"name": "echo"}])("/nowhere", "pw", timeout=5)
        proxy._adopt(client)
        for args, kwargs in (((1, "two"), {}), ((1,), {"x": [3]})):
            server.send_frame(MESSAGE, [None])  # the reply, waiting before the call
            proxy.call("echo", *args, **kwargs)
            kind, payload = server.receive_frame()
            expected_kind, expected = request("echo", args, kwargs)
            assert (kind, payload) == (expected_kind, _as_lists(expected))
        proxy.close()
        server.close()


def _as_lists(value: Any) -> Any:
    """What msgpack gives back for ``value``: tuples arrive as lists."""
    if isinstance(value, (tuple, list)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


class TestReplies:
    @pytest.mark.parametrize(
        ("result", "payload"),
        [(1, (1,)), (None, (None,)), ((1, 2), (1, 2)), ([1, 2], ([1, 2],)), ((), ())],
    )
    def test_a_tuple_is_a_reply_of_several_values(self, result: Any, payload: Any) -> None:
        """reply() sends a tuple's items as the values, anything else as one value."""
        assert reply(result) == (MESSAGE, payload)

    @pytest.mark.parametrize(
        ("payload", "result"), [([1], 1), ([None], None), ([1, 2], (1, 2)), ([], ())]
    )
    def test_reply_result_unwraps_one_value_or_returns_a_tuple(
        self, payload: Any, result: Any
    ) -> None:
        """One value comes back as itself, several as a tuple."""
        assert reply_result(MESSAGE, payload) == result

    @pytest.mark.parametrize(
        ("code", "error"),
        [
            (ERROR_UNKNOWN_MESSAGE, UnknownMessage),
            (ERROR_AUTHENTICATION, AuthenticationError),
            (ERROR_BAD_REQUEST, ProtocolError),
            (ERROR_UNKNOWN_KIND, ProtocolError),
            (ERROR_UNDECODABLE, DecodeError),
            ("remote", RemoteError),
            ("a-code-from-the-future", RemoteError),
        ],
    )
    def test_error_frames_raise_their_error_in_step(self, code: str, error: type) -> None:
        """An ERROR frame raises the error its code names; the connection stays in step."""
        with pytest.raises(error) as info:
            reply_result(ERROR, error_payload(code, "T", "m"))
        assert not isinstance(info.value, OutOfStep)

    @pytest.mark.parametrize(("kind", "payload"), [(DESCRIBE, []), (MESSAGE, "x"), (7, None)])
    def test_anything_else_is_out_of_step(self, kind: int, payload: Any) -> None:
        """A frame that is no reply raises OutOfStep, a ProtocolError: close the connection."""
        with pytest.raises(OutOfStep, match=f"kind {kind!r}"):
            reply_result(kind, payload)

    def test_a_malformed_error_frame_is_a_protocol_error(self) -> None:
        """An ERROR payload that is not a map raises ProtocolError naming what came."""
        with pytest.raises(ProtocolError, match="malformed error frame: str 'x'"):
            reply_result(ERROR, "x")

    def test_exception_reply_names_the_type_and_carries_the_traceback(self) -> None:
        """A handler's exception becomes a remote error with module-qualified type and traceback."""

        class Custom(Exception):
            pass

        try:
            raise Custom("boom")
        except Custom as exc:
            kind, payload = exception_reply(type(exc), exc, exc.__traceback__)
        assert kind == ERROR
        error = error_from_payload(payload)
        assert isinstance(error, RemoteError)
        assert error.remote_type.endswith("Custom")
        assert error.remote_type.startswith("tests.test_protocol.")
        assert error.remote_message == "boom"
        assert "raise Custom" in error.remote_traceback

    def test_the_proxys_inlined_reply_result_matches_reply_result(self) -> None:
        """Proxy._call unwraps a MESSAGE reply inline (the hot path); it gives what reply_result gives."""
        client, server = Channel.pair(timeout=5)
        proxy = proxy_class([{"name": "echo"}])("/nowhere", "pw", timeout=5)
        proxy._adopt(client)
        for payload in ([1], [None], [1, [2]], [], [{"a": 1}, 2, 3]):
            server.send_frame(MESSAGE, payload)
            assert proxy.call("echo") == reply_result(MESSAGE, payload)
            server.receive_frame()
        proxy.close()
        server.close()


class TestTypedErrors:
    def test_exception_reply_names_the_nearest_builtin(self) -> None:
        """The ERROR frame of a handler's exception carries its nearest builtin class's name."""
        try:
            json.loads("{")
        except ValueError as exc:
            _, payload = exception_reply(type(exc), exc, exc.__traceback__)
        assert payload["type"] == "json.decoder.JSONDecodeError"
        assert payload["builtin"] == "ValueError"

    def test_a_remote_error_is_typed_by_its_builtin(self) -> None:
        """With the builtin key, the error is both RemoteError and that builtin."""
        error = error_from_payload(error_payload(ERROR_REMOTE, "app.Bad", "m", "tb", "KeyError"))
        assert isinstance(error, KeyError)
        assert isinstance(error, RemoteError)
        assert (error.remote_type, error.remote_message, error.remote_traceback) == (
            "app.Bad",
            "m",
            "tb",
        )

    @pytest.mark.parametrize("code", [ERROR_BAD_REQUEST, "a-code-from-the-future"])
    def test_only_remote_errors_are_typed(self, code: str) -> None:
        """The builtin key counts in a "remote" error only."""
        error = error_from_payload(error_payload(code, "X", "m", "", "ValueError"))
        assert not isinstance(error, ValueError)

    def test_an_older_servers_error_without_the_key_is_plain(self) -> None:
        """Four keys, as version 1 first sent them: a plain RemoteError, whatever its type name."""
        error = error_from_payload(error_payload(ERROR_REMOTE, "ValueError", "m"))
        assert type(error) is RemoteError

    def test_the_receivers_registry_types_it(self) -> None:
        """A registry's registered class wins over the builtin, in that registry only."""

        class Rejected(Exception):
            pass

        types = TypeRegistry()
        types.register_error(Rejected)
        payload = error_payload(
            ERROR_REMOTE, f"{__name__}.{Rejected.__qualname__}", "m", "", "Exception"
        )
        assert isinstance(error_from_payload(payload, types), Rejected)
        assert type(error_from_payload(payload)) is RemoteError
        with pytest.raises(Rejected):
            reply_result(ERROR, payload, types)

    def test_undecodable_says_what_the_server_could_not_decode(self) -> None:
        """The server's report of a skipped request is raised as DecodeError."""
        _, payload = undecodable(
            DecodeError("frame at stream offset 0: a map key cannot be rebuilt")
        )
        assert payload["code"] == ERROR_UNDECODABLE
        with pytest.raises(
            DecodeError, match="could not decode the request: frame at stream offset 0"
        ):
            reply_result(ERROR, payload)


class TestIntrospection:
    def test_describe_round_trips_names_signatures_docs_and_routes(self) -> None:
        """describe_handlers gives what described_by_name indexes and route() reads."""

        def hello(first: str, last: str = "Dalton") -> str:
            """Greets."""
            return first + last

        def raw(channel: Any, path: str) -> None:
            pass

        described = describe_handlers([Handler("hello", hello, False), Handler("raw", raw, True)])
        by_name = described_by_name(parse_described(DESCRIBE, described))
        assert by_name["hello"]["signature"] == "(first: str, last: str = 'Dalton')"
        assert by_name["hello"]["doc"] == "Greets."
        assert by_name["raw"]["signature"] == "(path: str)"  # the channel is not the caller's
        assert route(by_name["hello"]) == "call"
        assert route(by_name["raw"]) == "raw"
        assert route(None) == "call"  # an unknown name is asked for, and refused by the server

    @pytest.mark.parametrize("entry", [1, None, {"nom": "x"}, {"name": 3}])
    def test_malformed_descriptions_are_refused(self, entry: Any) -> None:
        """An entry that is not a handler description raises ProtocolError, not KeyError."""
        with pytest.raises(ProtocolError, match="not a handler description"):
            described_by_name([entry])

    def test_describe_types_answers_codes_and_names(self) -> None:
        """DESCRIBE "types" gets the registry's names; any other payload the handlers."""
        types = TypeRegistry()
        types.register_type(Decimal, 5, encode=str, decode=Decimal)
        assert describe_reply("types", [{"name": "x"}], types) == (DESCRIBE, {5: "decimal.Decimal"})
        for payload in (None, "handlers", ["types"], b"types"):
            assert describe_reply(payload, [{"name": "x"}], types) == (DESCRIBE, [{"name": "x"}])

    def test_an_error_in_answer_to_describe_is_raised(self) -> None:
        """A DESCRIBE answered with ERROR raises that error; another kind is a ProtocolError."""
        with pytest.raises(UnknownMessage):
            parse_described(ERROR, error_payload(ERROR_UNKNOWN_MESSAGE, "U", "no"))
        with pytest.raises(ProtocolError, match="kind 0"):
            parse_described(MESSAGE, [])


class TestErrorTexts:
    @pytest.mark.parametrize("size", [4096, 4097, 10_000, 1_000_000])
    def test_long_texts_are_cut_to_the_bound_saying_exactly_how_much(self, size: int) -> None:
        """An ERROR payload's message stays within MAX_ERROR_TEXT; the marker counts what was cut."""
        payload = error_payload("remote", "T", "m" * size)
        message = payload["message"]
        assert len(message) <= MAX_ERROR_TEXT
        if size > MAX_ERROR_TEXT:
            kept = message.index(" [... ")
            assert message.endswith(f" [... {size - kept} characters cut]")
        else:
            assert message == "m" * size
