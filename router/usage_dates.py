"""The UTC days a key holder asks for, as GET /v1/usage and GET /v1/receipts read them: a
date (YYYY-MM-DD), or a date-time in UTC, whose day it is. Anything else is a 400: a value
with more after the date (read before as its first ten characters), a time at another
offset (its UTC day may be the next or the previous one, so it is not guessed), or a day
outside what the usage store holds (date arithmetic beyond year 9999 was a 500)."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from apifast.errors import bad

# Nothing is metered before 1970; ClickHouse's DateTime64 ends with 2299.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(2299, 12, 31)
_FORMAT = "must be a date, YYYY-MM-DD (a UTC day)"


def parse_day(value: str, name: str) -> date:
    """The UTC day `value` names, or a 400 naming the parameter `name`."""
    text = value.strip()
    try:
        if "T" in text.upper() or " " in text:
            moment = datetime.fromisoformat(text.replace("z", "Z"))
            offset = moment.utcoffset()
            if offset is not None and offset != timedelta(0):
                raise bad(name, "days are UTC days: send YYYY-MM-DD, or a time in UTC (Z)")
            day = moment.date()
        else:
            day = date.fromisoformat(text)
    except ValueError:
        raise bad(name, _FORMAT) from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise bad(name, f"must be a day from {FIRST_DAY} to {LAST_DAY}")
    return day


def days_before(day: date, days: int) -> date:
    """`days` before `day`, for a default window's start, never before FIRST_DAY."""
    return max(FIRST_DAY, day - timedelta(days=days))
