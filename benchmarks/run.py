"""The passrpc benchmark suite: every workload of docs/performance.md in one run.

Run from the repository root:

    python benchmarks/run.py                 # the full suite, 2-3 minutes; prints the table
    python benchmarks/run.py --quick         # a short smoke run (noisy figures)
    python benchmarks/run.py --only W1,W4    # some workloads only
    python benchmarks/run.py --only W1,W5 --runs 5
                                             # each target's median over 5 runs
    python benchmarks/run.py --write         # also rewrite the table in docs/performance.md
                                             # and the chart docs/performance.png

Workloads (see /work/shared/PERFORMANCE.md for the targets and docs/performance.md
for the method):

W1  a small call on a persistent connection, ``echo(i)``; and passrpc's
    echo of a registered attrs instance of five fields, against its plain call.
    The reference is the lean floor: the leanest loop we could write that
    can carry descriptors (one ``recvmsg_into`` of the whole reply into a
    reused buffer, ``unpack_from``, ``unpackb`` of a view, one ``sendall``;
    no helper calls, no checks), beside the same loop without room for
    descriptors and the older, hand-inlined floor
W2  connect + authenticate + one call + close
W3  throughput of K = 1, 4, 16 client processes, unpinned
W4  bulk echo of 1 MiB and 8 MiB
W5  a call that returns a file descriptor, against the lean floor's call that
    returns one
W6  a stream of 100,000 ints through the sync proxy, as items/s, against as
    many plain W1 calls and a raw socket + msgpack floor that sends one frame
    per item with one sendall each; and the same stream from an async
    generator handler (pinned to one CPU, like W1)

Latency (W1, W2, W4, W5) is measured with client and server pinned to one CPU,
in batches that take turns between the systems of a workload; each figure is
the median per-call time of the batches, and the floor is measured in the
same run. Every server runs in its own forked process, started fresh for each
system, and is stopped and reaped afterwards. Pyro5 and rpyc (the ``bench``
extra: ``pip install Pyro5 rpyc matplotlib``) are skipped with a note when
they are not installed.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
import gc
import json
import multiprocessing
import os
import re
import socket
import statistics
import struct
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from multiprocessing.managers import BaseManager
from typing import Any

import attrs
import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from _common import (  # noqa: E402
    HEADER,
    Child,
    Stats,
    fork,
    interleaved_batches,
    load_average,
    machine_description,
    pin,
    recv_exact,
    socket_dir,
    unix_listener,
)

import passrpc  # noqa: E402


@passrpc.register_type(code=100)
@attrs.frozen
class Order:
    """W1's registered value: five fields of four kinds (forked servers inherit the registration)."""

    id: int
    customer: str
    amount: float
    paid: bool
    note: str


ORDER = Order(12345, "Joe Dalton", 99.5, True, "deliver to the saloon")

DOC = os.path.join(ROOT, "docs", "performance.md")
CHART = os.path.join(ROOT, "docs", "performance.png")
BEGIN = "<!-- benchmarks/run.py --write: results begin -->"
END = "<!-- benchmarks/run.py --write: results end -->"

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")
MiB = 1024 * 1024
#: Descriptors the lean floor makes room for in each read: passrpc's default Limits.max_fds.
LEAN_MAX_FDS = passrpc.Limits().max_fds

Call = Callable[[int], Any]
Setup = Callable[[contextlib.ExitStack, str, int | None], Call]


# Settings --------------------------------------------------------------------


class Settings:
    """How long and how often to measure: the full run, or ``--quick``."""

    def __init__(self, quick: bool, cpu: int) -> None:
        self.quick = quick
        self.cpu = cpu
        self.batches = 5 if quick else 21
        self.batch_time = 0.02 if quick else 0.1
        self.warmup = 0.05 if quick else 0.2
        self.w3_duration = 0.5 if quick else 2.0
        self.w3_rounds = 1 if quick else 3
        self.w3_clients = (1, 4, 16)
        self.bulk_sizes = (1 * MiB, 8 * MiB)
        self.stream_items = 10_000 if quick else 100_000
        self.stream_rounds = 3 if quick else 7


# Servers (each runs in a forked child) ----------------------------------------


def _serve(
    ready: Callable[[], None],
    listener: socket.socket,
    serve_conn: Callable[..., None],
    threaded: bool,
    *args: Any,
) -> None:
    """Accept forever; serve each connection inline, or in a thread of its own."""
    ready()
    while True:
        conn, _ = listener.accept()
        if threaded:
            threading.Thread(target=_guard, args=(serve_conn, conn, *args), daemon=True).start()
        else:
            _guard(serve_conn, conn, *args)


def _guard(serve_conn: Callable[..., None], conn: socket.socket, *args: Any) -> None:
    try:
        serve_conn(conn, *args)
    except (ConnectionError, EOFError):
        pass
    finally:
        conn.close()


def _serve_raw(conn: socket.socket) -> None:
    """Echo length-prefixed frames as they are: recv_into a reused buffer, send a memoryview."""
    hdr = bytearray(4)
    hview = memoryview(hdr)
    buf = bytearray(64 * 1024)
    view = memoryview(buf)
    unpack_from = HEADER.unpack_from
    while recv_exact(conn, hview, 4):
        (n,) = unpack_from(hdr)
        if n > len(buf):
            buf = bytearray(n)
            view = memoryview(buf)
        if not recv_exact(conn, view, n):
            return
        if n <= 64 * 1024:
            conn.sendall(hdr + view[:n])
        else:
            conn.sendall(hdr)
            conn.sendall(view[:n])


def _serve_msgpack(conn: socket.socket, with_fd: bool = False) -> None:
    """The floor's server: recv header, recv body into a reused buffer, unpackb, packb, sendall.

    A request is ``[name, arg]``; the reply is ``arg``. With ``with_fd``, a
    request named "fd" gets the read end of a pipe with its reply (SCM_RIGHTS).
    """
    hdr = bytearray(4)
    hview = memoryview(hdr)
    buf = bytearray(64 * 1024)
    view = memoryview(buf)
    unpack_from = HEADER.unpack_from
    pack = HEADER.pack
    unpackb = msgpack.unpackb
    packb = msgpack.packb
    sendall = conn.sendall
    ancillary: list[Any] = []
    if with_fd:
        r, _w = os.pipe()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))]
    while recv_exact(conn, hview, 4):
        (n,) = unpack_from(hdr)
        if n > len(buf):
            buf = bytearray(n)
            view = memoryview(buf)
        if not recv_exact(conn, view, n):
            return
        name, arg = unpackb(view[:n])
        reply = packb(arg)
        if name == "fd":
            conn.sendmsg([pack(len(reply)) + reply], ancillary)
        else:
            sendall(pack(len(reply)) + reply)


def _serve_lean(conn: socket.socket, room_for_fds: bool) -> None:
    """The lean floor's server: the leanest loop we could write that still carries descriptors.

    One read of the whole request into a reused buffer (``recvmsg_into``
    with room for descriptors, or ``recv_into`` without), ``unpack_from``,
    ``unpackb`` of a view, ``packb``, one ``sendall`` of header and body; no
    helper calls, no checks but the one for a request cut short. A request
    is ``[name, arg]``, the reply ``arg``; "fd" gets with its reply
    (``SCM_RIGHTS``) a fresh duplicate of a pipe's read end, closed once
    sent: the system calls of passrpc's ``fd`` handler and server, so that
    the two differ only by the Python around them.
    """
    view = memoryview(bytearray(64 * 1024))
    unpack_from, pack = HEADER.unpack_from, HEADER.pack
    unpackb, packb = msgpack.unpackb, msgpack.packb
    sendall, sendmsg = conn.sendall, conn.sendmsg
    recvmsg_into, recv_into = conn.recvmsg_into, conn.recv_into
    cmsg_space = socket.CMSG_SPACE(LEAN_MAX_FDS * 4)
    r, _w = os.pipe()
    dup, close, one_fd = os.dup, os.close, struct.Struct("i").pack
    level, kind = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
    while True:
        nbytes = recvmsg_into([view], cmsg_space)[0] if room_for_fds else recv_into(view)
        if not nbytes:
            return
        (n,) = unpack_from(view)
        if nbytes < n + 4 and not recv_exact(conn, view[nbytes:], n + 4 - nbytes):
            return
        name, arg = unpackb(view[4 : 4 + n])
        reply = packb(arg)
        if name == "fd":
            fd = dup(r)
            sendmsg([pack(len(reply)) + reply], [(level, kind, one_fd(fd))])
            close(fd)
        else:
            sendall(pack(len(reply)) + reply)


def _serve_channel(
    ready: Callable[[], None], channel: passrpc.Channel, other: passrpc.Channel
) -> None:
    """A bare Channel echo loop: read a message, write back its arguments."""
    other.close()
    ready()
    read, write = channel.read, channel.write
    with contextlib.suppress(passrpc.ConnectionClosed):
        while True:
            values = read()
            write(*values[1:])


def _serve_mp_connection(ready: Callable[[], None], path: str, key: bytes, threaded: bool) -> None:
    """multiprocessing.connection: accept (with its HMAC handshake), then recv/send."""
    listener = Listener(path, family="AF_UNIX", authkey=key)
    ready()
    while True:
        conn = listener.accept()
        if threaded:
            threading.Thread(target=_mp_echo, args=(conn,), daemon=True).start()
        else:
            _mp_echo(conn)


def _mp_echo(conn: Any) -> None:
    try:
        while True:
            _name, arg = conn.recv()
            conn.send(arg)
    except (EOFError, ConnectionError):
        pass
    finally:
        conn.close()


class _Echo:
    def echo(self, x: Any) -> Any:
        return x


class _EchoManager(BaseManager):
    pass


_EchoManager.register("Echo", callable=_Echo)


def _serve_pyro(ready: Callable[[], None], path: str) -> None:
    import Pyro5.api  # type: ignore[import-untyped]

    Pyro5.config.SERIALIZER = "msgpack"

    @Pyro5.api.expose
    class PyroEcho:
        def echo(self, x: Any) -> Any:
            return x

    daemon = Pyro5.api.Daemon(unixsocket=path)
    daemon.register(PyroEcho(), "echo")
    ready()
    daemon.requestLoop()


def _serve_rpyc(ready: Callable[[], None], path: str) -> None:
    import rpyc  # type: ignore[import-untyped]
    from rpyc.utils.server import ThreadedServer  # type: ignore[import-untyped]

    class EchoService(rpyc.Service):  # type: ignore[misc]
        def exposed_echo(self, x: Any) -> Any:
            return x

    server = ThreadedServer(EchoService, socket_path=path)
    ready()
    server.start()


def _passrpc_server(
    stack: contextlib.ExitStack, d: str, cpu: int | None, name: str = "p", with_async: bool = False
) -> passrpc.Server:
    """A started passrpc server with ``echo`` and ``fd`` handlers, pinned like the client.

    ``with_async`` adds the async handler ``aecho`` and the async generator
    ``anumbers`` (and so the event loop's thread, pinned too).
    """
    server = passrpc.Server(socket_path=os.path.join(d, name + ".sock"))
    pipe: list[int] = []

    if with_async:

        @server.handler("aecho")
        async def aecho(x: Any) -> Any:
            return x

        @server.handler("anumbers")
        async def anumbers(n: int) -> Any:
            for i in range(n):
                yield i

        @server.on_initialize_server
        async def pin_loop() -> None:  # the loop's thread starts before initialize_server
            pin(cpu)

    @server.handler("echo")
    def echo(x: Any) -> Any:
        return x

    @server.handler("fd")
    def fd() -> passrpc.FileDescriptor:
        return passrpc.FileDescriptor(os.dup(pipe[0]))

    @server.handler("numbers")
    def numbers(n: int) -> Any:
        yield from range(n)

    @server.on_initialize_server
    def initialize() -> None:
        pin(cpu)
        pipe.extend(os.pipe())

    server.start()
    stack.callback(server.stop)
    return server


def _forked(
    stack: contextlib.ExitStack, name: str, fn: Callable[..., Any], *args: Any, cpu: int | None
) -> Child:
    child = fork(name, fn, *args, cpu=cpu)
    stack.callback(child.stop)
    return child


def _served(
    stack: contextlib.ExitStack,
    d: str,
    name: str,
    serve: Callable[..., None],
    *args: Any,
    cpu: int | None,
) -> socket.socket:
    """Fork a raw server (``_serve`` with ``serve`` per connection) and connect to it."""
    path = os.path.join(d, name.replace(" ", "-") + ".sock")
    listener = unix_listener(path)
    _forked(stack, name, _serve, listener, serve, *args, cpu=cpu)
    listener.close()
    return _connect(path, stack)


def _connect(path: str, stack: contextlib.ExitStack | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if stack is not None:
        stack.callback(sock.close)
    return sock


# Clients ---------------------------------------------------------------------


def _raw_client(sock: socket.socket) -> Call:
    """echo(i) over the raw framing: an 8-byte int, no msgpack."""
    hdr = bytearray(4)
    hview = memoryview(hdr)
    buf = bytearray(64)
    view = memoryview(buf)
    request = struct.Struct(">Iq").pack
    unpack_from = HEADER.unpack_from
    sendall = sock.sendall

    def call(i: int) -> int:
        sendall(request(8, i))
        recv_exact(sock, hview, 4)
        (n,) = unpack_from(hdr)
        recv_exact(sock, view, n)
        return int.from_bytes(view[:n], "big", signed=True)

    return call


def _msgpack_call(
    sock: socket.socket, hdr: bytearray, hview: memoryview, view: memoryview, i: int
) -> Any:
    body = msgpack.packb(["echo", i])
    sock.sendall(HEADER.pack(len(body)) + body)
    recv_exact(sock, hview, 4)
    (n,) = HEADER.unpack_from(hdr)
    recv_exact(sock, view, n)
    return msgpack.unpackb(view[:n])


def _msgpack_client(sock: socket.socket) -> Call:
    """echo(i) of the floor: ``packb(["echo", i])`` framed, the reply unpacked."""
    hdr = bytearray(4)
    hview = memoryview(hdr)
    view = memoryview(bytearray(64 * 1024))
    unpack_from = HEADER.unpack_from
    pack = HEADER.pack
    packb, unpackb = msgpack.packb, msgpack.unpackb
    sendall = sock.sendall

    def call(i: int) -> Any:
        body = packb(["echo", i])
        sendall(pack(len(body)) + body)
        recv_exact(sock, hview, 4)
        (n,) = unpack_from(hdr)
        recv_exact(sock, view, n)
        return unpackb(view[:n])

    return call


def _msgpack_fd_client(sock: socket.socket) -> Call:
    """The floor's fd call: the reply's first byte carries a descriptor, which we close."""
    hdr = bytearray(4)
    hview = memoryview(hdr)
    view = memoryview(bytearray(64 * 1024))
    cmsg_space = socket.CMSG_SPACE(4 * 4)
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def call(i: int) -> Any:
        body = packb(["fd", i])
        sock.sendall(HEADER.pack(len(body)) + body)
        nbytes, ancillary, _flags, _ = sock.recvmsg_into([hview], cmsg_space)
        for _level, _type, data in ancillary:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                os.close(fd)
        if nbytes < 4:
            recv_exact(sock, hview[nbytes:], 4 - nbytes)
        (n,) = HEADER.unpack_from(hdr)
        recv_exact(sock, view, n)
        return unpackb(view[:n])

    return call


def _lean_client(sock: socket.socket, room_for_fds: bool = True) -> Call:
    """echo(i) of the lean floor: ``packb(["echo", i])`` framed in one ``sendall``, one read back.

    The reply is read with ``recvmsg_into`` with room for descriptors (or
    ``recv_into`` without) into a reused buffer that holds the whole frame,
    unless the read was cut short; then ``unpackb`` of a view.
    """
    view = memoryview(bytearray(64 * 1024))
    unpack_from, pack = HEADER.unpack_from, HEADER.pack
    packb, unpackb = msgpack.packb, msgpack.unpackb
    sendall, recvmsg_into, recv_into = sock.sendall, sock.recvmsg_into, sock.recv_into
    cmsg_space = socket.CMSG_SPACE(LEAN_MAX_FDS * 4)

    def call(i: int) -> Any:
        body = packb(["echo", i])
        sendall(pack(len(body)) + body)
        nbytes = recvmsg_into([view], cmsg_space)[0]
        (n,) = unpack_from(view)
        if nbytes < n + 4:
            recv_exact(sock, view[nbytes:], n + 4 - nbytes)
        return unpackb(view[4 : 4 + n])

    def call_no_fds(i: int) -> Any:
        body = packb(["echo", i])
        sendall(pack(len(body)) + body)
        nbytes = recv_into(view)
        (n,) = unpack_from(view)
        if nbytes < n + 4:
            recv_exact(sock, view[nbytes:], n + 4 - nbytes)
        return unpackb(view[4 : 4 + n])

    return call if room_for_fds else call_no_fds


def _lean_fd_client(sock: socket.socket) -> Call:
    """The lean floor's descriptor call: the one descriptor that comes with the reply is closed."""
    view = memoryview(bytearray(64 * 1024))
    unpack_from, pack = HEADER.unpack_from, HEADER.pack
    packb, unpackb = msgpack.packb, msgpack.unpackb
    sendall, recvmsg_into = sock.sendall, sock.recvmsg_into
    cmsg_space = socket.CMSG_SPACE(LEAN_MAX_FDS * 4)
    one_fd = struct.Struct("i").unpack_from
    close = os.close

    def call(i: int) -> Any:
        body = packb(["fd", i])
        sendall(pack(len(body)) + body)
        nbytes, ancillary, _flags, _ = recvmsg_into([view], cmsg_space)
        close(one_fd(ancillary[0][2])[0])
        (n,) = unpack_from(view)
        if nbytes < n + 4:
            recv_exact(sock, view[nbytes:], n + 4 - nbytes)
        return unpackb(view[4 : 4 + n])

    return call


# W1: a small call on a persistent connection ----------------------------------


def w1_raw(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    return _raw_client(_served(stack, d, "raw", _serve_raw, False, cpu=cpu))


def w1_floor(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    return _msgpack_client(_served(stack, d, "floor", _serve_msgpack, False, cpu=cpu))


def w1_lean(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    return _lean_client(_served(stack, d, "lean", _serve_lean, False, True, cpu=cpu))


def w1_lean_no_fds(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    sock = _served(stack, d, "lean-nofd", _serve_lean, False, False, cpu=cpu)
    return _lean_client(sock, room_for_fds=False)


def w1_channel(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    ours, theirs = passrpc.Channel.pair()
    _forked(stack, "channel", _serve_channel, theirs, ours, cpu=cpu)
    theirs.close()
    stack.callback(ours.close)
    write, read = ours.write, ours.read

    def call(i: int) -> Any:
        write("echo", i)
        return read()[0]

    return call


def w1_passrpc(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    proxy = _passrpc_server(stack, d, cpu).proxy()
    stack.callback(proxy.close)
    return proxy.echo  # type: ignore[no-any-return]


def w1_passrpc_async(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    proxy = _passrpc_server(stack, d, cpu, name="async", with_async=True).proxy()
    stack.callback(proxy.close)
    return proxy.aecho  # type: ignore[no-any-return]


def w1_passrpc_mixed(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    proxy = _passrpc_server(stack, d, cpu, name="mixed", with_async=True).proxy()
    stack.callback(proxy.close)
    return proxy.echo  # type: ignore[no-any-return]


def w1_passrpc_attrs(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    proxy = _passrpc_server(stack, d, cpu, name="attrs").proxy()
    stack.callback(proxy.close)
    echo = proxy.echo

    def call(i: int) -> Any:
        return echo(ORDER)

    return call


def w1_mp_connection(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    path, key = os.path.join(d, "mpc.sock"), os.urandom(32)
    _forked(stack, "multiprocessing.connection", _serve_mp_connection, path, key, False, cpu=cpu)
    conn = Client(path, family="AF_UNIX", authkey=key)
    stack.callback(conn.close)
    send, recv = conn.send, conn.recv

    def call(i: int) -> Any:
        send(("echo", i))
        return recv()

    return call


def w1_managers(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    manager = _EchoManager(
        address=os.path.join(d, "mgr.sock"),
        authkey=os.urandom(32),
        ctx=multiprocessing.get_context("fork"),
    )
    manager.start(initializer=pin, initargs=(cpu,))
    stack.callback(manager.shutdown)
    return manager.Echo().echo  # type: ignore[attr-defined,no-any-return]


def w1_pyro5(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    import Pyro5.api

    Pyro5.config.SERIALIZER = "msgpack"
    path = os.path.join(d, "pyro.sock")
    _forked(stack, "Pyro5", _serve_pyro, path, cpu=cpu)
    proxy = Pyro5.api.Proxy(f"PYRO:echo@./u:{path}")
    proxy._pyroBind()
    stack.callback(proxy._pyroRelease)
    return proxy.echo  # type: ignore[no-any-return]


def w1_rpyc(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    import rpyc

    path = os.path.join(d, "rpyc.sock")
    _forked(stack, "rpyc", _serve_rpyc, path, cpu=cpu)
    # ThreadedServer binds in its constructor but listens only in start():
    # connecting may be refused for a moment after the child said it is ready.
    deadline = time.monotonic() + 10.0
    while True:
        try:
            conn = rpyc.utils.factory.unix_connect(path)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    stack.callback(conn.close)
    # Looked up once: each `conn.root.echo` would be a round trip of its own.
    return conn.root.echo  # type: ignore[no-any-return]


# W2: connect + authenticate + call + close --------------------------------------


def w2_floor(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    path = os.path.join(d, "floor2.sock")
    listener = unix_listener(path, backlog=1024)
    _forked(stack, "floor (thread per connection)", _serve, listener, _serve_msgpack, True, cpu=cpu)
    listener.close()
    hdr = bytearray(4)
    hview = memoryview(hdr)
    view = memoryview(bytearray(64 * 1024))

    def call(i: int) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return _msgpack_call(sock, hdr, hview, view, i)
        finally:
            sock.close()

    return call


def w2_passrpc(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    connect = _passrpc_server(stack, d, cpu).connect

    def call(i: int) -> Any:
        with connect() as channel:
            channel.write("echo", i)
            return channel.read()[0]

    return call


def w2_mp_connection(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
    path, key = os.path.join(d, "mpc2.sock"), os.urandom(32)
    _forked(stack, "multiprocessing.connection", _serve_mp_connection, path, key, True, cpu=cpu)

    def call(i: int) -> Any:
        conn = Client(path, family="AF_UNIX", authkey=key)
        try:
            conn.send(("echo", i))
            return conn.recv()
        finally:
            conn.close()

    return call


# W4: bulk echo --------------------------------------------------------------------


def w4_raw(size: int) -> Setup:
    def setup(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
        sock = _served(stack, d, f"raw bulk {size}", _serve_raw, False, cpu=cpu)
        blob = memoryview(os.urandom(size))
        header = HEADER.pack(size)
        hdr = bytearray(4)
        hview = memoryview(hdr)
        view = memoryview(bytearray(size))

        def call(i: int) -> Any:
            sock.sendall(header)
            sock.sendall(blob)
            recv_exact(sock, hview, 4)
            (n,) = HEADER.unpack_from(hdr)
            recv_exact(sock, view, n)
            return view

        return call

    return setup


def w4_passrpc(size: int) -> Setup:
    def setup(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
        proxy = _passrpc_server(stack, d, cpu, name=f"pbulk{size}").proxy()
        stack.callback(proxy.close)
        blob = os.urandom(size)
        echo = proxy.echo
        if echo(blob) != blob:
            raise AssertionError("passrpc echoed the blob wrongly")
        return lambda i: echo(blob)

    return setup


# W5: a call returning a file descriptor -----------------------------------------------


def w5_floor(stack: contextlib.ExitStack, d: str, cpu: int | None) -> tuple[Call, Call]:
    sock = _served(stack, d, "floor with SCM_RIGHTS", _serve_msgpack, False, True, cpu=cpu)
    return _msgpack_client(sock), _msgpack_fd_client(sock)


def w5_lean(stack: contextlib.ExitStack, d: str, cpu: int | None) -> tuple[Call, Call]:
    sock = _served(stack, d, "lean with SCM_RIGHTS", _serve_lean, False, True, cpu=cpu)
    return _lean_client(sock), _lean_fd_client(sock)


def w5_passrpc(stack: contextlib.ExitStack, d: str, cpu: int | None) -> tuple[Call, Call]:
    proxy = _passrpc_server(stack, d, cpu, name="fd").proxy()
    stack.callback(proxy.close)
    fd_call = proxy.fd

    def call_fd(i: int) -> Any:
        fd = fd_call()
        fd.close()
        return fd

    return proxy.echo, call_fd


# W6: a stream of small items ------------------------------------------------------------


def _serve_stream_floor(conn: socket.socket) -> None:
    """The stream's floor: for a request ``[name, n]``, n frames of one int, one sendall each."""
    hdr = bytearray(4)
    hview = memoryview(hdr)
    view = memoryview(bytearray(64 * 1024))
    pack, packb = HEADER.pack, msgpack.packb
    sendall = conn.sendall
    while recv_exact(conn, hview, 4):
        (n,) = HEADER.unpack_from(hdr)
        if not recv_exact(conn, view, n):
            return
        _, count = msgpack.unpackb(view[:n])
        for i in range(count):
            body = packb(i)
            sendall(pack(len(body)) + body)


def _stream_floor_client(sock: socket.socket) -> Callable[[int], int]:
    """Read a floor stream of ``n`` items as a good client would: large reads, frames parsed out."""
    unpack_from = HEADER.unpack_from
    unpackb = msgpack.unpackb

    def stream(n: int) -> int:
        body = msgpack.packb(["numbers", n])
        sock.sendall(HEADER.pack(len(body)) + body)
        data = b""
        got = total = 0
        while got < n:
            data += sock.recv(256 * 1024)
            at, end = 0, len(data)
            while at + 4 <= end:
                (size,) = unpack_from(data, at)
                if at + 4 + size > end:
                    break
                total += unpackb(data[at + 4 : at + 4 + size])
                got += 1
                at += 4 + size
            data = data[at:]
        return total

    return stream


def run_w6(run: Run, s: Settings) -> None:
    """Items/s of a stream, of plain calls and of the floor, in rounds that take turns."""
    pin(s.cpu)
    n = s.stream_items
    times: dict[str, list[float]] = {"floor": [], "stream": [], "astream": [], "calls": []}
    with socket_dir() as d, contextlib.ExitStack() as stack:
        floor = _stream_floor_client(
            _served(stack, d, "stream floor", _serve_stream_floor, False, cpu=s.cpu)
        )
        proxy = _passrpc_server(stack, d, s.cpu, name="stream").proxy()
        stack.callback(proxy.close)
        echo, numbers = proxy.echo, proxy.numbers
        # An async generator's items, each fetched from the server's event loop.
        aproxy = _passrpc_server(stack, d, s.cpu, name="astream", with_async=True).proxy()
        stack.callback(aproxy.close)
        anumbers = aproxy.anumbers
        expected = n * (n - 1) // 2
        assert floor(n) == expected  # warm, and right
        assert sum(numbers(n)) == expected
        assert sum(anumbers(n)) == expected
        calls = n // 10  # plain calls are slow: a tenth as many, per item all the same
        for round_ in range(s.stream_rounds):
            print(f"  W6: round {round_ + 1}/{s.stream_rounds}", flush=True)
            for key in times:
                gc.collect()  # every run starts from the same heap state; gc stays on
                start = time.perf_counter()
                if key == "floor":
                    floor(n)
                elif key == "stream":
                    for _ in numbers(n):
                        pass
                elif key == "astream":
                    for _ in anumbers(n):
                        pass
                else:
                    for i in range(calls):
                        echo(i)
                elapsed = time.perf_counter() - start
                times[key].append((calls if key == "calls" else n) / elapsed)
    labels = {
        "floor": ("floor: raw socket + msgpack, one sendall per item", None),
        "stream": ("passrpc stream (sync proxy)", "floor"),
        "astream": ("passrpc stream of an async generator (sync proxy)", "stream"),
        "calls": ("passrpc proxy, one plain call per item", "stream"),
    }
    for key, rates in times.items():
        st = Stats(rates)
        label, ref = labels[key]
        run.add(Result("W6", key, label, "items/s", st.median, st.q1, st.q3, ref, len(rates)))


# Running the workloads -----------------------------------------------------------------


class Result:
    """One measured figure: a system in a workload."""

    def __init__(
        self,
        workload: str,
        key: str,
        label: str,
        unit: str,
        value: float,
        q1: float | None = None,
        q3: float | None = None,
        ref: str | None = None,
        samples: int = 1,
    ) -> None:
        self.workload = workload
        self.key = key
        self.label = label
        self.unit = unit  # "s" (per call), "calls/s" or "GB/s"
        self.value = value
        self.q1 = q1
        self.q3 = q3
        self.ref = ref  # key of the figure this one is compared to in the table
        self.samples = samples  # batches (or rounds) behind the median

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Run:
    """The results of one run, by workload and key, and the notes to print with them."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, str], Result] = {}
        self.notes: list[str] = []

    def add(self, result: Result) -> None:
        self.results[(result.workload, result.key)] = result

    def get(self, workload: str, key: str) -> Result | None:
        return self.results.get((workload, key))

    def of(self, workload: str) -> list[Result]:
        return [r for r in self.results.values() if r.workload == workload]


def _optional(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _latency_group(
    run: Run, s: Settings, workload: str, systems: list[tuple[str, str, Setup | None, str | None]]
) -> None:
    """Set up every system of a workload, time them in turns, record medians, tear down.

    ``systems`` holds ``(key, label, setup, ref)``; a None setup is a system
    that could not be measured (a missing package), noted and skipped.
    """
    pin(s.cpu)
    with socket_dir() as d, contextlib.ExitStack() as stack:
        calls: dict[str, Call] = {}
        labels: dict[str, tuple[str, str | None]] = {}
        for key, label, setup, ref in systems:
            if setup is None:
                continue
            print(f"  {workload}: starting {label}", flush=True)
            try:
                call = setup(stack, d, s.cpu)
                call(0)  # a first call: connect, bind, look up
            except Exception as exc:
                # One system that cannot run must not cost the others' figures.
                traceback.print_exc()
                run.notes.append(f"{workload}: {label} failed and was skipped ({exc!r:.200})")
                continue
            calls[key] = call
            labels[key] = (label, ref)
        print(f"  {workload}: timing {len(calls)} systems in turns", flush=True)
        stats = interleaved_batches(
            calls, batches=s.batches, batch_time=s.batch_time, warmup=s.warmup
        )
    for key, st in stats.items():
        label, ref = labels[key]
        run.add(Result(workload, key, label, "s", st.median, st.q1, st.q3, ref, len(st.samples)))


def _setup_pair(pair: Callable[..., tuple[Call, Call]]) -> tuple[Setup, Setup]:
    """Split a setup that makes two calls on one server into two setups sharing it."""
    made: list[Call] = []

    def first(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
        a, b = pair(stack, d, cpu)
        made.append(b)
        return a

    def second(stack: contextlib.ExitStack, d: str, cpu: int | None) -> Call:
        return made[0]

    return first, second


def run_w1(run: Run, s: Settings) -> None:
    systems: list[tuple[str, str, Setup | None, str | None]] = [
        ("raw", "raw Python socket, 4-byte prefix", w1_raw, "lean"),
        ("lean_nofd", "lean floor, no room for descriptors", w1_lean_no_fds, "lean"),
        ("lean", "lean floor: one recvmsg_into, room for descriptors", w1_lean, None),
        ("floor", "floor: raw socket + msgpack", w1_floor, "lean"),
        ("channel", "passrpc Channel ping-pong", w1_channel, "lean"),
        ("passrpc", "passrpc proxy", w1_passrpc, "lean"),
        (
            "passrpc_attrs",
            "passrpc proxy, a registered attrs value (5 fields)",
            w1_passrpc_attrs,
            "passrpc",
        ),
        ("passrpc_async", "passrpc proxy, async def handler", w1_passrpc_async, "passrpc"),
        (
            "passrpc_mixed",
            "passrpc proxy, plain handler of a server with async ones",
            w1_passrpc_mixed,
            "passrpc",
        ),
        ("mp_connection", "multiprocessing.connection", w1_mp_connection, "lean"),
        ("managers", "multiprocessing.managers proxy", w1_managers, "lean"),
    ]
    for module, key, label, setup in (
        ("Pyro5", "pyro5", "Pyro5 (msgpack)", w1_pyro5),
        ("rpyc", "rpyc", "RPyC", w1_rpyc),
    ):
        if _optional(module):
            systems.append((key, label, setup, "lean"))
        else:
            run.notes.append(
                f"W1: {module} is not installed, skipped (pip install Pyro5 rpyc matplotlib)"
            )
    _latency_group(run, s, "W1", systems)


def run_w2(run: Run, s: Settings) -> None:
    _latency_group(
        run,
        s,
        "W2",
        [
            ("floor", "floor: raw + msgpack, no auth", w2_floor, None),
            ("passrpc", "passrpc connect() + handshake", w2_passrpc, "floor"),
            ("mp_connection", "multiprocessing.connection + authkey", w2_mp_connection, "floor"),
        ],
    )


def run_w4(run: Run, s: Settings) -> None:
    systems: list[tuple[str, str, Setup | None, str | None]] = []
    for size in s.bulk_sizes:
        mib = size // MiB
        systems.append((f"raw_{mib}", f"raw socket, {mib} MiB", w4_raw(size), None))
        systems.append(
            (f"passrpc_{mib}", f"passrpc proxy, {mib} MiB", w4_passrpc(size), f"raw_{mib}")
        )
    _latency_group(run, s, "W4", systems)
    # Report throughput: the payload counted both ways.
    for size in s.bulk_sizes:
        for key in (f"raw_{size // MiB}", f"passrpc_{size // MiB}"):
            r = run.get("W4", key)
            assert r is not None
            assert r.q1 is not None
            assert r.q3 is not None
            r.unit = "GB/s"
            r.value, r.q1, r.q3 = (
                2 * size / r.value / 1e9,
                2 * size / r.q3 / 1e9,
                2 * size / r.q1 / 1e9,
            )


def run_w5(run: Run, s: Settings) -> None:
    lean_plain, lean_fd = _setup_pair(w5_lean)
    floor_plain, floor_fd = _setup_pair(w5_floor)
    plain, with_fd = _setup_pair(w5_passrpc)
    _latency_group(
        run,
        s,
        "W5",
        [
            ("lean", "lean floor, plain call", lean_plain, None),
            ("lean_fd", "lean floor, returns an fd", lean_fd, None),
            ("floor", "floor: raw + msgpack", floor_plain, "lean"),
            ("floor_fd", "floor + SCM_RIGHTS", floor_fd, "lean_fd"),
            ("passrpc", "passrpc proxy, plain call", plain, "lean"),
            ("passrpc_fd", "passrpc proxy, returns an fd", with_fd, "lean_fd"),
        ],
    )


# W3: throughput ------------------------------------------------------------------


def _w3_floor_client(path: str) -> Call:
    return _msgpack_client(_connect(path))


def _w3_passrpc_client(server: passrpc.Server) -> Call:
    return server.proxy().echo  # type: ignore[no-any-return]


def _throughput(make_call: Callable[[], Call], clients: int, duration: float) -> float:
    """Fork ``clients`` processes that call for ``duration`` seconds together; total calls/s."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    result_r, result_w = os.pipe()
    pids = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd in (ready_r, go_w, result_r):
                    os.close(fd)
                pin(None)
                call = make_call()
                call(0)  # connected and authenticated before the clock starts
                os.write(ready_w, b"r")
                (end,) = struct.unpack("d", os.read(go_r, 8))
                count = 0
                now = time.monotonic
                while now() < end:
                    call(count)
                    count += 1
                os.write(result_w, struct.pack("q", count))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    for fd in (ready_w, go_r, result_w):
        os.close(fd)
    try:
        got = 0
        while got < clients:
            chunk = os.read(ready_r, clients - got)
            if not chunk:
                raise RuntimeError("W3: a client process died before it was ready")
            got += len(chunk)
        start = time.monotonic()
        end = start + duration
        os.write(go_w, struct.pack("d", end) * clients)
        data = b""
        while len(data) < 8 * clients:
            chunk = os.read(result_r, 8 * clients - len(data))
            if not chunk:
                raise RuntimeError("W3: a client process died while measuring")
            data += chunk
        total: int = sum(struct.unpack(f"{clients}q", data))
        return total / (end - start)
    finally:
        for fd in (ready_r, go_w, result_r):
            os.close(fd)
        for pid in pids:
            os.waitpid(pid, 0)


def run_w3(run: Run, s: Settings) -> None:
    pin(None)  # throughput: unpinned, every CPU
    rates: dict[tuple[str, int], list[float]] = {}
    with socket_dir() as d, contextlib.ExitStack() as stack:
        path = os.path.join(d, "floor3.sock")
        listener = unix_listener(path, backlog=1024)
        _forked(
            stack, "floor (thread per client)", _serve, listener, _serve_msgpack, True, cpu=None
        )
        listener.close()
        server = _passrpc_server(stack, d, None)
        makers: dict[str, Callable[[], Call]] = {
            "floor": lambda: _w3_floor_client(path),
            "passrpc": lambda: _w3_passrpc_client(server),
        }
        for round_ in range(s.w3_rounds):
            for k in s.w3_clients:
                for key, make in makers.items():
                    print(f"  W3: round {round_ + 1}/{s.w3_rounds}, K={k}, {key}", flush=True)
                    rates.setdefault((key, k), []).append(_throughput(make, k, s.w3_duration))
    labels = {"floor": "floor: raw + msgpack, thread per client", "passrpc": "passrpc proxy"}
    for (key, k), values in rates.items():
        st = Stats(values)
        run.add(
            Result(
                "W3",
                f"{key}_{k}",
                f"{labels[key]}, K={k}",
                "calls/s",
                st.median,
                st.q1,
                st.q3,
                None,
                len(values),
            )
        )


RUNNERS: dict[str, Callable[[Run, Settings], None]] = {
    "W1": run_w1,
    "W2": run_w2,
    "W3": run_w3,
    "W4": run_w4,
    "W5": run_w5,
    "W6": run_w6,
}


# Targets ----------------------------------------------------------------------------


class Target:
    """A target of PERFORMANCE.md, evaluated on this run's figures.

    ``margin`` is measured / allowed, oriented so that a margin of at most 1
    means the target is met (it is what the chart plots).
    """

    def __init__(self, workload: str, text: str, measured: str, margin: float | None) -> None:
        self.workload = workload
        self.text = text
        self.measured = measured
        self.margin = margin

    @property
    def verdict(self) -> str:
        if self.margin is None:
            return "not measured"
        return "met" if self.margin <= 1.0 else "**not met**"


def targets(run: Run, s: Settings) -> list[Target]:
    out: list[Target] = []

    def value(workload: str, key: str) -> float | None:
        r = run.get(workload, key)
        return None if r is None else r.value

    if run.of("W1"):
        proxy, lean = value("W1", "passrpc"), value("W1", "lean")
        if proxy and lean:
            out.append(
                Target(
                    "W1",
                    "proxy call ≤ 1.2x the lean fd-capable floor",
                    f"{proxy / lean:.2f}x the lean floor",
                    proxy / lean / 1.2,
                )
            )
        aio = value("W1", "passrpc_async")
        if proxy and aio:
            extra = (aio - proxy) * 1e6
            out.append(
                Target("W1", "async handler ≤ plain + 30 µs", f"+{extra:.1f} µs", extra / 30)
            )
        for key, name, factor in (
            ("managers", "multiprocessing.managers", 1),
            ("pyro5", "Pyro5", 2),
            ("rpyc", "RPyC", 3),
        ):
            other = value("W1", key)
            text = f"faster than {name}" if factor == 1 else f"{factor}x faster than {name}"
            if proxy and other:
                out.append(
                    Target("W1", text, f"{other / proxy:.2f}x faster", proxy * factor / other)
                )
            else:
                out.append(Target("W1", text, "—", None))
    if run.of("W2"):
        ours, theirs = value("W2", "passrpc"), value("W2", "mp_connection")
        if ours and theirs:
            out.append(
                Target(
                    "W2",
                    "no slower than multiprocessing.connection + authkey",
                    f"{ours / theirs:.2f}x its time",
                    ours / theirs,
                )
            )
    if run.of("W3"):
        k4, k16 = value("W3", "passrpc_4"), value("W3", "passrpc_16")
        if k4 and k16:
            change = (k16 - k4) / k4 * 100
            out.append(
                Target(
                    "W3",
                    "passrpc's calls/s do not fall from K=4 to K=16",
                    f"{change:+.0f} % ({k4:,.0f} → {k16:,.0f})",
                    k4 / k16,
                )
            )
    if run.of("W4"):
        for size in s.bulk_sizes:
            mib = size // MiB
            raw, ours = value("W4", f"raw_{mib}"), value("W4", f"passrpc_{mib}")
            if raw and ours:
                out.append(
                    Target(
                        "W4",
                        f"{mib} MiB echo ≥ 50 % of the raw socket",
                        f"{ours / raw * 100:.0f} %",
                        0.5 / (ours / raw),
                    )
                )
    if run.of("W5"):
        fd, lean_fd = value("W5", "passrpc_fd"), value("W5", "lean_fd")
        if fd and lean_fd:
            out.append(
                Target(
                    "W5",
                    "call returning an fd ≤ 1.3x the lean floor's",
                    f"{fd / lean_fd:.2f}x the lean floor's",
                    fd / lean_fd / 1.3,
                )
            )
    if run.of("W6"):
        stream, calls, floor = value("W6", "stream"), value("W6", "calls"), value("W6", "floor")
        if stream and calls:
            out.append(
                Target(
                    "W6",
                    "a stream's items/s ≥ 5x plain calls'",
                    f"{stream / calls:.1f}x",
                    5 / (stream / calls),
                )
            )
        if stream and floor:
            out.append(
                Target(
                    "W6",
                    "a stream's items/s ≥ 50 % of the floor's",
                    f"{stream / floor * 100:.0f} %",
                    0.5 / (stream / floor),
                )
            )
    return out


def median_targets(runs: list[Run], s: Settings) -> str:
    """Each target's median over several runs (of measured/allowed), with every run's figure."""
    by_target: dict[tuple[str, str], list[Target]] = {}
    for run in runs:
        for t in targets(run, s):
            by_target.setdefault((t.workload, t.text), []).append(t)
    lines = [
        f"Targets over {len(runs)} runs:",
        "",
        "| workload | target | median of measured/allowed | verdict | each run |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for (workload, text), ts in by_target.items():
        margins = [t.margin for t in ts if t.margin is not None]
        if not margins:
            continue
        margin = statistics.median(margins)
        verdict = "met" if margin <= 1.0 else "**not met**"
        each = "; ".join(t.measured for t in ts)
        lines.append(f"| {workload} | {text} | {margin:.3f} | {verdict} | {each} |")
    return "\n".join(lines)


# Output -----------------------------------------------------------------------------


def _fmt(r: Result, v: float | None) -> str:
    if v is None:
        return ""
    if r.unit == "s":
        return f"{v * 1e6:,.1f}"
    if r.unit in ("calls/s", "items/s"):
        return f"{v:,.0f}"
    return f"{v:.2f}"


def _unit(r: Result) -> str:
    return "µs" if r.unit == "s" else r.unit


def _relative(run: Run, r: Result) -> str:
    if r.ref is None:
        return "reference" if any(o.ref == r.key for o in run.of(r.workload)) else ""
    ref = run.get(r.workload, r.ref)
    if ref is None:
        return ""
    if r.unit == "GB/s":
        return f"{r.value / ref.value * 100:.0f} % of raw"
    if r.unit == "items/s":  # higher is better: the reference's rate over this one's
        return (
            f"{ref.value / r.value:.2f}x slower"
            if r.value < ref.value
            else f"{r.value / ref.value:.2f}x faster"
        )
    return f"{r.value / ref.value:.2f}x"


def markdown(run: Run, s: Settings, caption: str) -> str:
    lines = [
        caption,
        "",
        "| workload | system | median | unit | middle half of batches | vs reference |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        for r in run.of(workload):
            spread = f"{_fmt(r, r.q1)}-{_fmt(r, r.q3)}" if r.samples > 1 else ""
            lines.append(
                f"| {workload} | {r.label} | {_fmt(r, r.value)} | {_unit(r)} | "
                f"{spread} | {_relative(run, r)} |"
            )
    ts = targets(run, s)
    if ts:
        lines += ["", "| workload | target | measured | verdict |", "| --- | --- | --- | --- |"]
        lines += [f"| {t.workload} | {t.text} | {t.measured} | {t.verdict} |" for t in ts]
    if run.notes:
        lines += [""] + [f"- {note}" for note in run.notes]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    try:
        with open(DOC, encoding="utf-8") as f:
            doc = f.read()
    except FileNotFoundError:
        raise SystemExit(
            f"{DOC} does not exist; write its prose with the markers {BEGIN!r} and {END!r} first"
        ) from None
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(
            f"{DOC} lacks the markers {BEGIN!r} ... {END!r}; add them where the table belongs"
        )
    doc = pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(doc)
    print(f"wrote the table into {os.path.relpath(DOC, ROOT)}")


def write_chart(run: Run, s: Settings, caption: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(
            "matplotlib is not installed: the chart was not written "
            "(pip install matplotlib, or the bench extra)"
        )
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 12))
    fig.suptitle(textwrap.fill(caption, 150), fontsize=9)

    def bars(ax: Any, workload: str, title: str, highlight: tuple[str, ...]) -> None:
        rs = run.of(workload)
        labels = [r.label for r in rs]
        values = [r.value * 1e6 for r in rs]
        colors = [
            "tab:orange" if r.key in highlight else "tab:gray" if r.ref is None else "tab:blue"
            for r in rs
        ]
        ax.barh(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("µs per call (median), lower is better", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(x=0.15)

    panels = iter(axes.flat)
    if run.of("W1"):
        bars(next(panels), "W1", "W1 small call, persistent connection", ("passrpc",))
    if run.of("W2"):
        bars(next(panels), "W2", "W2 connect + auth + call + close", ("passrpc",))
    if run.of("W3"):
        ax = next(panels)
        for key, label in (("floor", "floor: raw + msgpack"), ("passrpc", "passrpc proxy")):
            ks = [k for k in s.w3_clients if run.get("W3", f"{key}_{k}")]
            ys = [run.results[("W3", f"{key}_{k}")].value for k in ks]
            ax.plot(
                ks,
                ys,
                marker="o",
                label=label,
                color="tab:orange" if key == "passrpc" else "tab:gray",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(s.w3_clients), [str(k) for k in s.w3_clients])
        ax.set_ylim(bottom=0)
        ax.set_title("W3 throughput of K client processes (unpinned)", fontsize=10)
        ax.set_xlabel("K", fontsize=8)
        ax.set_ylabel("calls/s, higher is better", fontsize=8)
        ax.legend(fontsize=7)
    if run.of("W4"):
        ax = next(panels)
        sizes = [size // MiB for size in s.bulk_sizes]
        width = 0.38
        for j, (key, label) in enumerate((("raw", "raw socket"), ("passrpc", "passrpc proxy"))):
            ys = [run.results[("W4", f"{key}_{m}")].value for m in sizes]
            xs = [i + (j - 0.5) * width for i in range(len(sizes))]
            ax.bar(
                xs, ys, width, label=label, color="tab:orange" if key == "passrpc" else "tab:gray"
            )
            for x, y in zip(xs, ys, strict=True):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sizes)), [f"{m} MiB" for m in sizes])
        ax.set_title("W4 bulk echo (payload counted both ways)", fontsize=10)
        ax.set_ylabel("GB/s, higher is better", fontsize=8)
        ax.legend(fontsize=7)
    if run.of("W5"):
        bars(next(panels), "W5", "W5 call returning a file descriptor", ("passrpc_fd",))
    ts = [t for t in targets(run, s) if t.margin is not None]
    if ts:
        ax = next(panels)
        assert all(t.margin is not None for t in ts)
        margins = [t.margin for t in ts if t.margin is not None]
        ax.barh(
            [f"{t.workload}: {t.text}" for t in ts],
            margins,
            color=["tab:green" if m <= 1 else "tab:red" for m in margins],
        )
        ax.axvline(1.0, color="black", linewidth=1)
        ax.invert_yaxis()
        ax.set_title("targets: measured / allowed (≤ 1 is met)", fontsize=10)
        ax.tick_params(labelsize=7)
    for ax in panels:
        ax.set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    fig.savefig(CHART, dpi=100)
    plt.close(fig)
    print(f"wrote the chart {os.path.relpath(CHART, ROOT)}")


# Main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run passrpc's benchmark suite (docs/performance.md)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: few, short batches (noisy figures)"
    )
    parser.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help="comma-separated workloads to run, e.g. W1,W4 (default: all)",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="rewrite the table in docs/performance.md and docs/performance.png",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=0,
        help="the CPU that latency workloads pin client and server to (default 0)",
    )
    parser.add_argument("--json", metavar="PATH", help="also save the raw figures as JSON")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="run the workloads N times and give each target's median over the runs "
        "(W1 and W5 are judged on the median of 5)",
    )
    args = parser.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.write and args.runs > 1:
        parser.error("--write writes one run's table: drop --runs")
    if args.write and set(args.workloads) != set(WORKLOADS):
        parser.error("--write regenerates the whole table: run every workload (drop --only)")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"CPU {args.cpu} is not available to this process")
    return args


def _check_reaped() -> None:
    """Say so if a process this run started is still around: every server must be reaped."""
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return  # no children at all: all were reaped
    print(f"warning: a child process is still running (or was reaped only now: pid {pid})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings(args.quick, args.cpu)
    machine = machine_description()
    load_before = load_average()
    started = time.monotonic()
    print(
        f"passrpc {passrpc.__version__} benchmarks{' (--quick)' if s.quick else ''}: "
        f"{', '.join(args.workloads)}; {machine['nproc']} CPUs, {machine['cpu']}, "
        f"Python {machine['python']}; load average {load_before}",
        flush=True,
    )
    runs: list[Run] = []
    for number in range(1, args.runs + 1):
        run = Run()
        for workload in WORKLOADS:
            if workload in args.workloads:
                counted = f" (run {number} of {args.runs})" if args.runs > 1 else ""
                print(f"{workload}{counted} ...", flush=True)
                RUNNERS[workload](run, s)
        runs.append(run)
    pin(None)
    _check_reaped()
    load_after = load_average()
    elapsed = time.monotonic() - started
    date = datetime.date.today().isoformat()
    caption = (
        f"Measured on {date}{' with --quick (short, noisy)' if s.quick else ''}: "
        f"{machine['nproc']} CPUs ({machine['cpu']}), {machine['implementation']} "
        f"{machine['python']}, passrpc {passrpc.__version__}; load average before "
        f"{load_before}, after {load_after}; the run took {elapsed:.0f} s."
    )
    if len(runs) > 1:
        caption += f" The table is the last of {len(runs)} runs."
    text = markdown(run, s, caption)
    print()
    print(text)
    if len(runs) > 1:
        print()
        print(median_targets(runs, s))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "caption": caption,
                    "machine": machine,
                    "results": [r.as_dict() for r in run.results.values()],
                    "notes": run.notes,
                    "runs": [[r.as_dict() for r in each.results.values()] for each in runs],
                },
                f,
                indent=2,
            )
    if args.write:
        write_doc(text)
        write_chart(run, s, caption)
    return 0


if __name__ == "__main__":
    sys.exit(main())
