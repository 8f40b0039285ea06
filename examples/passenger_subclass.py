"""Passenger's original AbstractServer example, translated line for line.

The Ruby was::

    class MyServer < PhusionPassenger::AbstractServer
      def initialize
        super()
        define_message_handler(:hello, :handle_hello)
      end
      def hello(first_name, last_name)
        connect do |channel|
          channel.write('hello', first_name, last_name)
          reply, pid = channel.read
          return [reply, pid]
        end
      end
      private
      def handle_hello(channel, first_name, last_name)
        channel.write("Hello #{first_name} #{last_name}, how are you?", 1234)
      end
    end
    server = MyServer.new
    server.start
    server.hello("Joe", "Dalton")
    server.stop

``handle_hello`` is a *raw* handler: it gets the channel and writes the
reply itself, so it is registered with ``raw=True``. Serve it from a shell
with ``python -m passrpc examples.passenger_subclass:MyServer`` (a Server
subclass is instantiated for you).
"""

from __future__ import annotations

import passrpc


class MyServer(passrpc.Server):
    def __init__(self) -> None:
        super().__init__()
        # define_message_handler(:hello, :handle_hello) is the decorator on _handle_hello.

    def hello(self, first_name: str, last_name: str) -> tuple[str, int]:
        """The client side: runs in whichever process calls it, not in the server."""
        with self.connect() as channel:
            channel.write("hello", first_name, last_name)
            reply, pid = channel.read()
            return reply, pid

    # private
    @passrpc.handler("hello", raw=True)
    def _handle_hello(self, channel: passrpc.Channel, first_name: str, last_name: str) -> None:
        """The server side: answers "hello" by writing on the caller's channel."""
        channel.write(f"Hello {first_name} {last_name}, how are you?", 1234)


def main() -> None:
    """Start MyServer, say hello through it, stop it: the Ruby script's four lines."""
    server = MyServer()
    server.start()
    try:
        print(server.hello("Joe", "Dalton"))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
