"""The client's routing preferences (`models`, `route`) probed where tests/test_smart_routing.py
does not reach: on native routes (an `anthropic` provider for /v1/messages, an `openai` one
with `native_responses` for /v1/responses) as well as translated ones, on /v1/embeddings,
and malformed, on every protocol.

- a fallback model answers, is named as the answer's `model` (streams too) and is billed at
  its own price; `max_price` keeps a pricier model's upstream from ever being called;
- a malformed `models` or `route` is a 400/404 in the protocol's own error shape, naming the
  field, before any hold (the key has no balance: a hold would be a 402) and before any
  upstream call;
- nothing any client receives names an upstream (provider, upstream model, their ids).

Deterministic: fake upstreams fail by count (FakeOpenAI.fail, FakeAnthropic.script)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from apifast.providers import parse_retry_after
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, running_stack

# Names no client may ever see: providers, upstream models, and what the fakes send.
SECRETS = ("prov_", "UPSTREAM", "upstream_secret", "upstream-org", "5f0b7a4e", "cloudflare",
           "anthropic-ratelimit", "fp_upstream")  # fmt: skip
# Anthropic's own ids (msg_01..., req_01...: base62). ApiFast's are hex (msg_<generation>00),
# so an id that is not all hex is the upstream's.
ANTHROPIC_ID = re.compile(r"(?:msg|req|toolu)_01[A-Za-z0-9]{22}")

CATALOG = """
[providers.prov_alpha]
type = "openai"
base_url = "{alpha}"

[providers.prov_beta]
type = "openai"
base_url = "{beta}"

[providers.prov_native_alpha]
type = "openai"
base_url = "{alpha}"
native_responses = true

[providers.prov_native_beta]
type = "openai"
base_url = "{beta}"
native_responses = true

[providers.prov_claude]
type = "anthropic"
base_url = "{claude}"
api_key = "sk-ant-test-key"

[[models]]
id = "claude-dear"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "6.00"
routes = [ {{ provider = "prov_claude", model = "claude-UPSTREAM-DEAR" }} ]

[[models]]
id = "claude-cheap"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.00"
routes = [ {{ provider = "prov_claude", model = "claude-UPSTREAM-CHEAP" }} ]

[[models]]
id = "native-dear"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "6.00"
routes = [ {{ provider = "prov_native_alpha", model = "UPSTREAM-NATIVE-DEAR" }} ]

[[models]]
id = "native-cheap"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.00"
routes = [ {{ provider = "prov_native_beta", model = "UPSTREAM-NATIVE-CHEAP" }} ]

[[models]]
id = "cheap"
input_usd_per_mtok = "0.40"
output_usd_per_mtok = "0.80"
routes = [ {{ provider = "prov_beta", model = "UPSTREAM-BETA-CHEAP" }} ]

[[models]]
id = "claude-two"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.00"
routes = [ {{ provider = "prov_claude", model = "claude-UPSTREAM-TWO" }},
           {{ provider = "prov_beta", model = "UPSTREAM-BETA-TWO" }} ]

[[models]]
id = "two"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.00"
routes = [ {{ provider = "prov_alpha", model = "UPSTREAM-ALPHA-TWO" }},
           {{ provider = "prov_beta", model = "UPSTREAM-BETA-TWO" }} ]

[[models]]
id = "fee"
input_usd_per_mtok = "0.10"
output_usd_per_mtok = "0.10"
request_usd = "0.001"
routes = [ {{ provider = "prov_beta", model = "UPSTREAM-BETA-FEE" }} ]

[[models]]
id = "embed-dear"
type = "embeddings"
input_usd_per_mtok = "0.10"
routes = [ {{ provider = "prov_alpha", model = "UPSTREAM-EMBED-DEAR" }} ]

[[models]]
id = "embed-cheap"
type = "embeddings"
input_usd_per_mtok = "0.02"
routes = [ {{ provider = "prov_beta", model = "UPSTREAM-EMBED-CHEAP" }} ]
"""
PRICES = {  # public USD per million tokens (input, output)
    "claude-cheap": (Decimal("0.50"), Decimal("1.00")),
    "native-cheap": (Decimal("0.50"), Decimal("1.00")),
    "cheap": (Decimal("0.40"), Decimal("0.80")),
    "embed-cheap": (Decimal("0.02"), Decimal("0")),
}
MESSAGES = [{"role": "user", "content": "hi"}]
PATHS = {
    "chat": "/v1/chat/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
}


class Seen:
    """Every body and header block the tests received, to check none names an upstream."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, r: httpx.Response) -> httpx.Response:
        self.texts.append(r.text)
        self.texts.append(repr(list(r.headers.items())))
        return r

    def assert_nothing_named(self) -> None:
        text = "\n".join(self.texts)
        for secret in SECRETS:
            assert secret not in text, secret
        for found in ANTHROPIC_ID.findall(text):
            assert re.fullmatch(r"[a-z]+_[0-9a-f]+", found), found


@pytest.fixture
async def claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        fake.api_key = "sk-ant-test-key"
        yield fake


@pytest.fixture
async def pstack(
    stack_settings_factory: Any, alpha: FakeOpenAI, beta: FakeOpenAI, claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    catalog = CATALOG.format(alpha=alpha.url, beta=beta.url, claude=claude.url)
    async with running_stack(stack_settings_factory(catalog)) as running:
        yield running


def body_for(api: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    if api == "chat":
        body: dict[str, Any] = {"messages": MESSAGES}
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif api == "messages":
        body = {"messages": MESSAGES, "max_tokens": 64}
    elif api == "responses":
        body = {"input": "hi"}
    else:
        body = {"input": "hi"}
    body.update(extra)
    if stream:
        body["stream"] = True
    return body


async def post(
    c: httpx.AsyncClient, seen: Seen, api: str, stream: bool = False, **extra: Any
) -> httpx.Response:
    return seen(await c.post(PATHS[api], json=body_for(api, stream, **extra)))


def stream_events(r: httpx.Response) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def answered_models(r: httpx.Response, stream: bool) -> set[str]:
    """Every `model` the answer names (a stream: in each of its events)."""
    if not stream:
        return {r.json()["model"]}
    found: set[str] = set()
    for event in stream_events(r):
        for holder in (event, event.get("message") or {}, event.get("response") or {}):
            if isinstance(holder, dict) and "model" in holder:
                found.add(holder["model"])
    assert found, r.text
    return found


def usage_cost(api: str, r: httpx.Response) -> tuple[int, int, Decimal]:
    usage = r.json()["usage"]
    if api in ("chat", "embeddings"):
        tokens = (usage["prompt_tokens"], usage.get("completion_tokens", 0))
    else:
        tokens = (usage["input_tokens"], usage["output_tokens"])
    return tokens[0], tokens[1], Decimal(str(usage["cost"]))


def priced(model: str, prompt: int, completion: int) -> Decimal:
    per_in, per_out = PRICES[model]
    return (prompt * per_in + completion * per_out) / 1_000_000


# --- fallback and max_price on native routes ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_models_fallback_on_native_routes(
    pstack: Stack, claude: FakeAnthropic, beta: FakeOpenAI, stream: bool
) -> None:
    seen = Seen()
    key = await pstack.create_key("5.00")
    async with pstack.client(key) as c:
        # Native to native: the dear model's Anthropic route fails, the cheap one answers.
        claude.script = ["error_500"]
        r = await post(c, seen, "messages", stream, model="claude-dear", models=["claude-cheap"])
        assert r.status_code == 200, r.text
        assert answered_models(r, stream) == {"claude-cheap"}
        sent = [q.body["model"] for q in claude.requests if q.path == "/v1/messages"]
        assert sent == ["claude-UPSTREAM-DEAR", "claude-UPSTREAM-CHEAP"]
        assert all("models" not in q.body and "route" not in q.body for q in claude.requests)
        # Native to translated: the cheap model is an OpenAI route.
        claude.script = ["error_500"]  # (a 529 with Retry-After would bench the route)
        r = await post(c, seen, "messages", stream, model="claude-dear", models=["cheap"])
        assert r.status_code == 200, r.text
        assert answered_models(r, stream) == {"cheap"}
        assert beta.chat_requests == 1
        # max_price: the dear model's upstream is never called.
        before = len(claude.requests)
        cap = {"max_price": {"prompt": "0.50", "completion": "1.00"}}
        r = await post(c, seen, "messages", stream, model="claude-dear",
                       models=["claude-cheap"], route=cap)  # fmt: skip
        assert r.status_code == 200, r.text
        assert answered_models(r, stream) == {"claude-cheap"}
        assert [q.body["model"] for q in claude.requests[before:]] == ["claude-UPSTREAM-CHEAP"]
        if not stream:
            prompt, completion, cost = usage_cost("messages", r)
            assert cost == priced("claude-cheap", prompt, completion)
        # No fallback allowed: the native route's failure, in Anthropic's shape, unnamed.
        claude.script = ["error_500"]
        r = await post(c, seen, "messages", stream, model="claude-dear", models=["claude-cheap"],
                       route={"allow_fallbacks": False})  # fmt: skip
        assert r.status_code == 502, r.text
        assert r.json() == {"type": "error", "error": {
            "type": "api_error", "message": "The model provider failed; try again later."}}  # fmt: skip
    seen.assert_nothing_named()


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_models_fallback_on_native_routes(
    pstack: Stack, alpha: FakeOpenAI, beta: FakeOpenAI, stream: bool
) -> None:
    seen = Seen()
    key = await pstack.create_key("5.00")
    async with pstack.client(key) as c:
        alpha.fail(500, times=1)  # native-dear's native route
        r = await post(c, seen, "responses", stream, model="native-dear", models=["native-cheap"])
        assert r.status_code == 200, r.text
        assert answered_models(r, stream) == {"native-cheap"}
        assert [b["model"] for b in alpha.responses_requests] == ["UPSTREAM-NATIVE-DEAR"]
        assert [b["model"] for b in beta.responses_requests] == ["UPSTREAM-NATIVE-CHEAP"]
        assert all("models" not in b and "route" not in b for b in beta.responses_requests)
        # Native to translated.
        alpha.fail(503, times=1)
        r = await post(c, seen, "responses", stream, model="native-dear", models=["cheap"])
        assert r.status_code == 200, r.text
        assert answered_models(r, stream) == {"cheap"}
        assert beta.chat_requests == 1
        # max_price: the dear model's upstream is never called.
        before = len(alpha.responses_requests)
        cap = {"max_price": {"prompt": "0.5", "completion": "1"}}
        r = await post(c, seen, "responses", stream, model="native-dear",
                       models=["native-cheap"], route=cap)  # fmt: skip
        assert r.status_code == 200, r.text
        assert answered_models(r, stream) == {"native-cheap"}
        assert len(alpha.responses_requests) == before
        if not stream:
            prompt, completion, cost = usage_cost("responses", r)
            assert cost == priced("native-cheap", prompt, completion)
    seen.assert_nothing_named()


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
async def test_every_stream_event_names_the_model_that_answered(
    pstack: Stack, alpha: FakeOpenAI, api: str
) -> None:
    seen = Seen()
    key = await pstack.create_key("5.00")
    async with pstack.client(key) as c:
        # native-dear's one route fails, then "two"'s first (both on alpha); its second
        # answers: the stream is "two"'s from its first event to its last.
        alpha.fail(500, times=2)
        r = await post(c, seen, api, True, model="native-dear", models=["two", "cheap"])
        assert r.status_code == 200, r.text
        events = stream_events(r)
        assert len(events) > 2
        assert answered_models(r, True) == {"two"}
    seen.assert_nothing_named()


# --- /v1/embeddings -------------------------------------------------------------------------


async def test_embeddings_honour_models_and_route(
    pstack: Stack, alpha: FakeOpenAI, beta: FakeOpenAI
) -> None:
    seen = Seen()
    key = await pstack.create_key("5.00")
    async with pstack.client(key) as c:
        # Fallback: the dear model's upstream fails, the cheap one answers, named and billed
        # at its own price.
        alpha.fail(500, times=1)
        r = await post(c, seen, "embeddings", model="embed-dear", models=["embed-cheap"])
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "embed-cheap"
        prompt, _, cost = usage_cost("embeddings", r)
        assert cost == priced("embed-cheap", prompt, 0)
        assert [b["model"] for b in alpha.requests] == ["UPSTREAM-EMBED-DEAR"]
        assert [b["model"] for b in beta.requests] == ["UPSTREAM-EMBED-CHEAP"]
        assert all("models" not in b and "route" not in b for b in alpha.requests + beta.requests)
        # `models` alone, without `model`.
        r = await post(c, seen, "embeddings", models=["embed-dear"])
        assert r.status_code == 200 and r.json()["model"] == "embed-dear", r.text
        # max_price leaves the dear model out: its upstream is not called.
        calls = len(alpha.requests)
        cap = {"max_price": {"prompt": "0.02"}}
        r = await post(c, seen, "embeddings", model="embed-dear", models=["embed-cheap"],
                       route=cap)  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == "embed-cheap", r.text
        assert len(alpha.requests) == calls
        # sort by price puts the cheaper model first.
        r = await post(c, seen, "embeddings", models=["embed-dear", "embed-cheap"],
                       route={"sort": "price"})  # fmt: skip
        assert r.json()["model"] == "embed-cheap" and len(alpha.requests) == calls
        # allow_fallbacks false: the first choice only, which fails.
        alpha.fail(500, times=1)
        r = await post(c, seen, "embeddings", model="embed-dear", models=["embed-cheap"],
                       route={"allow_fallbacks": False})  # fmt: skip
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_error"
        # Nothing within the price: 400 before any call.
        calls = len(alpha.requests) + len(beta.requests)
        r = await post(c, seen, "embeddings", model="embed-dear",
                       route={"max_price": {"prompt": "0.01"}})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_model_within_max_price"
        assert len(alpha.requests) + len(beta.requests) == calls
    # Each answered request was debited once, at its own model's price; the failed one
    # (allow_fallbacks false) cost nothing.
    debited = "SELECT ref AS generation_id, -amount_usd AS usd FROM ledger WHERE kind = 'usage' AND amount_usd < 0"
    await pstack.wait_until(lambda: pstack.pool.fetchval(f"SELECT count(*) FROM ({debited}) d"), 4)
    debits = await pstack.pool.fetch(debited)
    ids = [d["generation_id"] for d in debits]
    await pstack.wait_metered(ids)
    rows = await pstack.state.clickhouse.query(
        "SELECT generation_id, model, attempts, cost_usd FROM usage_events "
        "WHERE generation_id IN {ids:Array(String)}",
        {"ids": ids},
    )
    assert sorted((row["model"], row["attempts"]) for row in rows) == [
        ("embed-cheap", 1), ("embed-cheap", 1), ("embed-cheap", 2), ("embed-dear", 1),
    ]  # fmt: skip
    usd = {d["generation_id"]: d["usd"] for d in debits}
    assert all(usd[row["generation_id"]] == Decimal(str(row["cost_usd"])) for row in rows)
    seen.assert_nothing_named()


# --- malformed preferences: a clear 400/404 in the protocol's shape, before any hold --------

KIND_MODELS = {
    "chat": "cheap",
    "messages": "cheap",
    "responses": "cheap",
    "embeddings": "embed-cheap",
}
OTHER_KIND = {"chat": "embed-cheap", "messages": "embed-cheap", "responses": "embed-cheap",
              "embeddings": "cheap"}  # fmt: skip


def malformed(api: str) -> list[tuple[dict[str, Any], int, str]]:
    """(preferences, status, the field the error names) for `api`."""
    known, other = KIND_MODELS[api], OTHER_KIND[api]
    return [
        ({"models": []}, 400, "models"),
        ({"models": "cheap"}, 400, "models"),
        ({"models": [known, 3]}, 400, "models[1]"),
        ({"models": [known, ""]}, 400, "models[1]"),
        ({"models": [known, None]}, 400, "models[1]"),
        ({"models": [known, known]}, 400, "models[1]"),
        ({"models": [known] + [f"m{i}" for i in range(9)]}, 400, "models"),
        ({"models": [known, "no-such-model"]}, 404, "models[1]"),
        ({"models": [known, other]}, 400, "models[1]"),
        ({"model": "no-such-model", "models": [known]}, 404, "model"),
        ({"route": "price"}, 400, "route"),
        ({"route": {"sort": "fastest"}}, 400, "route.sort"),
        ({"route": {"sort": 1}}, 400, "route.sort"),
        ({"route": {"speed": 1}}, 400, "route.speed"),
        ({"route": {"max_price": {"prompt": "-1"}}}, 400, "route.max_price.prompt"),
        ({"route": {"max_price": {"prompt": "cheap"}}}, 400, "route.max_price.prompt"),
        ({"route": {"max_price": {"completion": "NaN"}}}, 400, "route.max_price.completion"),
        ({"route": {"max_price": {"prompt": 0.5}}}, 400, "route.max_price.prompt"),
        ({"route": {"max_price": {"prompt": True}}}, 400, "route.max_price.prompt"),
        ({"route": {"max_price": {"image": "1"}}}, 400, "route.max_price"),
        ({"route": {"max_price": "1.00"}}, 400, "route.max_price"),
        ({"route": {"allow_fallbacks": "false"}}, 400, "route.allow_fallbacks"),
        ({"route": {"allow_fallbacks": 0}}, 400, "route.allow_fallbacks"),
    ]


@pytest.mark.parametrize("api", list(PATHS))
async def test_malformed_preferences_are_refused_before_any_hold(
    pstack: Stack, alpha: FakeOpenAI, beta: FakeOpenAI, claude: FakeAnthropic, api: str
) -> None:
    seen = Seen()
    key = await pstack.create_key("0.00")  # a hold would be a 402: none may be tried
    async with pstack.client(key) as c:
        for prefs, status, param in malformed(api):
            extra = {"model": KIND_MODELS[api], **prefs}
            r = await post(c, seen, api, **extra)
            assert r.status_code == status, (prefs, r.text)
            body = r.json()
            error = body["error"]
            assert param in error["message"], (prefs, error)
            kind = "not_found_error" if status == 404 else "invalid_request_error"
            assert error["type"] == kind, (prefs, body)
            if api == "messages":
                assert body["type"] == "error" and set(error) == {"type", "message"}, body
            else:
                assert error["param"] == param, (prefs, error)
    assert not alpha.requests and not beta.requests and not claude.requests
    assert await pstack.pool.fetchval("SELECT count(*) FROM reservations") == 0
    seen.assert_nothing_named()


COUNTS = {"messages": "/v1/messages/count_tokens", "responses": "/v1/responses/input_tokens"}


@pytest.mark.parametrize("api", list(COUNTS))
async def test_counting_endpoints_take_preferences_as_the_request_does(
    pstack: Stack, claude: FakeAnthropic, api: str
) -> None:
    """A count refuses the `models` / `route` its request would refuse (they were ignored,
    malformed or not), and counts for the first model the request would try."""
    seen = Seen()
    key = await pstack.create_key("0.00")  # counting is free
    dear = "claude-dear" if api == "messages" else "native-dear"
    async with pstack.client(key) as c:
        for prefs, status, param in malformed(api):
            body = body_for(api, **{"model": KIND_MODELS[api], **prefs})
            r = seen(await c.post(COUNTS[api], json=body))
            assert r.status_code == status, (prefs, r.text)
            assert param in r.json()["error"]["message"], (prefs, r.text)
        # `models` alone names the model; max_price passes over the dear one (on /v1/messages
        # its Anthropic route would have counted upstream).
        calls = len(claude.requests)
        for prefs in ({"models": ["cheap"]}, {"model": dear, "models": ["cheap"],
                      "route": {"max_price": {"prompt": "1"}}}):  # fmt: skip
            body = body_for(api, **prefs)
            body.pop("max_tokens", None)
            r = seen(await c.post(COUNTS[api], json=body))
            assert r.status_code == 200 and r.json()["input_tokens"] > 0, r.text
        assert len(claude.requests) == calls
        r = seen(await c.post(COUNTS[api], json=body_for(api, models=["no-such-model"])))
        assert r.status_code == 404, r.text
    assert not claude.requests
    seen.assert_nothing_named()


@pytest.mark.parametrize("api", list(PATHS))
async def test_max_price_is_exact_with_many_digits(pstack: Stack, api: str) -> None:
    """The cap is compared as a decimal, never a float: a hair under the price leaves the
    model out, the price itself (or a hair over) keeps it."""
    seen = Seen()
    key = await pstack.create_key("5.00")
    model = KIND_MODELS[api]
    price = PRICES[model][0]  # "0.40" / "0.02"
    under = str(price - Decimal("0.000000000001"))  # 12 places: the finest a cap takes
    over = str(price + Decimal("0.000000000001"))
    long = "0" * 40 + str(price) + "0" * 10  # many digits, the same value
    async with pstack.client(key) as c:
        r = await post(c, seen, api, model=model, route={"max_price": {"prompt": under}})
        assert r.status_code == 400, r.text
        assert "route.max_price" in r.json()["error"]["message"]
        for cap in (over, str(price), long):
            r = await post(c, seen, api, model=model, route={"max_price": {"prompt": cap}})
            assert r.status_code == 200, (cap, r.text)
        r = await post(c, seen, api, model=model,
                       route={"max_price": {"prompt": str(price) + "0000000000001"}})  # fmt: skip
        assert r.status_code == 400, r.text
        assert "decimal places" in r.json()["error"]["message"]
    seen.assert_nothing_named()


# --- Retry-After: delta-seconds and HTTP dates, on every provider's overload status ---------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _states(stack: Stack, model: str) -> dict[int, str]:
    return {r["index"]: r["state"] for r in stack.state.route_health() if r["model"] == model}


@pytest.mark.parametrize("form", ["imf", "rfc850", "asctime"])
async def test_retry_after_as_an_http_date_benches_the_route(
    pstack: Stack, alpha: FakeOpenAI, beta: FakeOpenAI, form: str
) -> None:
    """Each of the three HTTP-date forms (RFC 9110 5.6.7) is a time in GMT, wherever the
    router runs: a date two minutes ahead benches the route for about two minutes."""
    clock = FakeClock()
    pstack.state.routes.clock = clock
    at = datetime.now(UTC) + timedelta(seconds=120)
    date = {
        "imf": at.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        "rfc850": at.strftime("%A, %d-%b-%y %H:%M:%S GMT"),
        "asctime": at.strftime("%a %b ") + f"{at.day:>2}" + at.strftime(" %H:%M:%S %Y"),
    }[form]
    seen = Seen()
    key = await pstack.create_key("5.00")
    async with pstack.client(key) as c:
        alpha.fail(503, times=1, retry_after=date)
        r = await post(c, seen, "chat", model="two")
        assert r.status_code == 200, r.text
        assert _states(pstack, "two")[0] == "benched"
        clock.now += 60  # well within the two minutes, in any time zone's reading
        r = await post(c, seen, "chat", model="two")
        assert r.status_code == 200 and alpha.chat_requests == 1  # still benched
        clock.now += 90  # past them
        assert _states(pstack, "two")[0] != "benched"
    seen.assert_nothing_named()


def test_an_http_date_without_a_zone_is_read_as_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    """asctime's form carries no zone: it is GMT, not the router's local time."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        at = datetime.now(UTC) + timedelta(seconds=120)
        asctime = at.strftime("%a %b ") + f"{at.day:>2}" + at.strftime(" %H:%M:%S %Y")
        assert 100 < (parse_retry_after(asctime) or 0) <= 120
        assert 100 < (parse_retry_after(asctime.encode()) or 0) <= 120
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


async def test_anthropic_overloaded_with_retry_after_benches_the_route(
    pstack: Stack, claude: FakeAnthropic, beta: FakeOpenAI
) -> None:
    """Anthropic says "busy" with 529 (and Retry-After): the route is benched as a 503's
    would be, not counted against its breaker as a fault."""
    clock = FakeClock()
    pstack.state.routes.clock = clock
    seen = Seen()
    key = await pstack.create_key("5.00")
    async with pstack.client(key) as c:
        claude.script = ["error_529"]  # the fake sends retry-after: 1 with it
        r = await post(c, seen, "messages", model="claude-two")
        assert r.status_code == 200, r.text
        assert _states(pstack, "claude-two")[0] == "benched"
        calls = len(claude.requests)
        r = await post(c, seen, "messages", model="claude-two")
        assert r.status_code == 200 and len(claude.requests) == calls  # benched: not tried
        assert beta.chat_requests == 2
        clock.now += 2
        r = await post(c, seen, "messages", model="claude-two")
        assert r.status_code == 200 and len(claude.requests) == calls + 1  # back
    seen.assert_nothing_named()


# --- max_price.request: a per-request price cannot slip under the token caps ---------------


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
async def test_max_price_request_caps_a_per_request_price(
    pstack: Stack, beta: FakeOpenAI, api: str
) -> None:
    seen = Seen()
    key = await pstack.create_key("5.00")
    tokens = {"prompt": "1", "completion": "1"}
    async with pstack.client(key) as c:
        r = await post(c, seen, api, models=["fee", "cheap"],
                       route={"max_price": {**tokens, "request": "0.0009"}})  # fmt: skip
        assert r.status_code == 200 and answered_models(r, False) == {"cheap"}, r.text
        r = await post(c, seen, api, models=["fee", "cheap"],
                       route={"max_price": {**tokens, "request": "0.001"}})  # fmt: skip
        assert r.status_code == 200 and answered_models(r, False) == {"fee"}, r.text
        calls = beta.chat_requests
        r = await post(c, seen, api, model="fee", route={"max_price": {"request": "0"}})
        assert r.status_code == 400 and "route.max_price" in r.json()["error"]["message"]
        r = await post(c, seen, api, model="fee", route={"max_price": {"request": "-0.1"}})
        assert r.status_code == 400 and "route.max_price.request" in r.text
        assert beta.chat_requests == calls
    seen.assert_nothing_named()
