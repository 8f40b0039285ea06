"""Instructions executed per operation, counted by valgrind's callgrind: figures that do not drift.

Run from the repository root (valgrind must be installed; about a minute):

    python benchmarks/instructions.py            # every operation
    python benchmarks/instructions.py chan_fd    # some operations only
    python benchmarks/instructions.py --types 10 proxy_client server_call
                                                 # with ten types registered first

Wall-clock figures on a virtual machine move by tens of percent between
runs; the number of instructions a loop executes in user space does not.
Each operation runs for 1,000 and then 3,000 iterations under callgrind,
both ends in this one process over a socketpair; the difference of the two
totals divided by 2,000 is its cost per iteration, free of start-up costs.
The kernel's work is not counted (callgrind sees user space only), so these
figures compare the Python around the system calls, not whole calls.

Operations:

floor_rt      one round trip of the floor: raw socket + 4-byte prefix + msgpack
lean_client   the client side of the lean floor (benchmarks/run.py), against
              canned replies as proxy_client: packb, one sendall of header and
              body, one recvmsg_into with room for descriptors into a reused
              buffer, unpack_from, unpackb of a view
lean_server   the server side of the lean floor, against canned requests as
              server_call: recvmsg_into, unpack_from, unpackb, packb, sendall
chan_rt       one round trip of two passrpc Channels (write, read, write, read)
chan_plain    one plain message from one Channel to the other
chan_fd       one message carrying a descriptor, Channel to Channel; the
              receiver closes it
proxy_client  a proxy call's client side, against canned replies
server_call   a call's server side: the request read from a Channel, dispatched
              to a handler, the reply sent (the body of Dispatcher.serve's loop,
              which a pool thread runs while requests keep coming), against
              canned requests
proxy_attrs   proxy_client, with a registered attrs instance of five fields as
              the argument and in the canned reply
server_attrs  server_call, with that instance in the request and the reply
server_mixed  server_call, on a dispatcher that also has an async handler:
              async handlers must not slow plain calls

``--types N`` registers N attrs classes (codes 100 and up) in the default
registry before the loop: registering types must not slow plain calls.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPERATIONS = (
    "floor_rt",
    "lean_client",
    "lean_server",
    "chan_rt",
    "chan_plain",
    "chan_fd",
    "proxy_client",
    "server_call",
    "proxy_attrs",
    "server_attrs",
    "server_mixed",
)
RUNS = (1000, 3000)


def register_types(count: int) -> None:
    """Register ``count`` attrs classes of five fields in the default registry (codes 100 on)."""
    import attrs

    import passrpc

    for i in range(count):
        cls = attrs.make_class(f"Registered{i}", ["a", "b", "c", "d", "e"])
        passrpc.register_type(cls, 100 + i)


def run(operation: str, n: int, types: int = 0) -> None:
    """The loop that callgrind counts (this script, run again with ``--loop``)."""
    import collections
    import socket
    import struct

    import attrs
    import msgpack

    sys.path.insert(0, ROOT)
    import passrpc
    from passrpc import Channel, FileDescriptor
    from passrpc._client import proxy_class
    from passrpc._dispatch import Dispatcher
    from passrpc._registry import Handler
    from passrpc._wire import encode_frame

    register_types(types)
    value: object = 1  # what the calls carry
    handlers = {"echo": Handler("echo", lambda x: x, False)}
    if operation == "server_mixed":

        async def aecho(x: object) -> object:
            return x

        handlers["aecho"] = Handler("aecho", aecho, False, is_async=True)
        operation = "server_call"
    if operation.endswith("_attrs"):

        @passrpc.register_type(code=99)
        @attrs.frozen
        class Order:
            id: int
            customer: str
            amount: float
            paid: bool
            note: str

        value = Order(12345, "Joe Dalton", 99.5, True, "deliver to the saloon")
        operation = {"proxy_attrs": "proxy_client", "server_attrs": "server_call"}[operation]

    if operation == "floor_rt":
        header = struct.Struct(">I")
        a, b = socket.socketpair()
        buffers = [memoryview(bytearray(65536)) for _ in range(2)]

        def receive(sock: socket.socket, view: memoryview) -> object:
            sock.recv_into(view, 4)
            (length,) = header.unpack_from(view)
            got = 0
            while got < length:
                got += sock.recv_into(view[got:length], length - got)
            return msgpack.unpackb(view[:length])

        for i in range(n):
            out = msgpack.packb(["echo", i])
            a.sendall(header.pack(len(out)) + out)
            request = receive(b, buffers[0])
            out = msgpack.packb([request[1]])  # type: ignore[index]
            b.sendall(header.pack(len(out)) + out)
            receive(a, buffers[1])
    elif operation in ("lean_client", "lean_server"):
        # The loops of run.py's lean floor (lean_client, _serve_lean), with
        # the harness of proxy_client and server_call around them: the same
        # canned frames, so the figures compare end to end.
        header = struct.Struct(">I")
        a, b = socket.socketpair()
        view = memoryview(bytearray(65536))
        cmsg_space = socket.CMSG_SPACE(64 * 4)
        recvmsg_into, sendall = a.recvmsg_into, a.sendall
        unpack_from, pack = header.unpack_from, header.pack
        packb, unpackb = msgpack.packb, msgpack.unpackb
        sink = bytearray(65536)
        if operation == "lean_client":
            reply = encode_frame(0, (value,))[0]
            for i in range(n):
                b.sendall(reply)
                body = packb(["echo", i])
                sendall(pack(len(body)) + body)
                recvmsg_into([view], cmsg_space)
                (length,) = unpack_from(view)
                unpackb(view[4 : 4 + length])
                b.recv_into(sink)
        else:
            request = encode_frame(0, ("echo", value))[0]
            for _ in range(n):
                b.sendall(request)
                recvmsg_into([view], cmsg_space)
                (length,) = unpack_from(view)
                message = unpackb(view[4 : 4 + length])
                body = packb(message[2][1:])
                sendall(pack(len(body)) + body)
                b.recv_into(sink)
    elif operation == "chan_rt":
        c, d = Channel.pair()
        for i in range(n):
            c.write("echo", i)
            values = d.read()
            d.write(*values[1:])
            c.read()
    elif operation == "chan_plain":
        c, d = Channel.pair()
        for i in range(n):
            c.write(i)
            d.read()
    elif operation == "chan_fd":
        c, d = Channel.pair()
        r, _w = os.pipe()
        fd = FileDescriptor(r)
        for _ in range(n):
            c.write(fd)
            d.read()[0].close()
    elif operation == "proxy_client":
        c, d = Channel.pair()
        server_end = d._sock
        sink = bytearray(65536)
        proxy_type = proxy_class(
            [
                {
                    "name": "echo",
                    "params": [{"name": "x", "kind": 1}],
                    "doc": "",
                    "raw": False,
                    "signature": "(x)",
                }
            ]
        )
        proxy = proxy_type("/nonexistent", "pw", timeout=None, wire=c._wire, server_uids=None)
        proxy._adopt(c)
        reply = encode_frame(0, (value,))[0]
        echo = proxy.echo
        if value == 1:
            for i in range(n):
                server_end.sendall(reply)
                echo(i)
                server_end.recv_into(sink)
        else:
            for _ in range(n):
                server_end.sendall(reply)
                echo(value)
                server_end.recv_into(sink)
    elif operation == "server_call":
        c, d = Channel.pair()
        client_end = d._sock
        sink = bytearray(65536)
        dispatcher = Dispatcher(handlers)
        receive, send, dispatch = c.receive_waiting, c.send_frame, dispatcher.dispatch
        hurry = collections.deque()  # the pool's backlog, as Dispatcher.serve asks it
        request = encode_frame(0, ("echo", value))[0]
        for _ in range(n):
            client_end.sendall(request)
            frame = receive(hurry)
            if frame is None:
                raise SystemExit("no request")
            kind, payload = frame
            idle_since = 0.0  # noqa: F841 (Dispatcher.serve resets its idle clock)
            reply = dispatch(kind, payload)
            send(*reply)  # type: ignore[misc]
            client_end.recv_into(sink)
    else:
        raise SystemExit(f"unknown operation {operation!r}; choose from {', '.join(OPERATIONS)}")


def count(operation: str, n: int, types: int) -> int:
    """Instructions callgrind collects for ``n`` iterations of ``operation`` (start-up included)."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            os.path.abspath(__file__),
            "--loop",
            operation,
            str(n),
            str(types),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # same dict layouts in every run
    )
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no total for {operation}:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    if sys.argv[1:2] == ["--loop"]:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    args = sys.argv[1:]
    types = 0
    if args[:1] == ["--types"]:
        types, args = int(args[1]), args[2:]
        print(f"with {types} types registered")
    operations = args or list(OPERATIONS)
    results: dict[str, int] = {}
    for operation in operations:
        few, many = (count(operation, n, types) for n in RUNS)
        results[operation] = round((many - few) / (RUNS[1] - RUNS[0]))
        print(f"{operation:14s} {results[operation]:8,d} instructions", flush=True)
    if "floor_rt" in results and "chan_rt" in results:
        print(f"chan_rt / floor_rt: {results['chan_rt'] / results['floor_rt']:.2f}x")
    for ours, lean in (("proxy_client", "lean_client"), ("server_call", "lean_server")):
        if ours in results and lean in results:
            print(f"{ours} / {lean}: {results[ours] / results[lean]:.2f}x")
    if "chan_plain" in results and "chan_fd" in results:
        print(f"chan_fd / chan_plain: {results['chan_fd'] / results['chan_plain']:.2f}x")


if __name__ == "__main__":
    main()
