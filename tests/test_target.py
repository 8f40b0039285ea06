"""Targets given as file paths (``path/to/app.py:attribute``), through the command line and spawn.

Each test writes its app into a private directory and runs the real
``python -m passrpc`` (or the script itself) in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from passrpc._target import load_target

from .helpers import WAIT, cli_env, wait_while_running

PASSWORD = "target-test-password"

APP = textwrap.dedent(
    """
    import pathlib

    import passrpc

    server = passrpc.Server()


    @server.handler()
    def hello(name: str) -> str:
        return f"Hello {name} from {__name__}"


    class Holder:
        server = server


    def make() -> passrpc.Server:
        return server


    answer = 42

    if __name__ == "__main__":
        pathlib.Path(__file__).with_name("main-ran").touch()
    """
)

SPAWNER = textwrap.dedent(
    """
    import os

    import passrpc

    server = passrpc.Server()


    @server.handler()
    def where() -> list:
        return [__name__, os.getpid(), os.getppid()]


    if __name__ == "__main__":
        server.start(method="spawn")  # finds no module name: the target is this file
        try:
            with server.proxy(timeout=10) as proxy:
                name, pid, ppid = proxy.where()
            print(name, pid != os.getpid(), ppid == os.getpid())
        finally:
            server.stop()
    """
)


@pytest.fixture
def app_dir(sockdir: Path) -> Path:
    """A directory holding sub/app.py, sub/broken.py and sub/syntax.py."""
    sub = sockdir / "sub"
    sub.mkdir()
    (sub / "app.py").write_text(APP)
    (sub / "broken.py").write_text('raise RuntimeError("this app fails as it runs")\n')
    (sub / "syntax.py").write_text("def broken(:\n")
    return sockdir


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m passrpc ARGS`` in ``cwd`` to completion, the test password in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "passrpc", *args],
        cwd=cwd,
        env=cli_env(PASSRPC_PASSWORD=PASSWORD),
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )


@contextmanager
def serving(cwd: Path, target: str, socket_path: str) -> Iterator[subprocess.Popen[str]]:
    """``python -m passrpc serve TARGET`` in ``cwd``, until its socket exists; killed if still running at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "passrpc", "serve", target, "--socket", socket_path],
        cwd=cwd,
        env=cli_env(PASSRPC_PASSWORD=PASSWORD),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_while_running(lambda: os.path.exists(socket_path), process, what="the socket file")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=WAIT)


@pytest.mark.parametrize(
    "target",
    [
        "{dir}/sub/app.py:server",  # absolute
        "sub/app.py:server",  # relative to the current directory
        "./sub/app.py",  # the attribute defaults to "server"
        "sub/app.py:Holder.server",  # a dotted attribute
        "sub/app.py:make",  # a factory
    ],
)
def test_file_target_is_served(app_dir: Path, target: str) -> None:
    """``serve path/app.py:attr`` runs the file as __passrpc__, skips its __main__ block, and serves it."""
    socket_path = str(app_dir / "s.sock")
    with serving(app_dir, target.format(dir=app_dir), socket_path) as process:
        result = cli(app_dir, "call", "--socket", socket_path, "hello", "Joe")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "Hello Joe from __passrpc__"
    assert process.returncode == 0, err
    assert not (app_dir / "sub" / "main-ran").exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("sub/missing.py:server", "no file 'sub/missing.py' (from 'sub/missing.py:server')"),
        ("sub/app.py:nope", "'sub/app.py' has no attribute 'nope' (from 'sub/app.py:nope')"),
        ("sub/app.py:Holder.nope", "'sub/app.py' has no attribute 'Holder.nope'"),
        ("sub/app.py:answer", "is 42, not a passrpc.Server"),
        (
            "sub/broken.py:server",
            "running 'sub/broken.py' failed: RuntimeError: this app fails as it runs",
        ),
        ("sub/syntax.py:server", "running 'sub/syntax.py' failed: SyntaxError"),
        ("sub/:server", "running 'sub/' failed"),  # a directory without __main__.py
    ],
)
def test_bad_file_target_is_a_one_line_usage_error(
    app_dir: Path, target: str, message: str
) -> None:
    """A file target that is missing, raises, or lacks the attribute exits 2 with one line saying which."""
    result = cli(app_dir, "serve", target, "--socket", str(app_dir / "s.sock"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("passrpc serve: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (app_dir / "s.sock").exists()


def test_spawn_from_a_script_loads_the_server_by_its_file(sockdir: Path) -> None:
    """A script's server started with method="spawn" is found by file path and run as __passrpc__."""
    script = sockdir / "sub" / "spawner.py"
    script.parent.mkdir()
    script.write_text(SPAWNER)
    # Run from the parent directory under a relative path: the target must still resolve.
    result = subprocess.run(
        [sys.executable, "sub/spawner.py"],
        cwd=sockdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["__passrpc__", "True", "True"]


def test_a_file_target_imports_the_modules_beside_it(tmp_path: Path) -> None:
    """As when Python runs a script, a file target's own directory is importable."""
    (tmp_path / "neighbour_of_the_app.py").write_text("GREETING = 'hi'\n")
    (tmp_path / "app.py").write_text(
        "import neighbour_of_the_app\nserver = neighbour_of_the_app.GREETING\n"
    )
    try:
        assert load_target(f"{tmp_path}/app.py:server") == "hi"
    finally:
        sys.modules.pop("neighbour_of_the_app", None)
        sys.path.remove(str(tmp_path))
