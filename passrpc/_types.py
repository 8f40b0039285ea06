"""Values beyond msgpack's own: registered user types, and typed remote exceptions.

Pure, like the codec that uses it (:mod:`passrpc._wire`, :mod:`passrpc._decoder`):
no socket, no thread. A :class:`TypeRegistry` says which classes of this
process travel as which msgpack extension code, and which exception classes a
remote error may be rebuilt as. Both directions rest on the same rule:
**every class that can arrive is one the receiving process registered itself**.
Nothing on the wire names a class to import: an extension value carries a small
integer that this process's registry maps to a class, and a remote error's type
name is only compared against the names registered here (and the builtin
exceptions). Nothing is ever unpickled.

``docs/server.md`` ("Values") is the user's guide; ``docs/protocol.md``
section 4 has the bytes.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime
from collections.abc import Callable
from typing import Any, TypeVar, overload

import attrs
import msgpack

from ._errors import ConfigurationError, RemoteError

#: Extension codes a registered type may take. msgpack keeps the negative
#: codes for itself (-1 is its Timestamp); 1 is passrpc's descriptor
#: placeholder and 0 is kept for passrpc's next use.
MIN_TYPE_CODE = 2
MAX_TYPE_CODE = 127

#: How deep registered values may nest in one another. Each level decodes
#: with a msgpack call of its own, which keeps about 40 KiB on the C stack;
#: 32 levels stays far from the end of a thread's stack whatever a peer
#: sends, and far beyond any real data model.
MAX_TYPE_NESTING = 32

_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)
Encode = Callable[[Any], Any]
Decode = Callable[[Any], Any]

#: Classes msgpack packs by itself, subclasses included (with ``strict_types``
#: off, as passrpc packs), before passrpc is asked: a registration for one
#: could never be used. What each packs as, for the refusal's message.
_NATIVE: tuple[tuple[type, str], ...] = (
    (type(None), "nil"),
    (bool, "a bool"),
    (int, "an int"),
    (float, "a float"),
    (str, "a str"),
    (bytes, "bin"),
    (bytearray, "bin"),
    (memoryview, "bin"),
    (tuple, "an array"),
    (list, "an array"),
    (dict, "a map"),
    (msgpack.ExtType, "the extension value it is"),
    (msgpack.Timestamp, "a Timestamp"),
)


def type_name(cls: type) -> str:
    """``module.QualName`` of ``cls``: how DESCRIBE "types" names a registered class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def error_name(cls: type) -> str:
    """The name an ERROR frame gives an exception class: the module is left out
    for builtins and ``__main__``, as it always was (``docs/protocol.md``, section 7)."""
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return type_name(cls)


@attrs.frozen
class RegisteredType:
    """One registration: ``cls`` travels as extension ``code``, through ``encode``/``decode``."""

    cls: type
    code: int
    name: str
    encode: Encode
    decode: Decode


class _Fields:
    """The default codec of an attrs class or a dataclass: a map of its fields by name.

    Only fields the class's ``__init__`` takes travel; decoding calls the class
    with them, by the name ``__init__`` gives each (attrs strips a leading
    underscore: field ``_x`` is argument ``x``).
    """

    def __init__(self, cls: type, fields: list[tuple[str, str]]) -> None:
        self.cls = cls
        self.names = tuple(name for name, _ in fields)
        self.arguments = dict(fields)
        # Usually every field is its own argument: the map is then the kwargs.
        self.renamed = any(name != argument for name, argument in fields)

    def encode(self, obj: Any) -> dict[str, Any]:
        return {name: getattr(obj, name) for name in self.names}

    def decode(self, value: Any) -> Any:
        if type(value) is not dict:
            raise TypeError(f"expected a map of fields, got {type(value).__name__}")
        arguments = self.arguments
        if not arguments.keys() >= value.keys():  # said here, by field name
            unknown = sorted(repr(name) for name in value if name not in arguments)
            raise TypeError(
                f"{self.cls.__qualname__} has no field {', '.join(unknown)}; "
                f"it has {list(self.names)}"
            )
        if self.renamed:
            value = {arguments[name]: item for name, item in value.items()}
        return self.cls(**value)


def _default_codec(cls: type) -> _Fields | None:
    if attrs.has(cls):
        return _Fields(
            cls,
            [
                (field.name, field.alias or field.name.lstrip("_"))
                for field in attrs.fields(cls)
                if field.init
            ],
        )
    if dataclasses.is_dataclass(cls):
        return _Fields(cls, [(f.name, f.name) for f in dataclasses.fields(cls) if f.init])
    return None


def _check_code(code: object) -> int:
    if type(code) is not int or not MIN_TYPE_CODE <= code <= MAX_TYPE_CODE:
        raise ConfigurationError(
            f"an extension code is an int from {MIN_TYPE_CODE} to {MAX_TYPE_CODE}, got {code!r} "
            "(msgpack keeps the negative codes, passrpc 0 and 1)"
        )
    return code


def _check_class(cls: object) -> type:
    if not isinstance(cls, type):
        raise ConfigurationError(f"register_type takes a class, got {cls!r}")
    if cls is datetime.datetime:
        raise ConfigurationError(
            "datetime.datetime needs no registration: a timezone-aware datetime travels "
            "built in (msgpack's Timestamp) and arrives in UTC"
        )
    for native, packed_as in _NATIVE:
        if issubclass(cls, native):
            raise ConfigurationError(
                f"{type_name(cls)} cannot be registered: msgpack packs every "
                f"{native.__qualname__} (subclasses such as NamedTuple and IntEnum too) as "
                f"{packed_as} by itself, so passrpc would never be asked to encode it; "
                "convert it to a class of your own, or send the plain value"
            )
    return cls


def _codec(cls: type, encode: Encode | None, decode: Decode | None) -> tuple[Encode, Decode]:
    fields = _default_codec(cls)
    if fields is not None:
        return encode or fields.encode, decode or fields.decode
    if encode is None or decode is None:
        raise ConfigurationError(
            f"{type_name(cls)} is neither an attrs class nor a dataclass: give both "
            "encode(obj) -> a msgpack-able value and decode(value) -> obj. (With "
            "@register_type(code=...) as a decorator, put it above @attrs.define or "
            "@dataclass, so that it gets the finished class.)"
        )
    for fn, what in ((encode, "encode"), (decode, "decode")):
        if not callable(fn):
            raise ConfigurationError(f"{what} must be callable, got {fn!r}")
    return encode, decode


class TypeRegistry:
    """Which of this process's classes travel as which msgpack extension code, and
    which exception classes remote errors may be rebuilt as.

    ``passrpc.register_type`` and ``passrpc.register_error`` fill the
    process-wide default registry, which ``Server``, ``passrpc.connect``,
    ``passrpc.aio.connect`` and ``Channel`` use unless given ``types=``. Make
    a registry of your own to keep a set of types apart (a library's, say).
    Register at import time: a registry is read by every connection that uses
    it, and a forked server process has a copy of it as it was at the fork.
    """

    def __init__(self) -> None:
        #: The registrations by class and by code, as the encoder and the
        #: decoder read them (they hold these very dicts: registrations made
        #: later count at once). Change them only through ``register_type``.
        self.by_class: dict[type, RegisteredType] = {}
        self.by_code: dict[int, RegisteredType] = {}
        self._errors: dict[str, type[RemoteError]] = {}

    @overload
    def register_type(
        self,
        cls: type[_T],
        code: int,
        *,
        encode: Encode | None = None,
        decode: Decode | None = None,
    ) -> type[_T]: ...

    @overload
    def register_type(
        self,
        cls: None = None,
        *,
        code: int,
        encode: Encode | None = None,
        decode: Decode | None = None,
    ) -> Callable[[type[_T]], type[_T]]: ...

    def register_type(
        self,
        cls: type[_T] | None = None,
        code: int | None = None,
        *,
        encode: Encode | None = None,
        decode: Decode | None = None,
    ) -> type[_T] | Callable[[type[_T]], type[_T]]:
        """Register ``cls`` under extension ``code`` in this registry (see :func:`register_type`)."""
        if cls is None:
            _check_code(code)

            def decorate(cls: type[_T]) -> type[_T]:
                return self.register_type(cls, code, encode=encode, decode=decode)  # type: ignore[arg-type]

            return decorate
        code = _check_code(code)
        _check_class(cls)
        name = type_name(cls)
        known = self.by_class.get(cls)
        if known is not None:
            if known.code == code:
                return cls  # the same registration again: a module imported twice
            raise ConfigurationError(
                f"{name} is registered under extension code {known.code} already; a class "
                "has one code, the same on every side"
            )
        for entry in self.by_code.values():
            if entry.name == name and entry.code != code:
                raise ConfigurationError(
                    f"a class named {name} is registered under extension code {entry.code} "
                    f"already; register it under {entry.code} again, not {code}"
                )
        held = self.by_code.get(code)
        if held is not None and held.name != name:
            raise ConfigurationError(
                f"extension code {code} is taken by {held.name}; choose another code for "
                f"{name} (from {MIN_TYPE_CODE} to {MAX_TYPE_CODE}), the same on every side"
            )
        encode, decode = _codec(cls, encode, decode)
        entry = RegisteredType(cls, code, name, encode, decode)
        # A class of the same name under the same code is that module imported
        # again: its newest class object decodes, and both encode.
        self.by_code[code] = entry
        self.by_class[cls] = entry
        return cls

    def register_error(self, cls: type[_E]) -> type[_E]:
        """Let remote errors of ``cls`` be rebuilt as ``cls`` (see :func:`register_error`)."""
        if not isinstance(cls, type) or not issubclass(cls, Exception):
            raise ConfigurationError(
                f"register_error takes an exception class (a subclass of Exception), got {cls!r}"
            )
        if cls.__module__ == "builtins":
            raise ConfigurationError(
                f"{cls.__qualname__} is a builtin exception: remote ones are typed already"
            )
        refused = next((base for base in NEVER_TYPED if issubclass(cls, base)), None)
        if refused is not None:
            raise ConfigurationError(
                f"{type_name(cls)} derives from {refused.__qualname__}, which a remote error "
                "must never pass for (it would be taken for a local timeout, a closed "
                "connection or an exit); it stays a plain RemoteError"
            )
        try:
            typed = _combine(cls, error_name(cls), builtin=False)
        except TypeError as exc:
            raise ConfigurationError(
                f"{type_name(cls)} cannot be combined with passrpc.RemoteError ({exc}); "
                "give it a constructor that accepts the RemoteError arguments, or leave it "
                "unregistered"
            ) from exc
        self._errors[error_name(cls)] = typed
        return cls

    def names(self) -> dict[int, str]:
        """Every registered code and its class's ``module.QualName``: the answer to DESCRIBE "types"."""
        return {code: entry.name for code, entry in sorted(self.by_code.items())}

    def remote_error(
        self, remote_type: str, builtin: object, message: str, traceback: str
    ) -> RemoteError:
        """The exception to raise for a handler's error: typed by a registered class
        named ``remote_type``, else by the builtin named ``builtin``, else a plain
        :class:`RemoteError`. Only registered classes and builtins are ever made."""
        typed = self._errors.get(remote_type)
        if typed is None and type(builtin) is str:
            typed = typed_builtin(builtin)
        if typed is None:
            return RemoteError(remote_type, message, traceback)
        return typed(remote_type, message, traceback)

    def __repr__(self) -> str:
        return f"<passrpc.TypeRegistry types={self.names()} errors={sorted(self._errors)}>"


#: The process-wide registry that ``passrpc.register_type`` and
#: ``passrpc.register_error`` fill, used wherever no ``types=`` is given.
DEFAULT_TYPES = TypeRegistry()


@overload
def register_type(
    cls: type[_T], code: int, *, encode: Encode | None = None, decode: Decode | None = None
) -> type[_T]: ...


@overload
def register_type(
    cls: None = None,
    *,
    code: int,
    encode: Encode | None = None,
    decode: Decode | None = None,
) -> Callable[[type[_T]], type[_T]]: ...


def register_type(
    cls: type[_T] | None = None,
    code: int | None = None,
    *,
    encode: Encode | None = None,
    decode: Decode | None = None,
) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Let instances of ``cls`` travel as msgpack extension ``code``, in the default registry.

    With no ``encode``/``decode``, an attrs class or a dataclass travels as a
    map of its fields by name (nested registered values, lists and dicts
    inside included) and is rebuilt by calling the class with them; any other
    class needs both: ``encode(obj)`` returns a value msgpack can carry and
    ``decode(value)`` rebuilds the object. Both sides must register the class
    under the same code. Used as a class decorator, ``@register_type(code=10)``
    goes above ``@attrs.define`` or ``@dataclass``. Returns ``cls``.

    Args:
        cls: the class; exactly this class (not its subclasses) is encoded.
        code: the extension code, an int from 2 to 127.
        encode: ``obj -> value``; for attrs classes and dataclasses optional.
        decode: ``value -> obj``; for attrs classes and dataclasses optional.

    Raises:
        ConfigurationError: ``code`` is out of range or taken by another class;
            ``cls`` has another code already; ``cls`` is one msgpack packs by
            itself (a subclass of int, str, bytes, tuple, list or dict: a
            ``NamedTuple``, an ``IntEnum``), or ``datetime``, which is built
            in; or ``cls`` is neither attrs nor a dataclass and lacks
            ``encode`` or ``decode``. Registering the same class under the
            same code again does nothing.
    """
    return DEFAULT_TYPES.register_type(cls, code, encode=encode, decode=decode)  # type: ignore[arg-type]


def register_error(cls: type[_E]) -> type[_E]:
    """Let a remote error of exception class ``cls`` be raised as an instance of ``cls``.

    A handler's exception whose class has this name (``module.QualName``, as
    the ERROR frame sends it) reaches the caller as an exception that is both
    a :class:`passrpc.RemoteError` and a ``cls``, so ``except cls:`` catches
    it. The class's ``__init__`` does not run: only its name, message and
    traceback travel. Register it on the calling side; works as a class
    decorator. Returns ``cls``.

    Raises:
        ConfigurationError: ``cls`` is not an exception class, is a builtin
            (those are typed already), derives from ``TimeoutError``,
            ``ConnectionError``, ``SystemExit``, ``KeyboardInterrupt``,
            ``GeneratorExit``, ``StopIteration``, ``StopAsyncIteration`` or an
            exception group, or cannot be combined with ``RemoteError``.
    """
    return DEFAULT_TYPES.register_error(cls)


# Typed remote exceptions ------------------------------------------------------

#: Builtins a remote error is never typed as: it must never pass for a local
#: timeout, a closed connection, an exit, an iterator's end or a group of errors.
NEVER_TYPED: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        SystemExit,
        KeyboardInterrupt,
        GeneratorExit,
        StopIteration,
        StopAsyncIteration,
        TimeoutError,
        ConnectionError,
        getattr(builtins, "BaseExceptionGroup", None),  # Python 3.11 and later
    )
    if cls is not None
)

#: Every builtin exception class by name, made once: a name from the wire is
#: looked up here and nowhere else.
_BUILTIN_EXCEPTIONS: dict[str, type[BaseException]] = {
    name: obj
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
}
_typed_builtins: dict[str, type[RemoteError] | None] = {}


def nearest_builtin(cls: type[BaseException]) -> str:
    """The name of the nearest builtin class among ``cls`` and its ancestors (``ValueError``
    for ``json.JSONDecodeError``): the ERROR frame's ``builtin`` key."""
    for klass in cls.__mro__:
        if klass.__module__ == "builtins":
            return klass.__qualname__
    return "BaseException"


def typed_builtin(name: str) -> type[RemoteError] | None:
    """The class of a remote error whose nearest builtin is ``name``; None for a plain one.

    A builtin whose constructor needs more than a message (``UnicodeDecodeError``
    needs the bytes and the positions, which did not travel) is replaced by its
    nearest ancestor that takes a message alone (``UnicodeError``).
    """
    try:
        return _typed_builtins[name]
    except KeyError:
        pass
    base = _BUILTIN_EXCEPTIONS.get(name)
    if base is None:
        return None  # not a builtin here: never cached, so a peer cannot grow the cache
    typed = None
    if issubclass(base, Exception) and not issubclass(base, NEVER_TYPED):
        for klass in base.__mro__:
            if klass is Exception:
                break
            if _takes_a_message(klass):
                typed = _combine(klass, klass.__qualname__, builtin=True)
                break
    _typed_builtins[name] = typed
    return typed


def _takes_a_message(cls: type[BaseException]) -> bool:
    try:
        cls("message")
    except Exception:
        return False
    return True


def _combine(cls: type[BaseException], name: str, *, builtin: bool) -> type[RemoteError]:
    """A class that is both :class:`RemoteError` and ``cls``, named ``RemoteError[name]``.

    Raises:
        TypeError: the two cannot be combined (their layouts or constructors clash).
    """

    def __reduce__(self: RemoteError) -> tuple[Any, tuple[Any, ...]]:
        # The class is made here, so copy and pickle cannot name it: they
        # get it again by name (pickle is never used on the wire; this is
        # for a program that copies or pickles the errors it caught).
        return _typed_again, (name, builtin, *self.args)

    bases: tuple[type, ...] = (cls,) if issubclass(cls, RemoteError) else (RemoteError, cls)
    title = f"RemoteError[{name}]"
    typed: type[RemoteError] = type(
        title,
        bases,
        {
            "__module__": "passrpc",
            "__qualname__": title,
            "__doc__": f"A {name} raised by a handler on the server, as passrpc.RemoteError.",
            "__reduce__": __reduce__,
        },
    )
    typed("T", "message", "")  # refuse now what would fail when an error arrives
    return typed


def _typed_again(
    name: str, builtin: bool, remote_type: str, message: str, traceback: str
) -> RemoteError:
    """A copied or unpickled typed remote error: typed again by ``name``, from the
    builtins or the default registry (a plain RemoteError if that has no such class)."""
    typed = typed_builtin(name) if builtin else DEFAULT_TYPES._errors.get(name)
    if typed is None:
        return RemoteError(remote_type, message, traceback)
    return typed(remote_type, message, traceback)


def type_name_mismatches(local: dict[int, str], remote: object) -> list[tuple[int, str, str]]:
    """``(code, local name, remote name)`` for each code the two sides name differently.

    ``remote`` is a server's answer to DESCRIBE "types"; anything but a map
    (an older server answers with its handlers) gives none. A class of
    ``__main__`` matches a module's class of the same qualified name: a script
    and the server that imports it name one class two ways.
    """
    if not isinstance(remote, dict):
        return []
    found = []
    for code, name in local.items():
        other = remote.get(code)
        if isinstance(other, str) and other != name and not _same_class(name, other):
            found.append((code, name, other))
    return found


def _same_class(a: str, b: str) -> bool:
    for main, other in ((a, b), (b, a)):
        if main.startswith("__main__.") and other.endswith(main.removeprefix("__main__")):
            return True
    return False


# Datetimes ---------------------------------------------------------------------

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def timestamp(value: datetime.datetime) -> msgpack.Timestamp:
    """A timezone-aware datetime as msgpack's Timestamp, in whole numbers (no float rounding)."""
    delta = value - _EPOCH
    return msgpack.Timestamp(delta.days * 86400 + delta.seconds, delta.microseconds * 1000)
