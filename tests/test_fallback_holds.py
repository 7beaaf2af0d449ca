"""The client's `models` fallback and holds, end to end (fake upstreams, real Postgres and
NATS): a model the balance cannot hold (402) is passed over for the next one, on all three
protocols; only when no model can be held does the client get the 402, in its protocol's
own error shape; and one client request counts once toward the key's rpm, however many of
its models took a hold, while tpm counts the tokens of the one answer billed.

Per-request prices make each model's hold deterministic, whatever each protocol's prompt
bound: "dear" needs $1, "mid" $0.50, "cheap" $0.001, and the key has $0.10."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, running_stack
from tests.test_smart_routing import answered_model, assert_nothing_named, call, gen_id

PROTOCOLS = ("chat", "messages", "responses")


# (model id, per-request price, its provider: prov_alpha answers, prov_beta fails with 500)
MODELS = (
    ("dear", "1.00", "prov_alpha"),
    ("mid", "0.50", "prov_alpha"),
    ("cheap", "0.001", "prov_alpha"),
    ("broken", "0.001", "prov_beta"),
)


def _catalog(good: str, bad: str) -> str:
    models = ""
    for model_id, request_usd, provider in MODELS:
        models += f"""
        [[models]]
        id = "{model_id}"
        input_usd_per_mtok = "1.00"
        output_usd_per_mtok = "2.00"
        request_usd = "{request_usd}"
        routes = [ {{ provider = "{provider}", model = "UPSTREAM-{model_id.upper()}" }} ]
        """
    return f"""
        [providers.prov_alpha]
        type = "openai"
        base_url = "{good}"

        [providers.prov_beta]
        type = "openai"
        base_url = "{bad}"
        {models}
    """


@pytest.fixture
async def good() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def bad() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    fake.fail(500)
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(
    stack_settings_factory: Any, good: FakeOpenAI, bad: FakeOpenAI
) -> AsyncIterator[Stack]:
    async with running_stack(stack_settings_factory(_catalog(good.url, bad.url))) as running:
        yield running


async def _balance(stack: Stack) -> tuple[Decimal, Decimal]:
    row = await stack.pool.fetchrow("SELECT balance_usd, reserved_usd FROM api_keys")
    assert row is not None
    return row["balance_usd"], row["reserved_usd"]


@pytest.mark.parametrize("api", PROTOCOLS)
async def test_a_model_the_balance_cannot_hold_is_passed_over(
    stack: Stack, good: FakeOpenAI, api: str
) -> None:
    key = await stack.create_key("0.10")
    async with stack.client(key) as c:
        answers = []
        for stream in (False, True):
            r = await call(c, api, stream, models=["dear", "mid", "cheap"])
            assert r.status_code == 200, r.text
            assert answered_model(api, r, stream) == "cheap"
            answers.append(r)
        # Only the model that could be held was called upstream.
        assert [b["model"] for b in good.requests] == ["UPSTREAM-CHEAP"] * 2
        generation = gen_id(answers[0])
        # No model can be held: a 402, in the protocol's own shape, naming the least any of
        # them needed ("mid": $0.50), and no upstream call.
        r = await call(c, api, models=["dear", "mid"])
        assert r.status_code == 402, r.text
        body = r.json()
        if api == "messages":
            assert body["type"] == "error"
            assert body["error"]["type"] == "billing_error"
        else:
            assert body["error"]["code"] == "insufficient_balance"
        assert "$0.50" in body["error"]["message"] and "$1.00" not in body["error"]["message"]
        assert len(good.requests) == 2
    await stack.wait_metered([generation])
    rows = await stack.state.clickhouse.query(
        "SELECT model FROM usage_events WHERE generation_id = {g:String}", {"g": generation}
    )
    assert [row["model"] for row in rows] == ["cheap"]
    assert_nothing_named()


async def test_a_held_model_that_failed_is_answered_when_the_rest_cannot_be_held(
    stack: Stack, good: FakeOpenAI, bad: FakeOpenAI
) -> None:
    key = await stack.create_key("0.10")
    async with stack.client(key) as c:
        # "broken" is held and its upstream fails; "dear" cannot be held: the client learns
        # of the failure (502), not of a balance it did not need for "broken".
        r = await call(c, "chat", models=["broken", "dear"])
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"
    assert bad.chat_requests == 1 and good.chat_requests == 0
    # Its failure is recorded once (the meter writes ClickHouse after the ledger), costs
    # nothing, and its hold is gone.

    async def stored() -> int:
        rows = await stack.state.clickhouse.query("SELECT count() AS n FROM usage_events", {})
        return int(rows[0]["n"])

    await stack.wait_until(stored, 1)
    assert await stack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'") == 1
    rows = await stack.state.clickhouse.query(
        "SELECT model, outcome, status, cost_usd FROM usage_events", {}
    )
    assert [(row["model"], row["outcome"], row["status"]) for row in rows] == [
        ("broken", "upstream_error", 502)
    ]
    assert Decimal(str(rows[0]["cost_usd"])) == 0
    assert await _balance(stack) == (Decimal("0.10"), Decimal("0"))
    assert_nothing_named()


async def test_one_client_request_counts_once_toward_the_keys_limits(
    stack: Stack, good: FakeOpenAI, bad: FakeOpenAI
) -> None:
    """Decision (router/holding.py, `hold`): of a request's holds, only the first one taken
    counts toward rpm and is checked against rpm and tpm, here and in Postgres; a fallback
    model's hold is neither counted nor refused for them. tpm counts the tokens of the one
    answer billed (a failed model used none)."""
    key = await stack.create_key("5.00")
    await stack.pool.execute("UPDATE api_keys SET rpm_limit = 2")
    key_id = await stack.pool.fetchval("SELECT id FROM api_keys")
    async with stack.client(key) as c:
        ids = []
        for _ in range(2):
            # Held for "broken", which fails; then held again for "cheap", which answers.
            r = await call(c, "chat", models=["broken", "cheap"])
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "cheap"
            ids.append(gen_id(r))
        assert bad.chat_requests == 2 and good.chat_requests == 2
        # Four holds, two requests: Postgres's window and this router's counted two.
        requests = await stack.pool.fetchval(
            "SELECT sum(requests) FROM key_rate_windows WHERE key_id = $1", key_id
        )
        assert requests == 2
        # ... so the third request is the one over rpm = 2, and no upstream sees it.
        r = await call(c, "chat", models=["broken", "cheap"])
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert bad.chat_requests == 2 and good.chat_requests == 2
    await stack.wait_metered(ids)
    used = 0
    for generation in ids:
        row = await stack.state.clickhouse.query(
            "SELECT input_tokens, output_tokens FROM usage_events WHERE generation_id = {g:String}",
            {"g": generation},
        )
        used += int(row[0]["input_tokens"]) + int(row[0]["output_tokens"])
    assert used > 0
    # tpm: this router's window holds the tokens of the two answers billed, no more.
    assert stack.state.key_limits._token_sums[key_id] == used
    assert_nothing_named()


async def test_a_model_a_sub_key_may_not_use_is_passed_over(stack: Stack, good: FakeOpenAI) -> None:
    parent = await stack.create_key("0.10")
    async with stack.client(parent) as c:
        r = await c.post("/v1/keys", json={"allowed_models": ["mid", "dear", "cheap"][1:]})
        assert r.status_code == 201, r.text
        child = r.json()["key"]
    async with stack.client(child) as c:
        # "mid" is not allowed: passed over for "cheap", which is; nothing counted for it.
        r = await call(c, "chat", models=["mid", "cheap"])
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "cheap"
        assert [b["model"] for b in good.requests] == ["UPSTREAM-CHEAP"]
        # None allowed: the 403, in each protocol's shape, and no upstream call.
        r = await call(c, "chat", models=["mid", "broken"])
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "model_not_allowed"
        assert r.json()["error"]["param"] == "model"
        m = await call(c, "messages", models=["mid"])
        assert m.status_code == 403, m.text
        assert m.json()["error"]["type"] == "permission_error"
        # Allowed but unaffordable ("dear") beside not allowed ("mid"): the 402 says more.
        r = await call(c, "chat", models=["mid", "dear"])
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "insufficient_balance"
        assert len(good.requests) == 1
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") <= 1  # the answer's
    assert_nothing_named()
