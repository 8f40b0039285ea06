"""What a running server tells about itself: status figures, the DEBUG call log, a wrong password."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

import passrpc
from passrpc import Server
from passrpc._stats import SAMPLE_EVERY, HandlerCounters, bucket, bucket_midpoint, percentile

from .helpers import WAIT, server_log, wait_for


def _server(path: Path) -> Server:
    server = Server(path, password="pw")

    @server.handler()
    def ok(x: int) -> int:
        return x

    @server.handler()
    def fail() -> None:
        raise ValueError("no")

    @server.handler(raw=True)
    def chat(channel: passrpc.Channel) -> None:
        channel.write("hi")

    return server


class TestFigures:
    def test_counts_after_a_known_mix_of_calls_and_errors(self, sockdir: Path) -> None:
        """Calls and errors are exact per handler, across connections and threads."""
        with _server(sockdir / "s.sock") as server:
            proxy = server.proxy(timeout=WAIT)

            def calls() -> None:
                for i in range(50):
                    assert proxy.ok(i) == i

            threads = [threading.Thread(target=calls) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            for _ in range(4):
                with pytest.raises(passrpc.RemoteError):
                    proxy.fail()
            with proxy.chat() as channel:
                assert channel.read() == ("hi",)
            status = server.status()
            pid = server.pid
            proxy.close()
        assert status.pid == pid
        assert status.protocol_version == passrpc.PROTOCOL_VERSION
        ok, fail, chat = (status.handlers[name] for name in ("ok", "fail", "chat"))
        assert (ok.calls, ok.errors) == (150, 0)
        assert (fail.calls, fail.errors) == (4, 4)
        assert (chat.calls, chat.errors) == (1, 0)
        # One call in SAMPLE_EVERY is timed, the first included.
        assert ok.timed == -(-150 // SAMPLE_EVERY)
        assert 0 < ok.mean < 1
        assert 0 < ok.p99 < 1
        # Served: the proxy's connections of three threads and this one, the raw
        # conversation's, the status request's. Open: this thread's and the status
        # request's, and those of the ended threads and the raw conversation that
        # the server has not yet seen close.
        assert status.connections_served == 6
        assert 2 <= status.connections_open <= 6
        assert status.uptime > 0

    def test_an_unused_server_reports_zeros(self, sockdir: Path) -> None:
        """Before any call every handler is listed with zero calls and no durations."""
        with _server(sockdir / "s.sock") as server:
            status = passrpc.server_status(server.socket_path, password="pw")
        assert status.handlers["ok"] == passrpc.HandlerStatistics(0, 0, 0.0, 0.0, 0)
        assert (status.connections_open, status.connections_served) == (1, 1)


class TestHistogram:
    @pytest.mark.parametrize("ns", [0, 1, 31, 32, 33, 1000, 123_456, 10**9, 7 * 10**12])
    def test_a_bucket_stands_for_its_durations_within_3_2_percent(self, ns: int) -> None:
        """The midpoint of a duration's bucket is within 1/32 of it (16 buckets per octave)."""
        assert abs(bucket_midpoint(bucket(ns)) - ns) <= ns / 31.5

    def test_p99_of_a_known_distribution(self) -> None:
        """With 990 calls of 1 ms and 10 of 100 ms, p99 is 1 ms and the mean 1.99 ms."""
        counters = HandlerCounters()
        for _ in range(990):
            counters.record(1_000_000)
        for _ in range(10):
            counters.record(100_000_000)
        summary = counters.summary()
        assert summary["p99"] == pytest.approx(1e-3, rel=0.035)
        assert summary["mean"] == pytest.approx(1.99e-3)
        assert percentile(counters.histogram, 1.0) == pytest.approx(1e8, rel=0.035)


class TestLogs:
    def test_debug_logs_every_call_of_a_forked_server(self, sockdir: Path) -> None:
        """At DEBUG, the server process logs one line per call: handler, peer pid, outcome, duration."""
        with server_log(sockdir / "log", logging.DEBUG) as log, _server(sockdir / "s.sock") as server:
            proxy = server.proxy(timeout=WAIT)
            assert proxy.ok(1) == 1
            with pytest.raises(passrpc.RemoteError):
                proxy.fail()
            proxy.close()
            wait_for(lambda: "call 'fail'" in log.read_text(), what="the call log")
            status = server.status()
        text = log.read_text()
        pid = os.getpid()
        assert f"DEBUG call 'ok' from pid {pid} returned in " in text
        assert f"DEBUG call 'fail' from pid {pid} raised in " in text
        assert "INFO handler 'fail' raised ValueError: no" in text  # as before, at INFO
        assert status.handlers["ok"].timed == 1  # every call timed at DEBUG

    def test_a_wrong_password_is_explained_on_both_sides(self, sockdir: Path) -> None:
        """The client says the server's proof failed; the server logs the client's report and pid."""
        with server_log(sockdir / "log") as log, _server(sockdir / "s.sock") as server:
            with pytest.raises(passrpc.AuthenticationError, match="trailing newline or space"):
                passrpc.connect(server.socket_path, password="pw\n", timeout=WAIT)
            wait_for(lambda: "refused a connection" in log.read_text(), what="the refusal")
        line = next(x for x in log.read_text().splitlines() if "refused a connection" in x)
        assert f"from pid {os.getpid()} uid {os.getuid()}: a client reports a wrong password" in line
