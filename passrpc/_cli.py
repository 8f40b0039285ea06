"""The command line: ``python -m passrpc`` serves, calls and lists.

``python -m passrpc app:server`` (or ``serve app:server``) runs a server in
the foreground; ``call``, ``list`` and ``status`` are clients. See docs/cli.md for the
guide. Exit statuses: 0 success, 1 the operation failed (a remote error, a
wrong password, no server), 2 a usage error (bad arguments, a target that
cannot be loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn, TypeAlias, TypeVar

from ._auth import PASSWORD_SUFFIX
from ._cli_client import (
    PASSWORD_ENV,
    Failure,
    UsageError,
    add_client_options,
    add_password_file,
    password_from,
    run_call,
    run_list,
    run_status,
)
from ._errors import (
    ConfigurationError,
    Error,
    StartError,
    TargetError,
)
from ._server import Server, reconfigure, socket_file
from ._socketfile import is_live_socket
from ._target import load_target

logger = logging.getLogger("passrpc.cli")

_SUBCOMMANDS = ("serve", "call", "list", "status")
_EXIT_FAILED = 1
_EXIT_USAGE = 2

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: How often --wait looks for the server again.
_WAIT_STEP = 0.05

T = TypeVar("T")


# Passwords ------------------------------------------------------------------


def _write_password_file(path: str, password: str | bytes) -> tuple[int, tuple[int, int]]:
    """Write ``password`` to a new file of mode 0600; return its locked descriptor and identity.

    O_EXCL makes sure the file is new (no one else's file, no symlink
    followed), and the mode is set at creation, so the password is never
    readable by anyone else, not even for an instant. The returned
    descriptor holds an exclusive flock for as long as the server runs, so
    another ``serve`` on the same path can tell the file is in use.
    """
    data = password.encode() if isinstance(password, str) else bytes(password)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view = memoryview(data + b"\n")
        while view:
            view = view[os.write(fd, view) :]
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd, (st.st_dev, st.st_ino)


def _remove_stale_password_file(path: str, socket_path: str) -> None:
    """Remove a password file a dead server left behind; refuse if its server still runs."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if is_live_socket(socket_path):
        raise Failure(
            f"a server already listens on {socket_path!r}: stop it, or choose another --socket"
        )
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise Failure(
            f"{path!r} exists and is not a password file of ours; passrpc never removes it: "
            "remove it yourself, or choose another --socket"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Failure(
            f"another passrpc serve is starting on {socket_path!r} (it holds {path!r}): "
            "stop it, or choose another --socket"
        ) from None
    finally:
        os.close(fd)
    os.unlink(path)
    logger.info("removed the stale password file %s", path)


# serve ----------------------------------------------------------------------


def _make_server(spec: str) -> Server:
    """Load ``spec`` and return the server it names (an instance, a class or a factory)."""
    obj = load_target(spec)
    if isinstance(obj, Server):
        return obj
    if not callable(obj):
        raise TargetError(
            f"{spec!r} is {obj!r}, not a passrpc.Server, a Server subclass or a factory of one"
        )
    what = "class" if isinstance(obj, type) else "factory"
    try:
        server = obj()
    except Exception as exc:
        raise TargetError(
            f"calling the {what} {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(server, Server):
        raise TargetError(f"the {what} {spec!r} returned {server!r}, not a passrpc.Server")
    return server


def _configure(server: Server, socket_path: str | None, password: bytes | None) -> None:
    """Point ``server`` at the socket path and password given on the command line."""
    if server.started:
        raise Failure(f"{server!r} is already running; the command line serves a fresh server")
    try:
        reconfigure(server, socket_path=socket_path, password=password)
    except ConfigurationError as exc:
        raise UsageError(f"--socket: {exc}") from exc


def _serve(args: argparse.Namespace) -> int:
    # As Flask does: the console script does not put the current directory on
    # sys.path the way ``python -m`` does, and app:server usually lives there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    password = password_from(args)
    # Handlers, and what they start, must not inherit the secret.
    os.environb.pop(PASSWORD_ENV.encode(), None)
    try:
        server = _make_server(args.target)
    except TargetError as exc:
        raise UsageError(str(exc)) from exc
    # After the import: an app that configures logging itself keeps its own.
    _set_up_logging(args.log_level)
    _configure(server, args.socket, password)
    with _password_file(server, password) as password_file:
        logger.info("serving %s on %s", args.target, server.socket_path)
        if password_file is not None:
            logger.info(
                "password in %s (mode 0600; call, list, status and passrpc.connect(path) read it from there)",
                password_file,
            )
        else:
            logger.info("password from %s", args.password_file or "$" + PASSWORD_ENV)
        return _run(server)


def _set_up_logging(level: str) -> None:
    """Log to stderr at ``level``, unless the app has set up logging itself."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            format="%(name)s[%(process)d] %(levelname)s %(message)s", stream=sys.stderr
        )
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("passrpc").setLevel(level.upper())


@contextlib.contextmanager
def _password_file(server: Server, password: bytes | None) -> Iterator[str | None]:
    """Write the server's password beside its socket for the block; yield the file's path.

    With a ``password`` from the command line there is no file: it yields
    None. Afterwards the file is removed (if it is still the one written
    here), its lock released, and the directory made for it removed.
    """
    if password is not None:
        yield None
        return
    password_file = server.socket_path + PASSWORD_SUFFIX
    created_dir = None
    identity = None
    locked_fd = None
    try:
        try:
            # The server's private directory (if passrpc chose the path) is
            # made here, 0700 as the server makes it, so the password can
            # sit beside the socket.
            created_dir = socket_file(server).make_dir()
            _remove_stale_password_file(password_file, server.socket_path)
            locked_fd, identity = _write_password_file(password_file, server.password)
        except OSError as exc:
            raise Failure(
                f"cannot write the password file {password_file!r}: {exc.strerror}; "
                f"choose another --socket, or give the password with ${PASSWORD_ENV} "
                "or --password-file"
            ) from exc
        yield password_file
    finally:
        if identity is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(password_file)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(password_file)
        if locked_fd is not None:
            os.close(locked_fd)
        if created_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(created_dir)


def _run(server: Server) -> int:
    """Serve until stopped; return the exit status, or raise for the message to print."""
    try:
        server.serve()
    except StartError as exc:
        raise Failure(str(exc)) from exc
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from exc
    except Exception:
        # The app's own code failed (initialize_server, say): its traceback
        # is what the user needs.
        logger.exception("the server failed")
        return _EXIT_FAILED
    logger.info("stopped; %s removed", server.socket_path)
    return 0


# call and list --------------------------------------------------------------


# The parser -----------------------------------------------------------------

#: What ``add_subparsers`` returns: each subcommand is added to it by one helper.
_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m passrpc",
        description=(
            "Serve a passrpc server in the foreground, or call one. "
            "'python -m passrpc app:server' is short for 'python -m passrpc serve app:server'."
        ),
        epilog="Exit status: 0 success, 1 the operation failed, 2 a usage error. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"passrpc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(commands)
    _add_call(commands)
    _add_list(commands)
    _add_status(commands)
    return parser


def _add_serve(commands: _Subcommands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve module:attribute in the foreground (the default command)",
        description=(
            "Serve a passrpc.Server in the foreground until SIGINT or SIGTERM. TARGET is "
            "module:attribute (or path/to/file.py:attribute); the attribute (default 'server') "
            "is a Server, a Server subclass or a factory that returns one. Without "
            f"${PASSWORD_ENV} or --password-file, the server's own password is written to "
            f"SOCKET{PASSWORD_SUFFIX} (mode 0600), removed again on exit."
        ),
    )
    serve.add_argument("target", metavar="TARGET", help="module:attribute, e.g. app:server")
    serve.add_argument(
        "--socket",
        metavar="PATH",
        help="listen here instead of the server's own socket path",
    )
    add_password_file(
        serve,
        f"read the password from FILE instead of ${PASSWORD_ENV} or the server's own",
    )
    serve.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="info",
        type=str.lower,
        help="how much to log on stderr (default: info)",
    )
    serve.set_defaults(run=_serve)


def _add_call(commands: _Subcommands) -> None:
    call = commands.add_parser(
        "call",
        help="call a handler and print its reply as JSON",
        description=(
            "Call handler NAME with ARGS and print the reply as one JSON value (several "
            "returned values make a JSON array). Each ARG is parsed as JSON where it parses, "
            "else taken as a string: 3 is a number, '\"3\"' a string, Joe a string; "
            '{"$bytes": BASE64} is bytes and {"$ext": [CODE, BASE64]} a msgpack extension '
            'value. In the reply, bytes print as {"$bytes": BASE64}, extension values this '
            'process cannot decode as {"$ext": [CODE, BASE64]}, datetimes as ISO 8601 text, '
            'file descriptors as {"$fd": N}. A remote error goes to stderr with exit status '
            "1. Put -- before ARGS that start with '-'."
        ),
    )
    add_client_options(call)
    call.add_argument(
        "-k",
        "--kwarg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a keyword argument (VALUE parsed as ARGS are); repeatable",
    )
    call.add_argument("--indent", type=int, default=None, metavar="N", help="pretty-print the JSON")
    call.add_argument("name", metavar="NAME", help="the handler to call")
    call.add_argument("args", nargs="*", metavar="ARGS", help="its positional arguments")
    call.set_defaults(run=run_call)


def _add_list(commands: _Subcommands) -> None:
    listing = commands.add_parser(
        "list",
        help="list the handlers with their signatures and docs",
        description="List the server's handlers: name, signature and docstring of each.",
    )
    add_client_options(listing)
    listing.add_argument(
        "--json", action="store_true", help="print the server's description as JSON"
    )
    listing.set_defaults(run=run_list)


def _add_status(commands: _Subcommands) -> None:
    status = commands.add_parser(
        "status",
        help="show what a running server has done: connections, calls, durations",
        description=(
            "Show the server's pid, uptime and protocol version, the connections it serves "
            "now and has served, and for each handler its calls, errors, and mean and "
            "99th-percentile duration (measured on one call in 17, or on every call when the "
            "server logs at debug level)."
        ),
    )
    add_client_options(status)
    status.add_argument("--json", action="store_true", help="print the figures as JSON")
    status.set_defaults(run=run_status)


def _fail(prog: str, message: str, status: int) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``passrpc`` command line and return its exit status.

    ``argv`` defaults to ``sys.argv[1:]``. If the first argument is not a
    subcommand (``serve``, ``call``, ``list``, ``status``) or an option of the main
    parser, ``serve`` is assumed: ``python -m passrpc app:server``.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in (*_SUBCOMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "serve")
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return _EXIT_USAGE
    prog = f"passrpc {args.command}"
    try:
        status: int = args.run(args)
    except UsageError as exc:
        _fail(prog, str(exc), _EXIT_USAGE)
    except Failure as exc:
        _fail(prog, str(exc), _EXIT_FAILED)
    except Error as exc:
        _fail(prog, str(exc), _EXIT_FAILED)
    except KeyboardInterrupt:
        # SIGINT before the server took it over (during import, say).
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return status
