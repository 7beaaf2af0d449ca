"""JSON written exactly as JavaScript's `JSON.stringify` writes it, with keys sorted.

NOWPayments signs `JSON.stringify(sortObject(body))` computed in Node, so checking its
signature means rebuilding that string byte for byte. Two places differ from Python:
numbers (JavaScript prints 0.0000123, never 1.23e-05, and 15 rather than 15.0) and key
order (integer-like keys first, then UTF-16 code-unit order).

Decimals are formatted from their own digits, so amounts parsed with
`json.loads(raw, parse_float=Decimal)` keep their exact value for crediting while the
signature string still matches what Node printed.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

__all__ = ["canonical_json", "js_number", "loads_exact"]

_MAX_SAFE_INT = 2**53
_MAX_ARRAY_INDEX = 2**32 - 2
# Any decimal of at most this many significant digits survives a round trip through a
# double unchanged, so its own digits are the shortest ones Node would print.
_DBL_DIG = 15


def loads_exact(raw: bytes | str) -> Any:
    """Parse JSON keeping every non-integer number as an exact Decimal."""
    return json.loads(raw, parse_float=Decimal)


def doubles_exactly(value: Any) -> bool:
    """Whether every number in `value` is one a double holds exactly as written. The
    processor signs the JSON after a JS engine parsed it into doubles, so a number with
    more digits shares its signature with its rounded neighbour: such a body is refused."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return float(value) == value and abs(value) <= 2**53
    if isinstance(value, Decimal):
        if not value.is_finite():
            return False
        as_float = float(value)
        return math.isfinite(as_float) and Decimal(repr(as_float)) == value
    if isinstance(value, dict):
        return all(doubles_exactly(v) for v in value.values())
    if isinstance(value, list):
        return all(doubles_exactly(v) for v in value)
    return False


def _shortest_digits(value: Decimal | float | int) -> tuple[int, str, int]:
    """(sign, digits, n) with value = sign * 0.digits * 10**n and the fewest digits that
    identify the double nearest `value` — the (s, k, n) of ECMA-262 Number::toString."""
    if isinstance(value, Decimal):
        normalized = value.normalize()
        sign, digit_tuple, exponent = normalized.as_tuple()
        if not isinstance(exponent, int):
            raise ValueError(f"{value!r} is not a finite number")
        digits = "".join(map(str, digit_tuple))
        n = exponent + len(digits)
        if len(digits) <= _DBL_DIG and -300 < n < 300:
            return (-1 if sign else 1), digits, n
        # More digits than a double holds (or near its range limits): Node prints the
        # double's shortest form. Only the signature string goes through the float here,
        # never an amount.
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"{value!r} is not a finite number")
    text = repr(abs(as_float))  # Python's repr is the shortest round-trip form, like JS.
    mantissa, _, exp_text = text.partition("e")
    whole, _, frac = mantissa.partition(".")
    all_digits = (whole + frac).lstrip("0")
    exponent = (int(exp_text) if exp_text else 0) + len(whole)
    # Leading zeros of a number below 1 move the point left.
    exponent -= len(whole + frac) - len((whole + frac).lstrip("0"))
    all_digits = all_digits.rstrip("0")
    return (-1 if as_float < 0 else 1), all_digits, exponent


def js_number(value: Decimal | float | int) -> str:
    """A number as JavaScript prints it: 15, 0.5, 0.0000123, 1e-7, 1.5e+21."""
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers")
    if isinstance(value, int) and abs(value) < _MAX_SAFE_INT:
        return str(value)
    if value == 0:
        return "0"  # Also -0, which JavaScript prints as 0.
    sign, digits, n = _shortest_digits(value)
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        exp = n - 1
        exp_text = f"e+{exp}" if exp >= 0 else f"e-{-exp}"
        text = (digits if k == 1 else f"{digits[0]}.{digits[1:]}") + exp_text
    return ("-" if sign < 0 else "") + text


def _is_array_index(key: str) -> bool:
    return key.isdigit() and key.isascii() and str(int(key)) == key and int(key) <= _MAX_ARRAY_INDEX


def _js_key_order(keys: list[str]) -> list[str]:
    """Array.prototype.sort() order, then the object's own-property order, in which
    integer-like keys always come first, in numeric order."""
    ordered = sorted(keys, key=lambda k: k.encode("utf-16-be"))
    indexes = sorted((k for k in ordered if _is_array_index(k)), key=int)
    return indexes + [k for k in ordered if not _is_array_index(k)]


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        # Python's escaping with ensure_ascii=False matches JSON.stringify's: quotes,
        # backslashes and control characters only; `/` and non-ASCII stay as they are.
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, (int, float, Decimal)):
        out.append(js_number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(_js_key_order(list(value))):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot serialize {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Compact JSON with object keys sorted recursively (arrays keep their order)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)
