"""A canary in the prompt must appear nowhere ApiFast keeps or writes anything: Postgres,
ClickHouse, the JetStream stream, or log lines."""

from __future__ import annotations

import logging

import anthropic
import nats
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack

CANARY = "CANARY-7f3a9c-do-not-store"


async def postgres_text(stack: Stack) -> str:
    async with stack.pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT quote_ident(table_name) AS t FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        parts = []
        for row in tables:
            rows = await conn.fetch(f"SELECT x::text AS v FROM {row['t']} x")
            parts.extend(r["v"] for r in rows)
    return "\n".join(parts)


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


async def test_canary_is_never_kept(
    stack: Stack, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, capfd
):
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
    # The error request's id is not returned; wait for the known ones, then for all of them.
    await stack.wait_metered(list(set(ids)))
    await stack.wait_until(
        lambda: stack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind='usage'"), 7
    )

    assert any(CANARY in str(r) for r in fake_openai.requests), "canary never reached upstream"
    assert all("user" not in r for r in fake_openai.requests)
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
