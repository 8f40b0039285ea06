"""Passing file descriptors: the server opens a pipe and hands the caller its read end.

The bytes that go through the pipe never pass through the server's socket or
msgpack: the caller reads them straight from the kernel, while the server
writes. The same works for files, sockets, memfds and anything else with a
descriptor, in both directions.

Run it with ``python examples/fd_passing.py`` (or ``python -m examples.fd_passing``).
"""

from __future__ import annotations

import os

import passrpc

server = passrpc.Server()


@server.handler("numbers", raw=True)
def numbers(channel: passrpc.Channel, count: int) -> None:
    """Hand the caller the read end of a pipe, then write ``count`` lines into it.

    A raw handler, so that the server's own copy of the read end is closed
    right after it went out (an object with ``fileno()`` in a message travels
    as a descriptor; the receiver gets its own copy).
    """
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader:
        channel.write(reader)
    # Closing the write end is the end of file the caller reads up to.
    with open(write_end, "w") as writer:
        for i in range(1, count + 1):
            writer.write(f"line {i} of {count}, written by pid {os.getpid()}\n")


@server.handler("motd")
def motd() -> passrpc.FileDescriptor:
    """Return a descriptor of an anonymous file (one no path can open) holding a message.

    A plain handler can return descriptors too. The server's copy is closed
    when the returned FileDescriptor is garbage collected, at the latest
    when the connection ends; use a raw handler (above) to close it at once.
    """
    fd = os.memfd_create("motd")  # Linux: a file that lives only in memory
    os.write(fd, b"Welcome: this text came through a descriptor, not the socket.\n")
    os.lseek(fd, 0, os.SEEK_SET)
    return passrpc.FileDescriptor(fd)


def main() -> None:
    """Start the server, read from a pipe and from a file it opened, stop it."""
    server.start()
    try:
        with server.proxy() as proxy:
            # A raw handler's method sends the request and returns the channel.
            with proxy.numbers(3) as channel:
                (reader,) = channel.read()  # a passrpc.FileDescriptor
                with reader.open("r") as lines:  # the file object now owns it
                    for line in lines:
                        print("pipe:", line.rstrip())

            with proxy.motd().open("r") as file:
                print("file:", file.read().rstrip())
    finally:
        server.stop()


if __name__ == "__main__":
    main()
