"""Values and errors across a real process boundary: registered types, datetimes, typed
remote exceptions, frames that cannot be rebuilt, DESCRIBE "types", with both clients."""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import attrs
import msgpack
import pytest

import passrpc
from passrpc import DecodeError, EncodeError, RemoteError, Server, TypeRegistry
from passrpc._protocol import DESCRIBE

from .model import NotFound, Point, Record, Shape, Unregistered
from .test_aio import run

UTC = datetime.timezone.utc


def make_server(**kwargs: Any) -> Server:
    server = Server(**kwargs)

    @server.handler()
    def echo(value: object) -> object:
        return value

    @server.handler()
    def move(point: Point, dx: int = 1) -> Point:
        """Return a new Point: proof the server rebuilt the one it got."""
        return Point(point.x + dx, point.y)

    @server.handler()
    def kinds(*values: object) -> list[str]:
        return [type(value).__qualname__ for value in values]

    @server.handler()
    def now() -> datetime.datetime:
        return datetime.datetime.now(UTC)

    @server.handler()
    def tuple_keys() -> dict[tuple[int, int], int]:
        return {(1, 2): 3}

    @server.handler()
    def fail(name: str) -> None:
        if name == "json":
            json.loads("{")
        errors = {
            "value": ValueError("bad value"),
            "not_found": NotFound("no such user"),
            "unregistered": Unregistered("k"),
            "timeout": TimeoutError("slow"),
            "unicode": UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            "file": FileNotFoundError(2, "No such file or directory", "/nope"),
        }
        raise errors[name]

    @server.handler("chat", raw=True)
    def chat(channel: passrpc.Channel) -> None:
        (value,) = channel.read()
        channel.write(value, [value])

    return server


@pytest.fixture
def server() -> Iterator[Server]:
    server = make_server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(server: Server) -> Iterator[passrpc.Proxy]:
    """A proxy of ``server``, closed at the end (its sockets must not wait for the collector)."""
    with server.proxy(timeout=10) as proxy:
        yield proxy


def _channel_of(proxy: passrpc.Proxy) -> object:
    """The calling thread's connection of ``proxy``, to tell whether a call kept it."""
    connection = proxy._local.connection
    assert connection is not None
    return connection.channel


class TestRegisteredValues:
    def test_arguments_and_replies_are_the_registered_classes(self, proxy: passrpc.Proxy) -> None:
        """The server rebuilds a registered value it is sent, and its reply comes back as one."""
        assert proxy.move(Point(1, 2), dx=3) == Point(4, 2)
        assert proxy.kinds(Point(0, 0), Record(1, "a", 0.5, b"")) == ["Point", "Record"]

    def test_nested_values_in_containers_round_trip(self, proxy: passrpc.Proxy) -> None:
        """Dataclasses holding attrs values, in lists and dicts, come back equal."""
        when = datetime.datetime(2024, 5, 1, 8, tzinfo=UTC)
        shape = Shape("tri", [Point(0, 0), Point(1, 0)], {"r": Record(2, "b", 1.5, b"\x00")}, when)
        value = {"shapes": [shape, shape], "origin": Point(0, 0)}
        assert proxy.echo(value) == value

    def test_datetimes_cross_in_utc(self, proxy: passrpc.Proxy) -> None:
        """A server's aware datetime arrives in UTC; one sent in another zone comes back equal."""
        before = datetime.datetime.now(UTC)
        stamp = proxy.now()
        assert stamp.tzinfo == UTC
        assert before <= stamp <= datetime.datetime.now(UTC)
        paris = datetime.datetime(
            2024, 3, 1, 10, tzinfo=datetime.timezone(datetime.timedelta(hours=1))
        )
        assert proxy.echo(paris) == paris

    def test_a_naive_datetime_is_refused_before_sending(self, proxy: passrpc.Proxy) -> None:
        """EncodeError names the fix, nothing was sent, and the connection goes on."""
        assert proxy.echo(1) == 1
        channel = _channel_of(proxy)
        with pytest.raises(EncodeError, match="attach a timezone"):
            proxy.echo(datetime.datetime(2024, 1, 1))
        assert proxy.echo(2) == 2
        assert _channel_of(proxy) is channel

    def test_raw_channels_carry_registered_values(
        self, server: Server, proxy: passrpc.Proxy
    ) -> None:
        """A Channel and a raw handler's conversation carry them too."""
        with server.connect(timeout=10) as channel:
            channel.write("chat")
            channel.write(Point(5, 6))
            assert channel.read() == (Point(5, 6), [Point(5, 6)])
        with proxy.chat() as channel:
            channel.write(Record(1, "x", 2.0, b"y"))
            assert channel.read()[0] == Record(1, "x", 2.0, b"y")

    def test_the_asyncio_client_carries_them(self, server: Server) -> None:
        """aio proxies and channels send and receive registered values and datetimes."""
        when = datetime.datetime(2024, 1, 2, tzinfo=UTC)

        async def main() -> None:
            async with server.async_proxy(timeout=10) as proxy:
                assert await proxy.move(Point(1, 1)) == Point(2, 1)
                assert await proxy.echo([Shape("s", [Point(0, 1)], {}, when)]) == [
                    Shape("s", [Point(0, 1)], {}, when)
                ]
                async with await proxy.chat() as channel:
                    await channel.write(Point(7, 7))
                    assert await channel.read() == (Point(7, 7), [Point(7, 7)])

        run(main())

    def test_a_spawned_server_has_the_types_its_import_registers(self) -> None:
        """A spawned server imports its module, which registers the classes (tests.model)."""
        from .spawn_app import server

        server.start(method="spawn")
        try:
            with server.proxy(timeout=10) as proxy:
                assert proxy.echo(Point(3, 4)) == Point(3, 4)
        finally:
            server.stop()


class TestValuesThatCannotBeRebuilt:
    def test_a_tuple_keyed_argument_is_refused_and_the_connection_goes_on(
        self, proxy: passrpc.Proxy
    ) -> None:
        """The server skips the request and says why; the next call works on the same connection."""
        assert proxy.echo(0) == 0
        channel = _channel_of(proxy)
        with pytest.raises(DecodeError, match=r"could not decode the request: .*map key"):
            proxy.echo({(1, 2): "tuple key"})
        assert proxy.echo(1) == 1
        assert _channel_of(proxy) is channel

    def test_a_tuple_keyed_reply_is_refused_and_the_connection_goes_on(
        self, proxy: passrpc.Proxy
    ) -> None:
        """The client skips the reply and raises; the next call works on the same connection."""
        assert proxy.echo(0) == 0
        channel = _channel_of(proxy)
        with pytest.raises(DecodeError, match="map key cannot be rebuilt"):
            proxy.tuple_keys()
        assert proxy.echo(1) == 1
        assert _channel_of(proxy) is channel

    def test_a_value_whose_decode_fails_on_the_server(self, proxy: passrpc.Proxy) -> None:
        """A registered value the server cannot rebuild is an error reply, not a broken link."""
        negative = msgpack.ExtType(13, msgpack.packb({"value": -1}))
        with pytest.raises(DecodeError, match="Strict takes no negative value"):
            proxy.echo(negative)
        assert proxy.echo(2) == 2

    def test_the_asyncio_client_keeps_its_connection_too(self, server: Server) -> None:
        """An undecodable reply or request leaves the pooled connection in the pool."""

        async def main() -> None:
            async with server.async_proxy(timeout=10) as proxy:
                with pytest.raises(DecodeError):
                    await proxy.tuple_keys()
                with pytest.raises(DecodeError):
                    await proxy.echo({(1,): 1})
                assert await proxy.echo(3) == 3
                assert proxy.statistics().connections == 1

        run(main())

    def test_an_unregistered_code_arrives_as_ext_type(self) -> None:
        """A server's registered class the client does not know arrives as msgpack.ExtType."""

        @attrs.frozen
        class Secret:
            value: int

        types = TypeRegistry()
        types.register_type(Secret, 40)
        server = Server(types=types)

        @server.handler()
        def secret() -> Secret:
            return Secret(7)

        with server, passrpc.connect(server.socket_path, password=server.password) as proxy:
            assert proxy.secret() == msgpack.ExtType(40, msgpack.packb({"value": 7}))


class TestTypedRemoteErrors:
    def test_except_value_error_catches_a_handlers_value_error(self, proxy: passrpc.Proxy) -> None:
        """The caller's own except clause catches it; RemoteError's details stay available."""
        with pytest.raises(ValueError, match="bad value") as caught:
            proxy.fail("value")
        error = caught.value
        assert isinstance(error, RemoteError)
        assert error.remote_type == "ValueError"
        assert error.remote_message == "bad value"
        assert "raise errors[name]" in error.remote_traceback
        assert proxy.echo(1) == 1

    def test_a_subclass_of_a_builtin_is_caught_as_the_builtin(self, proxy: passrpc.Proxy) -> None:
        """json.JSONDecodeError's nearest builtin is ValueError, and so it is caught."""
        with pytest.raises(ValueError, match="Expecting") as caught:
            proxy.fail("json")
        assert caught.value.remote_type == "json.decoder.JSONDecodeError"  # type: ignore[attr-defined]

    def test_a_registered_application_exception_is_caught_by_its_class(
        self, proxy: passrpc.Proxy
    ) -> None:
        """tests.model registers NotFound: the caller catches NotFound (and LookupError)."""
        with pytest.raises(NotFound, match="no such user") as caught:
            proxy.fail("not_found")
        assert isinstance(caught.value, LookupError)
        assert isinstance(caught.value, RemoteError)

    def test_an_unregistered_application_exception_is_typed_by_its_builtin(
        self, proxy: passrpc.Proxy
    ) -> None:
        """Unregistered (a KeyError subclass) is a KeyError here, never an Unregistered."""
        with pytest.raises(KeyError) as caught:
            proxy.fail("unregistered")
        assert not isinstance(caught.value, Unregistered)
        assert caught.value.remote_type == "tests.model.Unregistered"  # type: ignore[attr-defined]

    def test_a_remote_timeout_never_passes_for_a_local_one(self, proxy: passrpc.Proxy) -> None:
        """A handler's TimeoutError is a plain RemoteError: no local except TimeoutError takes it."""
        with pytest.raises(RemoteError) as caught:
            proxy.fail("timeout")
        assert not isinstance(caught.value, TimeoutError)
        assert not isinstance(caught.value, passrpc.Timeout)

    @pytest.mark.parametrize(
        ("name", "builtin"), [("unicode", UnicodeError), ("file", FileNotFoundError)]
    )
    def test_builtins_with_richer_constructors(
        self, proxy: passrpc.Proxy, name: str, builtin: type[Exception]
    ) -> None:
        """UnicodeDecodeError arrives as a UnicodeError; FileNotFoundError as itself."""
        with pytest.raises(builtin):
            proxy.fail(name)

    def test_the_asyncio_client_types_them_too(self, server: Server) -> None:
        """``except ValueError`` works around an awaited call."""

        async def main() -> None:
            async with server.async_proxy(timeout=10) as proxy:
                with pytest.raises(ValueError, match="bad value"):
                    await proxy.fail("value")
                with pytest.raises(NotFound):
                    await proxy.fail("not_found")

        run(main())

    def test_a_raw_conversation_types_them(self, server: Server) -> None:
        """A Channel's read() raises a handler's error typed as the proxy does."""
        with server.connect(timeout=10) as channel:
            channel.write("fail", "value")
            with pytest.raises(ValueError, match="bad value"):
                channel.read()


class TestDescribeTypes:
    def test_describe_types_names_every_code(self, server: Server) -> None:
        """DESCRIBE "types" answers {code: module.QualName}; a plain DESCRIBE is as it was."""
        with server.connect(timeout=10) as channel:
            channel.send_frame(DESCRIBE, "types")
            kind, names = channel.receive_frame()
            assert kind == DESCRIBE
            assert names[10] == "tests.model.Point"
            assert names[14] == "decimal.Decimal"
            channel.send_frame(DESCRIBE, None)
            kind, handlers = channel.receive_frame()
            assert [entry["name"] for entry in handlers][:2] == ["echo", "move"]

    def test_connect_warns_once_when_a_code_means_another_class(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Code 10 is Point here and another class there: one warning, however many connects."""

        @attrs.frozen
        class Impostor:
            x: int

        types = TypeRegistry()
        types.register_type(Impostor, 10)
        server = Server(types=types)
        server.add_handler("ping", lambda: "pong")
        with server, caplog.at_level(logging.WARNING, logger="passrpc"):
            for _ in range(2):
                proxy = passrpc.connect(server.socket_path, password=server.password, timeout=10)
                assert proxy.ping() == "pong"
                proxy.close()
            aproxy = run(
                passrpc.aio.connect(server.socket_path, password=server.password, timeout=10)
            )
            aproxy.close()
        warnings = [r.getMessage() for r in caplog.records if "extension codes" in r.getMessage()]
        assert len(warnings) == 1
        assert "code 10 is tests.model.Point here" in warnings[0]
        assert "Impostor there" in warnings[0]

    def test_connect_with_matching_types_says_nothing(
        self, server: Server, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Both sides with the same registrations: no warning."""
        with caplog.at_level(logging.WARNING, logger="passrpc"):
            proxy = passrpc.connect(server.socket_path, password=server.password, timeout=10)
            assert proxy.move(Point(0, 0)) == Point(1, 0)
            proxy.close()
        assert not [r for r in caplog.records if "extension codes" in r.getMessage()]


def test_a_forked_server_inherits_registrations_made_before_start() -> None:
    """A type registered before start() travels to and from the forked server."""

    @attrs.frozen
    class Late:
        value: int

    types = TypeRegistry()
    server = make_server(types=types)
    types.register_type(Late, 50)
    with server:
        proxy = passrpc.connect(server.socket_path, password=server.password, types=types)
        assert proxy.echo(Late(1)) == Late(1)
        assert proxy.echo(os.getpid()) == os.getpid()
        proxy.close()
