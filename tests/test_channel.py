"""Channel over real socketpairs: messages, descriptors, timeouts, end of stream."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from passrpc import (
    Channel,
    ConnectionClosed,
    EncodeError,
    FileDescriptor,
    FrameTooLarge,
    Limits,
    ProtocolError,
    RemoteError,
    Timeout,
)
from passrpc._protocol import error_payload
from passrpc._wire import Kind

from .conftest import open_fds

pytestmark = pytest.mark.usefixtures("no_fd_leak")


@pytest.fixture
def pair():
    a, b = Channel.pair(timeout=10)
    yield a, b
    a.close()
    b.close()


class TestMessages:
    def test_seed_conversation(self, pair) -> None:
        """write(name, *args) arrives as one tuple; replies likewise."""
        a, b = pair
        a.write("hello", "Joe", "Dalton")
        assert b.read() == ("hello", "Joe", "Dalton")
        b.write("Hello Joe Dalton, how are you?", 1234)
        reply, number = a.read()
        assert (reply, number) == ("Hello Joe Dalton, how are you?", 1234)

    def test_many_messages_in_one_read(self, pair) -> None:
        """Frames written back to back are read one by one."""
        a, b = pair
        # Linux charges ~3 KiB of the 208 KiB send buffer per small write.
        for i in range(40):
            a.write("n", i)
        assert [b.read()[1] for _ in range(40)] == list(range(40))

    def test_32_mib_message_intact(self, pair) -> None:
        """A 32 MiB bytes value crosses whole while the reader drains concurrently."""
        a, b = pair
        blob = os.urandom(32 << 20)
        writer = threading.Thread(target=a.write, args=("blob", blob))
        writer.start()
        assert b.read() == ("blob", blob)
        writer.join()

    def test_large_value_with_a_descriptor_in_pieces(self, pair) -> None:
        """A large value and a descriptor cross whole though the send goes out in pieces."""
        a, b = pair  # with a timeout, sendmsg returns after what fits: partial sends
        blob = os.urandom(4 << 20)
        r, w = os.pipe()
        with FileDescriptor(r) as read_end:
            writer = threading.Thread(
                target=a.write, args=("blob", blob, read_end, bytearray(blob))
            )
            writer.start()
            name, got, fd, again = b.read()
            writer.join()
        assert (name, got, again) == ("blob", blob, blob)
        os.write(w, b"!")
        assert os.read(fd.fileno(), 1) == b"!"
        fd.close()
        os.close(w)

    def test_error_frame_is_raised_by_read(self, pair) -> None:
        """A peer's error frame comes out of read() as the matching exception."""
        a, b = pair
        b.send_frame(Kind.ERROR, error_payload("remote", "ValueError", "bad", "Traceback..."))
        with pytest.raises(RemoteError, match="ValueError: bad") as info:
            a.read()
        assert info.value.remote_traceback == "Traceback..."

    def test_unencodable_message_sends_nothing(self, pair) -> None:
        """EncodeError leaves the stream clean for the next message."""
        a, b = pair
        with pytest.raises(EncodeError):
            a.write("x", object())
        a.write("ok")
        assert b.read() == ("ok",)


class TestDescriptors:
    def test_pipe_passed_and_readable_on_the_other_side(self, pair) -> None:
        """A pipe's read end sent over the channel reads the data written to it."""
        a, b = pair
        r, w = os.pipe()
        with FileDescriptor(r) as read_end:
            a.write("pipe", read_end)
        os.write(w, b"through the pipe")
        os.close(w)
        _name, received = b.read()
        assert isinstance(received, FileDescriptor)
        with received.open("rb") as f:
            assert f.read() == b"through the pipe"

    def test_file_objects_and_sockets_are_sent_as_descriptors(self, pair, tmp_path) -> None:
        """Objects with fileno() travel as descriptors; the sender's stay open."""
        a, b = pair
        path = tmp_path / "f"
        path.write_bytes(b"file data")
        s1, s2 = socket.socketpair()
        with open(path, "rb") as f, s1, s2:
            a.write("both", {"file": f, "sock": [s1]})
            _, got = b.read()
            with got["file"].open("rb") as g:
                assert g.read() == b"file data"
            with got["sock"][0].socket() as s:
                s.sendall(b"ping")
                assert s2.recv(4) == b"ping"
            assert not f.closed

    def test_thousand_round_trips_leak_nothing(self, pair) -> None:
        """The descriptor count returns to its baseline after 1000 round trips."""
        a, b = pair
        r, w = (FileDescriptor(fd) for fd in os.pipe())
        baseline = open_fds()
        for _ in range(1000):
            a.write("fds", r, [w])
            _, x, [y] = b.read()
            b.write("back", x, y)
            _, x2, y2 = a.read()
            for fd in (x, y, x2, y2):
                fd.close()
        assert open_fds() == baseline
        r.close()
        w.close()

    def test_unclaimed_descriptors_close_on_collection(self, pair) -> None:
        """A received FileDescriptor nobody claimed closes when it is collected."""
        a, b = pair
        r, w = (FileDescriptor(fd) for fd in os.pipe())
        baseline = open_fds()
        a.write("x", r)
        b.read()  # dropped at once: nobody claims the descriptor
        assert open_fds() == baseline
        r.close()
        w.close()

    def test_too_many_descriptors_for_the_receiver(self) -> None:
        """More descriptors than the receiver's buffer: an error, and nothing leaked."""
        big = Limits(max_fds=32)
        a_sock, b_sock = socket.socketpair()
        a = Channel(a_sock, limits=big, timeout=5)
        b = Channel(b_sock, limits=Limits(max_fds=4), timeout=5)
        r, w = (FileDescriptor(fd) for fd in os.pipe())
        sockets = {a.fileno(), b.fileno()}
        baseline = open_fds()
        a.write("many", [r] * 20)
        with pytest.raises(FrameTooLarge, match="descriptors"):
            b.read()
        b.close()
        a.close()
        assert open_fds() == baseline - sockets
        r.close()
        w.close()

    def test_closed_descriptor_is_an_encode_error(self, pair) -> None:
        """Sending a descriptor that is not open raises before anything is sent."""
        a, b = pair
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        stale = FileDescriptor(r)
        with pytest.raises(EncodeError, match="not open"):
            a.write("x", stale)
        stale.detach()
        a.write("ok")
        assert b.read() == ("ok",)


class TestFork:
    def test_pair_across_a_fork_each_side_closes_the_other_end(self) -> None:
        """The classic pattern: fork, each process closes the end it does not use."""
        a, b = Channel.pair(timeout=10)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                a.close()
                b.write("child", *b.read())
                code = 0
            finally:
                os._exit(code)
        b.close()  # the parent's copy only: the child's end stays connected
        a.write("ping", 1)
        assert a.read() == ("child", "ping", 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        a.close()


class TestEndOfStreamAndTimeouts:
    def test_peer_close_is_connection_closed(self, pair) -> None:
        """A closed peer ends read() with ConnectionClosed, a ConnectionError."""
        a, b = pair
        b.close()
        with pytest.raises(ConnectionClosed):
            a.read()
        with pytest.raises(ConnectionError):
            a.read()

    def test_write_to_a_gone_peer_is_an_error_not_sigpipe(self, pair) -> None:
        """MSG_NOSIGNAL: writing to a vanished peer raises instead of killing us."""
        a, b = pair
        b.close()
        with pytest.raises(ConnectionClosed):
            a.write("x" * 1000)

    def test_close_mid_frame_says_so(self) -> None:
        """A connection that ends inside a frame says it ended mid-message."""
        s1, s2 = socket.socketpair()
        channel = Channel(s2, timeout=5)
        s1.sendall(b"\x00\x00\x00\x10abc")
        s1.close()
        with pytest.raises(ConnectionClosed, match="middle"):
            channel.read()
        channel.close()

    def test_read_timeout_then_message_still_arrives(self, pair) -> None:
        """A read that times out leaves the channel usable."""
        a, b = pair
        b.timeout = 0.05
        with pytest.raises(Timeout):
            b.read()
        with pytest.raises(TimeoutError):
            b.read()
        a.write("late")
        assert b.read() == ("late",)

    def test_garbage_closes_the_channel(self) -> None:
        """A protocol error closes the channel, so nothing reads a desynced stream."""
        s1, s2 = socket.socketpair()
        channel = Channel(s2, timeout=5)
        s1.sendall(b"\x00\x00\x00\x01\xc1")
        with pytest.raises(ProtocolError):
            channel.read()
        assert channel.closed
        s1.close()

    def test_closed_channel_raises_connection_closed(self, pair) -> None:
        """Using a channel after close() is a clear error."""
        a, _ = pair
        a.close()
        a.close()
        with pytest.raises(ConnectionClosed, match="was closed"):
            a.write("x")
