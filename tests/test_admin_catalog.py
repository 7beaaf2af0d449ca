"""Models and providers managed in /admin: stored in Postgres over the TOML catalog, live on
every router without a restart, prices applied from the next request, credentials encrypted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai
import orjson

from tests.admin_support import AdminClient, GuardedFakeOpenAI, admin, admin_stack, model_form
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, running_stack

__all__ = ["admin", "admin_stack"]


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


async def priced_cost(stack: Stack, key: str) -> tuple[Decimal, Any]:
    raw = await sdk(stack, key).chat.completions.with_raw_response.create(
        model="fast-chat", messages=[{"role": "user", "content": "price check"}]
    )
    body = raw.http_response.json(parse_float=Decimal)
    return body["usage"]["cost"], body["usage"]


def expected(usage: dict[str, Any], inp: str, out: str) -> Decimal:
    return (usage["prompt_tokens"] * Decimal(inp) + usage["completion_tokens"] * Decimal(out)) / (
        Decimal(1_000_000)
    )


async def test_price_edit_applies_to_the_next_request(admin: AdminClient):
    stack = admin.stack
    key = await stack.create_key("5.00")
    cost, usage = await priced_cost(stack, key)
    assert cost == expected(usage, "0.50", "1.50")
    r = await admin.post("/admin/models/save", model_form(input_usd_per_mtok="3.25",
                                                          output_usd_per_mtok="7.5"))  # fmt: skip
    assert r.status_code == 303
    cost, usage = await priced_cost(stack, key)
    assert cost == expected(usage, "3.25", "7.5")
    async with stack.client() as c:
        listed = (await c.get("/v1/models/fast-chat")).json()
    assert listed["pricing"]["input_usd_per_mtok"] == "3.25"
    page = await admin.get("/admin/models")
    assert "TOML, overridden" in page.text and "3.25" in page.text
    # Revert: the TOML price is back.
    assert (await admin.post("/admin/models/revert", {"id": "fast-chat"})).status_code == 303
    cost, usage = await priced_cost(stack, key)
    assert cost == expected(usage, "0.50", "1.50")


async def test_a_change_reaches_another_running_router(
    admin: AdminClient, stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
):
    first = admin.stack
    settings = first.settings.model_copy(
        update={"port": stack_settings_factory(None).port, "catalog_poll_s": 30.0}
    )
    # A second router on the same database; its poll is slow, so NOTIFY must do the work.
    async with running_stack(settings, run_meter=False) as second:
        r = await admin.post("/admin/models/save", model_form(input_usd_per_mtok="4.00"))
        assert r.status_code == 303
        async with second.client() as c:
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                price = (await c.get("/v1/models/fast-chat")).json()["pricing"]
                if price["input_usd_per_mtok"] == "4.00":
                    break
                assert asyncio.get_running_loop().time() < deadline, "change never arrived"
                await asyncio.sleep(0.05)


async def test_create_disable_enable_model(admin: AdminClient):
    stack = admin.stack
    key = await stack.create_key("1.00")
    form = model_form("new-chat", is_new="1", description="Added in the panel",
                      routes="local upstream-model-b 0.1 0.2")  # fmt: skip
    assert (await admin.post("/admin/models/save", form)).status_code == 303
    dup = await admin.post("/admin/models/save", form)
    assert dup.status_code == 409
    resp = await sdk(stack, key).chat.completions.create(
        model="new-chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.model == "new-chat"
    model = stack.state.catalog.models["new-chat"]
    assert model.routes[0].model == "upstream-model-b"
    assert model.routes[0].cost.input_usd_per_mtok == Decimal("0.1")
    assert (await admin.post("/admin/models/disable", {"id": "new-chat"})).status_code == 303
    async with stack.client(key) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "new-chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 404
    assert (await admin.post("/admin/models/enable", {"id": "new-chat"})).status_code == 303
    assert "new-chat" in stack.state.catalog.models
    # A TOML model can be disabled too; reverting brings it back.
    await admin.post("/admin/models/disable", {"id": "embed-small"})
    assert "embed-small" not in stack.state.catalog.models
    await admin.post("/admin/models/revert", {"id": "embed-small"})
    assert "embed-small" in stack.state.catalog.models


async def test_invalid_model_forms_name_the_problem(admin: AdminClient):
    cases = [
        ({"input_usd_per_mtok": "0.1234567"}, "more than 6 decimal places"),
        ({"input_usd_per_mtok": "-1"}, "must not be negative"),
        ({"input_usd_per_mtok": "1e400x"}, "decimal string"),
        ({"routes": "nowhere some-model"}, "unknown provider"),
        ({"routes": "local"}, "routes, line 1"),
        ({"routes": ""}, "at least one route"),
        ({"max_output_tokens": "-5"}, "max_output_tokens"),
        ({"id": "bad id!", "is_new": "1"}, "id:"),
    ]
    for change, message in cases:
        r = await admin.post("/admin/models/save", model_form(**change))
        assert r.status_code == 400, change
        assert message in r.text, (change, r.text[:2000])
    assert str(admin.stack.state.catalog.models["fast-chat"].price.input_usd_per_mtok) == "0.50"


async def test_provider_credentials_are_encrypted_and_masked(
    admin: AdminClient, fake_openai: FakeOpenAI
):
    stack = admin.stack
    secret = "sk-live-upstream-credential-9876"
    guarded = await GuardedFakeOpenAI(api_key=secret).start()
    try:
        form = {"name": "guarded", "type": "openai", "base_url": guarded.url, "api_key": secret,
                "api_key_env": "", "timeout_s": "30", "connect_timeout_s": "5", "is_new": "1"}  # fmt: skip
        r = await admin.post("/admin/providers/save", form)
        assert r.status_code == 303, r.text
        row = await stack.pool.fetchrow("SELECT * FROM db_providers WHERE name = 'guarded'")
        assert secret.encode() not in bytes(row["api_key_ciphertext"])
        assert secret not in str(dict(row))
        assert row["api_key_kid"]
        page = await admin.get("/admin/providers")
        assert secret not in page.text and "••••9876" in page.text
        edit = await admin.get("/admin/providers/edit?name=guarded")
        assert secret not in edit.text
        tested = await admin.post("/admin/providers/test", {"name": "guarded"})
        assert "connected in" in tested.text
        # Route a model to it: the upstream sees the decrypted key.
        form = model_form("guarded-chat", is_new="1", routes="guarded upstream-model-c")
        assert (await admin.post("/admin/providers/save", {**form})).status_code == 400
        assert (await admin.post("/admin/models/save", form)).status_code == 303
        key = await stack.create_key("1.00")
        resp = await sdk(stack, key).chat.completions.create(
            model="guarded-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert resp.model == "guarded-chat"
        assert guarded.headers[-1]["Authorization"] == f"Bearer {secret}"
        # Saving again with a blank key keeps it; a wrong key fails the connection test.
        form = {"name": "guarded", "type": "openai", "base_url": guarded.url, "api_key": "",
                "api_key_env": "", "timeout_s": "30", "connect_timeout_s": "5", "is_new": "0"}  # fmt: skip
        assert (await admin.post("/admin/providers/save", form)).status_code == 303
        assert (
            "connected in" in (await admin.post("/admin/providers/test", {"name": "guarded"})).text
        )
        form["api_key"] = "sk-wrong-credential-000000000"
        await admin.post("/admin/providers/save", form)
        failed = await admin.post("/admin/providers/test", {"name": "guarded"})
        assert "failed: HTTP 401" in failed.text
        # In use: it cannot be deleted until its models move.
        r = await admin.post("/admin/providers/delete", {"name": "guarded"})
        assert r.status_code == 409
        audit = str(await stack.pool.fetch("SELECT * FROM admin_audit"))
        assert secret not in audit and "sk-wrong-credential" not in audit
    finally:
        await guarded.stop()


async def test_overriding_a_toml_provider(admin: AdminClient, fake_openai: FakeOpenAI):
    stack = admin.stack
    other = await FakeOpenAI().start()
    try:
        form = {"name": "local", "type": "openai", "base_url": other.url, "api_key": "",
                "api_key_env": "", "timeout_s": "30", "connect_timeout_s": "5", "is_new": "0"}  # fmt: skip
        assert (await admin.post("/admin/providers/save", form)).status_code == 303
        key = await stack.create_key("1.00")
        before = len(fake_openai.requests)
        await sdk(stack, key).chat.completions.create(
            model="fast-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert len(other.requests) == 1 and len(fake_openai.requests) == before
        assert (await admin.post("/admin/providers/delete", {"name": "local"})).status_code == 303
        await sdk(stack, key).chat.completions.create(
            model="fast-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert len(fake_openai.requests) == before + 1
    finally:
        await other.stop()


async def test_polling_catches_a_missed_notification(admin: AdminClient):
    stack = admin.stack
    sync = stack.app.state.admin.catalog_sync
    await sync._listener.close()  # as if the LISTEN connection had dropped
    spec = (
        '{"type": "chat", "input_usd_per_mtok": "1", "output_usd_per_mtok": "2", '
        '"routes": [{"provider": "local", "model": "m"}]}'
    )
    await stack.pool.execute(
        "INSERT INTO db_models (id, spec, enabled) VALUES ('polled', $1::jsonb, true)", spec
    )
    deadline = asyncio.get_running_loop().time() + 20
    while "polled" not in stack.state.catalog.models:
        assert asyncio.get_running_loop().time() < deadline, "the poll never picked it up"
        await asyncio.sleep(0.05)
    # ... and it listens again.
    while sync._listener is None or sync._listener.is_closed():
        assert asyncio.get_running_loop().time() < deadline, "never reconnected"
        await asyncio.sleep(0.05)


async def test_a_broken_stored_model_is_not_served(admin: AdminClient):
    stack = admin.stack
    spec = (
        '{"type": "chat", "input_usd_per_mtok": "1", "output_usd_per_mtok": "2", '
        '"routes": [{"provider": "gone", "model": "m"}]}'
    )
    await stack.pool.execute(
        "INSERT INTO db_models (id, spec, enabled) VALUES ('fast-chat', $1::jsonb, true)", spec
    )
    await stack.app.state.admin.catalog_sync.refresh()
    # Not served at a stale price: not served at all, and the panel says why.
    assert "fast-chat" not in stack.state.catalog.models
    page = await admin.get("/admin/models")
    assert "unknown provider &#39;gone&#39;" in page.text
    assert "embed-small" in stack.state.catalog.models


async def test_native_responses_is_a_provider_form_checkbox(
    admin: AdminClient, fake_openai: FakeOpenAI
):
    """Ticking native_responses on a provider makes /v1/responses on its routes pass through
    to the upstream's /v1/responses; unticking it translates again."""
    stack = admin.stack
    form = {"name": "local", "type": "openai", "base_url": fake_openai.url, "api_key": "",
            "api_key_env": "", "timeout_s": "30", "connect_timeout_s": "5", "is_new": "0",
            "native_responses": "on"}  # fmt: skip
    assert (await admin.post("/admin/providers/save", form)).status_code == 303
    row = await stack.pool.fetchrow("SELECT options FROM db_providers WHERE name = 'local'")
    assert orjson.loads(row["options"])["native_responses"] is True
    edit = await admin.get("/admin/providers/edit?name=local")
    assert 'name="native_responses" checked' in edit.text
    key = await stack.create_key("1.00")
    await sdk(stack, key).responses.create(model="fast-chat", input="hi")
    assert len(fake_openai.responses_requests) == 1 and fake_openai.chat_requests == 0
    del form["native_responses"]
    assert (await admin.post("/admin/providers/save", form)).status_code == 303
    assert (
        'name="native_responses" checked'
        not in (await admin.get("/admin/providers/edit?name=local")).text
    )
    await sdk(stack, key).responses.create(model="fast-chat", input="hi")
    assert len(fake_openai.responses_requests) == 1 and fake_openai.chat_requests == 1
