"""The one exception hierarchy of passrpc.

Every exception passrpc raises on purpose derives from :class:`Error`. Where an
exception means the same as a builtin one, it inherits that too, so code that
already catches ``ConnectionError`` or ``TimeoutError`` keeps working.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error passrpc raises on purpose.

    Catch this to handle any passrpc failure in one place. Errors that come
    from your own handlers on the server reach you as :class:`RemoteError`,
    which derives from this class too.
    """


class ProtocolError(Error):
    """The bytes on a connection broke the passrpc wire protocol.

    You get this when a peer sends something that is not a valid passrpc
    frame: garbage, a truncated frame, a wrong type where the protocol fixes
    one, or descriptors that do not match their frame. The connection cannot
    be trusted afterwards; close it. You do not get this for a well-formed
    message your code did not expect: that is your protocol, not ours.
    """


class FrameTooLarge(ProtocolError):
    """A frame's length, or its count of descriptors, is over the configured limit.

    Raised as soon as the frame header is read, before any memory is set
    aside for the body. Raise the limit (``Limits(max_frame_size=...)``) on
    both ends if the message is legitimately that large, or send the data
    through a file descriptor instead.
    """


class EncodeError(Error, TypeError):
    """A value in an outgoing message cannot travel.

    Messages may hold None, bool, int, float, str, bytes, lists, tuples,
    dicts, timezone-aware datetimes, file descriptors (objects with
    ``fileno()``) and instances of classes registered with
    :func:`passrpc.register_type`. Convert other objects, or register their
    class, before sending them. Nothing was sent when you get this.
    """


class DecodeError(Error, ValueError):
    """A received value could not be rebuilt; its frame was skipped whole.

    You get this when a registered type's ``decode`` failed (or the class
    refused the fields it was called with), when a map key cannot be a
    Python dict key (a tuple key arrives as a list, which cannot), or when a
    datetime is out of Python's range. It is raised by the call, or by
    ``read()``, whose frame it was; the server answers a request it cannot
    decode with an error of code ``undecodable``, raised by the caller as
    this. You do not get this for a broken stream (that is
    :class:`ProtocolError`): the connection stays usable.
    """

    def __init__(self, message: str, kind: int | None = None) -> None:
        super().__init__(message)
        #: The kind of the skipped frame (``docs/protocol.md``, section 2),
        #: when this side skipped it; None for the server's report.
        self.kind = kind


class ConnectionClosed(Error, ConnectionError):
    """The peer closed the connection, or the OS broke it.

    You get this when the other side went away: the server stopped or died,
    or the client disconnected. The cause, if the OS reported one, is in
    ``__cause__``. Open a new connection to go on; a call that got this may or
    may not have run on the server.
    """


class ServerBusy(Error, ConnectionError):
    """The server is at its connection limit and refused this connection.

    You get this from connecting (a proxy's first call, ``connect()``,
    ``server.connect()``) when the server already holds ``max_connections``
    connections: it accepted yours only to say so, and closed it. Nothing was
    sent to a handler. passrpc does not retry by itself: try again later,
    close connections you do not use, or raise the server's
    ``max_connections``. You do not get this once a connection is open.
    """


class Timeout(Error, TimeoutError):
    """An operation did not finish within its time bound.

    A proxy call that times out discards its connection, so no late reply
    can be mistaken for the answer to a later call. Raise the timeout, or
    check whether the handler hangs.
    """


class AuthenticationError(Error, PermissionError):
    """The handshake failed: wrong password, a refused user, or a bad proof.

    Check that client and server use the same password, that the socket
    path is the server you meant, and that the client runs as the server's
    user (or as a uid the server allows).
    """


class RemoteError(Error):
    """A handler raised an exception on the server.

    ``remote_type`` names the exception's class, ``remote_message`` holds
    its message and ``remote_traceback`` the formatted traceback text from
    the server process. The server goes on serving; so can you.

    When the remote class is a builtin exception, or derives from one, the
    error you get is also an instance of that builtin (``except
    ValueError:`` catches a handler's ``ValueError``), except for
    ``TimeoutError``, ``ConnectionError``, exits and exception groups, which
    a remote error must never pass for. A class registered with
    :func:`passrpc.register_error` makes it an instance of that class too.
    Either way its ``__init__`` does not run: only the type name, message
    and traceback travel.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        # Not super().__init__: in a typed remote error (RemoteError and, say,
        # OSError) the next class's constructor would read these three as its
        # own arguments (errno, strerror, filename); only the args are set.
        Exception.__init__(self, remote_type, remote_message, remote_traceback)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip("\n")
        return text


class UnknownMessage(Error, LookupError):
    """The server has no handler for the message name you sent.

    Check the name against ``passrpc.connect(...)``'s handler list or
    ``python -m passrpc list``. The connection stays usable.
    """


class ServerAlreadyStarted(Error, RuntimeError):
    """``start()`` or ``serve()`` was called on a server that is already running.

    Call ``stop()`` first, or use the running server.
    """


class ServerNotStarted(Error, RuntimeError):
    """An operation needs a running server, and this one is not running.

    Call ``start()`` first. You do not get this from ``stop()`` on a server
    whose process died by itself: that ``stop()`` just cleans up.
    """


class StartError(Error, RuntimeError):
    """The server could not start.

    Its socket path is taken (by a live server, or by something that is not
    a socket), or the server process failed before it was ready to accept
    connections: its ``initialize_server`` hook raised, or it exited or was
    killed. The message says which; the server's log (the ``passrpc``
    logger) says more.
    """


class ConfigurationError(Error, ValueError):
    """An argument or a registration that passrpc cannot accept.

    You registered a handler name twice, registered after the server started
    (the server process already has its copy), named a signal that does not
    exist or cannot be caught, or gave a socket path longer than AF_UNIX
    allows. The message names the offending value and the fix.
    """


class TargetError(Error, ImportError):
    """A ``module:attribute`` target cannot be loaded.

    The message says whether the module was not found, its import failed
    (the original exception is the cause), or it has no such attribute.
    Check the spelling and that the module is importable from the current
    directory or ``sys.path``.
    """


class WorkerError(Error, RuntimeError):
    """A worker could not be forked, or how it ended cannot be known.

    ``Server.fork_worker`` raises it when the server's fork server cannot
    fork: its preload raised (the message carries the traceback), ``fork()``
    failed, the fork server died, or the server is stopping; and when it is
    called outside the server process. ``Worker.wait`` raises it when the
    fork server ended before the worker did (the worker was killed with it,
    its exit status is lost). You do not get it for a worker that failed on
    its own: that is an exit status, which ``Worker.wait`` returns.
    """
