"""End to end through the official openai SDK: real router, NATS, meter, Postgres, chdb."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


async def balance(stack: Stack, key: str) -> dict:
    async with stack.client(key) as c:
        r = await c.get("/v1/key")
        assert r.status_code == 200, r.text
        return r.json()


async def test_chat_is_priced_metered_and_debited_exactly(stack: Stack, fake_openai: FakeOpenAI):
    key = await stack.create_key("5.00")
    client = sdk(stack, key)
    resp = await client.chat.completions.create(
        model="fast-chat", messages=[{"role": "user", "content": "Say hello please"}]
    )
    assert resp.model == "fast-chat"
    assert resp.id.startswith("gen-")
    assert resp.choices[0].message.content == "Hello from the fake upstream model"
    assert resp.system_fingerprint is None
    usage = resp.usage
    assert usage is not None
    expected = (
        Decimal(usage.prompt_tokens) * Decimal("0.50")
        + Decimal(usage.completion_tokens) * Decimal("1.50")
    ) / Decimal(1_000_000)
    raw = await client.chat.completions.with_raw_response.create(
        model="fast-chat", messages=[{"role": "user", "content": "Say hello please"}]
    )
    body = raw.http_response.json(parse_float=Decimal)
    assert body["usage"]["cost"] == expected
    assert "x-request-id" not in raw.headers and "openai-organization" not in raw.headers
    second = raw.parse()
    await stack.wait_metered([resp.id, second.id])
    info = await balance(stack, key)
    assert Decimal(info["balance_usd"]) == Decimal("5.00") - 2 * expected
    assert Decimal(info["spent_usd"]) == 2 * expected
    assert info["reserved_usd"] == "0.00"
    # The upstream saw its own model name and no caller-identifying fields.
    sent = fake_openai.requests[-1]
    assert sent["model"] == "upstream-model-a" and "user" not in sent
    headers = {k.lower() for k in fake_openai.headers[-1]}
    assert not headers & {"x-forwarded-for", "user-agent", "cookie", "x-real-ip", "forwarded"}

    async with stack.client(key) as c:
        gen = (await c.get(f"/v1/generation/{resp.id}")).json()
        assert gen["model"] == "fast-chat" and Decimal(gen["cost_usd"]) == expected
        assert gen["input_tokens"] == usage.prompt_tokens
        used = (await c.get("/v1/usage")).json()
        assert used["total_requests"] == 2
        assert Decimal(used["total_cost_usd"]) == 2 * expected
        other = await stack.create_key("1.00")
        r = await c.get(f"/v1/generation/{resp.id}", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404


async def test_stream_reports_usage_and_debits(stack: Stack):
    key = await stack.create_key("1.00")
    client = sdk(stack, key)
    stream = await client.chat.completions.create(
        model="fast-chat",
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, ids = "", None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        assert chunk.model == "fast-chat"
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from the fake upstream model"
    assert usage is not None and usage.completion_tokens == 6
    (gen_id,) = ids
    await stack.wait_metered([gen_id])
    info = await balance(stack, key)
    cost = Decimal(str(usage.model_extra["cost"])) if usage.model_extra else None
    assert cost is not None
    assert (
        Decimal(info["spent_usd"])
        == (Decimal(usage.prompt_tokens) * Decimal("0.5") + Decimal(6) * Decimal("1.5")) / 1_000_000
    )


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"model": "fast-chat"}', 400, "messages"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (
            b'{"model": "fast-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            400,
            "max_tokens",
        ),
    ],
)
async def test_bad_requests_get_openai_errors(stack: Stack, payload: bytes, status: int, param):
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        r = await c.post(
            "/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"}
        )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["param"] == param


async def test_auth_and_balance_errors(stack: Stack):
    async with stack.client() as c:
        body = {"model": "fast-chat", "messages": [{"role": "user", "content": "hi"}]}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 401
        r = await c.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer af-typo"}
        )
        assert r.status_code == 401
        empty = await stack.create_key("0")
        r = await c.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {empty}"}
        )
        assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"


async def test_upstream_errors_are_hidden(stack: Stack):
    key = await stack.create_key("1.00")
    client = sdk(stack, key)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            model="fast-chat", messages=[{"role": "user", "content": "[[error:500]]"}]
        )
    assert info.value.status_code == 502
    assert "UPSTREAM" not in info.value.response.text
    assert "x-request-id" not in info.value.response.headers


async def test_models_list_has_pricing(stack: Stack):
    async with stack.client() as c:
        data = (await c.get("/v1/models")).json()["data"]
        fast = next(m for m in data if m["id"] == "fast-chat")
        assert fast["pricing"]["input_usd_per_mtok"] == "0.50"
        assert "upstream-model-a" not in str(data)
        assert (await c.get("/v1/models/fast-chat")).json()["id"] == "fast-chat"
        assert (await c.get("/v1/models/nope")).status_code == 404
        assert (await c.get("/healthz")).status_code == 200


async def test_embeddings(stack: Stack):
    key = await stack.create_key("1.00")
    client = sdk(stack, key)
    resp = await client.embeddings.create(model="embed-small", input=["hello world"])
    assert resp.model == "embed-small" and len(resp.data) == 1
