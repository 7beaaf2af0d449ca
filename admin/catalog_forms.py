"""Model and provider forms: turning catalog entries into form values and posted forms back
into catalog tables, validated by the same parser as the TOML file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData

from apifast.admin.web import field
from apifast.catalog.pricing import Price
from apifast.catalog.toml import (
    MODEL_KINDS,
    STRATEGIES,
    CatalogError,
    Model,
    parse_model,
    parse_providers,
)
from apifast.money import ZERO

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PRICE_FIELDS = (
    "input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
    "cache_write_usd_per_mtok", "request_usd",
)  # fmt: skip
_FORM_SOURCE = "form"


class FormError(ValueError):
    pass


def _clean(exc: CatalogError) -> str:
    # parse_* messages start with "<source>: <entry>: "; keep the problem itself.
    return str(exc).split(": ", 2)[-1]


# --- models --------------------------------------------------------------------------------


def _price_fields(price: Price, prefix: str = "") -> dict[str, str]:
    out = {
        prefix + "input_usd_per_mtok": str(price.input_usd_per_mtok),
        prefix + "output_usd_per_mtok": str(price.output_usd_per_mtok),
    }
    if price.cached_input_usd_per_mtok is not None:
        out[prefix + "cached_input_usd_per_mtok"] = str(price.cached_input_usd_per_mtok)
    if price.cache_write_usd_per_mtok is not None:
        out[prefix + "cache_write_usd_per_mtok"] = str(price.cache_write_usd_per_mtok)
    if price.request_usd != ZERO:
        out[prefix + "request_usd"] = str(price.request_usd)
    return out


def model_spec(model: Model) -> dict[str, Any]:
    """A served model as a [[models]] table without its id (what db_models.spec holds)."""
    spec: dict[str, Any] = {"type": model.kind, **_price_fields(model.price)}
    if model.description:
        spec["description"] = model.description
    if model.max_output_tokens:
        spec["max_output_tokens"] = model.max_output_tokens
    if model.context_window:
        spec["context_window"] = model.context_window
    if model.owned_by != "apifast":
        spec["owned_by"] = model.owned_by
    if model.demo:
        spec["demo"] = True
    if model.strategy != "ordered":
        spec["strategy"] = model.strategy
    routes = []
    for r in model.routes:
        route: dict[str, Any] = {"provider": r.provider, "model": r.model}
        cost = r.cost
        if cost.input_usd_per_mtok or cost.output_usd_per_mtok:
            route["cost_input_usd_per_mtok"] = str(cost.input_usd_per_mtok)
            route["cost_output_usd_per_mtok"] = str(cost.output_usd_per_mtok)
        if r.weight != 1:
            route["weight"] = r.weight
        if r.max_concurrency is not None:
            route["max_concurrency"] = r.max_concurrency
        routes.append(route)
    spec["routes"] = routes
    return spec


# Route settings written `name=value` after a route's provider, model and costs.
_ROUTE_OPTIONS = ("weight", "max_concurrency")


def routes_text(spec: dict[str, Any]) -> str:
    lines = []
    for r in spec.get("routes", []):
        parts = [str(r.get("provider", "")), str(r.get("model", ""))]
        if "cost_input_usd_per_mtok" in r:
            parts += [
                str(r["cost_input_usd_per_mtok"]),
                str(r.get("cost_output_usd_per_mtok", "0")),
            ]
        for name in _ROUTE_OPTIONS:
            if name in r:
                parts.append(f"{name}={r[name]}")
        lines.append(" ".join(parts))
    return "\n".join(lines)


def model_form_values(model_id: str, spec: dict[str, Any], enabled: bool) -> dict[str, Any]:
    values: dict[str, Any] = {name: str(spec.get(name, "")) for name in PRICE_FIELDS}
    values.update(
        id=model_id,
        type=spec.get("type", "chat"),
        strategy=spec.get("strategy", "ordered"),
        description=spec.get("description", ""),
        max_output_tokens=str(spec.get("max_output_tokens", "")),
        context_window=str(spec.get("context_window", "")),
        routes=routes_text(spec),
        enabled=enabled,
    )
    return values


def _parse_routes(text: str) -> list[dict[str, Any]]:
    routes = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        parts = [w for w in words if "=" not in w]
        options = [w.split("=", 1) for w in words if "=" in w]
        if not parts:
            continue
        if len(parts) not in (2, 4):
            raise FormError(
                f"routes, line {n}: write 'provider upstream-model', optionally the "
                "upstream's input and output cost per million tokens, then weight=N and "
                "max_concurrency=N if wanted"
            )
        route: dict[str, Any] = {"provider": parts[0], "model": parts[1]}
        if len(parts) == 4:
            route["cost_input_usd_per_mtok"], route["cost_output_usd_per_mtok"] = parts[2:]
        for name, value in options:
            if name not in _ROUTE_OPTIONS:
                raise FormError(f"routes, line {n}: unknown setting {name!r}; use weight=N "
                                "or max_concurrency=N")  # fmt: skip
            if not value.isdigit():
                raise FormError(f"routes, line {n}: {name} must be a whole number")
            route[name] = int(value)
        routes.append(route)
    return routes


def _int_field(form: FormData, name: str) -> int | None:
    raw = field(form, name)
    if not raw:
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise FormError(f"{name}: must be a positive whole number")
    return int(raw)


@dataclass(frozen=True, slots=True)
class ModelForm:
    id: str
    spec: dict[str, Any]
    enabled: bool


def parse_model_form(form: FormData, providers: set[str]) -> ModelForm:
    """The posted model, validated exactly as a TOML [[models]] entry; FormError if not."""
    model_id = field(form, "id", limit=200)
    if not MODEL_ID.match(model_id):
        raise FormError("id: letters, digits and . _ : / @ + - only, at most 128 characters")
    kind = field(form, "type", "chat")
    if kind not in MODEL_KINDS:
        raise FormError(f"type: must be one of {', '.join(MODEL_KINDS)}")
    spec: dict[str, Any] = {"type": kind}
    strategy = field(form, "strategy", "ordered")
    if strategy not in STRATEGIES:
        raise FormError(f"strategy: must be one of {', '.join(STRATEGIES)}")
    if strategy != "ordered":
        spec["strategy"] = strategy
    for name in PRICE_FIELDS:
        value = field(form, name, limit=64)
        if value:
            spec[name] = value
    description = field(form, "description", limit=500)
    if description:
        spec["description"] = description
    for name in ("max_output_tokens", "context_window"):
        number = _int_field(form, name)
        if number is not None:
            spec[name] = number
    spec["routes"] = _parse_routes(field(form, "routes", limit=5000))
    try:
        parse_model({**spec, "id": model_id}, _FORM_SOURCE, "model", providers)
    except CatalogError as exc:
        raise FormError(_clean(exc)) from None
    return ModelForm(model_id, spec, form.get("enabled") == "on")


# --- providers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderForm:
    name: str
    type: str
    base_url: str
    options: dict[str, Any]  # timeouts, api_key_env and plugin options
    api_key: str  # "" unless a new key was typed
    clear_api_key: bool


def _seconds(form: FormData, name: str, default: float) -> float:
    raw = field(form, name, limit=32)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise FormError(f"{name}: must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise FormError(f"{name}: must be between 0 and 3600 seconds")
    return value


def parse_provider_form(
    form: FormData, known_types: set[str], keep_options: dict[str, Any]
) -> ProviderForm:
    name = field(form, "name", limit=100)
    if not PROVIDER_NAME.match(name):
        raise FormError("name: letters, digits, _ and - only, at most 64 characters")
    ptype = field(form, "type")
    base_url = field(form, "base_url", limit=2000)
    if base_url and not re.match(r"^https?://[^\s/]+", base_url):
        raise FormError("base_url: must be an http:// or https:// URL")
    api_key_env = field(form, "api_key_env", limit=128)
    if api_key_env and not ENV_NAME.match(api_key_env):
        raise FormError("api_key_env: must be the name of an environment variable")
    options = {k: v for k, v in keep_options.items() if k != "api_key_env"}
    options["timeout_s"] = _seconds(form, "timeout_s", 300.0)
    options["connect_timeout_s"] = _seconds(form, "connect_timeout_s", 10.0)
    if api_key_env:
        options["api_key_env"] = api_key_env
    # A checkbox: the upstream has OpenAI's Responses API (the openai type reads it).
    options.pop("native_responses", None)
    if form.get("native_responses") == "on":
        options["native_responses"] = True
    api_key = field(form, "api_key", limit=4096)
    table = {**options, "type": ptype, "base_url": base_url}
    try:
        parse_providers({name: table}, _FORM_SOURCE, dict(os.environ), known_types)
    except CatalogError as exc:
        raise FormError(_clean(exc)) from None
    return ProviderForm(name, ptype, base_url, options, api_key, form.get("clear_api_key") == "on")
