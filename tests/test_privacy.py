"""A canary in the prompt must appear nowhere ApiFast keeps or writes anything: Postgres,
ClickHouse, the JetStream stream, or log lines."""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import nats
import openai
import orjson
import pytest

from apifast.keys import hash_key
from apifast.orders.email_keys import email_hash, key_aad
from tests.fakes.mailbox import Mailbox
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack
from tests.test_responses_native import NATIVE

CANARY = "CANARY-7f3a9c-do-not-store"


async def postgres_tables(stack: Stack) -> dict[str, str]:
    """Every Postgres table's rows as text, by table."""
    async with stack.pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT quote_ident(table_name) AS t FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        found = {}
        for row in tables:
            rows = await conn.fetch(f"SELECT x::text AS v FROM {row['t']} x")
            found[row["t"]] = "\n".join(r["v"] for r in rows)
    return found


async def postgres_text(stack: Stack) -> str:
    return "\n".join((await postgres_tables(stack)).values())


async def clickhouse_text(stack: Stack) -> str:
    store = stack.state.clickhouse
    tables = await store.query("SELECT name FROM system.tables WHERE database = {db:String}",
                               {"db": store.database})  # fmt: skip
    parts = []
    for t in tables:
        # formatRow renders every column type as text, aggregate states included.
        rows = await store.query(
            f"SELECT formatRowNoNewline('TSV', *) AS row FROM {store.database}.`{t['name']}`", {}
        )
        parts.extend(r["row"] for r in rows)
    return "\n".join(parts)


async def stream_text(stack: Stack) -> str:
    nc = await nats.connect(stack.settings.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stack.settings.nats_stream)
        parts = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stack.settings.nats_stream, seq)
            parts.append((msg.data or b"").decode() + repr(msg.headers))
        return "\n".join(parts)
    finally:
        await nc.close()


@pytest.fixture
async def canary_stack(stack_settings_factory: Any, fake_openai: FakeOpenAI) -> Any:
    """The usual stack, plus a route that speaks the Responses API natively."""
    settings = stack_settings_factory(
        models_toml(fake_openai.url, NATIVE.format(url=fake_openai.url))
    )
    async with running_stack(settings) as running:
        yield running


async def test_canary_is_never_kept(
    canary_stack: Stack, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, capfd
):
    stack = canary_stack
    caplog.set_level(logging.DEBUG)
    # The anthropic SDK (the client, not ApiFast) logs request options at DEBUG.
    caplog.set_level(logging.INFO, logger="anthropic")
    key = await stack.create_key("2.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)
    messages = [
        {"role": "system", "content": f"You are {CANARY}."},
        {"role": "user", "content": f"Repeat {CANARY} please"},
    ]
    ids = []
    resp = await client.chat.completions.create(model="fast-chat", messages=messages, user=CANARY)
    ids.append(resp.id)
    stream = await client.chat.completions.create(
        model="fast-chat", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        ids.append(chunk.id)
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(
            model="fast-chat",
            messages=[{"role": "user", "content": f"{CANARY} [[error:500]]"}],
        )
    # The Messages API too, streaming and not, with the caller's id in metadata.
    claude = anthropic.AsyncAnthropic(api_key=key, base_url=stack.base_url, max_retries=0)
    message = await claude.messages.create(
        model="fast-chat", max_tokens=50, system=f"You are {CANARY}.",
        messages=[{"role": "user", "content": f"Repeat {CANARY} please"}],
        metadata={"user_id": CANARY},
    )  # fmt: skip
    ids.append(message.id.removeprefix("msg_"))
    async with claude.messages.stream(
        model="fast-chat", max_tokens=50, messages=[{"role": "user", "content": CANARY}]
    ) as streamed:
        ids.append((await streamed.get_final_message()).id.removeprefix("msg_"))
    # The Responses API too, streaming and not, with the caller's ids in user and metadata.
    response = await client.responses.create(
        model="fast-chat", instructions=f"You are {CANARY}.", input=f"Repeat {CANARY} please",
        user=CANARY, metadata={"who": CANARY}, store=True,
    )  # fmt: skip
    ids.append(response.id.removeprefix("resp_"))
    async with client.responses.stream(model="fast-chat", input=CANARY) as events:
        ids.append((await events.get_final_response()).id.removeprefix("resp_"))
    # And passed through to a route that speaks it natively, with every caller field.
    caller: Any = {"user": CANARY, "metadata": {"who": CANARY}, "safety_identifier": CANARY,
                   "prompt_cache_key": CANARY, "store": True}  # fmt: skip
    response = await client.responses.create(
        model="native-chat", instructions=f"You are {CANARY}.", input=f"Repeat {CANARY}",
        **caller,
    )  # fmt: skip
    ids.append(response.id.removeprefix("resp_"))
    async with client.responses.stream(
        model="native-chat", input=[{"role": "user", "content": CANARY}], **caller
    ) as events:
        ids.append((await events.get_final_response()).id.removeprefix("resp_"))
    # The error request's id is not returned; wait for the known ones, then for all of them.
    await stack.wait_metered(list(set(ids)))
    await stack.wait_until(
        lambda: stack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind='usage'"), 9
    )

    assert any(CANARY in str(r) for r in fake_openai.requests), "canary never reached upstream"
    assert all("user" not in r for r in fake_openai.requests)
    assert len(fake_openai.responses_requests) == 2
    for sent in fake_openai.responses_requests:  # the caller's fields, on the native route
        assert CANARY in str(sent["input"])
        assert not {"metadata", "safety_identifier", "prompt_cache_key"} & set(sent)
    assert CANARY not in await postgres_text(stack)
    assert CANARY not in await clickhouse_text(stack)
    assert CANARY not in await stream_text(stack)
    assert CANARY not in caplog.text
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err


async def test_unhandled_errors_log_no_exception_text(
    stack: Stack, caplog: pytest.LogCaptureFixture, capfd
):
    async def boom() -> None:
        raise RuntimeError(f"failed while handling {CANARY}")

    stack.app.add_api_route("/v1/boom-for-test", boom)
    caplog.set_level(logging.DEBUG)
    async with stack.client() as c:
        r = await c.get("/v1/boom-for-test")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "api_error" and CANARY not in r.text
    assert "RuntimeError" in caplog.text and CANARY not in caplog.text
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err


LABEL = "LABEL-CANARY-51c2e8"
ADDRESS = "address-canary-93d1@example.com"


async def test_sub_key_labels_and_alert_addresses_stay_with_the_holders_data(
    stack_settings_factory: Any, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    """The new key-holder endpoints (sub-keys, alerts): the prompt is kept nowhere, a sub-key's
    label only in its api_keys row, an alert's address nowhere in the clear."""
    caplog.set_level(logging.DEBUG)
    box = Mailbox().start()
    settings = stack_settings_factory(
        models_toml(fake_openai.url), smtp_url=box.url, balance_alert_interval_s=3600.0
    )
    try:
        async with running_stack(settings) as stack:
            parent = await stack.create_key("2.00")
            parent_id = await stack.pool.fetchval(
                "SELECT id FROM api_keys WHERE key_hash = $1", hash_key(SECRET.encode(), parent)
            )
            # An email left with an order, as orders store it (hash and encrypted key copy).
            ring = stack.app.state.payments.keyring
            hashed = email_hash(SECRET.encode(), ADDRESS)
            sealed = ring.encrypt(parent.encode(), key_aad(parent_id, hashed))
            await stack.pool.execute(
                "INSERT INTO email_keys (key_id, email_hash, key_ciphertext, nonce, enc_key_id) "
                "VALUES ($1, $2, $3, $4, $5)", parent_id, hashed, sealed.ciphertext,
                sealed.nonce, sealed.kid,
            )  # fmt: skip
            async with stack.client(parent) as c:
                made = await c.post("/v1/keys", json={"label": LABEL, "spend_cap_usd": "1.00"})
                assert made.status_code == 201, made.text
                child_id = made.json()["id"]
                r = await c.patch(f"/v1/keys/{child_id}", json={"label": LABEL + "-2"})
                assert r.status_code == 200
                r = await c.post(
                    "/v1/key/alerts", json={"low_balance_usd": "1.99999", "email": ADDRESS}
                )
                assert r.status_code == 200, r.text
            client = openai.AsyncOpenAI(
                api_key=made.json()["key"], base_url=stack.base_url + "/v1", max_retries=0
            )
            resp = await client.chat.completions.create(
                model="fast-chat", messages=[{"role": "user", "content": f"Say {CANARY}"}],
                user=CANARY,
            )  # fmt: skip
            await stack.wait_metered([resp.id])
            async with stack.client(parent) as c:
                listed = (await c.get("/v1/keys")).json()["data"]
                assert listed[0]["label"] == LABEL + "-2"  # the holder sees it
                assert (await c.get("/v1/key/alerts")).status_code == 200
            async with stack.client(made.json()["key"]) as c:
                assert LABEL not in (await c.get("/v1/key")).text  # the child does not
            # The alert goes out (the balance fell below 1.99999) and tells only the balance.
            assert await stack.app.state.payments.alerts.sweep() == 1
            await stack.app.state.payments.drain()
            mails = box.to(ADDRESS)
            assert len(mails) == 1 and CANARY not in mails[0].body and LABEL not in mails[0].body

            tables = await postgres_tables(stack)
            everything = "\n".join(tables.values())
            assert CANARY not in everything
            assert {t for t, text in tables.items() if LABEL in text} == {"api_keys"}
            assert ADDRESS not in everything.lower()
            # Not the test's own parties: the SMTP test server (mail.log) and the SDK client.
            ours = "\n".join(
                f"{r.name} {r.getMessage()}" for r in caplog.records
                if not r.name.startswith(("mail.log", "openai", "httpx", "httpcore"))
            )  # fmt: skip
            for text in (await clickhouse_text(stack), await stream_text(stack), ours):
                assert CANARY not in text and LABEL not in text and ADDRESS not in text
            out, err = capfd.readouterr()
            for text in (out, err):
                assert CANARY not in text and LABEL not in text and ADDRESS not in text
    finally:
        box.stop()


# Everything a client can send that identifies it (or makes the upstream keep or reprice the
# request), on every OpenAI endpoint that forwards the client's own body.
CALLER_FIELDS: dict[str, Any] = {
    "user": CANARY, "metadata": {"who": CANARY}, "safety_identifier": CANARY,
    "prompt_cache_key": CANARY, "prompt_cache_retention": "24h", "store": True,
    "service_tier": "auto",  # flex / priority are refused (test_protocol_conformance)
}  # fmt: skip
CALLER_HEADERS = {
    "X-Forwarded-For": "203.0.113.77", "X-Real-IP": "203.0.113.77",
    "Forwarded": "for=203.0.113.77", "User-Agent": f"agent-{CANARY}",
    "Cookie": f"session={CANARY}", "OpenAI-Organization": CANARY, "OpenAI-Project": CANARY,
}  # fmt: skip


async def test_nothing_identifying_the_caller_goes_upstream(
    stack: Stack, fake_openai: FakeOpenAI
) -> None:
    key = await stack.create_key("2.00")
    messages = [{"role": "user", "content": "hello"}]
    async with stack.client(key) as c:
        for stream in (False, True):
            r = await c.post(
                "/v1/chat/completions", headers=CALLER_HEADERS,
                json={"model": "fast-chat", "messages": messages, "stream": stream,
                      **CALLER_FIELDS},
            )  # fmt: skip
            assert r.status_code == 200, r.text
        r = await c.post(
            "/v1/embeddings", headers=CALLER_HEADERS,
            json={"model": "embed-small", "input": "hello", **CALLER_FIELDS},
        )  # fmt: skip
        assert r.status_code == 200, r.text
    assert len(fake_openai.requests) == 3
    for body, headers in zip(fake_openai.requests, fake_openai.headers, strict=True):
        assert not set(CALLER_FIELDS) & set(body), body
        assert CANARY not in str(body) and CANARY not in str(headers)
        names = {name.lower() for name in headers}
        assert not names & {name.lower() for name in CALLER_HEADERS}, headers


VENDOR = "VENDOR-FIELD-3e9b"


async def test_no_upstream_field_reaches_the_client(stack: Stack, fake_openai: FakeOpenAI) -> None:
    """What an OpenAI-compatible upstream adds to its messages, deltas, tool calls and
    embeddings (its own fields, as LiteLLM and OpenRouter do) is not relayed: it could show
    which upstream served. OpenAI's own fields are."""
    fake_openai.vendor_fields = {
        "provider_specific_fields": {"upstream": VENDOR}, "reasoning_details": [VENDOR],
    }  # fmt: skip
    key = await stack.create_key("2.00")
    answers = []
    async with stack.client(key) as c:
        for stream in (False, True):
            for marker in ("", " [[tools]]"):
                r = await c.post("/v1/chat/completions", json={
                    "model": "fast-chat", "stream": stream,
                    "messages": [{"role": "user", "content": "hello" + marker}],
                })  # fmt: skip
                assert r.status_code == 200, r.text
                answers.append(r.text)
        r = await c.post("/v1/embeddings", json={"model": "embed-small", "input": ["a", "b"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        answers.append(r.text)
    for text in answers:
        assert VENDOR not in text and "reasoning_details" not in text
        assert "UPSTREAMID" not in text and "fp_upstream_secret" not in text
    plain, tools = orjson.loads(answers[0]), orjson.loads(answers[1])
    assert plain["choices"][0]["message"]["content"].startswith("Hello")
    call = tools["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert set(call) == {"id", "type", "function"}
    assert '"name":"get_weather"' in answers[3] and "Pa" in answers[3]
    assert orjson.loads(answers[4])["data"][0]["embedding"] == [0.1, 0.2, 0.3]


@pytest.mark.parametrize(
    ("path", "body", "ending"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi [[malformed]]"}]},
         '"type":"upstream_error"'),
        ("/v1/messages", {"max_tokens": 50,
                          "messages": [{"role": "user", "content": "hi [[malformed]]"}]},
         "event: error"),
        ("/v1/responses", {"input": "hi [[malformed]]"}, "event: response.failed"),
    ],
)  # fmt: skip
async def test_an_unreadable_upstream_stream_ends_in_the_protocols_error(
    stack: Stack, caplog: pytest.LogCaptureFixture, capfd: Any, path: str, body: Any, ending: str
) -> None:
    """A stream chunk the relay cannot read (a buggy upstream's) ends the stream with the
    protocol's error event, billed for what was delivered, never as an unhandled exception
    (a cut connection, and a traceback in the log)."""
    caplog.set_level(logging.DEBUG)
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        r = await c.post(path, json={"model": "fast-chat", "stream": True, **body})
        text = r.text  # read to its end: a cut stream would raise here
    assert r.status_code == 200 and ending in text, text
    assert '"Hello"' in text  # what came before the bad chunk was relayed
    generation = text.split('"id":"', 1)[1].split('"', 1)[0]
    generation = "gen-" + generation.split("gen-", 1)[1]
    await stack.wait_metered([generation])
    row = await stack.pool.fetchrow(
        "SELECT amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1", generation
    )
    assert row is not None and row["amount_usd"] < 0  # the delivered words are billed
    out, err = capfd.readouterr()
    for logged in (caplog.text, out, err):
        assert "Exception in ASGI application" not in logged and "Traceback" not in logged
    assert "unreadable stream data (TypeError)" in caplog.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi [[malformed]]"}]}),
        ("/v1/messages", {"max_tokens": 50,
                          "messages": [{"role": "user", "content": "hi [[malformed]]"}]}),
        ("/v1/responses", {"input": "hi [[malformed]]"}),
    ],
)  # fmt: skip
async def test_an_answer_with_a_malformed_field_is_served_not_a_billed_500(
    stack: Stack, path: str, body: Any
) -> None:
    """A non-streaming answer whose `tool_calls` is not an array: the text is served and
    billed once, rather than a 500 for a request that was billed all the same."""
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        r = await c.post(path, json={"model": "fast-chat", **body})
    assert r.status_code == 200, r.text
    assert "Hello from the fake upstream model" in r.text
    generation = "gen-" + r.json()["id"].split("gen-", 1)[1]
    await stack.wait_metered([generation])
    billed = await stack.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE kind = 'usage' AND ref = $1 AND amount_usd < 0",
        generation,
    )
    assert billed == 1
