"""The one JSON reader for what an upstream answers (bodies and stream events), shared by the
HTTP provider plugins.

orjson reads nearly everything, fast. It refuses one thing a faulty upstream sends in
otherwise good answers: a number no double can hold (an integer of 309 digits or more, or a
float like `1e999`). Such a count in `usage` turned a served answer into a 502 before, and
a stream into an error after its content. Those answers are read again here, slowly, with
each such number read as an infinity, as orjson reads an integer past 64 bits as a float:
the providers' count parsing (`token_count`) believes neither, so the router bills its
documented estimate (docs/billing.md, "Usage is sanity-checked"). Anything else orjson
refuses (not JSON, NaN, lone surrogates, nesting orjson cannot write back) stays refused.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def _number(text: str) -> Any:
    """An integer as orjson reads it: an int within 64 bits, else a float (an infinity for
    one no double holds). `float` first: int() refuses more than 4300 digits."""
    value = float(text)
    if abs(value) > 2.0**64:
        return value
    whole = int(text)
    return whole if _I64_MIN <= whole <= _U64_MAX else value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes) -> Any:
    """`data` as JSON; raises ValueError (orjson.JSONDecodeError is one) when it is not."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as refused:
        try:
            value = json.loads(data, parse_int=_number, parse_constant=_not_json)
            orjson.dumps(value)  # only what the answer can be written back as
        except (ValueError, TypeError, RecursionError):
            raise refused from None
        return value
