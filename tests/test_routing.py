"""Routes, fallback and failures through the real router: fallback before the first byte
only, timeouts, broken streams, Anthropic behind the OpenAI wire format, lowered max_tokens."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from tests.fakes.anthropic_upstream import API_KEY as ANTHROPIC_KEY
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import running_stack


def two_route_models(primary: str, backup: str, timeout_s: int = 300) -> str:
    return f"""
        [providers.primary]
        type = "openai"
        base_url = "{primary}"
        timeout_s = {timeout_s}

        [providers.backup]
        type = "openai"
        base_url = "{backup}"

        [[models]]
        id = "chat"
        input_usd_per_mtok = "1.00"
        output_usd_per_mtok = "2.00"
        routes = [ {{ provider = "primary", model = "m-primary" }},
                   {{ provider = "backup", model = "m-backup" }} ]
    """


@pytest.fixture
async def backup_openai():
    fake = await FakeOpenAI().start()
    yield fake
    await fake.stop()


def sdk(stack, key):
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


@pytest.mark.parametrize("behaviour", ["error:500", "error:429", "error:503"])
async def test_falls_back_on_retryable_errors(
    stack_settings_factory, fake_openai, backup_openai, behaviour
):
    fake_openai.behaviour = behaviour
    async with running_stack(
        stack_settings_factory(two_route_models(fake_openai.url, backup_openai.url))
    ) as stack:
        key = await stack.create_key("1.00")
        resp = await sdk(stack, key).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert resp.model == "chat"
        assert backup_openai.requests[-1]["model"] == "m-backup"
        stream = await sdk(stack, key).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("Hello")


async def test_no_fallback_on_client_error(stack_settings_factory, fake_openai, backup_openai):
    fake_openai.behaviour = "error:400"
    async with running_stack(
        stack_settings_factory(two_route_models(fake_openai.url, backup_openai.url))
    ) as stack:
        key = await stack.create_key("1.00")
        with pytest.raises(openai.BadRequestError) as info:
            await sdk(stack, key).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert "UPSTREAM" not in info.value.response.text
        assert backup_openai.requests == []


async def test_all_routes_fail_gives_502_then_nothing_is_charged(
    stack_settings_factory, fake_openai, backup_openai
):
    fake_openai.behaviour = backup_openai.behaviour = "error:500"
    async with running_stack(
        stack_settings_factory(two_route_models(fake_openai.url, backup_openai.url))
    ) as stack:
        key = await stack.create_key("1.00")
        with pytest.raises(openai.APIStatusError) as info:
            await sdk(stack, key).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.status_code == 502
        await stack.wait_until(
            lambda: stack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'"), 1
        )
        row = await stack.pool.fetchrow("SELECT balance_usd, reserved_usd FROM api_keys")
        assert row["balance_usd"] == Decimal("1.00") and row["reserved_usd"] == 0


async def test_timeout_gives_504(stack_settings_factory, fake_openai):
    fake_openai.behaviour = "slow:3"
    models = two_route_models(fake_openai.url, fake_openai.url, timeout_s=1).replace(
        '{ provider = "backup", model = "m-backup" }', '{ provider = "primary", model = "m2" }'
    )
    async with running_stack(stack_settings_factory(models)) as stack:
        key = await stack.create_key("1.00")
        with pytest.raises(openai.APIStatusError) as info:
            await sdk(stack, key).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.status_code == 504


async def test_broken_stream_after_first_byte_ends_with_error_event(
    stack_settings_factory, fake_openai, backup_openai
):
    fake_openai.behaviour = "broken"
    async with running_stack(
        stack_settings_factory(two_route_models(fake_openai.url, backup_openai.url))
    ) as stack:
        key = await stack.create_key("1.00")
        async with (
            stack.client(key) as c,
            c.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "chat",
                    "stream": True,
                    "messages": [{"role": "user", "content": "x"}],
                },
            ) as r,
        ):
            body = (await r.aread()).decode()
        assert r.status_code == 200
        assert '"error"' in body and body.rstrip().endswith("data: [DONE]")
        assert "Hello" in body  # what was delivered before the break
        assert backup_openai.requests == []  # no fallback after bytes went out
        await stack.wait_until(
            lambda: stack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'"), 1
        )
        spent = await stack.pool.fetchval("SELECT spent_usd FROM api_keys")
        assert spent > 0  # the delivered part is billed, by the documented estimate


async def test_anthropic_behind_openai_wire_format(stack_settings_factory, monkeypatch):
    async with FakeAnthropic() as fake:
        models = f"""
            [providers.claude]
            type = "anthropic"
            base_url = "{fake.url}"
            api_key_env = "TEST_ANTHROPIC_KEY"

            [[models]]
            id = "smart"
            input_usd_per_mtok = "3.00"
            output_usd_per_mtok = "15.00"
            cached_input_usd_per_mtok = "0.30"
            cache_write_usd_per_mtok = "3.75"
            routes = [ {{ provider = "claude", model = "claude-sonnet-4-5-20250929" }} ]
        """
        monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
        settings = stack_settings_factory(models)
        fake.behaviour = "cache"
        async with running_stack(settings) as stack:
            key = await stack.create_key("1.00")
            client = sdk(stack, key)
            resp = await client.chat.completions.create(
                model="smart",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                ],
            )
            assert resp.model == "smart" and resp.choices[0].message.content
            assert fake.last_request.body["system"]
            u = resp.usage
            assert u.prompt_tokens_details.cached_tokens == fake.cache_read_tokens
            stream = await client.chat.completions.create(
                model="smart",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            assert (
                chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == u.prompt_tokens
            )
            await stack.wait_metered([resp.id, chunks[-1].id])


async def test_low_balance_lowers_max_tokens(stack):
    # 0.00002 USD covers the input bound and only a few output tokens at $1.50/Mtok.
    key = await stack.create_key("0.0002")
    async with stack.client(key) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": "fast-chat",
                "max_tokens": 100000,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert r.status_code == 200, r.text
    lowered = int(r.headers["x-apifast-max-tokens-lowered"])
    assert 0 < lowered < 100000


async def test_body_too_large(stack):
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        big = "x" * (stack.settings.max_body_bytes + 10)
        r = await c.post(
            "/v1/chat/completions",
            content=big.encode(),
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


async def test_unknown_endpoint_in_openai_shape(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as c:
        r = await c.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
