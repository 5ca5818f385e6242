"""How a lab spec's values are read and how a refused one is reported.

Rates and sizes come as numbers with units, as tc and podman take them:
:func:`parse_rate` reads ``"1mbit"`` as bits per second (SI units; tc's
``bps`` is bytes per second, so it is refused with a hint) and
:func:`parse_size` reads ``"64m"`` as bytes (binary units). The spec's models
(:mod:`fedge.lab.spec`) use the same readers inside their validators, and
:func:`_message` turns pydantic's first error into the one line a refusal
prints: ``group[1].link.rate: must be > 0, got "-1mbit"``, or an unknown key
with the keys its table knows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import get_args

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from fedge.errors import ConfigError

__all__ = ["parse_rate", "parse_size"]


# ------------------------------------------------------------------ units


_AMOUNT = re.compile(r"([+-]?[0-9]+(?:\.[0-9]*)?)\s*([a-z]*)", re.IGNORECASE)
_RATE_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
               "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def _amount(value: object, units: Mapping[str, int], what: str) -> int:
    """An int, or a number with one of ``units`` (``what`` describes them), as an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be {what}")
    if isinstance(value, int):
        amount = value
    else:
        m = _AMOUNT.fullmatch(value.strip())
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in units:
            hint = "; tc's bps means bytes per second" if unit.endswith("bps") else ""
            raise ValueError(f"must be {what}{hint}")
        amount = round(float(m.group(1)) * units[unit])
    if amount <= 0:
        raise ValueError("must be > 0")
    return amount


def _rate_bps(value: object) -> int:
    return _amount(value, _RATE_UNITS, 'a rate such as "1mbit" or "256kbit" (bit, kbit, mbit, gbit '
                   "per second, SI), or bits per second")


def _size_bytes(value: object) -> int:
    return _amount(value, _SIZE_UNITS, 'a size such as "64m", "1g" or "512k" (b, k, m, g: binary), '
                   "or bytes")


def parse_rate(text: str | int) -> int:
    """Bits per second of a tc rate: ``"1mbit"`` is 1_000_000; an int is bits/s already.

    Raises:
        ConfigError: not a rate, a unit other than bit/kbit/mbit/gbit, or not > 0.
    """
    try:
        return _rate_bps(text)
    except ValueError as e:
        raise ConfigError(f"rate {e}, got {_show(text)}") from None


def parse_size(text: str | int) -> int:
    """Bytes of a size: ``"64m"`` is 64 MiB; an int is bytes already.

    Raises:
        ConfigError: not a size, an unknown unit, or not > 0.
    """
    try:
        return _size_bytes(text)
    except ValueError as e:
        raise ConfigError(f"size {e}, got {_show(text)}") from None


def _show(value: object) -> str:
    if isinstance(value, str | int | float | bool) and value is not None:
        return json.dumps(value)
    return repr(value)


def _human(size: int) -> str:
    for unit, scale in (("g", 2**30), ("m", 2**20), ("k", 2**10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size} bytes"


# ------------------------------------------------------------------ refusals


_PLAIN = {"int_type": "must be an integer", "int_from_float": "must be an integer",
          "float_type": "must be a number", "bool_type": "must be true or false",
          "string_type": "must be a string", "dict_type": "must be a table", "model_type": "must be a table",
          "model_attributes_type": "must be a table", "tuple_type": "must be an array",
          "list_type": "must be an array", "finite_number": "must be a finite number",
          "missing": "required"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _message(err: ErrorDetails, root: type[BaseModel]) -> str:
    """One pydantic error of model ``root`` as ``key.path: message, got value``."""
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx", {})
    if kind == "extra_forbidden":
        where, key = _dotted(loc[:-1]), loc[-1]
        known = ", ".join(_known_keys(root, loc[:-1]))
        return f"{where + ': ' if where else ''}unknown key {str(key)!r}; known: {known}"
    if kind == "value_error":
        text = str(err["msg"]).removeprefix("Value error, ")
    elif kind in _BOUNDS:
        bound, sign = _BOUNDS[kind]
        text = f"must be {sign} {ctx[bound]:g}"
    elif kind == "literal_error":
        text = f"must be {ctx['expected']}"
    elif kind == "too_short":
        text = f"needs at least {ctx['min_length']} entry"
    else:
        text = _PLAIN.get(kind, str(err["msg"]))
    value = err.get("input")
    if kind == "missing" and loc == ("group",):
        text += ": at least one [[group]] table"
    elif kind != "missing" and not isinstance(value, dict | list | tuple) and loc and not (
            isinstance(value, str) and repr(value) in text):  # a message that names the value already
        text += f", got {_show(value)}"
    where = _dotted(loc)
    # A whole-spec check names its own key path; a table's check is prefixed with the table's.
    return f"{where}: {text}" if where else text


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    model = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        inner = _model_in(fields[str(part)].annotation) if str(part) in fields else None
        if inner is None:
            return []
        model = inner
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
