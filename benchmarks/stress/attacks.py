"""Attacks on a real passrpc server, and what each one gets now: the figures of docs/reliability.md.

Run from the repository root (each stops by itself, within its time bound):

    python benchmarks/stress/attacks.py all            # every attack below, one after another
    python benchmarks/stress/attacks.py hello-fds      # (1) a stranger's hello, 64 descriptors per byte
    python benchmarks/stress/attacks.py trickle-fds    # (2) an authenticated trickle, 64 per byte
    python benchmarks/stress/attacks.py budget         # (2) many such clients at once
    python benchmarks/stress/attacks.py big-frames     # (3) 16 MiB frames of empty maps, 3 connections
    python benchmarks/stress/attacks.py late-reply     # (4) Channel.call against a SIGSTOPped peer
    python benchmarks/stress/attacks.py high-fd        # (5) start() with a descriptor above RLIMIT_NOFILE
    python benchmarks/stress/attacks.py outcomes       # (6) every handler outcome
    python benchmarks/stress/attacks.py pipelined      # a request pipelined behind a refused proof
    python benchmarks/stress/attacks.py handshake-time # silent and trickling strangers
    python benchmarks/stress/attacks.py threads        # 1,000 idle clients: the threads they cost

Every attack runs against a server started with ``passrpc.Server.start()``
(a forked process) over AF_UNIX sockets only; the server's descriptors and
memory are read from /proc, its warnings from its log. Every process and
socket file is cleaned up, also when an attack fails or its time runs out.
See benchmarks/stress/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from _raw import (
    ERROR,
    MESSAGE,
    PASSWORD,
    attacked_server,
    authenticated,
    closed_by_peer,
    connect,
    fd_count,
    frame,
    hello_frame,
    log_lines,
    memory,
    mib,
    proof_frame,
    read_frame,
    send_piece,
    settle,
    shorten,
    thread_count,
)

import passrpc
from passrpc import Channel

FDS_PER_PIECE = 64


def heading(text: str) -> None:
    print(f"\n== {text}")


def show_log(log: Path, *needles: str, limit: int = 2) -> None:
    lines = log_lines(log, *needles)
    for line in lines[:limit]:
        print(f"   server log: {shorten(line)}")
    if len(lines) > limit:
        print(f"   server log: ... and {len(lines) - limit} more such line(s)")


def trickle(
    sock: socket.socket, data: bytes, fds: list[int], wait: float
) -> tuple[int, str, float]:
    """Send ``data`` one byte per ``sendmsg``, ``fds`` with each, until the peer ends it.

    Returns how many pieces the kernel took, how the connection ended (the
    error a send got, or what a read saw) and the seconds from the first
    piece to that end. Gives up after 10 pieces: the server should have
    ended it long before.
    """
    start = time.perf_counter()
    for i in range(min(len(data), 10)):
        failed = send_piece(sock, data[i : i + 1], fds)
        if failed:
            return i, f"send of piece {i + 1}: {failed}", time.perf_counter() - start
        ended = closed_by_peer(sock, wait)
        if ended:
            return i + 1, f"read after piece {i + 1}: {ended}", time.perf_counter() - start
    return 10, "still open after 10 pieces", time.perf_counter() - start


# (1) ----------------------------------------------------------------------------------


def hello_fds(args: argparse.Namespace) -> None:
    heading("(1) a stranger trickles a hello, one byte at a time, 64 descriptors per byte")
    r, w = os.pipe()
    try:
        with attacked_server() as (server, log):
            assert server.pid is not None
            before = fd_count(server.pid)
            print(f"   server pid {server.pid}: {before} descriptors open before")
            outcomes = []
            for _ in range(args.rounds):
                with connect(server.socket_path) as sock:
                    outcomes.append(trickle(sock, hello_frame(), [r] * FDS_PER_PIECE, 1.0))
            pieces = sorted({o[0] for o in outcomes})
            ends = sorted({o[1] for o in outcomes})
            times = sorted(o[2] for o in outcomes)
            print(
                f"   {args.rounds} connections: the server took {pieces} piece(s) of the "
                f"{len(hello_frame())}-byte hello before it closed; ended by {ends}"
            )
            print(
                f"   first byte to closed connection: median {times[len(times) // 2] * 1e3:.2f} ms, "
                f"max {times[-1] * 1e3:.2f} ms"
            )
            # The whole hello in one piece, descriptors attached: refused as well.
            with connect(server.socket_path) as sock:
                failed = send_piece(sock, hello_frame(), [r] * FDS_PER_PIECE)
                ended = closed_by_peer(sock, 2.0)
            print(f"   a whole hello with 64 descriptors: send {failed or 'taken'}, then {ended}")
            # Many at once, as fast as they can connect.
            start = time.perf_counter()
            peak = before
            socks = []
            for i in range(args.burst):
                sock = connect(server.socket_path)
                send_piece(sock, hello_frame()[:1], [r] * FDS_PER_PIECE)
                socks.append(sock)
                if i % 10 == 0:
                    peak = max(peak, fd_count(server.pid))
            refused = sum(closed_by_peer(sock, 2.0) is not None for sock in socks)
            elapsed = time.perf_counter() - start
            for sock in socks:
                sock.close()
            after = settle(server.pid, before)
            print(
                f"   burst: {args.burst} connections, each the hello's first byte with 64 "
                f"descriptors ({args.burst * FDS_PER_PIECE} in all): {refused} refused in "
                f"{elapsed:.2f} s; server descriptors sampled every 10 connections: at most {peak}"
            )
            print(f"   server descriptors: before {before}, after {after}")
            show_log(log, "before it authenticated")
            # A header over the pre-authentication limit: refused from the header alone.
            with connect(server.socket_path) as sock:
                start = time.perf_counter()
                sock.sendall((4097).to_bytes(4, "big"))
                ended = closed_by_peer(sock, 2.0)
                took = time.perf_counter() - start
            print(f"   a hello header announcing 4,097 bytes: {ended} after {took * 1e3:.2f} ms")
            show_log(log, "over the limit of 4096", limit=1)
            with passrpc.connect(server.socket_path, password=PASSWORD, timeout=10) as proxy:
                print(f"   a good client afterwards: ok(1) -> {proxy.ok(1)}")
    finally:
        os.close(r)
        os.close(w)


# (2) ----------------------------------------------------------------------------------


def trickle_fds(args: argparse.Namespace) -> None:
    heading("(2) an authenticated client trickles a frame, 64 descriptors per byte")
    r, w = os.pipe()
    try:
        with attacked_server() as (server, log):
            assert server.pid is not None
            before = fd_count(server.pid)
            outcomes = []
            for _ in range(args.rounds):
                with authenticated(server.socket_path) as sock:
                    big = frame(MESSAGE, FDS_PER_PIECE, ["ok", "x" * 1000])
                    outcomes.append(trickle(sock, big, [r] * FDS_PER_PIECE, 1.0))
            print(
                f"   {args.rounds} connections: the server took {sorted({o[0] for o in outcomes})} "
                f"piece(s) before it closed; ended by {sorted({o[1] for o in outcomes})}"
            )
            after = settle(server.pid, before)
            print(f"   server descriptors: before {before}, after {after}")
            show_log(log, "frames it has not finished")
    finally:
        os.close(r)
        os.close(w)


def _lower_nofile(soft: int) -> None:
    """In the server process, before it accepts: lower its own descriptor limit to ``soft``."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _placeholders(count: int) -> list[msgpack.ExtType]:
    return [msgpack.ExtType(1, bytes([i])) for i in range(count)]


def _unfinished_frames(path: str, clients: int, r: int) -> list[socket.socket]:
    """``clients`` connections each send the first byte of a 64-descriptor frame; return those kept."""
    kept = []
    for _ in range(clients):
        sock = authenticated(path)
        time.sleep(0.01)  # the server finishes the handshake before the descriptors come
        unfinished = frame(MESSAGE, FDS_PER_PIECE, ["ok", *_placeholders(FDS_PER_PIECE)])
        send_piece(sock, unfinished[:1], [r] * FDS_PER_PIECE)
        if closed_by_peer(sock, 0.2):
            sock.close()
        else:
            kept.append(sock)
    return kept


def budget(args: argparse.Namespace) -> None:
    heading(
        "(2) many authenticated clients at once, each with a frame of 64 descriptors unfinished"
    )
    r, w = os.pipe()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        for nofile in (None, 1024):
            limit = soft if nofile is None else nofile
            expected = min(1024, limit // 4)
            init = None if nofile is None else (lambda n=nofile: _lower_nofile(n))
            with attacked_server(init) as (server, log):
                assert server.pid is not None
                pid, path = server.pid, server.socket_path
                before = fd_count(pid)
                print(
                    f"   server RLIMIT_NOFILE {limit}: budget min(1024, {limit} // 4) = {expected} "
                    f"descriptors; {before} descriptors open before"
                )
                start = time.perf_counter()
                kept = _unfinished_frames(path, args.clients, r)
                elapsed = time.perf_counter() - start
                held = fd_count(pid)
                print(
                    f"   {args.clients} clients in {elapsed:.1f} s: {len(kept)} kept a frame "
                    f"unfinished ({len(kept) * FDS_PER_PIECE} descriptors waiting), "
                    f"{args.clients - len(kept)} cut off; server descriptors now {held} "
                    f"(= {before} + {len(kept)} sockets + {held - before - len(kept)} waiting)"
                )
                show_log(log, "as many descriptors waiting", limit=1)
                # A good client passes a descriptor while the budget is spent: its frame
                # arrives whole, so nothing of it waits.
                with (
                    passrpc.connect(path, password=PASSWORD, timeout=10) as proxy,
                    open(os.devnull, "rb") as f,
                ):
                    print(f"   meanwhile a good client passes a descriptor: ok(f) -> {proxy.ok(f)}")
                # The kept finish their frames: each is answered, and the budget is given back.
                rest = frame(MESSAGE, FDS_PER_PIECE, ["ok", *_placeholders(FDS_PER_PIECE)])[1:]
                answers = []
                for sock in kept:
                    sock.sendall(rest)
                    answers.append(read_frame(sock))
                print(
                    f"   the kept finish their frames: answers {sorted({repr(a) for a in answers})}; "
                    f"server descriptors {settle(pid, before + len(kept))}"
                )
                again = _unfinished_frames(path, args.clients, r)
                print(
                    f"   a second wave of {args.clients}: {len(again)} kept (the budget was given back)"
                )
                for sock in kept + again:
                    sock.close()
                print(f"   all gone: server descriptors {settle(pid, before)} (before {before})")
    finally:
        os.close(r)
        os.close(w)


# (3) ----------------------------------------------------------------------------------


def _available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def _empty_maps_frame(size: int, first: bytes) -> bytes:
    """A MESSAGE frame of ``size`` body bytes: ``[first, {}, {}, ...]``, built without packing."""
    count = size - 3 - 5 - len(first)  # [0, 0, ...] and the array's own header
    payload = b"\xdd" + (count + 1).to_bytes(4, "big") + first + b"\x80" * count
    body = b"\x93\x00\x00" + payload
    return len(body).to_bytes(4, "big") + body


def big_frames(args: argparse.Namespace) -> None:
    size = args.frame_mib << 20
    heading(
        f"(3) {args.connections} authenticated connections each send a {args.frame_mib} MiB frame "
        "of empty maps, then sit idle"
    )
    # Each frame decodes to about 75 bytes per byte (docs/protocol.md section 6).
    need = args.connections * size * 100 // 1024
    available = _available_kib()
    if need > available * 0.8:
        print(f"   skipped: needs about {mib(need)} of memory, {mib(available)} available")
        return
    with attacked_server() as (server, _):
        assert server.pid is not None
        pid = server.pid
        socks = [authenticated(server.socket_path) for _ in range(args.connections)]
        for sock in socks:
            sock.settimeout(120)
        time.sleep(0.2)
        print(
            f"   server VmRSS with {args.connections} idle connections: {mib(memory(pid)['VmRSS'])}"
        )
        for label, first in (
            ("a bad request [1, {}, ...]", b"\x01"),
            ("an unknown handler ['nope', {}, ...]", msgpack.packb("nope")),
        ):
            data = _empty_maps_frame(size, first)
            base = memory(pid)
            peak = [0]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.wait(0.01):
                    peak[0] = max(peak[0], memory(pid)["VmRSS"])

            answers: list[Any] = [None] * len(socks)

            def attack(
                i: int, sock: socket.socket, data: bytes = data, answers: list[Any] = answers
            ) -> None:
                sock.sendall(data)
                answers[i] = read_frame(sock)

            sampler = threading.Thread(target=sample)
            sampler.start()
            start = time.perf_counter()
            threads = [threading.Thread(target=attack, args=(i, s)) for i, s in enumerate(socks)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - start
            right_after = memory(pid)["VmRSS"]
            done.set()
            sampler.join()
            time.sleep(1.0)
            later = memory(pid)["VmRSS"]
            time.sleep(2.0)
            latest = memory(pid)["VmRSS"]
            codes = sorted(
                {(a[0], a[2].get("code"), len(a[2].get("message", ""))) for a in answers}
            )
            print(
                f"   {label}: {len(data):,} bytes x {args.connections}, all answered in "
                f"{elapsed:.1f} s with (kind, code, message length) {codes}"
            )
            print(
                f"     server VmRSS: before {mib(base['VmRSS'])}, peak sampled {mib(peak[0])}, "
                f"just after the answers {mib(right_after)}, 1 s later {mib(later)}, "
                f"3 s later {mib(latest)} (connections still open, idle)"
            )
        print(f"   server VmHWM (its peak RSS): {mib(memory(pid)['VmHWM'])}")
        with passrpc.connect(server.socket_path, password=PASSWORD, timeout=10) as proxy:
            print(f"   a good client afterwards: ok(1) -> {proxy.ok(1)}")
        for sock in socks:
            sock.close()


# (4) ----------------------------------------------------------------------------------


def _echo_peer(listener: socket.socket, deadline: float, parent: int) -> None:
    """The forked peer: one bare Channel per accepted connection, each message echoed back."""
    listener.settimeout(0.2)
    while time.monotonic() < deadline and os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with Channel(conn) as channel:
            while True:
                try:
                    channel.write(*channel.read())
                except passrpc.ConnectionClosed:
                    break


def _pauses(pid: int, stop: threading.Event, seed: int) -> None:
    """SIGSTOP ``pid`` for 20 to 300 ms at a time, every 50 to 250 ms, until ``stop``."""
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.05, 0.25)):
        os.kill(pid, signal.SIGSTOP)
        try:
            stop.wait(rng.uniform(0.02, 0.3))
        finally:
            os.kill(pid, signal.SIGCONT)


def _request_loop(path: str, seconds: float, timeout: float, use_call: bool) -> dict[str, int]:
    counts = {"calls": 0, "right": 0, "wrong": 0, "timeouts": 0, "connections": 0}
    channel: Channel | None = None
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        if channel is None or channel.closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            channel = Channel(sock, timeout=timeout)
            counts["connections"] += 1
        i += 1
        counts["calls"] += 1
        try:
            if use_call:
                reply = channel.call(i)
            else:
                channel.write(i)
                reply = channel.read()
        except passrpc.Timeout:
            counts["timeouts"] += 1
            continue
        counts["right" if reply == (i,) else "wrong"] += 1
    if channel is not None:
        channel.close()
    return counts


def late_reply(args: argparse.Namespace) -> None:
    heading(
        "(4) a bare Channel request/reply loop, timeout 0.1 s, against a peer SIGSTOPped "
        "for 20-300 ms every 50-250 ms"
    )
    tmp = Path(tempfile.mkdtemp(prefix="passrpc-stress-"))
    path = str(tmp / "echo.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the peer
        try:
            _echo_peer(listener, time.monotonic() + 2 * args.seconds + 30, parent)
        finally:
            os._exit(0)
    listener.close()
    try:
        for use_call, label in (
            (True, "Channel.call(i)"),
            (False, "write(i) then read(), naively"),
        ):
            stop = threading.Event()
            pauser = threading.Thread(target=_pauses, args=(pid, stop, 1))
            pauser.start()
            try:
                counts = _request_loop(path, args.seconds, 0.1, use_call)
            finally:
                stop.set()
                pauser.join()
            print(
                f"   {label}: {counts['calls']} requests in {args.seconds:.0f} s, "
                f"{counts['right']} answered by their own reply, {counts['wrong']} by another's, "
                f"{counts['timeouts']} timed out; {counts['connections']} connection(s)"
            )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(tmp, ignore_errors=True)


# (5) ----------------------------------------------------------------------------------


def high_fd(args: argparse.Namespace) -> None:
    high, lowered = 1100, 1024
    heading(f"(5) start() while this process holds descriptor {high}, over RLIMIT_NOFILE {lowered}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= high:
        print(f"   skipped: the hard descriptor limit ({hard}) is not above {high}")
        return
    r, w = os.pipe()
    try:
        if soft != resource.RLIM_INFINITY and soft <= high:
            resource.setrlimit(resource.RLIMIT_NOFILE, (high + 1, hard))  # only to place it
        os.dup2(r, high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        start = time.perf_counter()
        with attacked_server() as (server, _):
            elapsed = time.perf_counter() - start
            assert server.pid is not None
            fds = os.listdir(f"/proc/{server.pid}/fd")
            targets = [os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in fds]
            ok = server.proxy(timeout=10).ok(1)
            print(
                f"   start() returned in {elapsed * 1e3:.0f} ms; ok(1) -> {ok}; the server holds "
                f"descriptor {high}: {str(high) in fds}; its highest descriptor is "
                f"{max(map(int, fds))}; {targets.count('/dev/null')} of its {len(fds)} "
                "descriptors are /dev/null"
            )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with contextlib.suppress(OSError):
            os.close(high)
        os.close(r)
        os.close(w)


# (6) ----------------------------------------------------------------------------------


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    # msgpack.ExtType's constructor refuses negative codes; passrpc sends them as they are.
    return tuple.__new__(msgpack.ExtType, (code, data))


def _describe(exc: passrpc.Error) -> str:
    if isinstance(exc, passrpc.RemoteError):
        text = (
            f"RemoteError type {exc.remote_type!r}, message {len(exc.remote_message):,} chars "
            f"{shorten(repr(exc.remote_message), 70)}, traceback {len(exc.remote_traceback):,} chars"
        )
        cut = [
            name
            for name, value in (
                ("message", exc.remote_message),
                ("traceback", exc.remote_traceback),
            )
            if value.endswith("characters cut]")
        ]
        return text + (f" ({' and '.join(cut)} cut)" if cut else "")
    return f"{type(exc).__name__}, {len(str(exc)):,} chars: {shorten(str(exc), 90)}"


def outcomes(args: argparse.Namespace) -> None:
    heading("(6) every handler outcome, on one connection")
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("SystemExit(3) in a handler", ("exits",)),
        ("an exception whose str() raises", ("unprintable",)),
        ("a returned object whose fileno() is 2**31", ("huge_fd",)),
        ("an exception with a 1 MiB message", ("long_message", 1 << 20)),
        ("a 16 MiB unknown handler name", ("x" * (16 << 20),)),
        ("ext -128 sent, echoed back", ("echo", _ext(-128, b"abc"))),
        ("a msgpack Timestamp (ext -1) sent, echoed back", ("echo", msgpack.Timestamp(1, 2))),
        ("ext 127 returned", ("ext127",)),
    ]
    with attacked_server() as (server, _):
        with server.connect(timeout=30) as channel:
            for label, request in cases:
                start = time.perf_counter()
                try:
                    channel.write(*request)
                    outcome = f"reply {channel.read()!r}"
                except passrpc.Error as exc:
                    outcome = _describe(exc)
                elapsed = time.perf_counter() - start
                channel.write("ok", 1)
                still = channel.read() == (1,)
                print(
                    f"   {label} ({elapsed * 1e3:.0f} ms): {outcome}; same connection goes on: {still}"
                )
        print(f"   server alive: {server.alive}")


def pipelined(args: argparse.Namespace) -> None:
    heading("a request pipelined right behind a proof the server refuses")
    tallies: dict[str, dict[str, int]] = {}
    with attacked_server() as (server, log):
        for size in (100, 1 << 20):
            tally = tallies.setdefault(f"{size:,}-byte request", {})
            for _ in range(args.rounds):
                with connect(server.socket_path) as sock:
                    ours = os.urandom(32)
                    sock.sendall(hello_frame(ours))
                    _, _, answer = read_frame(sock)
                    request = frame(MESSAGE, 0, ["echo", b"x" * size])
                    try:
                        sock.sendall(
                            proof_frame(PASSWORD, ours, answer, wrong=True) + request,
                            socket.MSG_NOSIGNAL,
                        )
                        wrote = "write taken"
                    except OSError as exc:
                        wrote = f"write: {type(exc).__name__}"
                    try:
                        kind, _, payload = read_frame(sock)
                        read = (
                            f"then ERROR {payload['code']!r}"
                            if kind == ERROR
                            else f"then kind {kind}"
                        )
                        ended = closed_by_peer(sock, 2.0)
                        read += f", then {ended}"
                    except (EOFError, ConnectionResetError) as exc:
                        read = f"then no frame: {type(exc).__name__}"
                    key = f"{wrote}, {read}"
                    tally[key] = tally.get(key, 0) + 1
        for what, tally in tallies.items():
            print(f"   {what}, {args.rounds} times: {tally}")
        show_log(log, "wrong password", limit=1)


# Time and threads -------------------------------------------------------------------


def _trickle_slowly(sock: socket.socket, data: bytes, every: float, result: list[Any]) -> None:
    """Send ``data`` one plain byte every ``every`` s until the peer ends the connection."""
    start = time.perf_counter()
    for i in range(len(data)):
        failed = send_piece(sock, data[i : i + 1], [])
        ended = failed or closed_by_peer(sock, every)
        if ended:
            result[:] = [i + (0 if failed else 1), ended, time.perf_counter() - start]
            return
    result[:] = [len(data), "never ended", time.perf_counter() - start]


def handshake_time(args: argparse.Namespace) -> None:
    heading(
        f"{args.silent} strangers connect and say nothing, one trickles its hello a byte "
        "every 0.2 s: the handshake's time bound (5 s)"
    )
    with attacked_server() as (server, log):
        assert server.pid is not None
        pid, path = server.pid, server.socket_path
        before = thread_count(pid)
        start = time.perf_counter()
        silent = [connect(path) for _ in range(args.silent)]
        trickler = connect(path)
        result: list[Any] = []
        thread = threading.Thread(
            target=_trickle_slowly, args=(trickler, hello_frame(), 0.2, result)
        )
        thread.start()
        time.sleep(1.0)
        during = thread_count(pid)
        closed_at = []
        for sock in silent:
            ended = closed_by_peer(sock, max(0.1, start + 10 - time.perf_counter()))
            closed_at.append((time.perf_counter() - start, ended))
            sock.close()
        thread.join()
        trickler.close()
        ends = sorted({e for _, e in closed_at}, key=str)
        times = [t for t, _ in closed_at]
        print(
            f"   server threads: {before} before, {during} while they wait; the silent ones "
            f"closed ({ends}) between {min(times):.2f} and {max(times):.2f} s after connecting"
        )
        print(
            f"   the trickler: {result[0]} of the hello's {len(hello_frame())} bytes sent, then "
            f"{result[1]} at {result[2]:.2f} s"
        )
        show_log(log, "refused a connection", limit=1)


def threads(args: argparse.Namespace) -> None:
    heading(f"{args.idle} authenticated clients that stay idle: the server threads they cost")
    for idle_timeout in (None, 1.0):
        with attacked_server(client_idle_timeout=idle_timeout) as (server, _):
            assert server.pid is not None
            pid, path = server.pid, server.socket_path
            before = thread_count(pid), memory(pid)["VmRSS"], fd_count(pid)
            start = time.perf_counter()
            socks = [authenticated(path) for _ in range(args.idle)]
            opened = time.perf_counter() - start
            time.sleep(0.5)
            during = thread_count(pid), memory(pid)["VmRSS"], fd_count(pid)
            call_start = time.perf_counter()
            with passrpc.connect(path, password=PASSWORD, timeout=10) as proxy:
                ok = proxy.ok(1)
            call = time.perf_counter() - call_start
            print(
                f"   client_idle_timeout={idle_timeout}: {args.idle} connections in {opened:.1f} s; "
                f"server threads {before[0]} -> {during[0]}, VmRSS {mib(before[1])} -> "
                f"{mib(during[1])}, descriptors {before[2]} -> {during[2]}; a new client's "
                f"connect + ok(1) -> {ok} in {call * 1e3:.1f} ms"
            )
            if idle_timeout is not None:
                time.sleep(idle_timeout + 0.5)
                ended = sum(closed_by_peer(sock, 0.01) is not None for sock in socks)
                print(
                    f"   {idle_timeout + 0.5:.1f} s later: {ended} of {args.idle} closed by the "
                    f"server; threads {thread_count(pid)}"
                )
            for sock in socks:
                sock.close()
            time.sleep(1.0)
            print(
                f"   once they all left: threads {thread_count(pid)} (idle pool threads are "
                f"kept 30 s for the next clients), descriptors {fd_count(pid)}"
            )


ATTACKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "hello-fds": hello_fds,
    "trickle-fds": trickle_fds,
    "budget": budget,
    "big-frames": big_frames,
    "late-reply": late_reply,
    "high-fd": high_fd,
    "outcomes": outcomes,
    "pipelined": pipelined,
    "handshake-time": handshake_time,
    "threads": threads,
}


class OutOfTime(Exception):
    pass


def _out_of_time(signum: int, frame_: Any) -> None:
    raise OutOfTime(f"the attack took longer than its bound ({signum})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("attack", choices=["all", *ATTACKS])
    parser.add_argument("--rounds", type=int, default=20, help="connections per trickle attack")
    parser.add_argument("--burst", type=int, default=200, help="connections in the hello burst")
    parser.add_argument("--clients", type=int, default=24, help="clients in the budget attack")
    parser.add_argument("--frame-mib", type=int, default=16, help="size of each big frame")
    parser.add_argument("--connections", type=int, default=3, help="connections sending big frames")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the late-reply loop")
    parser.add_argument("--silent", type=int, default=50, help="silent strangers")
    parser.add_argument("--idle", type=int, default=1000, help="idle authenticated clients")
    parser.add_argument("--bound", type=int, default=180, help="seconds any one attack may take")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _out_of_time)
    names = list(ATTACKS) if args.attack == "all" else [args.attack]
    print(
        f"passrpc {passrpc.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}"
    )
    for name in names:
        signal.alarm(args.bound)
        try:
            ATTACKS[name](args)
        finally:
            signal.alarm(0)


if __name__ == "__main__":
    main()
