"""The socket file: made privately, stale ones taken over, removed only while still ours."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from passrpc import ConfigurationError, StartError
from passrpc._socketfile import MAX_SOCKET_PATH, SocketFile, identity, is_live_socket


def test_a_chosen_directory_is_private_and_removed_with_the_socket() -> None:
    """With no path, the socket sits in a fresh 0700 directory; remove() takes both away."""
    files = SocketFile.choose(None, 0o600)
    assert files.own_dir is not None
    sock, ours = files.listen(4)
    try:
        assert stat.S_IMODE(os.stat(files.own_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(files.path).st_mode) == 0o600
        assert is_live_socket(files.path)
    finally:
        sock.close()
    assert not is_live_socket(files.path)
    files.remove(ours)
    assert not os.path.exists(files.own_dir)


def test_make_dir_makes_the_private_directory_before_listen(sockdir: Path) -> None:
    """make_dir() makes the chosen directory 0700 at once; listen() then accepts it as ours."""
    files = SocketFile.choose(None, 0o600)
    made = files.make_dir()
    assert made == files.own_dir
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    sock, ours = files.listen(4)
    sock.close()
    files.remove(ours)
    assert not os.path.exists(made)
    assert SocketFile.choose(sockdir / "s.sock", 0o600).make_dir() is None  # the user's path


def test_a_stale_socket_is_taken_over_and_a_live_one_refused(sockdir: Path) -> None:
    """A socket nobody listens on is replaced; one with a listener raises StartError."""
    files = SocketFile.choose(sockdir / "s.sock", 0o600)
    first, _ = files.listen(4)
    with pytest.raises(StartError, match="already listens"):
        files.listen(4)
    first.close()  # now stale
    second, ours = files.listen(4)
    second.close()
    files.remove(ours)
    assert not os.path.exists(files.path)


def test_anything_but_a_socket_is_never_removed(sockdir: Path) -> None:
    """A regular file at the path raises StartError and stays."""
    path = sockdir / "s.sock"
    path.write_text("mine")
    with pytest.raises(StartError, match="is not a socket"):
        SocketFile.choose(path, 0o600).listen(4)
    assert path.read_text() == "mine"


def test_remove_leaves_a_later_servers_socket_alone(sockdir: Path) -> None:
    """remove() with an old identity does not touch another socket bound at the same path since."""
    files = SocketFile.choose(sockdir / "s.sock", 0o600)
    sock, old = files.listen(4)
    sock.close()
    os.unlink(files.path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(files.path)
    try:
        assert identity(files.path) != old
        files.remove(old)
        assert os.path.exists(files.path)
    finally:
        other.close()


def test_a_path_too_long_names_the_limit(sockdir: Path) -> None:
    """A path over AF_UNIX's limit raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=str(MAX_SOCKET_PATH)):
        SocketFile.choose(sockdir / ("x" * 120), 0o600)
