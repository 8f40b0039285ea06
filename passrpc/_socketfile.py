"""The socket file: where a server listens, made privately and removed only if still ours.

A server given no path gets a fresh private directory (0700, or 0711 when
the socket lets others in) under ``$XDG_RUNTIME_DIR`` or the temp
directory; a given path is bound in a private directory beside it and then
linked into place, so the socket is never reachable with looser permissions.
A stale socket (nobody listens) is taken over; anything else at the path is
left alone. Removal checks the file's identity, so a later server's socket
at the same path is never removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import stat
import tempfile

import attrs

from ._errors import ConfigurationError, StartError

logger = logging.getLogger("passrpc")

#: AF_UNIX's sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def default_socket_dir() -> str:
    """A fresh private directory name for a socket, short enough for AF_UNIX."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.access(base, os.W_OK | os.X_OK) or len(base) > 60:
        base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return os.path.join(base, "passrpc-" + secrets.token_hex(8))


def check_path(path: str) -> None:
    """Raise ConfigurationError if ``path`` is too long for AF_UNIX."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"socket path {path!r} is {size} bytes; AF_UNIX allows at most {MAX_SOCKET_PATH}: "
            "choose a shorter path (or leave socket_path=None for a safe default)"
        )


def is_live_socket(path: str) -> bool:
    """True if a server listens at ``path``; never blocks, even on a full backlog."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # the backlog is full: someone listens
    except OSError:
        return False
    finally:
        probe.close()
    return True


def identity(path: str) -> tuple[int, int]:
    """The (st_dev, st_ino) of ``path`` itself: tells our socket file from a later one."""
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, ours: tuple[int, int]) -> None:
    """Remove the socket file unless something else has taken the path since."""
    with contextlib.suppress(OSError):
        if identity(path) == ours:
            os.unlink(path)


# The server -----------------------------------------------------------------


@attrs.define
class SocketFile:
    """Where one server listens: the path, the private directory made for it, the file mode.

    ``own_dir`` is the directory passrpc chose (and makes and removes);
    None when the user chose the path.
    """

    path: str
    own_dir: str | None
    mode: int = 0o600

    @classmethod
    def choose(cls, path: str | os.PathLike[str] | None, mode: int) -> SocketFile:
        """A socket file at ``path``, or in a fresh private directory for None.

        Raises:
            ConfigurationError: the path is too long for AF_UNIX.
        """
        if path is None:
            own_dir: str | None = default_socket_dir()
            chosen = os.path.join(own_dir, "server.sock")  # type: ignore[arg-type]
        else:
            own_dir, chosen = None, os.path.abspath(os.fspath(path))
        check_path(chosen)
        return cls(chosen, own_dir, mode)

    def make_dir(self) -> str | None:
        """Make the private directory now (0700), for files that go beside the socket.

        Returns the directory made, for the caller to remove, or None when the
        user chose the path. The command line puts the password file there.

        Raises:
            OSError: it cannot be made (it exists, say).
        """
        if self.own_dir is None:
            return None
        os.mkdir(self.own_dir, 0o700)
        return self.own_dir

    def listen(self, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
        """Create, bind and listen on the socket, never reachable by group or others."""
        path = self.path
        if self.own_dir is not None:
            # Others may pass through (never list) only when the socket lets them in.
            dir_mode = 0o711 if self.mode & 0o077 else 0o700
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.own_dir, 0o700)
            st = os.lstat(self.own_dir)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o066:
                raise StartError(f"{self.own_dir!r} is not a private directory of ours")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.own_dir is not None:
                # The directory is 0700: the socket is private from the moment it exists.
                self._take_stale_path(path)
                sock.bind(path)
                os.chmod(path, self.mode)
                os.chmod(self.own_dir, dir_mode)
            else:
                self._bind_privately(sock, path)
            sock.listen(backlog)
            return sock, identity(path)
        except BaseException:
            sock.close()
            raise

    def _bind_privately(self, sock: socket.socket, path: str) -> None:
        """Bind in a fresh 0700 directory beside ``path``, chmod, then link into place."""
        parent = os.path.dirname(path)
        try:
            private = tempfile.mkdtemp(prefix=".prpc", dir=parent)
        except OSError as exc:
            raise StartError(
                f"cannot create the socket in {parent!r}: {exc.strerror}; "
                "choose a socket_path in a directory you can write to"
            ) from exc
        temporary = os.path.join(private, "s")
        try:
            if len(os.fsencode(temporary)) > MAX_SOCKET_PATH:
                raise ConfigurationError(
                    f"binding {path!r} safely needs {temporary!r}, over AF_UNIX's "
                    f"{MAX_SOCKET_PATH} bytes: choose a shorter path"
                )
            sock.bind(temporary)
            os.chmod(temporary, self.mode)
            self._take_stale_path(path)
            try:
                os.link(temporary, path)  # fails if anything appeared there meanwhile
            except FileExistsError:
                raise StartError(f"{path!r} appeared while the server was starting") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            with contextlib.suppress(OSError):
                os.rmdir(private)

    def _take_stale_path(self, path: str) -> None:
        """Remove ``path`` only if it is a socket nobody listens on."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StartError(
                f"{path!r} exists and is not a socket; passrpc never removes it: "
                "choose another socket_path or remove it yourself"
            )
        if is_live_socket(path):
            raise StartError(
                f"a server already listens on {path!r}: stop it, or choose another socket_path"
            )
        try:
            os.unlink(path)
        except OSError as exc:
            raise StartError(
                f"a stale socket at {path!r} cannot be removed ({exc.strerror}): "
                "remove it yourself, or choose another socket_path"
            ) from exc
        logger.info("removed stale socket %s", path)

    def remove(self, identity: tuple[int, int]) -> None:
        """Remove the socket file (if it is still the one with ``identity``) and our directory."""
        unlink_if_ours(self.path, identity)
        if self.own_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.own_dir)
