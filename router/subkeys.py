"""Sub-keys: what a key holder may set on a child key, read from a request body, and how a
child is shown. The endpoints are in `subkeys_api.py`; the money rules (caps checked by
every hold under the parent's row lock, debits to the parent) are in SQL (migration 0013,
metering/sql/settle_usage_batch.sql) and docs/billing.md."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from apifast.catalog.toml import Catalog
from apifast.errors import bad
from apifast.money import MoneyError, format_usd, parse_usd

MAX_LABEL = 100
MAX_MODELS = 100
MAX_SUB_KEYS = 1000  # per key holder: GET /v1/keys lists them all at once
_UNSET = object()


@dataclass(slots=True)
class SubKeySettings:
    """The fields a request sets; `present` names those it gave (null clears a setting)."""

    present: set[str]
    label: str | None = None
    spend_cap_usd: Decimal | None = None
    daily_cap_usd: Decimal | None = None
    rpm_limit: int | None = None
    expires_at: datetime | None = None
    allowed_models: list[str] | None = None
    disabled: bool = False


def parse_settings(
    body: dict[str, Any], catalog: Catalog, *, allow_disabled: bool
) -> SubKeySettings:
    """Validate the sub-key fields of a POST or PATCH body (400 naming the field at fault)."""
    known = {"label", "spend_cap_usd", "daily_cap_usd", "rpm_limit", "expires_at",
             "allowed_models"} | ({"disabled"} if allow_disabled else set())  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(unknown[0], "unknown field")
    out = SubKeySettings(present=set(body))
    label = body.get("label")
    if label is not None:
        if not isinstance(label, str) or len(label) > MAX_LABEL:
            raise bad("label", f"a string of at most {MAX_LABEL} characters")
        # A control character is no part of a note, and NUL cannot be stored at all (a 500).
        if any(unicodedata.category(ch) == "Cc" for ch in label):
            raise bad("label", "must not contain control characters")
        out.label = label
    for name in ("spend_cap_usd", "daily_cap_usd"):
        value = body.get(name)
        if value is None:
            continue
        try:  # a string or a JSON integer; a float is refused (money never passes through one)
            amount = parse_usd(value, field=name)
        except MoneyError as exc:
            raise bad(name, str(exc).removeprefix(f"{name} ")) from None
        setattr(out, name, amount)
    rpm = body.get("rpm_limit")
    if rpm is not None:
        if type(rpm) is not int or not 1 <= rpm <= 1_000_000:
            raise bad("rpm_limit", "an integer from 1 to 1000000")
        out.rpm_limit = rpm
    expires = body.get("expires_at")
    if expires is not None:
        out.expires_at = _parse_time(expires)
        if out.expires_at <= datetime.now(UTC):
            raise bad("expires_at", "must be in the future")
    models = body.get("allowed_models")
    if models is not None:
        if not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS:
            raise bad("allowed_models", f"a list of 1 to {MAX_MODELS} model ids")
        for model in models:
            if not isinstance(model, str) or catalog.get(model) is None:
                raise bad("allowed_models", f"no model {str(model)[:80]!r}; see GET /v1/models")
        out.allowed_models = sorted(set(models))
    disabled = body.get("disabled", False)
    if not isinstance(disabled, bool):
        raise bad("disabled", "true or false")
    out.disabled = disabled
    return out


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise bad("expires_at", "an RFC 3339 date-time such as 2027-01-31T00:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        raise bad("expires_at", "an RFC 3339 date-time such as 2027-01-31T00:00:00Z") from None
    if parsed.tzinfo is None:
        raise bad("expires_at", "needs a time zone offset (Z for UTC)")
    return parsed


def check_caps(settings: SubKeySettings, balance: Decimal) -> None:
    """A cap above the holder's balance promises what is not there: 400."""
    for name in ("spend_cap_usd", "daily_cap_usd"):
        cap = getattr(settings, name)
        if cap is not None and cap > balance:
            raise bad(name, f"must not exceed the key's balance (${format_usd(balance)})")


def _usd(value: Decimal | None) -> str | None:
    return None if value is None else format_usd(value)


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def sub_key_json(row: Any, *, with_label: bool = True) -> dict[str, Any]:
    """A sub-key as GET /v1/keys shows it: settings and usage as exact decimal strings."""
    body: dict[str, Any] = {
        "id": row["public_id"],
        "object": "sub_key",
    }
    if with_label:
        body["label"] = row["label"]
    body.update(
        {
            "spend_cap_usd": _usd(row["spend_cap_usd"]),
            "daily_cap_usd": _usd(row["daily_cap_usd"]),
            "rpm_limit": row["rpm_limit"],
            "expires_at": _time(row["expires_at"]),
            "allowed_models": row["allowed_models"],
            "disabled": row["disabled"],
            "created_at": _time(row["created_at"]),
            "usage": {
                "spent_usd": format_usd(row["spent_usd"]),
                "spent_today_usd": format_usd(row["spent_today_usd"]),
                "held_usd": format_usd(row["held_usd"]),
            },
        }
    )
    return body
