"""The command line end to end: ``python -m passrpc`` in real subprocesses, real signals."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

import passrpc

from .helpers import REPO, WAIT, cli_env, wait_while_running

PASSWORD = "cli-test-password"
START_DEADLINE = 20.0


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m passrpc ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "passrpc", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    """Poll ``condition`` until it holds; fail early if ``process`` exits, or at the deadline."""
    wait_while_running(condition, process, what=what, timeout=START_DEADLINE)


def read_stderr_until(process: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    """Read the server's stderr until a line matches ``pattern``; return the match."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + START_DEADLINE
    while True:
        match = re.search(pattern, seen.decode(errors="replace"))
        if match:
            return match
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no line matching {pattern!r} within {START_DEADLINE} s: {seen!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"the server exited before logging {pattern!r}: {seen!r}")
        seen += chunk


@contextmanager
def serving(
    *args: str, socket_path: str | None = None, **env: str
) -> Iterator[subprocess.Popen[str]]:
    """Run ``python -m passrpc ARGS`` in the background; wait for ``socket_path`` if given.

    The process is killed and reaped on the way out if the test left it running.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "passrpc", *args],
        cwd=REPO,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if socket_path is not None:
            wait_until(lambda: os.path.exists(socket_path), process, "socket file")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[str, str]:
    """Send ``sig`` and wait for the process to end; return its stdout and stderr."""
    process.send_signal(sig)
    return process.communicate(timeout=30)


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[str]:
    """A short private directory for the sockets of this module's servers."""
    path = tempfile.mkdtemp(prefix="prpc-cli-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def greeter(shared_dir: str) -> Iterator[str]:
    """One served tests.apps.greeter:server for every client test; yields its socket path."""
    path = os.path.join(shared_dir, "greeter.sock")
    with serving(
        "tests.apps.greeter:server", "--socket", path, socket_path=path, PASSRPC_PASSWORD=PASSWORD
    ) as process:
        yield path
        _, err = stop(process)
        assert process.returncode == 0, err


def call(
    socket_path: str, *args: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m passrpc call --socket SOCKET ARGS`` with ``password`` in the environment."""
    return run_cli("call", "--socket", socket_path, *args, PASSRPC_PASSWORD=password)


class TestServe:
    """``python -m passrpc [serve] module:attribute``."""

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_signal_stops_gracefully(self, sockdir: Path, sig: int) -> None:
        """SIGTERM or SIGINT stops the server: socket removed, exit status 0."""
        path = str(sockdir / "s.sock")
        with serving(
            "tests.apps.greeter:server",
            "--socket",
            path,
            socket_path=path,
            PASSRPC_PASSWORD=PASSWORD,
        ) as process:
            assert call(path, "hello", "Joe", "Dalton").returncode == 0
            _, err = stop(process, sig)
        assert process.returncode == 0, err
        assert not os.path.exists(path)
        assert f"received {signal.Signals(sig).name}; stopping" in err

    def test_short_form_equals_serve_subcommand(self, sockdir: Path) -> None:
        """``serve app:server`` works as the short form does."""
        path = str(sockdir / "s.sock")
        with serving(
            "serve",
            "tests.apps.greeter:server",
            "--socket",
            path,
            socket_path=path,
            PASSRPC_PASSWORD=PASSWORD,
        ) as process:
            result = call(path, "hello", "Joe", "Dalton")
            stop(process)
        assert json.loads(result.stdout) == ["Hello Joe Dalton, how are you?", 1234]
        assert process.returncode == 0

    def test_password_file_is_new_0600_and_never_printed(self) -> None:
        """Without a password given, the server's own one goes to SOCKET.password, mode 0600."""
        with serving("tests.apps.greeter:server") as process:
            match = read_stderr_until(process, r"password in (\S+) ")
            password_file = match.group(1)
            socket_path = password_file.removesuffix(".password")
            assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
            password = Path(password_file).read_text().rstrip("\n")
            wait_until(lambda: os.path.exists(socket_path), process, "socket file")
            # The client finds the password beside the socket by itself.
            result = run_cli("call", "--socket", socket_path, "hello", "Joe", "Dalton")
            assert result.returncode == 0, result.stderr
            out, err = stop(process)
        assert process.returncode == 0, err
        assert password not in out + err + result.stdout + result.stderr
        assert not os.path.exists(password_file)
        assert not os.path.exists(os.path.dirname(socket_path))

    def test_stale_password_file_is_replaced(self, sockdir: Path) -> None:
        """A password file left by a dead server is replaced by a fresh one of mode 0600."""
        path = str(sockdir / "s.sock")
        stale = Path(path + ".password")
        stale.write_text("stale\n")
        stale.chmod(0o644)
        with serving("tests.apps.greeter:server", "--socket", path, socket_path=path) as process:
            assert stale.read_text() != "stale\n"
            assert stat.S_IMODE(stale.stat().st_mode) == 0o600
            result = run_cli("call", "--socket", path, "hello", "A", "B")
            _, err = stop(process)
        assert result.returncode == 0, result.stderr
        assert "removed the stale password file" in err
        assert not stale.exists()

    def test_password_file_option(self, sockdir: Path) -> None:
        """``--password-file`` gives the password to serve and to call alike."""
        path, secret = str(sockdir / "s.sock"), sockdir / "secret"
        secret.write_text("from-a-file\n")
        secret.chmod(0o600)
        with serving(
            "tests.apps.greeter:server",
            "--socket",
            path,
            "--password-file",
            str(secret),
            socket_path=path,
        ) as process:
            result = run_cli(
                "call", "--socket", path, "--password-file", str(secret), "hello", "A", "B"
            )
            with passrpc.connect(path, password="from-a-file", timeout=10) as proxy:
                assert proxy.hello("C", "D") == ("Hello C D, how are you?", 1234)
            stop(process)
        assert result.returncode == 0, result.stderr
        assert not os.path.exists(path + ".password")

    @pytest.mark.parametrize(
        ("target", "greeting"),
        [
            ("tests.apps.greeter:GreeterServer", "Hello A B, from a subclass"),
            ("tests.apps.greeter:make_server", "Hello A B, from a subclass"),
            ("examples.passenger_subclass:MyServer", "Hello A B, how are you?"),
        ],
    )
    def test_serves_a_subclass_or_a_factory(
        self, sockdir: Path, target: str, greeting: str
    ) -> None:
        """A Server subclass or a zero-argument factory is called to make the server."""
        path = str(sockdir / "s.sock")
        with serving(
            target, "--socket", path, socket_path=path, PASSRPC_PASSWORD=PASSWORD
        ) as process:
            result = call(path, "hello", "A", "B")
            stop(process)
        assert json.loads(result.stdout) == [greeting, 1234], result.stderr
        assert process.returncode == 0

    @pytest.mark.parametrize(
        ("target", "message"),
        [
            ("passrpc_no_such_module:server", "no module named 'passrpc_no_such_module'"),
            ("tests.apps.greeter:nope", "has no attribute 'nope'"),
            ("tests.apps.broken:server", "importing 'tests.apps.broken' failed: RuntimeError"),
            ("tests.apps.needs_missing:server", "importing 'tests.apps.needs_missing' failed"),
            ("tests.apps.greeter:answer", "is 42, not a passrpc.Server"),
        ],
    )
    def test_bad_target_is_a_one_line_usage_error(self, target: str, message: str) -> None:
        """A bad module:attribute exits 2 with one line naming what was wrong."""
        result = run_cli(target)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
        assert result.stderr.startswith("passrpc serve: error: ")

    def test_failing_initialize_server_exits_1_and_cleans_up(self, sockdir: Path) -> None:
        """An app whose initialize_server raises: traceback logged, exit 1, no files left."""
        path = str(sockdir / "s.sock")
        result = run_cli("tests.apps.failing_init:server", "--socket", path)
        assert result.returncode == 1
        assert "RuntimeError: initialize_server of this fixture app fails" in result.stderr
        assert not os.path.exists(path)
        assert not os.path.exists(path + ".password")

    def test_taken_socket_fails(self, greeter: str) -> None:
        """Serving on a socket a live server listens on exits 1 and leaves that server alone."""
        result = run_cli(
            "tests.apps.greeter:server", "--socket", greeter, PASSRPC_PASSWORD=PASSWORD
        )
        assert result.returncode == 1
        assert "already listens" in result.stderr
        assert call(greeter, "hello", "still", "there").returncode == 0

    def test_readme_first_command(self, sockdir: Path) -> None:
        """``python -m passrpc examples.hello:server`` serves the example; call reaches it."""
        path = str(sockdir / "s.sock")
        with serving("examples.hello:server", "--socket", path, socket_path=path) as process:
            result = run_cli("call", "--socket", path, "hello", "Joe", "Dalton")
            stop(process)
        assert json.loads(result.stdout) == ["Hello Joe Dalton, how are you?", 1234]
        assert process.returncode == 0


class TestCall:
    """``python -m passrpc call``."""

    def test_prints_reply_as_json(self, greeter: str) -> None:
        """A reply of several values prints as one JSON array on stdout."""
        result = call(greeter, "hello", "Joe", "Dalton")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["Hello Joe Dalton, how are you?", 1234]

    def test_arguments_are_json_where_they_parse(self, greeter: str) -> None:
        """3 is a number, '"3"' a string, Joe a string, and -k passes keywords."""
        result = call(
            greeter, "echo", "3", '"3"', "Joe", "[1, 2]", '{"a": null}', "true", "-k", "n=1.5"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [[3, "3", "Joe", [1, 2], {"a": None}, True], {"n": 1.5}]

    def test_bytes_and_descriptors_are_tagged(self, greeter: str) -> None:
        """Bytes print as {"$bytes": base64}; a descriptor as {"$fd": N} with a note on stderr."""
        result = call(greeter, "blob")
        assert json.loads(result.stdout) == {"$bytes": "AAFiaW5hcnn/"}
        result = call(greeter, "pipe")
        assert result.returncode == 0, result.stderr
        assert set(json.loads(result.stdout)) == {"$fd"}
        assert "file descriptor" in result.stderr

    def test_datetimes_print_as_iso_8601(self, greeter: str) -> None:
        """A datetime reply prints as its ISO 8601 text, in UTC."""
        result = call(greeter, "when")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == "2024-05-01T12:30:00+00:00"

    def test_extension_values_it_cannot_decode_are_tagged(self, greeter: str) -> None:
        """A registered value the command line has not registered prints as {"$ext": [code, base64]}."""
        result = call(greeter, "point", "3", "4")
        assert result.returncode == 0, result.stderr
        data = base64.b64encode(msgpack.packb({"x": 3, "y": 4})).decode()
        assert json.loads(result.stdout) == {"$ext": [10, data]}

    def test_tagged_arguments_become_bytes_and_extension_values(self, greeter: str) -> None:
        """{"$bytes": ...} is sent as bytes, {"$ext": [code, ...]} as that extension value."""
        point = base64.b64encode(msgpack.packb({"x": 1, "y": 2})).decode()
        result = call(greeter, "kinds", '{"$bytes": "AAE="}', f'{{"$ext": [10, "{point}"]}}', "[]")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["bytes", "Point", "list"]
        result = call(greeter, "echo", '[{"$bytes": "AAE="}]')
        assert json.loads(result.stdout) == [[[{"$bytes": "AAE="}]], {}]

    @pytest.mark.parametrize(
        "argument", ['{"$bytes": "not base64!"}', '{"$bytes": 3}', '{"$ext": [300, ""]}']
    )
    def test_malformed_tagged_arguments_are_usage_errors(self, greeter: str, argument: str) -> None:
        """A tag that does not parse exits 2 saying what was expected."""
        result = call(greeter, "echo", argument)
        assert result.returncode == 2
        assert "$" in result.stderr
        assert result.stdout == ""

    def test_remote_error_goes_to_stderr_with_status_1(self, greeter: str) -> None:
        """A handler's exception is reported on stderr, type and message, and exits 1."""
        result = call(greeter, "fail", "it broke")
        assert result.returncode == 1
        assert result.stdout == ""
        assert "ValueError: it broke" in result.stderr
        assert "handler 'fail' raised" in result.stderr

    def test_unknown_handler_exits_1(self, greeter: str) -> None:
        """Calling a handler the server lacks names the ones it has."""
        result = call(greeter, "nope")
        assert result.returncode == 1
        assert "no handler for 'nope'" in result.stderr

    def test_wrong_password_fails_at_once(self, greeter: str) -> None:
        """A wrong password exits 1 with a clear message, without waiting out the timeout."""
        started = time.monotonic()
        result = call(greeter, "--timeout", "25", "hello", "a", "b", password="wrong")
        assert time.monotonic() - started < 10
        assert result.returncode == 1
        assert "authentication failed" in result.stderr
        assert "PASSRPC_PASSWORD" in result.stderr

    def test_a_missing_socket_says_so_before_any_password(self, sockdir: Path) -> None:
        """A mistyped path is reported as a missing socket (with the path), not a password problem."""
        path = str(sockdir / "none.sock")
        for command in ("call", "list", "status"):
            args = [command, "--socket", path, *(["hello"] if command == "call" else [])]
            result = run_cli(*args)
            assert result.returncode == 1, result.stderr
            assert f"no socket at {path!r}: is the server running" in result.stderr
            assert "password" not in result.stderr
            assert "Traceback" not in result.stderr

    def test_a_socket_nobody_listens_on_exits_1(self, sockdir: Path) -> None:
        """A socket file with no server behind it is a clear failure, not a traceback."""
        path = str(sockdir / "s.sock")
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(path)
        result = call(path, "hello")
        assert result.returncode == 1
        assert "cannot connect" in result.stderr
        assert "Traceback" not in result.stderr

    def test_no_password_is_a_usage_error(self, sockdir: Path) -> None:
        """Without any password source, call says where a password can come from."""
        path = str(sockdir / "s.sock")
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(path)
        result = run_cli("call", "--socket", path, "hello")
        assert result.returncode == 2
        assert "PASSRPC_PASSWORD" in result.stderr


class TestList:
    """``python -m passrpc list``."""

    def test_lists_signatures_and_docs(self, greeter: str) -> None:
        """Each handler appears with its signature and its docstring."""
        result = run_cli("list", "--socket", greeter, PASSRPC_PASSWORD=PASSWORD)
        assert result.returncode == 0, result.stderr
        assert "hello(first_name: " in result.stdout
        assert "    Greet someone by name." in result.stdout
        assert "echo(*values" in result.stdout

    def test_json(self, greeter: str) -> None:
        """--json prints the server's description as JSON."""
        result = run_cli("list", "--json", "--socket", greeter, PASSRPC_PASSWORD=PASSWORD)
        described: list[dict[str, Any]] = json.loads(result.stdout)
        assert {"hello", "echo", "fail", "blob", "pipe", "environment", "when", "point", "kinds"} == {
            item["name"] for item in described
        }

    def test_wrong_password_exits_1(self, greeter: str) -> None:
        """list refuses a wrong password just as call does."""
        result = run_cli("list", "--socket", greeter, PASSRPC_PASSWORD="wrong")
        assert result.returncode == 1
        assert "authentication failed" in result.stderr


class TestProxyAgainstCommandLine:
    """passrpc.connect against a server the command line started."""

    @pytest.mark.usefixtures("no_fd_leak")
    def test_connect_and_call(self, greeter: str) -> None:
        """The proxy learns the handlers and calls them; errors come back as RemoteError."""
        with passrpc.connect(greeter, password=PASSWORD, timeout=10) as proxy:
            assert proxy.hello("Joe", "Dalton") == ("Hello Joe Dalton, how are you?", 1234)
            assert proxy.echo(1, b"x", k=2) == [[1, b"x"], {"k": 2}]
            with proxy.pipe() as fd, fd.open("rb") as pipe:
                assert pipe.read() == b"piped"
            with pytest.raises(passrpc.RemoteError, match="boom"):
                proxy.fail("boom")


class TestHelp:
    """``--help`` on the command and each subcommand."""

    @pytest.mark.parametrize("args", [(), ("serve",), ("call",), ("list",)])
    def test_help(self, args: tuple[str, ...]) -> None:
        """--help exits 0 and shows a usage line."""
        result = run_cli(*args, "--help")
        assert result.returncode == 0
        assert result.stdout.startswith("usage: python -m passrpc")

    def test_no_arguments_prints_help_and_exits_2(self) -> None:
        """Bare ``python -m passrpc`` explains itself instead of doing nothing."""
        result = run_cli()
        assert result.returncode == 2
        assert "serve" in result.stderr


class TestSecrets:
    """The password stays where it belongs."""

    def test_password_is_not_left_in_the_servers_environment(self, greeter: str) -> None:
        """Handlers (and what they start) do not inherit $PASSRPC_PASSWORD."""
        result = call(greeter, "environment", "PASSRPC_PASSWORD")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) is None

    def test_fifo_beside_the_socket_is_refused_not_read(self, sockdir: Path) -> None:
        """A FIFO planted at SOCKET.password is refused at once instead of hanging the client."""
        path = str(sockdir / "s.sock")
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(path)
        os.mkfifo(path + ".password")
        result = run_cli("call", "--socket", path, "hello", "A", "B")
        assert result.returncode == 2
        assert "not a password file of yours" in result.stderr

    def test_password_file_in_use_is_not_taken_over(self, sockdir: Path) -> None:
        """A second serve on the same socket does not remove the first one's password file."""
        path = str(sockdir / "s.sock")
        with serving("tests.apps.greeter:server", "--socket", path, socket_path=path) as first:
            password_file = Path(path + ".password")
            before = password_file.read_text()
            result = run_cli("tests.apps.greeter:server", "--socket", path)
            assert result.returncode == 1
            assert password_file.read_text() == before
            stop(first)
        assert first.returncode == 0


class TestStatusAndWait:
    """``python -m passrpc status``, ``--wait``, and ``connect(path)`` against a CLI server."""

    def test_status_shows_connections_and_each_handlers_figures(self, sockdir: Path) -> None:
        """status prints pid, uptime, connections and a line per handler; --json the same as data."""
        path = str(sockdir / "s.sock")
        with serving("tests.apps.greeter:server", "--socket", path, socket_path=path) as process:
            # No password given: each command reads the file serve wrote beside the socket.
            assert run_cli("call", "--socket", path, "hello", "A", "B").returncode == 0
            assert run_cli("call", "--socket", path, "fail", "x").returncode == 1
            text = run_cli("status", "--socket", path)
            data = run_cli("status", "--socket", path, "--json")
            stop(process)
        assert text.returncode == 0, text.stderr
        assert f"pid {process.pid}, up " in text.stdout
        assert "connections: 1 open, 3 served" in text.stdout
        assert re.search(r"^hello\s+1\s+0\s+", text.stdout, re.MULTILINE), text.stdout
        assert re.search(r"^fail\s+1\s+1\s+", text.stdout, re.MULTILINE), text.stdout
        figures = json.loads(data.stdout)
        assert figures["pid"] == process.pid
        assert figures["protocol_version"] == passrpc.PROTOCOL_VERSION
        assert (figures["connections_open"], figures["connections_served"]) == (1, 4)
        assert figures["handlers"]["fail"]["calls"] == figures["handlers"]["fail"]["errors"] == 1
        assert figures["handlers"]["blob"] == {
            "calls": 0, "errors": 0, "mean": 0.0, "p99": 0.0, "timed": 0,
        }  # fmt: skip

    def test_wait_outlasts_a_server_that_starts_later(self, sockdir: Path) -> None:
        """call --wait started before the server answers once the server is up."""
        path = str(sockdir / "s.sock")
        client = subprocess.Popen(
            [sys.executable, "-m", "passrpc", "call", "--wait", "20", "--socket", path,
             "hello", "A", "B"],
            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            with serving("tests.apps.greeter:server", "--socket", path, socket_path=path) as server:
                out, err = client.communicate(timeout=30)
                stop(server)
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
        assert client.returncode == 0, err
        assert json.loads(out) == ["Hello A B, how are you?", 1234]

    def test_wait_gives_up_saying_what_it_waited_for(self, sockdir: Path) -> None:
        """With no server, --wait ends after its time with exit status 1 and the path."""
        path = str(sockdir / "never.sock")
        start = time.monotonic()
        result = run_cli("list", "--wait", "0.5", "--socket", path)
        assert time.monotonic() - start >= 0.5
        assert result.returncode == 1
        assert f"no socket at {path!r}" in result.stderr
        assert "gave up after waiting 0.5 s" in result.stderr

    def test_connect_finds_the_password_file_serve_wrote(self, sockdir: Path) -> None:
        """passrpc.connect(path) with no password reads SOCKET.password, as serve writes it."""
        path = str(sockdir / "s.sock")
        with serving("tests.apps.greeter:server", "--socket", path, socket_path=path) as process:
            wait_until(lambda: os.path.exists(path + ".password"), process, "password file")
            with passrpc.connect(path, timeout=WAIT) as proxy:
                assert proxy.hello("A", "B") == ("Hello A B, how are you?", 1234)
            assert passrpc.server_status(path).handlers["hello"].calls == 1
            stop(process)

    def test_a_password_file_that_others_can_read_is_not_used_implicitly(
        self, sockdir: Path
    ) -> None:
        """connect(path) refuses a SOCKET.password that is not 0600, saying how to fix it."""
        path = str(sockdir / "s.sock")
        Path(path + ".password").write_text("pw\n")
        os.chmod(path + ".password", 0o644)
        with pytest.raises(passrpc.ConfigurationError, match=r"mode 0644.*chmod 600"):
            passrpc.connect(path)
        with pytest.raises(passrpc.ConfigurationError, match="no password given, and there is no"):
            passrpc.connect(str(sockdir / "other.sock"))
