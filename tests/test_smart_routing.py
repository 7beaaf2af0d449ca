"""Smart routing through the real router: weighted splits, circuit breakers with a probe,
Retry-After benching, lowest_latency moving away and back, the client's `models` fallback
and `route.max_price` on all three protocols, the route index and attempts in usage events,
health shared between two routers over real NATS, and no upstream ever named to a client.

Deterministic: the route book's clock is a fake one the tests move (an upstream is "slow"
by moving it while it answers), and its random source is seeded. No sleeps, no timings."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import httpx
import pytest

from apifast.catalog.toml import CatalogError, parse_catalog
from apifast.router.route_book import RouteBook
from apifast.router.route_choice import attempt_order
from apifast.router.route_health import CLOSED, OPEN, BreakerPolicy
from tests.harness import Stack, running_stack

# Names no client may ever see: providers, upstream models, and what the fake upstream sends.
SECRETS = ("prov_alpha", "prov_beta", "UPSTREAM-ALPHA", "UPSTREAM-BETA", "UPSTREAM-SECRET",
           "UPSTREAMID", "upstream_secret", "upstream-org", "fp_upstream")  # fmt: skip
seen: list[str] = []  # every response body and header block the tests received


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def catalog(alpha: str, beta: str, strategy: str = "ordered", weights: tuple[int, int] = (1, 1),
            extra: str = "") -> str:  # fmt: skip
    costs = [f'cost_input_usd_per_mtok = "{i}", cost_output_usd_per_mtok = "{o}"'
             for i, o in (("0.80", "1.60"), ("0.40", "0.80"))]  # fmt: skip
    return (
        f"""
        [providers.prov_alpha]
        type = "openai"
        base_url = "{alpha}"

        [providers.prov_beta]
        type = "openai"
        base_url = "{beta}"

        [[models]]
        id = "chat"
        strategy = "{strategy}"
        input_usd_per_mtok = "1.00"
        output_usd_per_mtok = "2.00"
        routes = [
          {{ provider = "prov_alpha", model = "UPSTREAM-ALPHA-1", weight = {weights[0]}, {costs[0]} }},
          {{ provider = "prov_beta", model = "UPSTREAM-BETA-1", weight = {weights[1]}, {costs[1]} }},
        ]

        [[models]]
        id = "dear"
        input_usd_per_mtok = "3.00"
        output_usd_per_mtok = "6.00"
        routes = [ {{ provider = "prov_alpha", model = "UPSTREAM-ALPHA-DEAR" }} ]

        [[models]]
        id = "cheap"
        input_usd_per_mtok = "0.50"
        output_usd_per_mtok = "1.00"
        routes = [ {{ provider = "prov_beta", model = "UPSTREAM-BETA-CHEAP" }} ]
    """
        + extra
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def started(factory: Any, models: str, clock: FakeClock, **settings: Any) -> Any:
    cm = running_stack(factory(models, **settings))
    stack = await cm.__aenter__()
    book: RouteBook = stack.state.routes
    book.clock = clock
    book.rng = random.Random(1234)
    return cm, stack


def record(r: httpx.Response) -> httpx.Response:
    seen.append(r.text)
    seen.append(repr(list(r.headers.items())))
    return r


def assert_nothing_named() -> None:
    text = "\n".join(seen)
    for secret in SECRETS:
        assert secret not in text, secret


MESSAGES = [{"role": "user", "content": "hi"}]


async def chat(c: httpx.AsyncClient, stream: bool = False, **extra: Any) -> httpx.Response:
    body = {"model": "chat", "messages": MESSAGES, **extra}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return record(await c.post("/v1/chat/completions", json=body))


async def event_rows(stack: Stack, ids: list[str]) -> dict[str, dict[str, Any]]:
    await stack.wait_metered(ids)
    rows = await stack.state.clickhouse.query(
        "SELECT generation_id, model, route_index, attempts, provider FROM usage_events "
        "WHERE generation_id IN {ids:Array(String)}",
        {"ids": ids},
    )
    return {r["generation_id"]: r for r in rows}


# --- the catalog ----------------------------------------------------------------------------


def test_catalog_reads_strategy_weight_and_max_concurrency():
    data = {
        "providers": {"p": {"type": "openai"}},
        "models": [{
            "id": "m", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1",
            "strategy": "weighted",
            "routes": [{"provider": "p", "model": "a", "weight": 3, "max_concurrency": 2},
                       {"provider": "p", "model": "b"}],
        }],
    }  # fmt: skip
    model = parse_catalog(data, "t").models["m"]
    assert model.strategy == "weighted"
    assert [(r.weight, r.max_concurrency) for r in model.routes] == [(3, 2), (1, None)]
    for bad, problem in (
        ({"strategy": "fastest"}, "strategy must be one of"),
        ({"routes": [{"provider": "p", "model": "a", "weight": -1}]}, "weight"),
        ({"routes": [{"provider": "p", "model": "a", "max_concurrency": 0}]}, "max_concurrency"),
        ({"strategy": "weighted", "routes": [{"provider": "p", "model": "a", "weight": 0}]},
         "weight above 0"),
    ):  # fmt: skip
        broken = {**data, "models": [{**data["models"][0], **bad}]}
        with pytest.raises(CatalogError, match=problem):
            parse_catalog(broken, "t")


# --- choice, unit level -----------------------------------------------------------------------


def _book(clock: FakeClock, **policy: Any) -> tuple[RouteBook, Any]:
    data = {
        "providers": {"p": {"type": "openai"}},
        "models": [{
            "id": "m", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1",
            "strategy": "lowest_latency",
            "routes": [{"provider": "p", "model": "a", "max_concurrency": 1,
                        "cost_input_usd_per_mtok": "2", "cost_output_usd_per_mtok": "2"},
                       {"provider": "p", "model": "b",
                        "cost_input_usd_per_mtok": "1", "cost_output_usd_per_mtok": "1"}],
        }],
    }  # fmt: skip
    book = RouteBook(BreakerPolicy(**policy), clock=clock, rng=random.Random(5))
    return book, parse_catalog(data, "t").models["m"]


def test_lowest_latency_follows_observations_and_explores(clock: FakeClock):
    book, model = _book(clock)
    a, b = book.entries(model)
    for _ in range(5):
        a.stats.observe_ttfb(0.1)
        b.stats.observe_ttfb(0.3)
    firsts = [book.order(model)[0].index for _ in range(100)]
    assert firsts.count(0) > 80 and firsts.count(1) > 0  # mostly the fastest, some exploring
    for _ in range(5):
        a.stats.observe_ttfb(5.0)  # slowed down
    firsts = [book.order(model)[0].index for _ in range(100)]
    assert firsts.count(1) > 80 and firsts.count(0) > 0  # still explored: it can recover
    for _ in range(10):
        a.stats.observe_ttfb(0.05)  # what the explored requests measure once it recovered
    assert [book.order(model)[0].index for _ in range(100)].count(0) > 80


def test_lowest_latency_weighs_output_rate_against_time_to_first_byte(clock: FakeClock):
    book, model = _book(clock)
    a, b = book.entries(model)
    a.stats.observe_ttfb(0.1)
    b.stats.observe_ttfb(0.3)
    assert attempt_order("lowest_latency", [a, b], book.rng, explore=0)[0] is a
    # a answers first but then trickles (100 tokens in 10 s); b streams 100 tokens in 0.5 s.
    a.stats.observe_throughput(100, 10.0)
    b.stats.observe_throughput(100, 0.5)
    assert attempt_order("lowest_latency", [a, b], book.rng, explore=0)[0] is b


def test_lowest_cost_least_busy_and_max_concurrency(clock: FakeClock):
    book, model = _book(clock)
    a, b = book.entries(model)
    assert [e.index for e in attempt_order("lowest_cost", [a, b], book.rng)] == [1, 0]
    assert book.admit(a)  # in flight: 1, its max_concurrency
    assert [e.index for e in attempt_order("least_busy", [a, b], book.rng)] == [1, 0]
    assert not book.admit(a)  # full: skipped
    book.release(a, output_tokens=50, seconds=2.0)
    assert a.stats.tokens_per_s == 25.0
    assert book.admit(a)


def test_breaker_error_rate_threshold(clock: FakeClock):
    from apifast.providers import UpstreamError

    book, model = _book(clock, failures=100, error_rate=0.5, window=10)
    a, _ = book.entries(model)
    for _ in range(5):
        assert book.admit(a)
        book.succeeded("m", a, 0.1)
        book.release(a)
    for _ in range(4):
        assert book.admit(a)
        book.failed("m", a, UpstreamError(500))
    assert a.breaker.state == CLOSED  # 4 of 9 failed: below half
    assert book.admit(a)
    book.failed("m", a, UpstreamError(500))
    assert a.breaker.state == OPEN  # 5 of the last 10 failed
    assert not book.admit(a)
    clock.advance(31)
    assert book.admit(a)  # the probe
    assert not book.admit(a)  # only one
    book.succeeded("m", a, 0.1)
    assert a.breaker.state == CLOSED


# --- end to end -----------------------------------------------------------------------------


async def test_weighted_split_and_route_index_in_usage_events(
    stack_settings_factory, alpha, beta, clock
):
    cm, stack = await started(
        stack_settings_factory, catalog(alpha.url, beta.url, "weighted", (3, 1)), clock
    )
    try:
        key = await stack.create_key("5.00")
        async with stack.client(key) as c:
            ids = [(await chat(c)).json()["id"] for _ in range(80)]
        assert alpha.chat_requests + beta.chat_requests == 80
        assert 50 <= alpha.chat_requests <= 70, alpha.chat_requests  # 60 expected
        rows = await event_rows(stack, ids)
        by_route = [sum(1 for r in rows.values() if r["route_index"] == i) for i in (0, 1)]
        assert by_route == [alpha.chat_requests, beta.chat_requests]
        assert {r["attempts"] for r in rows.values()} == {1}
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


async def test_open_breaker_stops_traffic_and_a_probe_closes_it(
    stack_settings_factory, alpha, beta, clock
):
    cm, stack = await started(
        stack_settings_factory, catalog(alpha.url, beta.url), clock,
        breaker_failures=2, breaker_cooldown_s=30,
    )  # fmt: skip
    try:
        key = await stack.create_key("5.00")
        alpha.fail(500)
        async with stack.client(key) as c:
            failed_over = [(await chat(c, stream=i == 1)) for i in range(2)]
            assert all(r.status_code == 200 for r in failed_over)
            assert alpha.chat_requests == 2 and beta.chat_requests == 2
            health = {r["index"]: r for r in stack.state.route_health() if r["model"] == "chat"}
            assert health[0]["state"] == "open" and health[0]["error_rate"] == 1.0
            # Open: the failing route gets nothing, even once it has recovered.
            alpha.recover()
            opened = [(await chat(c)).json()["id"] for _ in range(3)]
            assert alpha.chat_requests == 2 and beta.chat_requests == 5
            clock.advance(31)  # the cooldown passed: half-open, one probe
            probe = (await chat(c)).json()["id"]
            assert alpha.chat_requests == 3
            health = {r["index"]: r for r in stack.state.route_health() if r["model"] == "chat"}
            assert health[0]["state"] == "closed"
            after = (await chat(c)).json()["id"]
            assert alpha.chat_requests == 4
        ids = [failed_over[0].json()["id"], *opened, probe, after]
        rows = await event_rows(stack, ids)
        assert (rows[ids[0]]["route_index"], rows[ids[0]]["attempts"]) == (1, 2)
        assert all((rows[i]["route_index"], rows[i]["attempts"]) == (1, 1) for i in opened)
        assert (rows[probe]["route_index"], rows[after]["route_index"]) == (0, 0)
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


async def test_retry_after_benches_a_route(stack_settings_factory, alpha, beta, clock):
    cm, stack = await started(stack_settings_factory, catalog(alpha.url, beta.url), clock)
    try:
        key = await stack.create_key("5.00")
        alpha.fail(429, times=1, retry_after="20")
        async with stack.client(key) as c:
            assert (await chat(c)).status_code == 200
            assert (alpha.chat_requests, beta.chat_requests) == (1, 1)
            health = {r["index"]: r for r in stack.state.route_health() if r["model"] == "chat"}
            assert health[0]["state"] == "benched"
            await chat(c, stream=True)
            assert (alpha.chat_requests, beta.chat_requests) == (1, 2)  # benched
            clock.advance(21)
            assert (await chat(c)).status_code == 200
            assert (alpha.chat_requests, beta.chat_requests) == (2, 2)  # back
            # Every route benched: 503 with Retry-After, nothing named.
            alpha.fail(503, times=1, retry_after="7")
            beta.fail(429, times=1, retry_after="9")
            r = await chat(c)
            assert r.status_code == 502  # both failed (each then benched)
            r = await chat(c)
            assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
            assert r.headers["retry-after"] == "7"
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


async def test_lowest_latency_moves_away_from_a_slowed_route_and_back(
    stack_settings_factory, alpha, beta, clock
):
    cm, stack = await started(
        stack_settings_factory, catalog(alpha.url, beta.url, "lowest_latency"), clock
    )
    delay = {"alpha": 0.1, "beta": 0.3}  # seconds of fake clock per answer
    alpha.on_request = lambda body: clock.advance(delay["alpha"])
    beta.on_request = lambda body: clock.advance(delay["beta"])
    stack.state.routes.explore = 0.2

    async def phase(c: httpx.AsyncClient, n: int = 30) -> tuple[int, int]:
        a0, b0 = alpha.chat_requests, beta.chat_requests
        for _ in range(n):
            assert (await chat(c)).status_code == 200
        return alpha.chat_requests - a0, beta.chat_requests - b0

    try:
        key = await stack.create_key("5.00")
        async with stack.client(key) as c:
            a, b = await phase(c)
            assert a > b, (a, b)  # alpha is faster
            delay["alpha"] = 2.0  # alpha slows down
            a, b = await phase(c)
            assert b > a, (a, b)
            delay["alpha"] = 0.05  # and recovers: exploration measures it again ...
            a, _ = await phase(c, 40)
            assert a > 0
            a, b = await phase(c)  # ... and it is the first choice again
            assert a > b, (a, b)
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


PROTOCOLS = ("chat", "messages", "responses")


def gen_id(r: httpx.Response) -> str:
    """The generation id in any protocol's answer (msg_gen-..., resp_gen-..., gen-...)."""
    return "gen-" + r.json()["id"].split("gen-", 1)[1]


async def call(
    c: httpx.AsyncClient, api: str, stream: bool = False, **extra: Any
) -> httpx.Response:
    if api == "chat":
        path, body = "/v1/chat/completions", {"messages": MESSAGES}
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif api == "messages":
        path, body = "/v1/messages", {"messages": MESSAGES, "max_tokens": 64}
    else:
        path, body = "/v1/responses", {"input": "hi"}
    body.update(extra)
    if stream:
        body["stream"] = True
    return record(await c.post(path, json=body))


def answered_model(api: str, r: httpx.Response, stream: bool) -> str:
    if not stream:
        return r.json()["model"]
    for line in r.text.splitlines():
        if line.startswith("data: {") and '"model"' in line:
            import orjson

            data = orjson.loads(line[6:])
            found = data.get("model") or (data.get("message") or {}).get("model")
            found = found or (data.get("response") or {}).get("model")
            if found:
                return str(found)
    raise AssertionError("no model in the stream")


@pytest.mark.parametrize("api", PROTOCOLS)
async def test_models_fallback_and_max_price(stack_settings_factory, alpha, beta, clock, api):
    cm, stack = await started(stack_settings_factory, catalog(alpha.url, beta.url), clock)
    try:
        key = await stack.create_key("5.00")
        alpha.fail(500)  # serves "dear" (and route 0 of "chat")
        async with stack.client(key) as c:
            ids = []
            for stream in (False, True):
                r = await call(c, api, stream, model="dear", models=["cheap"])
                assert r.status_code == 200, r.text
                assert answered_model(api, r, stream) == "cheap"
                if not stream:
                    ids.append(gen_id(r))
            assert all("models" not in b and "route" not in b for b in beta.requests)
            # max_price: "dear" is over the cap, so only "cheap" is tried; dear's upstream
            # is never called.
            alpha.recover()
            before = alpha.chat_requests
            cap = {"max_price": {"prompt": "1.00", "completion": "1.00"}}
            r = await call(c, api, model="dear", models=["cheap"], route=cap)
            assert r.status_code == 200 and answered_model(api, r, False) == "cheap"
            ids.append(gen_id(r))
            # sort by price puts the cheaper model first.
            r = await call(c, api, models=["dear", "cheap"], route={"sort": "price"})
            assert answered_model(api, r, False) == "cheap"
            assert alpha.chat_requests == before
            # Nothing within the price: 400 before any upstream call; unknown model: 404.
            tight = {"max_price": {"prompt": "0.10"}}
            calls = alpha.chat_requests + beta.chat_requests
            r = await call(c, api, model="dear", models=["cheap"], route=tight)
            assert r.status_code == 400
            error = r.json()["error"]
            assert "route.max_price" in error["message"]
            if api == "messages":
                assert r.json()["type"] == "error" and error["type"] == "invalid_request_error"
            else:
                assert error["code"] == "no_model_within_max_price"
            r = await call(c, api, model="dear", models=["no-such-model"])
            assert r.status_code == 404
            r = await call(c, api, model="dear", route={"sort": "fastest"})
            assert r.status_code == 400
            assert alpha.chat_requests + beta.chat_requests == calls
            # allow_fallbacks false: only the first choice, which fails.
            alpha.fail(500)
            r = await call(c, api, model="dear", models=["cheap"],
                           route={"allow_fallbacks": False})  # fmt: skip
            assert r.status_code == 502
        rows = await event_rows(stack, ids)
        assert [rows[i]["model"] for i in ids] == ["cheap", "cheap"]
        assert rows[ids[0]]["attempts"] == 2  # dear's route, then cheap's
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


async def test_fallback_model_is_billed_at_its_own_price(
    stack_settings_factory, alpha, beta, clock
):
    cm, stack = await started(stack_settings_factory, catalog(alpha.url, beta.url), clock)
    try:
        key = await stack.create_key("5.00")
        alpha.fail(500)
        async with stack.client(key) as c:
            r = await call(c, "chat", model="dear", models=["cheap"])
        usage = r.json()["usage"]
        expected = (
            Decimal(usage["prompt_tokens"]) * Decimal("0.50")
            + Decimal(usage["completion_tokens"]) * Decimal("1.00")
        ) / 1_000_000
        assert Decimal(str(usage["cost"])) == expected
        await stack.wait_metered([r.json()["id"]])
        await stack.wait_until(
            lambda: stack.pool.fetchval("SELECT reserved_usd FROM api_keys"), Decimal("0")
        )
        assert await stack.pool.fetchval("SELECT spent_usd FROM api_keys") == expected
    finally:
        await cm.__aexit__(None, None, None)


async def test_health_is_shared_between_routers_over_nats(
    stack_settings_factory, alpha, beta, clock
):
    cm, first = await started(
        stack_settings_factory, catalog(alpha.url, beta.url), clock, breaker_failures=1,
    )  # fmt: skip
    try:
        settings = first.settings.model_copy(update={"port": stack_settings_factory(None).port})
        async with running_stack(settings, run_meter=False) as second:
            second.state.routes.clock = clock
            await asyncio.wait_for(first.state.health.wait_ready(), 10)
            await asyncio.wait_for(second.state.health.wait_ready(), 10)
            key = await first.create_key("5.00")
            alpha.fail(500)
            async with first.client(key) as c:
                assert (await chat(c)).status_code == 200  # alpha failed: its breaker opens
            await first.wait_until(lambda: _applied(second), 1)
            alpha.recover()
            async with second.client(key) as c:
                assert (await chat(c)).status_code == 200
            assert alpha.chat_requests == 1  # the second router never tried it
            clock.advance(31)
            async with second.client(key) as c:
                assert (await chat(c)).status_code == 200  # its probe closes it ...
            assert alpha.chat_requests == 2
            await first.wait_until(lambda: _applied(first), 1)  # ... for the first too
            state = {r["index"]: r["state"] for r in first.state.route_health()
                     if r["model"] == "chat"}  # fmt: skip
            assert state[0] == "closed"
    finally:
        await cm.__aexit__(None, None, None)


async def _applied(stack: Stack) -> int:
    return int(stack.state.health.applied)


async def test_admin_overview_shows_route_health_and_split(
    stack_settings_factory, alpha, beta, clock
):
    from tests.admin_support import AdminClient, model_form, set_admin_password

    cm, stack = await started(stack_settings_factory, catalog(alpha.url, beta.url), clock,
                              breaker_failures=1)  # fmt: skip
    try:
        await set_admin_password(stack)
        key = await stack.create_key("5.00")
        alpha.fail(500, times=1)
        async with stack.client(key) as c:
            ids = [(await chat(c)).json()["id"] for _ in range(3)]
        await stack.wait_metered(ids)
        async with AdminClient(stack) as admin:
            await admin.login()
            page = (await admin.get("/admin/?range=24h")).text
            assert "Route health" in page and "prov_alpha" in page  # the operator sees names
            health = page.split('id="route-health"')[1].split("</table>")[0]
            assert 'class="route-state state-open">open<' in health  # chat's route 0
            assert "100% <span" in health  # its recent error rate: its one outcome failed
            split = page.split('id="route-split"')[1].split("</table>")[0]
            # All three answered by chat's route 1 (route 0 failed, then its breaker was open).
            assert (
                '<td>chat</td><td class="num">1</td><td>prov_beta</td><td class="num">3</td>'
                in split
            )
            assert "100.00%" in split

            # Strategy, weight and max_concurrency are edited in the model form.
            form = model_form(
                "chat", input_usd_per_mtok="1.00", output_usd_per_mtok="2.00",
                strategy="weighted",
                routes="prov_alpha UPSTREAM-ALPHA-1 weight=3\n"
                       "prov_beta UPSTREAM-BETA-1 0.1 0.2 weight=0 max_concurrency=2",
            )  # fmt: skip
            assert (await admin.post("/admin/models/save", form)).status_code == 303
            model = stack.state.catalog.models["chat"]
            assert model.strategy == "weighted"
            assert [(r.weight, r.max_concurrency) for r in model.routes] == [(3, None), (0, 2)]
            editor = (await admin.get("/admin/models/edit?id=chat")).text
            assert "weight=0 max_concurrency=2" in editor
            assert '<option value="weighted" selected>' in editor
            bad = {**form, "routes": "prov_alpha UPSTREAM-ALPHA-1 speed=9"}
            r = await admin.post("/admin/models/save", bad)
            assert r.status_code == 400 and "unknown setting" in r.text
    finally:
        await cm.__aexit__(None, None, None)


async def test_without_nats_health_stays_local(clock: FakeClock):
    from apifast.providers import UpstreamError
    from apifast.router.health_share import HealthShare
    from tests.harness import free_port

    book, model = _book(clock, failures=1)
    share = HealthShare(book, f"nats://127.0.0.1:{free_port()}", "t.route_health", {}.get)
    await share.start()
    try:
        a, _ = book.entries(model)
        assert book.admit(a)
        book.failed("m", a, UpstreamError(500))  # reported to nobody, without raising
        assert a.breaker.state == OPEN and not book.admit(a)
    finally:
        await share.close()


async def test_a_stream_broken_after_its_first_byte_counts_against_the_route(
    stack_settings_factory, alpha, beta, clock
):
    cm, stack = await started(
        stack_settings_factory, catalog(alpha.url, beta.url), clock, breaker_failures=1
    )
    try:
        key = await stack.create_key("5.00")
        alpha.behaviour = "broken"
        async with stack.client(key) as c:
            r = await chat(c, stream=True)
            assert r.status_code == 200 and '"error"' in r.text  # not retried: data was sent
            assert (alpha.chat_requests, beta.chat_requests) == (1, 0)
            health = {r["index"]: r for r in stack.state.route_health() if r["model"] == "chat"}
            assert health[0]["state"] == "open" and health[0]["in_flight"] == 0
            assert (await chat(c)).status_code == 200
            assert (alpha.chat_requests, beta.chat_requests) == (1, 1)
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


@pytest.mark.parametrize("api", PROTOCOLS)
async def test_route_sort_orders_a_models_routes(stack_settings_factory, alpha, beta, clock, api):
    cm, stack = await started(stack_settings_factory, catalog(alpha.url, beta.url), clock)
    alpha.on_request = lambda body: clock.advance(0.1)
    beta.on_request = lambda body: clock.advance(0.5)
    stack.state.routes.explore = 0.0
    try:
        key = await stack.create_key("5.00")
        async with stack.client(key) as c:
            r = await call(c, api, model="chat")  # ordered: alpha
            assert (alpha.chat_requests, beta.chat_requests) == (1, 0)
            r = await call(c, api, model="chat", route={"sort": "price"})  # beta costs less
            assert r.status_code == 200 and answered_model(api, r, False) == "chat"
            assert (alpha.chat_requests, beta.chat_requests) == (1, 1)
            r = await call(c, api, model="chat", route={"sort": "latency"})  # alpha: 0.1 s
            assert (alpha.chat_requests, beta.chat_requests) == (2, 1)
            # Throughput: the same answer in less time is more tokens per second: alpha.
            r = await call(c, api, model="chat", route={"sort": "throughput"})
            assert (alpha.chat_requests, beta.chat_requests) == (3, 1)
            assert all("route" not in b and "models" not in b for b in alpha.requests)
        assert_nothing_named()
    finally:
        await cm.__aexit__(None, None, None)


def test_retry_after_header_values():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from apifast.providers import parse_retry_after

    assert parse_retry_after(b"20") == 20.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(b"999999") == 3600.0  # capped
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (parse_retry_after(soon) or 0) <= 120
    assert parse_retry_after(b"") is None and parse_retry_after(b"soon") is None
    assert parse_retry_after(b"-5") == 0.0
