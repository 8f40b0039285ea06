"""The type registry: what may be registered under which code, and typed remote exceptions."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
import json
import uuid
from typing import Any, NamedTuple

import attrs
import pytest

import passrpc
from passrpc import ConfigurationError, RemoteError, TypeRegistry
from passrpc._types import DEFAULT_TYPES, nearest_builtin, type_name_mismatches, typed_builtin


@attrs.define
class _Pair:
    a: int
    b: int


@dataclasses.dataclass
class _Data:
    a: int
    computed: int = dataclasses.field(init=False, default=0)


class _Plain:
    def __init__(self, a: int) -> None:
        self.a = a


class _Tuple(NamedTuple):
    a: int


class _Number(enum.IntEnum):
    ONE = 1


class _Text(str):
    pass


class TestRegisterType:
    def test_the_same_class_under_the_same_code_again_is_a_no_op(self) -> None:
        """A module imported twice registers its classes twice: nothing happens."""
        types = TypeRegistry()
        assert types.register_type(_Pair, 5) is _Pair
        assert types.register_type(_Pair, 5) is _Pair
        assert types.names() == {5: f"{__name__}._Pair"}

    def test_a_class_of_the_same_name_under_the_same_code_replaces_the_decoder(self) -> None:
        """A module loaded again makes new class objects of the same names: the newest decodes."""
        types = TypeRegistry()
        first = attrs.define(
            type("_Pair", (), {"__annotations__": {"a": "int"}, "__module__": "m"})
        )
        second = attrs.define(
            type("_Pair", (), {"__annotations__": {"a": "int"}, "__module__": "m"})
        )
        types.register_type(first, 5)
        types.register_type(second, 5)
        assert types.by_code[5].cls is second
        assert types.by_class[first].code == types.by_class[second].code == 5

    def test_another_class_for_a_used_code_is_refused(self) -> None:
        """Two classes cannot share a code: the error names the holder."""
        types = TypeRegistry()
        types.register_type(_Pair, 5)
        with pytest.raises(ConfigurationError, match=r"code 5 is taken by .*_Pair"):
            types.register_type(_Data, 5)

    def test_another_code_for_a_registered_class_is_refused(self) -> None:
        """A class has one code."""
        types = TypeRegistry()
        types.register_type(_Pair, 5)
        with pytest.raises(ConfigurationError, match="under extension code 5 already"):
            types.register_type(_Pair, 6)

    @pytest.mark.parametrize("code", [0, 1, 128, -1, "5", True, 2.0])
    def test_codes_outside_2_to_127_are_refused(self, code: Any) -> None:
        """msgpack keeps the negative codes, passrpc 0 and 1; ext codes stop at 127."""
        with pytest.raises(ConfigurationError, match="from 2 to 127"):
            TypeRegistry().register_type(_Pair, code)

    @pytest.mark.parametrize("code", [2, 127])
    def test_codes_2_and_127_are_accepted(self, code: int) -> None:
        """Both ends of the range are usable."""
        types = TypeRegistry()
        types.register_type(_Pair, code)
        assert types.names() == {code: f"{__name__}._Pair"}

    @pytest.mark.parametrize(
        ("cls", "packed_as"),
        [
            (_Tuple, "an array"),
            (_Number, "an int"),
            (_Text, "a str"),
            (bytes, "bin"),
            (dict, "a map"),
            (list, "an array"),
            (bool, "a bool"),
            (float, "a float"),
        ],
    )
    def test_classes_msgpack_packs_itself_are_refused_with_why(
        self, cls: type, packed_as: str
    ) -> None:
        """A NamedTuple, an IntEnum, a str subclass...: msgpack packs them before asking."""
        with pytest.raises(ConfigurationError, match=f"as {packed_as} by itself"):
            TypeRegistry().register_type(cls, 5)

    def test_datetime_needs_no_registration(self) -> None:
        """datetime is built in; registering it is refused with that said."""
        with pytest.raises(ConfigurationError, match="built in"):
            TypeRegistry().register_type(datetime.datetime, 5)

    def test_other_classes_need_both_functions(self) -> None:
        """A class that is neither attrs nor a dataclass needs encode and decode."""
        types = TypeRegistry()
        with pytest.raises(ConfigurationError, match="give both"):
            types.register_type(_Plain, 5, encode=lambda p: p.a)
        types.register_type(_Plain, 5, encode=lambda p: p.a, decode=_Plain)
        assert types.by_code[5].decode(3).a == 3

    def test_a_decorator_below_the_attrs_one_is_told_where_to_go(self) -> None:
        """The decorator must get the finished class: the error says to put it above."""
        with pytest.raises(ConfigurationError, match=r"above @attrs\.define"):
            TypeRegistry().register_type(code=5)(_Plain)

    def test_works_as_a_class_decorator(self) -> None:
        """``@types.register_type(code=...)`` registers and returns the class."""
        types = TypeRegistry()

        @types.register_type(code=7)
        @attrs.frozen
        class Marked:
            value: int

        assert types.by_code[7].cls is Marked
        assert types.by_code[7].encode(Marked(3)) == {"value": 3}

    def test_a_decorator_with_a_bad_code_fails_at_once(self) -> None:
        """The code is checked when the decorator is made, not when it is applied."""
        with pytest.raises(ConfigurationError):
            TypeRegistry().register_type(code=1)

    def test_fields_travel_by_name_and_come_back_by_init_argument(self) -> None:
        """attrs strips a private field's underscore in __init__; init=False fields stay home."""

        @attrs.define
        class Private:
            _secret: int
            shown: int = attrs.field(init=False, default=0)

        types = TypeRegistry()
        types.register_type(Private, 5)
        types.register_type(_Data, 6)
        entry = types.by_code[5]
        assert entry.encode(Private(3)) == {"_secret": 3}
        assert entry.decode({"_secret": 3}) == Private(3)
        assert types.by_code[6].encode(_Data(1)) == {"a": 1}

    @pytest.mark.parametrize(
        ("value", "match"),
        [([1, 2], "expected a map"), ({"a": 1, "c": 2}, "no field 'c'"), ({"a": 1}, "b")],
    )
    def test_fields_that_do_not_fit_the_class_are_refused(self, value: Any, match: str) -> None:
        """A map that is not the class's fields fails to decode, saying why."""
        types = TypeRegistry()
        types.register_type(_Pair, 5)
        with pytest.raises(TypeError, match=match):
            types.by_code[5].decode(value)

    def test_the_default_registry_is_what_the_module_functions_fill(self) -> None:
        """passrpc.register_type fills the registry every entry point uses by default."""
        from .model import Point

        assert DEFAULT_TYPES.by_code[10].cls is Point
        assert passrpc.register_type(Point, 10) is Point  # again: a no-op

    def test_names_answer_describe_types(self) -> None:
        """names() maps each code to module.QualName, in code order."""
        types = TypeRegistry()
        types.register_type(_Data, 9)
        types.register_type(
            uuid.UUID, 3, encode=lambda u: u.bytes, decode=lambda b: uuid.UUID(bytes=b)
        )
        assert list(types.names().items()) == [(3, "uuid.UUID"), (9, f"{__name__}._Data")]


class TestTypedBuiltins:
    @pytest.mark.parametrize(
        ("name", "base"),
        [
            ("ValueError", ValueError),
            ("KeyError", KeyError),
            ("FileNotFoundError", FileNotFoundError),
            ("PermissionError", PermissionError),
            ("UnicodeDecodeError", UnicodeError),
            ("UnicodeEncodeError", UnicodeError),
            ("ZeroDivisionError", ZeroDivisionError),
        ],
    )
    def test_builtins_are_typed_by_themselves_or_the_nearest_base_that_takes_a_message(
        self, name: str, base: type[Exception]
    ) -> None:
        """The typed class is both RemoteError and the builtin (or the base that fits)."""
        typed = typed_builtin(name)
        assert typed is not None
        assert issubclass(typed, RemoteError)
        assert issubclass(typed, base)
        error = typed(name, "it failed", "Traceback ...")
        assert (error.remote_type, error.remote_message) == (name, "it failed")
        assert str(error).startswith(f"{name}: it failed")

    @pytest.mark.parametrize(
        "name",
        [
            "TimeoutError",
            "ConnectionError",
            "ConnectionResetError",
            "BrokenPipeError",
            "SystemExit",
            "KeyboardInterrupt",
            "GeneratorExit",
            "StopIteration",
            "StopAsyncIteration",
            "ExceptionGroup",
            "BaseExceptionGroup",
            "Exception",
            "BaseException",
            "print",
            "os.system",
            "NoSuchError",
        ],
    )
    def test_the_rest_stay_plain(self, name: str) -> None:
        """Timeouts, closed connections, exits, groups and non-exceptions are never typed."""
        assert typed_builtin(name) is None

    def test_an_oserror_keeps_no_made_up_errno(self) -> None:
        """A typed OSError does not take the remote type and message for errno and strerror."""
        typed = typed_builtin("FileNotFoundError")
        assert typed is not None
        error = typed("FileNotFoundError", "[Errno 2] No such file", "")
        assert isinstance(error, FileNotFoundError)
        assert error.errno is None

    @pytest.mark.parametrize(
        ("cls", "name"),
        [
            (json.JSONDecodeError, "ValueError"),
            (ValueError, "ValueError"),
            (UnicodeDecodeError, "UnicodeDecodeError"),
            (ConfigurationError, "ValueError"),
            (RemoteError, "Exception"),
        ],
    )
    def test_the_sender_names_the_nearest_builtin(self, cls: type[Exception], name: str) -> None:
        """The ERROR frame's builtin key is the first builtin among the class and its ancestors."""
        assert nearest_builtin(cls) == name

    def test_a_typed_error_copies_as_itself(self) -> None:
        """copy and deepcopy (and pickle, which uses the same reduction) keep the type and details."""
        typed = typed_builtin("KeyError")
        assert typed is not None
        error = typed("KeyError", "'k'", "Traceback ...")
        for copied in (copy.copy(error), copy.deepcopy(error)):
            assert type(copied) is typed
            assert (copied.remote_type, copied.remote_message, copied.remote_traceback) == (
                "KeyError",
                "'k'",
                "Traceback ...",
            )

    def test_a_registered_error_copies_as_itself(self) -> None:
        """A class registered in the default registry is found again by name."""
        from .model import NotFound

        error = DEFAULT_TYPES.remote_error("tests.model.NotFound", None, "gone", "")
        assert isinstance(error, NotFound)
        assert isinstance(copy.copy(error), NotFound)


class TestRegisterError:
    def test_a_registered_class_types_its_remote_errors(self) -> None:
        """An error of a registered class's name is both RemoteError and that class."""
        types = TypeRegistry()

        class Refused(Exception):
            def __init__(self, reason: str, code: int) -> None:
                super().__init__(reason, code)

        types.register_error(Refused)
        name = f"{__name__}.{Refused.__qualname__}"
        error = types.remote_error(name, "Exception", "no", "tb")
        assert isinstance(error, Refused)
        assert isinstance(error, RemoteError)
        assert (error.remote_type, error.remote_message, error.remote_traceback) == (
            name,
            "no",
            "tb",
        )

    def test_an_unregistered_name_falls_back_to_the_builtin(self) -> None:
        """A name nobody registered is typed by the frame's builtin key, or plain."""
        types = TypeRegistry()
        assert isinstance(types.remote_error("app.Nope", "KeyError", "m", ""), KeyError)
        assert type(types.remote_error("app.Nope", None, "m", "")) is RemoteError
        assert type(types.remote_error("app.Nope", 42, "m", "")) is RemoteError

    @pytest.mark.parametrize("cls", [TimeoutError, ConnectionResetError, StopIteration])
    def test_classes_that_must_never_be_passed_for_are_refused(self, cls: type) -> None:
        """A registered class may not make a remote error pass for a timeout or a closed link."""
        derived = type("Derived", (cls,), {})
        with pytest.raises(ConfigurationError, match="must never pass for"):
            TypeRegistry().register_error(derived)

    @pytest.mark.parametrize("value", [ValueError, int, "ValueError", BaseException])
    def test_builtins_and_non_exceptions_are_refused(self, value: Any) -> None:
        """Builtins are typed already; anything else is not an exception class."""
        with pytest.raises(ConfigurationError):
            TypeRegistry().register_error(value)

    def test_works_as_a_class_decorator(self) -> None:
        """``@passrpc.register_error`` returns the class unchanged."""
        from .model import NotFound

        assert passrpc.register_error(NotFound) is NotFound


class TestMismatches:
    @pytest.mark.parametrize(
        ("local", "remote", "found"),
        [
            ({10: "a.P"}, {10: "a.P"}, []),
            ({10: "a.P"}, {10: "b.Q"}, [(10, "a.P", "b.Q")]),
            ({10: "a.P"}, {11: "b.Q"}, []),
            ({10: "__main__.P"}, {10: "app.P"}, []),
            ({10: "app.P"}, {10: "__main__.P"}, []),
            ({10: "__main__.P"}, {10: "app.Q"}, [(10, "__main__.P", "app.Q")]),
            ({10: "a.P"}, [{"name": "hello"}], []),
        ],
    )
    def test_codes_named_differently_are_found(
        self, local: dict[int, str], remote: Any, found: list[tuple[int, str, str]]
    ) -> None:
        """Only codes both sides name, differently, count (a script's __main__ is its module)."""
        assert type_name_mismatches(local, remote) == found
