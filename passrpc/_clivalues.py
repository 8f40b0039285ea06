"""The command line's values: JSON arguments in, replies out as JSON.

JSON has no bytes, no extension values and no datetimes, so ``call`` writes
and reads them as tagged objects (``docs/cli.md``, "Arguments" and "Output"):
``{"$bytes": "<base64>"}`` both ways, ``{"$ext": [code, "<base64>"]}`` both
ways, a datetime out as its ISO 8601 text, a descriptor out as ``{"$fd": N}``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from typing import Any

import msgpack

from ._fd import FileDescriptor


class ValueSyntaxError(ValueError):
    """A tagged argument (``$bytes``, ``$ext``) that is not well formed."""


def parse_value(text: str) -> Any:
    """JSON where the text is JSON (tagged objects made values), else the text itself as a str.

    Raises:
        ValueSyntaxError: a ``$bytes`` or ``$ext`` object is malformed.
    """
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return _untag(value)


def _untag(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag(item) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "$bytes" in value:
        return _base64(value["$bytes"], '{"$bytes": "<base64>"}')
    if len(value) == 1 and "$ext" in value:
        tagged = value["$ext"]
        shape = '{"$ext": [CODE, "<base64>"]} with CODE from -128 to 127'
        if (
            not isinstance(tagged, list)
            or len(tagged) != 2
            or type(tagged[0]) is not int
            or not -128 <= tagged[0] <= 127
        ):
            raise ValueSyntaxError(f"{json.dumps(value)} is not {shape}")
        return msgpack.ExtType(tagged[0], _base64(tagged[1], shape))
    return {key: _untag(item) for key, item in value.items()}


def _base64(text: object, shape: str) -> bytes:
    if not isinstance(text, str):
        raise ValueSyntaxError(f"{text!r} is not base64 text: write {shape}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueSyntaxError(f"{text!r} is not valid base64 ({exc}): write {shape}") from None


def jsonable(value: Any, fds: list[int]) -> Any:
    """Turn a reply into values ``json`` can write (see docs/cli.md, "Output").

    The numbers of descriptors met are appended to ``fds``.
    """
    if isinstance(value, msgpack.ExtType):  # a code this process has not registered
        return {"$ext": [value.code, base64.b64encode(value.data).decode("ascii")]}
    if isinstance(value, (list, tuple)):  # after ExtType, a named tuple
        return [jsonable(item, fds) for item in value]
    if isinstance(value, dict):
        return {
            key
            if isinstance(key, (str, int, float, bool)) or key is None
            else json.dumps(jsonable(key, fds)): jsonable(item, fds)
            for key, item in value.items()
        }
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, FileDescriptor):
        number = value.fileno()
        fds.append(number)
        return {"$fd": number}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return {"$repr": repr(value)}


def close_fds(value: Any) -> None:
    """Close every :class:`FileDescriptor` in ``value``, however deep."""
    if isinstance(value, FileDescriptor):
        value.close()
    elif isinstance(value, (list, tuple)):
        for item in value:
            close_fds(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            close_fds(key)
            close_fds(item)
