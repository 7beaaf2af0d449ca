"""The model catalog: public model ids, their prices, their upstream routes and how a
request picks among them (`strategy`, per-route `weight` and `max_concurrency`).

Loaded from the TOML file named by APIFAST_MODELS_FILE (and, from issue #4 on, overlaid by
models stored in Postgres). A broken catalog raises `CatalogError` naming file, entry and problem.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from apifast.catalog.pricing import Price
from apifast.money import ZERO, MoneyError, parse_usd
from apifast.providers import ProviderConfig

MODEL_KINDS = ("chat", "embeddings")
# How a model's routes are ordered for each request (router/route_choice.py).
STRATEGIES = ("ordered", "weighted", "lowest_cost", "lowest_latency", "least_busy")
_PRICE_FIELDS = (
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cached_input_usd_per_mtok",
    "cache_write_usd_per_mtok",
)
# Per-part bounds of prompt tokens for non-text input: the hold bounds text by its bytes,
# but an image or audio part costs far more tokens than its URL or base64 has bytes.
_MEDIA_FIELDS = ("image_input_tokens", "audio_input_tokens", "file_input_tokens")
# Safe for the image tokenizers we know (OpenAI tiles and patches, Anthropic, Gemini): the
# largest image any of them bills stays under it. Audio and files have no default: a model
# takes them only when its catalog entry declares a bound.
DEFAULT_IMAGE_INPUT_TOKENS = 2500
_MODEL_FIELDS = {
    "id", "routes", "type", "description", "max_output_tokens", "context_window",
    "enabled", "request_usd", "demo", "owned_by", "strategy", *_PRICE_FIELDS, *_MEDIA_FIELDS,
}  # fmt: skip
_ROUTE_FIELDS = {
    "provider", "model", "cost_input_usd_per_mtok", "cost_output_usd_per_mtok", "weight",
    "max_concurrency",
}  # fmt: skip
_PROVIDER_FIELDS = {"type", "base_url", "api_key_env", "api_key", "timeout_s", "connect_timeout_s"}


class CatalogError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    model: str
    # What the upstream charges us, for margin reports (and `lowest_cost`); zero when unknown.
    cost: Price = field(default_factory=Price)
    weight: int = 1  # its share of traffic under `weighted`
    max_concurrency: int | None = None  # requests in flight at most on this router; None: any


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    price: Price
    routes: tuple[Route, ...]
    kind: str = "chat"
    description: str = ""
    max_output_tokens: int | None = None
    context_window: int | None = None
    demo: bool = False
    owned_by: str = "apifast"
    image_input_tokens: int = DEFAULT_IMAGE_INPUT_TOKENS  # per image part
    audio_input_tokens: int | None = None  # per audio part; None: audio is refused
    file_input_tokens: int | None = None  # per file part; None: files are refused
    strategy: str = "ordered"  # one of STRATEGIES


@dataclass(frozen=True, slots=True)
class Catalog:
    models: dict[str, Model]
    providers: dict[str, ProviderConfig]
    source: str = ""

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id)


def _fail(source: str, entry: str, problem: str) -> CatalogError:
    return CatalogError(f"{source}: {entry}: {problem}")


def _price(table: dict[str, Any], source: str, entry: str, prefix: str = "") -> Price:
    """Read the price fields (each optionally prefixed, as route costs are) of one entry."""
    values: dict[str, Decimal | None] = {}
    for name in _PRICE_FIELDS:
        raw = table.get(prefix + name)
        try:
            values[name] = (
                None if raw is None else parse_usd(raw, field=prefix + name, max_places=6)
            )
        except MoneyError as exc:
            raise _fail(source, entry, str(exc)) from None
    request_raw = table.get(prefix + "request_usd")
    try:
        request_usd = (
            ZERO if request_raw is None else parse_usd(request_raw, field=prefix + "request_usd")
        )
    except MoneyError as exc:
        raise _fail(source, entry, str(exc)) from None
    return Price(
        input_usd_per_mtok=values["input_usd_per_mtok"] or ZERO,
        output_usd_per_mtok=values["output_usd_per_mtok"] or ZERO,
        cached_input_usd_per_mtok=values["cached_input_usd_per_mtok"],
        cache_write_usd_per_mtok=values["cache_write_usd_per_mtok"],
        request_usd=request_usd,
    )


def _positive_int(value: Any, source: str, entry: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(source, entry, f"{name} must be a positive integer")
    return value


def parse_providers(
    raw: Any, source: str, env: dict[str, str], known_types: set[str] | None
) -> dict[str, ProviderConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(source, "providers", "must be a table of [providers.NAME] tables")
    providers = {}
    for name, table in raw.items():
        entry = f"providers.{name}"
        if not isinstance(table, dict):
            raise _fail(source, entry, "must be a table")
        ptype = table.get("type")
        if not isinstance(ptype, str) or not ptype:
            raise _fail(source, entry, "missing 'type' (the provider plugin, e.g. \"openai\")")
        if known_types is not None and ptype not in known_types:
            raise _fail(
                source, entry,
                f"unknown provider type {ptype!r}; installed: {', '.join(sorted(known_types))}",
            )  # fmt: skip
        base_url = table.get("base_url", "")
        if not isinstance(base_url, str):
            raise _fail(source, entry, "base_url must be a string")
        api_key_env = table.get("api_key_env")
        if api_key_env is not None and not isinstance(api_key_env, str):
            raise _fail(source, entry, "api_key_env must be the name of an environment variable")
        api_key = env.get(api_key_env) if api_key_env else table.get("api_key")
        timeout = table.get("timeout_s", 300)
        connect_timeout = table.get("connect_timeout_s", 10)
        for tname, tvalue in (("timeout_s", timeout), ("connect_timeout_s", connect_timeout)):
            if isinstance(tvalue, bool) or not isinstance(tvalue, (int, float, Decimal)):
                raise _fail(source, entry, f"{tname} must be a number of seconds")
            if tvalue <= 0:
                raise _fail(source, entry, f"{tname} must be positive")
        native = table.get("native_responses", False)
        if not isinstance(native, bool):
            raise _fail(source, entry, "native_responses must be true or false")
        providers[name] = ProviderConfig(
            name=name,
            type=ptype,
            base_url=base_url.rstrip("/"),
            api_key=api_key or None,
            connect_timeout_s=float(connect_timeout),
            read_timeout_s=float(timeout),
            options={k: v for k, v in table.items() if k not in _PROVIDER_FIELDS},
        )
    return providers


def parse_model(table: Any, source: str, entry: str, providers: set[str]) -> Model:
    if not isinstance(table, dict):
        raise _fail(source, entry, "must be a table")
    model_id = table.get("id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise _fail(source, entry, "missing 'id' (the public model name)")
    entry = f"{entry} (id={model_id!r})"
    unknown = set(table) - _MODEL_FIELDS
    if unknown:
        raise _fail(source, entry, f"unknown field(s): {', '.join(sorted(unknown))}")
    kind = table.get("type", "chat")
    if kind not in MODEL_KINDS:
        raise _fail(source, entry, f"type must be one of {', '.join(MODEL_KINDS)}")
    routes_raw = table.get("routes")
    if not isinstance(routes_raw, list) or not routes_raw:
        raise _fail(source, entry, "needs at least one route: routes = [{provider, model}]")
    routes = []
    for i, r in enumerate(routes_raw):
        rentry = f"{entry} routes[{i}]"
        if not isinstance(r, dict):
            raise _fail(source, rentry, "must be a table {provider = ..., model = ...}")
        unknown = set(r) - _ROUTE_FIELDS
        if unknown:
            raise _fail(source, rentry, f"unknown field(s): {', '.join(sorted(unknown))}")
        provider, upstream = r.get("provider"), r.get("model")
        if not isinstance(provider, str) or provider not in providers:
            raise _fail(source, rentry, f"unknown provider {provider!r}")
        if not isinstance(upstream, str) or not upstream:
            raise _fail(source, rentry, "missing 'model' (the upstream model name)")
        cost = _price(r, source, rentry, prefix="cost_")
        weight = r.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise _fail(source, rentry, "weight must be a whole number from 0 to 1000000")
        routes.append(
            Route(
                provider=provider,
                model=upstream,
                cost=cost,
                weight=weight,
                max_concurrency=_positive_int(
                    r.get("max_concurrency"), source, rentry, "max_concurrency"
                ),
            )
        )
    strategy = table.get("strategy", "ordered")
    if strategy not in STRATEGIES:
        raise _fail(source, entry, f"strategy must be one of {', '.join(STRATEGIES)}")
    if strategy == "weighted" and not any(r.weight for r in routes):
        raise _fail(source, entry, "strategy 'weighted' needs a route with a weight above 0")
    for name in ("input_usd_per_mtok", "output_usd_per_mtok"):
        if kind == "chat" and name not in table:
            raise _fail(source, entry, f'missing price {name} (a decimal string such as "0.50")')
    if kind == "embeddings" and "input_usd_per_mtok" not in table:
        raise _fail(source, entry, "missing price input_usd_per_mtok")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise _fail(source, entry, "description must be a string")
    return Model(
        id=model_id,
        price=_price(table, source, entry),
        routes=tuple(routes),
        kind=kind,
        description=description,
        max_output_tokens=_positive_int(
            table.get("max_output_tokens"), source, entry, "max_output_tokens"
        ),
        context_window=_positive_int(table.get("context_window"), source, entry, "context_window"),
        demo=bool(table.get("demo", False)),
        owned_by=str(table.get("owned_by", "apifast")),
        image_input_tokens=_positive_int(
            table.get("image_input_tokens"), source, entry, "image_input_tokens"
        )
        or DEFAULT_IMAGE_INPUT_TOKENS,
        audio_input_tokens=_positive_int(
            table.get("audio_input_tokens"), source, entry, "audio_input_tokens"
        ),
        file_input_tokens=_positive_int(
            table.get("file_input_tokens"), source, entry, "file_input_tokens"
        ),
        strategy=strategy,
    )


def parse_catalog(
    data: dict[str, Any],
    source: str,
    *,
    env: dict[str, str] | None = None,
    known_types: set[str] | None = None,
) -> Catalog:
    env = dict(os.environ) if env is None else env
    unknown = set(data) - {"providers", "models"}
    if unknown:
        raise _fail(source, "top level", f"unknown table(s): {', '.join(sorted(unknown))}")
    providers = parse_providers(data.get("providers"), source, env, known_types)
    models_raw = data.get("models", [])
    if not isinstance(models_raw, list):
        raise _fail(source, "models", "must be an array of [[models]] tables")
    models: dict[str, Model] = {}
    for i, table in enumerate(models_raw):
        model = parse_model(table, source, f"models[{i}]", set(providers))
        if model.id in models:
            raise _fail(source, f"models[{i}] (id={model.id!r})", "duplicate model id")
        if table.get("enabled", True) is False:
            continue
        models[model.id] = model
    return Catalog(models=models, providers=providers, source=source)


def load_catalog(path: Path, *, known_types: set[str] | None = None) -> Catalog:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{source}: cannot read models file: {exc.strerror}") from None
    try:
        # parse_float=Decimal: a price written as a bare number is still read exactly.
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: invalid TOML: {exc}") from None
    return parse_catalog(data, source, known_types=known_types)


def demo_catalog() -> Catalog:
    """Served when no models file is configured: one offline model, clearly labelled."""
    return parse_catalog(
        {
            "providers": {"demo": {"type": "demo"}},
            "models": [
                {
                    "id": "apifast-demo",
                    "description": "DEMO MODEL: canned offline replies, for trying ApiFast "
                    "without an upstream. Set APIFAST_MODELS_FILE to serve real models.",
                    "input_usd_per_mtok": "1.00",
                    "output_usd_per_mtok": "2.00",
                    "demo": True,
                    "routes": [{"provider": "demo", "model": "demo"}],
                }
            ],
        },
        "<built-in demo catalog>",
    )
