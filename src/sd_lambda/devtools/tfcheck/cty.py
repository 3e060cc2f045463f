"""cty values on the wire: the msgpack encoding Terraform uses for ``DynamicValue``.

Known values map to plain Python values (str, int/float, bool, None, list, dict). Unknown values are
msgpack extension code 0 (plain) or 12 (unknown with refinements, e.g. "not null"); both decode to an
:class:`Unknown` that keeps its original bytes, so a value Terraform sent comes back byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

_UNKNOWN_CODE = 0
_REFINED_UNKNOWN_CODE = 12


@dataclass(frozen=True)
class Unknown:
    """A value not known until apply. ``ext`` is the wire form it arrived in (or will leave in)."""

    ext: msgpack.ExtType = msgpack.ExtType(_UNKNOWN_CODE, b"\x00")


UNKNOWN = Unknown()


def _ext_hook(code: int, data: bytes) -> Any:
    if code in (_UNKNOWN_CODE, _REFINED_UNKNOWN_CODE):
        return Unknown(msgpack.ExtType(code, data))
    raise ValueError(f"unexpected msgpack extension type {code} in a cty value")


def _default(value: Any) -> Any:
    if isinstance(value, Unknown):
        return value.ext
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as a cty value")


def decode(data: bytes) -> Any:
    """msgpack bytes -> Python value (``None`` for empty input, as Terraform sends for null objects)."""
    if not data:
        return None
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def is_known(value: Any) -> bool:
    """True when ``value`` contains no unknown anywhere inside it."""
    if isinstance(value, Unknown):
        return False
    if isinstance(value, dict):
        return all(is_known(v) for v in value.values())
    if isinstance(value, list):
        return all(is_known(v) for v in value)
    return True
