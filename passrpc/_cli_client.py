"""The command line's client subcommands: ``call``, ``list`` and ``status``.

Each finds the server's socket (``--socket`` or ``$PASSRPC_SOCKET``) before
its password (``--password-file``, ``$PASSRPC_PASSWORD``, or the file
``serve`` writes beside the socket), so a mistyped path says so; with
``--wait`` each waits for the server to appear and answer. The parser and
``serve`` are in :mod:`passrpc._cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from ._auth import PASSWORD_SUFFIX, read_password_file
from ._channel import Channel
from ._client import Proxy, connect, server_status
from ._clivalues import ValueSyntaxError, close_fds, jsonable, parse_value
from ._errors import AuthenticationError, ConfigurationError, ConnectionClosed, RemoteError

#: The environment variable that carries the password to every subcommand.
PASSWORD_ENV = "PASSRPC_PASSWORD"  # noqa: S105 (a variable name, not a password)
#: The environment variable ``call`` and ``list`` read when ``--socket`` is not given.
SOCKET_ENV = "PASSRPC_SOCKET"
#: Seconds ``call`` and ``list`` wait by default: long enough for any
#: interactive handler, short enough that a hung server does not hang a script.
DEFAULT_TIMEOUT = 30.0


#: How often --wait looks for the server again.
_WAIT_STEP = 0.05

T = TypeVar("T")


class UsageError(Exception):
    """A mistake on the command line: one line on stderr, exit status 2."""


class Failure(Exception):
    """The operation failed: the message on stderr, exit status 1."""


def read_password(path: str, *, ours: bool = False) -> bytes:
    """Return the password stored in ``path`` (see :func:`passrpc._auth.read_password_file`).

    A file readable by others is used, with a warning to chmod it.
    """
    try:
        data = read_password_file(path, ours=ours)
    except ConfigurationError as exc:
        raise UsageError(
            f"{exc}: give the password with --password-file or ${PASSWORD_ENV}"
        ) from exc
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if mode & 0o077:
            warn(
                f"the password file {path!r} is readable by others (mode "
                f"{stat.S_IMODE(mode):04o}); chmod 600 it"
            )
    return data


def password_from(args: argparse.Namespace) -> bytes | None:
    """The password the user gave: ``--password-file`` first, then ``$PASSRPC_PASSWORD``."""
    if args.password_file is not None:
        return read_password(args.password_file)
    value = os.environb.get(PASSWORD_ENV.encode())
    return value or None


def _client_password(args: argparse.Namespace, socket_path: str) -> bytes:
    password = password_from(args)
    if password is not None:
        return password
    beside = socket_path + PASSWORD_SUFFIX
    if os.path.exists(beside):
        return read_password(beside, ours=True)
    raise UsageError(
        f"no password: set ${PASSWORD_ENV}, pass --password-file, or run the server with "
        f"'python -m passrpc serve', which writes {beside!r}"
    )


def _socket_path(args: argparse.Namespace) -> str:
    path: str | None = args.socket or os.environ.get(SOCKET_ENV)
    if not path:
        raise UsageError(f"which server? pass --socket PATH (or set ${SOCKET_ENV})")
    return path


def _reach(args: argparse.Namespace, ask: Callable[[str, bytes, float | None], T]) -> T:
    """Find the server's socket and password, then ``ask(path, password, timeout)``.

    The socket is looked for before the password, so a mistyped path says
    so. With ``--wait``, a socket that is not there yet, or a server that
    does not answer yet, is tried again until the wait is over.
    """
    path = _socket_path(args)
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    deadline = time.monotonic() + max(args.wait, 0.0)
    while True:
        try:
            if not os.path.lexists(path):
                raise Failure(
                    f"no socket at {path!r}: is the server running, and is this its path?"
                )
            return ask(path, _client_password(args, path), timeout)
        except (Failure, UsageError, ConnectionClosed) as exc:
            if time.monotonic() >= deadline:
                if args.wait > 0:
                    raise Failure(f"{exc} (gave up after waiting {args.wait:g} s)") from exc
                raise
        except AuthenticationError as exc:
            raise Failure(
                f"authentication failed: {exc} (check ${PASSWORD_ENV} or --password-file)"
            ) from exc
        time.sleep(_WAIT_STEP)


def _connect(args: argparse.Namespace) -> Proxy:
    return _reach(
        args, lambda path, password, timeout: connect(path, password=password, timeout=timeout)
    )


def run_call(args: argparse.Namespace) -> int:
    try:
        positional = [parse_value(text) for text in args.args]
        keywords: dict[str, Any] = {}
        for item in args.kwarg:
            name, sep, text = item.partition("=")
            if not sep or not name.isidentifier():
                raise UsageError(f"-k takes NAME=VALUE, got {item!r}")
            keywords[name] = parse_value(text)
    except ValueSyntaxError as exc:
        raise UsageError(str(exc)) from exc
    with _connect(args) as proxy:
        info = proxy._handler_info.get(args.name)
        if info is not None and info.get("stream"):
            return _print_stream(proxy, args.name, positional, keywords)
        try:
            reply = proxy.call(args.name, *positional, **keywords)
            if isinstance(reply, Channel):
                # A raw handler converses: show its first message, then hang up.
                with reply:
                    values = reply.read()
                reply = values[0] if len(values) == 1 else list(values)
        except RemoteError as exc:
            raise Failure(f"handler {args.name!r} raised {exc}") from exc
    fds: list[int] = []
    try:
        text = json.dumps(
            jsonable(reply, fds), ensure_ascii=False, indent=args.indent, sort_keys=False
        )
    finally:
        close_fds(reply)
    print(text)
    if fds:
        print(
            f"passrpc call: note: the reply carried {len(fds)} file descriptor(s), shown as "
            '{"$fd": N} with the number they had in this process; they are closed now',
            file=sys.stderr,
        )
    return 0


def _print_stream(proxy: Proxy, name: str, positional: list[Any], keywords: dict[str, Any]) -> int:
    """Print a stream's items as they come, one JSON line each; Ctrl-C ends the stream.

    The items may take as long as they take (a log being followed): the
    timeout bounds connecting only. Ctrl-C (KeyboardInterrupt, exit status
    130) closes the stream's connection, and the server stops the generator.
    """
    fds: list[int] = []
    try:
        with proxy.with_timeout(None).call(name, *positional, **keywords) as stream:
            for item in stream:
                try:
                    print(json.dumps(jsonable(item, fds), ensure_ascii=False), flush=True)
                finally:
                    close_fds(item)
    except RemoteError as exc:
        raise Failure(f"handler {name!r} raised {exc}") from exc
    if fds:
        print(
            f"passrpc call: note: the items carried {len(fds)} file descriptor(s), shown as "
            '{"$fd": N} with the number they had in this process; they are closed now',
            file=sys.stderr,
        )
    return 0


def run_status(args: argparse.Namespace) -> int:
    status = _reach(
        args,
        lambda path, password, timeout: server_status(path, password=password, timeout=timeout),
    )
    if args.json:
        print(json.dumps(attrs.asdict(status), ensure_ascii=False, indent=2))
        return 0
    print(
        f"pid {status.pid}, up {_duration(status.uptime)}, protocol {status.protocol_version}; "
        f"connections: {status.connections_open} open, {status.connections_served} served"
    )
    width = max([len("handler"), *map(len, status.handlers)])
    print(f"{'handler':<{width}}  {'calls':>8}  {'errors':>8}  {'mean':>10}  {'p99':>10}")
    for name, figures in sorted(status.handlers.items()):
        print(
            f"{name:<{width}}  {figures.calls:>8}  {figures.errors:>8}  "
            f"{_ms(figures.mean):>10}  {_ms(figures.p99):>10}"
        )
    return 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return " ".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds else "-"


def run_list(args: argparse.Namespace) -> int:
    with _connect(args) as proxy:
        described = list(proxy._handler_info.values())
    if args.json:
        print(json.dumps(described, ensure_ascii=False, indent=2))
        return 0
    for info in sorted(described, key=lambda item: str(item["name"])):
        raw = "  [raw: converses on the channel]" if info.get("raw") else ""
        if info.get("stream"):
            raw += "  [stream: one item per line]"
        if info.get("async"):
            raw += "  [async]"
        print(f"{info['name']}{info.get('signature', '(...)')}{raw}")
        for line in (info.get("doc") or "").splitlines():
            print(f"    {line}" if line else "")
    return 0


def add_password_file(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--password-file", metavar="FILE", help=help)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the server's socket (default: ${SOCKET_ENV})",
    )
    add_password_file(
        parser,
        f"read the password from FILE (default: ${PASSWORD_ENV}, else the file "
        f"SOCKET{PASSWORD_SUFFIX} that 'serve' writes)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on connecting and on the call (default: {DEFAULT_TIMEOUT:g}; 0 for none)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the server to appear and answer (default: 0, do not wait)",
    )


def warn(message: str) -> None:
    """Print a warning for the user on stderr."""
    print(f"passrpc: warning: {message}", file=sys.stderr)
