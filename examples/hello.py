"""A first passrpc server: one handler, called through a proxy and through a channel.

Run it with ``python examples/hello.py`` (or ``python -m examples.hello``):
it starts the server in a child process, calls it twice, and stops it.

Serve it from a shell instead with ``python -m passrpc examples.hello:server``
and call it from another one with
``python -m passrpc call --socket PATH hello Joe Dalton``.
"""

from __future__ import annotations

import passrpc

server = passrpc.Server()


@server.handler("hello")
def hello(first_name: str, last_name: str) -> tuple[str, int]:
    """Greet someone by name, and give a number too: a handler can reply with several values."""
    return f"Hello {first_name} {last_name}, how are you?", 1234


def main() -> None:
    """Start the server, call "hello" with a proxy and over a raw channel, stop it."""
    server.start()  # forks; returns once the socket accepts connections
    try:
        # The proxy: a method per handler, one persistent connection per thread.
        with server.proxy() as proxy:
            reply, number = proxy.hello("Joe", "Dalton")
            print(f"proxy:   {reply} ({number})")

        # The raw form: one conversation on one connection, as Passenger's connect did.
        with server.connect() as channel:
            channel.write("hello", "Jack", "Dalton")
            reply, number = channel.read()
            print(f"channel: {reply} ({number})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
