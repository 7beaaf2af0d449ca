"""A newcomer's walk through the README on what `scripts/dev` serves with no models file (the
demo catalog): the examples, as the README writes them, give what it shows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from tests.harness import Stack, running_stack

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _bodies(section: str) -> list[dict[str, object]]:
    """The JSON bodies of the section's curl examples (`-d '{...}'`), in order."""
    return [orjson.loads(b) for b in re.findall(r"-d '(\{.*?\})'", section, re.DOTALL)]


@pytest.fixture
async def demo(stack_settings_factory: Callable[..., object]) -> AsyncIterator[Stack]:
    async with running_stack(stack_settings_factory(None)) as running:  # type: ignore[arg-type]
        yield running


async def test_try_it_costs_what_the_readme_shows(demo: Stack) -> None:
    """Try it: a 5.00 key, the chat request as written, then GET /v1/key shows the balance
    and spend of the README's comment (it showed 0.000054; the demo's answer costs 0.000053)."""
    section = _section("Try it")
    shown = re.search(r'# \{"balance_usd":"([0-9.]+)".*"spent_usd":"([0-9.]+)"', section)
    assert shown, "README's Try it lost its GET /v1/key output"
    (body,) = _bodies(section)
    key = await demo.create_key("5.00")
    async with demo.client(key) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        await demo.wait_metered([r.json()["id"]])
        account = (await c.get("/v1/key")).json()
    assert (account["balance_usd"], account["spent_usd"]) == shown.groups()
    assert Decimal(shown[1]) + Decimal(shown[2]) == Decimal("5.00")


async def test_generation_takes_the_id_each_protocol_answers_with(demo: Stack) -> None:
    """`GET /v1/generation/{id}` with "the `id` of a response": the Messages API answers
    `msg_gen-...` and the Responses API `resp_gen-...`; each id, as answered, finds its
    generation (they got 404, found only without the prefix)."""
    key = await demo.create_key("1.00")
    async with demo.client(key) as c:
        chat = await c.post("/v1/chat/completions", json={
            "model": "apifast-demo", "messages": [{"role": "user", "content": "Hello"}]})  # fmt: skip
        message = await c.post("/v1/messages", json={
            "model": "apifast-demo", "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hello"}]})  # fmt: skip
        response = await c.post("/v1/responses", json={"model": "apifast-demo", "input": "Hi"})
        answered = [chat.json()["id"], message.json()["id"], response.json()["id"]]
        assert [i.split("gen-")[0] for i in answered] == ["", "msg_", "resp_"], answered
        stored = ["gen-" + i.split("gen-", 1)[1] for i in answered]
        await demo.wait_metered(stored)
        apis = ["chat", "messages", "responses"]
        for answered_id, generation_id, api in zip(answered, stored, apis, strict=True):
            r = await c.get(f"/v1/generation/{answered_id}")
            assert r.status_code == 200, r.text
            assert r.json()["id"] == generation_id and r.json()["cost_usd"] != "0.00"
            assert r.json()["api"] == api and r.json()["endpoint"] == "chat"
        listed = (await c.get("/v1/generations?limit=10")).json()["data"]
        assert sorted(g["api"] for g in listed) == apis
        missing = await c.get("/v1/generation/msg_gen-000000000000000000000000")
        assert missing.status_code == 404
        assert "msg_gen-000000000000000000000000" in missing.json()["error"]["message"]


async def test_the_sub_key_example_works_on_the_demo_catalog(demo: Stack) -> None:
    """Sub-keys: the README's body, sent as written, makes a sub-key (its `allowed_models`
    named `fast-chat`, which the demo catalog has not: a 400), and the sub-key can call it."""
    create, disable = _bodies(_section("Sub-keys"))
    key = await demo.create_key("5.00")
    async with demo.client(key) as c:
        made = await c.post("/v1/keys", json=create)
        assert made.status_code == 201, made.text
        sub = made.json()
        allowed = create["allowed_models"]
        assert isinstance(allowed, list)
        async with demo.client(sub["key"]) as s:
            r = await s.post("/v1/chat/completions", json={
                "model": allowed[0], "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
            assert r.status_code == 200, r.text
        off = await c.patch(f"/v1/keys/{sub['id']}", json=disable)
        assert off.status_code == 200 and off.json()["disabled"] is True


async def test_buying_and_alerts_on_a_server_with_no_processor_and_no_mail(demo: Stack) -> None:
    """Buying credit and Low-balance alerts, on a plain `apifast dev` (no processor, no SMTP):
    the README's order and alert bodies get the answers it says they get there."""
    order = _bodies(_section("Buying credit"))[0]
    (alert,) = _bodies(_section("Low-balance alerts"))
    key = await demo.create_key("1.00")
    async with demo.client() as anonymous, demo.client(key) as c:
        options = (await anonymous.get("/v1/payments/options")).json()
        assert options["processors"] == []
        refused = await anonymous.post("/v1/orders", json=order)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_value", "processor")
        assert "no payment processor is configured on this server" in error["message"]
        no_mail = await c.post("/v1/key/alerts", json=alert)
        assert no_mail.status_code == 400 and no_mail.json()["error"]["code"] == "email_unavailable"
        # docs/buying.md: recovery answers its 202 all the same (it said 503), mailing nothing.
        assert options["email_recovery"] is False
        recover = await anonymous.post("/v1/recover", json={"email": order["email"]})
        assert recover.status_code == 202 and recover.json()["status"] == "accepted"


async def test_messages_without_a_key_names_the_anthropic_header(demo: Stack) -> None:
    """The API table: `/v1/messages` takes `x-api-key` or `Authorization: Bearer`. Sent
    neither, it told an Anthropic client only of the Bearer header; now of its own first."""
    body = {
        "model": "apifast-demo",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    async with demo.client() as c:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = await c.post(path, json=body)
            assert r.status_code == 401, r.text
            error = r.json()
            assert error["type"] == "error" and error["error"]["type"] == "authentication_error"
            assert "x-api-key: af-..." in error["error"]["message"], error
        chat = await c.post("/v1/chat/completions", json=body)
        assert "Authorization: Bearer af-..." in chat.json()["error"]["message"]


async def test_count_tokens_refuses_a_disabled_key_as_messages_does(demo: Stack) -> None:
    """README: a disabled sub-key gets 401, and a rotated-away key is disabled (401 from then
    on). `/v1/messages/count_tokens` answered those 403 `permission_error`, where
    `/v1/messages` itself answers 401 `authentication_error`: now the same."""
    count = {"model": "apifast-demo", "messages": [{"role": "user", "content": "Hi"}]}
    message = {**count, "max_tokens": 16}
    key = await demo.create_key("1.00")
    async with demo.client(key) as c:
        sub = (await c.post("/v1/keys", json={"label": "x"})).json()
        assert (await c.patch(f"/v1/keys/{sub['id']}", json={"disabled": True})).status_code == 200
        assert (await c.post("/v1/key/rotate")).status_code == 201
    for disabled in (sub["key"], key):
        async with demo.client() as c:
            headers = {"x-api-key": disabled}
            counted = await c.post("/v1/messages/count_tokens", json=count, headers=headers)
            sent = await c.post("/v1/messages", json=message, headers=headers)
        for r in (counted, sent):
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error"
