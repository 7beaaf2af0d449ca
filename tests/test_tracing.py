"""OpenTelemetry traces: with APIFAST_OTEL_ENDPOINT set, a fake OTLP collector (a real HTTP
server on 127.0.0.1) receives the spans of chat requests (request -> hold -> upstream ->
publish) and of the meter's batches, and nothing in them (span or resource attributes,
events, names, the raw export) carries the prompt, the answer, the key, its hash, the
client's address or an upstream's name or error text. Off, nothing of the SDK is loaded."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.server.migrations import migrate_database
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
from tests.fakes.otlp_collector import FakeCollector, Span
from tests.fault_tools import MeterProcess, publish_events, usage_events, wait_in_ledger
from tests.harness import SECRET, models_toml, running_stack, stack_settings

PROMPT = "canary-prompt-5d1e9 tell me about zebras"
CLIENT_IP = "203.0.113.77"  # TEST-NET-3, sent as X-Forwarded-For
ROOT = "POST /v1/chat/completions"


@pytest.fixture
async def collector() -> AsyncIterator[FakeCollector]:
    fake = await FakeCollector().start()
    try:
        yield fake
    finally:
        await fake.stop()


def _chat(prompt: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "fast-chat", "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def test_chat_and_meter_spans_reach_the_collector_without_identifying_data(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, collector: FakeCollector
) -> None:
    settings = stack_settings_factory(models_toml(fake_openai.url), otel_endpoint=collector.url)
    headers = {"X-Forwarded-For": CLIENT_IP}
    async with running_stack(settings) as stack:
        key = await stack.create_key("1.00")
        poor = await stack.create_key("0.00")
        async with stack.client(key) as c:
            plain = await c.post("/v1/chat/completions", json=_chat(PROMPT), headers=headers)
            assert plain.status_code == 200, plain.text
            streamed = await c.post(
                "/v1/chat/completions", json=_chat(PROMPT, stream=True), headers=headers
            )
            assert streamed.status_code == 200 and "[DONE]" in streamed.text
            failed = await c.post(
                "/v1/chat/completions", json=_chat(PROMPT + " [[error:500]]"), headers=headers
            )
            assert failed.status_code == 502
            refused = await c.post(
                "/v1/chat/completions", json=_chat(PROMPT),
                headers={**headers, "Authorization": f"Bearer {poor}"},
            )  # fmt: skip
            assert refused.status_code == 402
            embedded = await c.post(
                "/v1/embeddings", json={"model": "embed-small", "input": PROMPT}, headers=headers
            )
            assert embedded.status_code == 200, embedded.text
        stream_id = orjson.loads(streamed.text.split("data: ")[1])["id"]
        await stack.wait_metered([plain.json()["id"], stream_id])
    # The lifespan's shutdown flushed every span to the collector.

    roots = collector.named(ROOT)
    assert len(roots) == 4, [s.name for s in collector.spans]
    assert {s.service for s in roots} == {"apifast-router"}
    assert len({s.trace_id for s in roots}) == 4  # one trace per request
    assert all(not s.parent_id for s in roots)  # no trace context is taken from clients

    def summary(stream: bool, status: int) -> Span:
        found = [s for s in roots if s.attributes.get("apifast.stream") is stream
                 and s.attributes.get("apifast.status") == status]  # fmt: skip
        assert len(found) == 1, [s.attributes for s in roots]
        return found[0]

    for stream in (False, True):
        root = summary(stream, 200)
        a = root.attributes
        assert a["apifast.model"] == "fast-chat" and a["apifast.api"] == "chat"
        assert a["http.response.status_code"] == 200 and a["apifast.outcome"] == "ok"
        assert a["apifast.route"] == 0
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        children = collector.children(root)
        assert [s.name for s in children] == ["hold", "upstream", "publish"], children
        assert all(s.trace_id == root.trace_id for s in children)
        upstream = children[1]
        assert upstream.attributes["apifast.route"] == 0
        assert upstream.raw.get("kind") == "SPAN_KIND_CLIENT"

    # A failed upstream: the attempt is marked by status and cause class, the request 502.
    bad = summary(False, 502)
    assert bad.attributes["http.response.status_code"] == 502
    assert bad.attributes["apifast.outcome"] == "upstream_error"
    attempt = [s for s in collector.children(bad) if s.name == "upstream"]
    assert len(attempt) == 1 and attempt[0].raw["status"]["code"] == "STATUS_CODE_ERROR"
    assert attempt[0].attributes["apifast.upstream.status"] == 500
    assert attempt[0].attributes["apifast.upstream.cause"] == "http"
    # A refused hold: a failed `hold` span by error code, and nothing called upstream.
    poor_root = [s for s in roots if s.attributes["http.response.status_code"] == 402]
    assert len(poor_root) == 1
    hold = collector.children(poor_root[0])
    assert [s.name for s in hold] == ["hold"]
    assert hold[0].attributes["error.type"] == "insufficient_balance"

    # Embeddings, served by the framework's route rather than the fast path: the same steps.
    (embed_root,) = collector.named("POST /v1/embeddings")
    assert embed_root.attributes["apifast.model"] == "embed-small"
    assert embed_root.attributes["apifast.endpoint"] == "embeddings"
    assert [s.name for s in collector.children(embed_root)] == ["hold", "upstream", "publish"]

    # The meter's batches: each with its Postgres debit and ClickHouse insert.
    batches = collector.named("meter.batch")
    assert batches and sum(int(b.attributes["apifast.events"]) for b in batches) >= 3
    for batch in batches:
        steps = [s.name for s in collector.children(batch)]
        assert steps == ["meter.postgres", "meter.clickhouse"], steps

    # The canary: nothing identifying, and no content, anywhere in what was exported.
    key_hash = hash_key(SECRET.encode(), key)
    canaries = [PROMPT, "canary-prompt", "zebras", REPLY, "Hello from the fake", key, poor,
                key_hash.hex(), hash_key(SECRET.encode(), poor).hex(), CLIENT_IP, "127.0.0.1",
                "upstream-model-a", "UPSTREAM-SECRET", "chatcmpl-UPSTREAMID", "fp_upstream",
                plain.json()["id"], stream_id]  # fmt: skip
    raw = b"".join(collector.bodies)
    assert raw, "nothing was exported"
    for canary in canaries:
        assert canary.encode() not in raw, canary
    assert key_hash not in raw
    exported = orjson.dumps([s.raw for s in collector.spans]).decode()
    exported += orjson.dumps(collector.resources).decode()
    for canary in canaries:
        assert canary not in exported, canary
    assert all(not s.raw.get("events") for s in collector.spans)  # no exception events


async def test_tracing_off_makes_no_tracer(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, collector: FakeCollector
) -> None:
    settings = stack_settings_factory(models_toml(fake_openai.url))
    async with running_stack(settings) as stack:
        assert stack.state.tracer is None and stack.app.tracer is None
        key = await stack.create_key("1.00")
        async with stack.client(key) as c:
            r = await c.post("/v1/chat/completions", json=_chat("hello"))
            assert r.status_code == 200
        await stack.wait_metered([r.json()["id"]])
    assert not collector.bodies


def test_the_sdk_is_imported_only_when_tracing_is_on() -> None:
    script = (
        "import sys\n"
        "import apifast.server.app, apifast.metering.run, apifast.router.core, apifast.cli.main\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter', 'opentelemetry.proto', 'google.protobuf')))\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


async def test_the_exporter_posts_to_the_traces_path_of_the_endpoint(
    collector: FakeCollector,
) -> None:
    import asyncio

    from apifast.tracing import Tracer, traces_url

    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://127.0.0.1:4318/v1/traces/") == "http://127.0.0.1:4318/v1/traces"
    tracer = Tracer(collector.url + "/", "apifast-test")
    with tracer.span("outer"):
        await tracer.within("inner", asyncio.sleep(0))
    await asyncio.to_thread(tracer.shutdown)
    outer, inner = collector.named("outer"), collector.named("inner")
    assert len(outer) == len(inner) == 1 and inner[0].parent_id == outer[0].span_id
    assert collector.resources[0]["service.name"] == "apifast-test"


async def test_the_meter_process_exports_its_batches(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_database: str,
    collector: FakeCollector, tmp_path: Path,
) -> None:  # fmt: skip
    settings = stack_settings(
        database_url=database_factory("trace_meter"), nats_url=nats_url, clickhouse_url="",
        clickhouse_database=clickhouse_database, data_dir=tmp_path / "data", models_file=None,
    )  # fmt: skip
    await migrate_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            key, _, _ = await insert_key(conn, SECRET.encode(), Decimal("5.00"))
    finally:
        await conn.close()
    key_hash = hash_key(SECRET.encode(), key)
    events = usage_events([key_hash], 3)
    await publish_events(settings, events)
    meter = MeterProcess(settings, tmp_path / "meter-chdb", tmp_path / "meter")
    meter.env["APIFAST_OTEL_ENDPOINT"] = collector.url
    meter.start()
    try:
        await wait_in_ledger(settings.database_url, [gid for gid, _, _ in events], timeout=120)
    finally:
        assert await meter.stop() == 0, meter.log()  # SIGTERM: the last spans are exported
    batches = collector.named("meter.batch")
    assert batches and {b.service for b in batches} == {"apifast-meter"}
    assert sum(int(b.attributes["apifast.events"]) for b in batches) == 3
    for batch in batches:
        assert not batch.parent_id
        assert [s.name for s in collector.children(batch)] == ["meter.postgres", "meter.clickhouse"]
    raw = b"".join(collector.bodies)
    assert key_hash not in raw and key_hash.hex().encode() not in raw
    assert not [gid for gid, _, _ in events if gid.encode() in raw]


async def test_a_request_the_sampler_drops_makes_no_step_spans(
    collector: FakeCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from apifast.tracing import Tracer

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracer = Tracer(collector.url, "apifast-test")
    steps: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with tracer.span("hold") as span:
            steps.append(span.is_recording())
        await send({"type": "http.response.start", "status": 200})

    async def send(message: Any) -> None:
        return None

    scope = {"method": "POST", "path": "/v1/chat/completions"}
    await tracer.request(ROOT, app, scope, None, send)
    with tracer.span("meter.batch") as batch:  # no parent: the sampler decides, and drops
        assert not batch.is_recording()
    await asyncio.to_thread(tracer.shutdown)
    assert steps == [False] and not collector.spans
