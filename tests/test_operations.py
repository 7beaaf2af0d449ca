"""What operators rely on: /readyz apart from /healthz, JSON log lines, and failed upstreams
logged with the class of their cause (never a text that could carry content)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from apifast.key_admin import insert_key
from apifast.server.migrations import migrate_database
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import RouterProcess
from tests.harness import SECRET, free_port, models_toml, running_stack, stack_settings


async def test_ready_when_postgres_catalog_and_metering_are(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    async with running_stack(stack_settings_factory(models_toml(fake_openai.url))) as stack:
        async with stack.client() as c:
            r = await c.get("/readyz")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] == "ready"
            assert body["postgres"] == body["catalog"] == body["metering"] == "ok"
            assert (await c.get("/healthz")).status_code == 200


async def test_not_ready_while_usage_events_cannot_be_kept(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    # A spool that holds nothing: paid requests are refused, so the router is not ready.
    settings = stack_settings_factory(models_toml(fake_openai.url), spool_max_events=0)
    async with running_stack(settings) as stack, stack.client() as c:
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready"
        assert r.json()["metering"] == "spool_full"
        assert (await c.get("/healthz")).status_code == 200  # alive all the same


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_json_logs_name_the_cause_of_a_failed_upstream(
    database_factory: Callable[[str], str], nats_url: str, tmp_path: Path, workers: str
) -> None:
    """Every line is JSON, the workers' own too (APIFAST_WORKERS > 1: fresh interpreters,
    whose lines once bypassed the format as bare text)."""
    models = tmp_path / "models.toml"
    models.write_text(models_toml(f"http://127.0.0.1:{free_port()}/v1"))  # nothing listens
    settings = stack_settings(
        database_url=database_factory("ops"), nats_url=nats_url, clickhouse_url="",
        data_dir=tmp_path / "data", models_file=models,
    )  # fmt: skip
    await migrate_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            key, _, _ = await insert_key(conn, SECRET.encode(), Decimal("1.00"))
    finally:
        await conn.close()
    router = RouterProcess(
        settings, tmp_path / "r", LOG_FORMAT="json", LOG_LEVEL="INFO", WORKERS=workers
    )
    router.start()
    try:
        await router.wait_ready()
        async with httpx.AsyncClient(base_url=router.base_url, timeout=30) as c:
            r = await c.post(
                "/v1/chat/completions",
                json={"model": "fast-chat", "messages": [{"role": "user", "content": "secret"}]},
                headers={"Authorization": f"Bearer {key}"},
            )
        assert r.status_code in (502, 503), r.text
    finally:
        await router.stop()
    lines = [orjson.loads(line) for line in router.log().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "message"} <= set(e) for e in lines)
    failed = [e for e in lines if "failed: status=None" in e["message"]]
    assert failed and "cause=refused" in failed[0]["message"]
    assert failed[0]["level"] == "WARNING" and failed[0]["logger"] == "apifast.router"
    started = [e for e in lines if e["message"] == "Application startup complete."]
    assert len(started) == int(workers)  # each worker's INFO lines are kept
    text = router.log()
    assert "secret" not in text and key not in text  # no prompt, no key


async def test_metrics_on_their_own_listener_without_identifying_labels(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    port = free_port()
    settings = stack_settings_factory(
        models_toml(fake_openai.url), metrics_listen=f"127.0.0.1:{port}"
    )
    async with running_stack(settings) as stack:
        key = await stack.create_key("1.00")
        async with stack.client(key) as c:
            ok = await c.post(
                "/v1/chat/completions",
                json={
                    "model": "fast-chat",
                    "messages": [{"role": "user", "content": "canary-7f3"}],
                },
            )
            assert ok.status_code == 200
            poor = await stack.create_key("0.00")
            refused = await c.post(
                "/v1/chat/completions",
                json={"model": "fast-chat", "messages": [{"role": "user", "content": "x"}]},
                headers={"Authorization": f"Bearer {poor}"},
            )
            assert refused.status_code == 402
            failed = await c.post(
                "/v1/chat/completions",
                json={
                    "model": "fast-chat",
                    "messages": [{"role": "user", "content": "[[error:500]]"}],
                },
            )
            assert failed.status_code == 502
            assert (await c.get("/metrics")).status_code == 404  # not on the public port
        await stack.wait_metered([ok.json()["id"]])
        async with httpx.AsyncClient(timeout=10) as m:
            text = (await m.get(f"http://127.0.0.1:{port}/metrics")).text
    series = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
              if line and not line.startswith("#")}  # fmt: skip
    for name in ("apifast_requests_total", "apifast_request_seconds_bucket",
                 "apifast_time_to_first_byte_seconds_bucket", "apifast_added_seconds_bucket",
                 "apifast_tokens_total", "apifast_cost_usd_total", "apifast_hold_refusals_total",
                 "apifast_spool_events", "apifast_spool_age_seconds", "apifast_leases",
                 "apifast_lease_growths_total", "apifast_upstream_errors_total",
                 "apifast_publish_failures_total", "apifast_meter_events_total",
                 "apifast_meter_pending", "apifast_meter_in_flight",
                 "apifast_meter_store_errors_total"):  # fmt: skip
        assert name in series, name
    # Upstream errors by route (the public model and the provider of the route) and cause.
    assert (
        'apifast_upstream_errors_total{cause="http",model="fast-chat",provider="local"} 1.0' in text
    )
    assert 'apifast_meter_store_errors_total{store="clickhouse"} 0.0' in text
    assert 'apifast_requests_total{api="chat",model="fast-chat",status="200"} 1.0' in text
    assert 'apifast_hold_refusals_total{reason="insufficient_balance"} 1.0' in text
    # Nothing that identifies a caller, nor any content.
    from apifast.keys import hash_key
    from tests.harness import SECRET as secret

    for secret_text in (key, poor, hash_key(secret.encode(), key).hex(), "canary-7f3",
                        "127.0.0.1:"):  # fmt: skip
        assert secret_text not in text


def _requests_total(text: str) -> dict[tuple[str, str, str], float]:
    """apifast_requests_total by (model, api, status), from a /metrics page."""
    found = {}
    for line in text.splitlines():
        if line.startswith("apifast_requests_total{"):
            labels, value = line.removeprefix("apifast_requests_total").rsplit(" ", 1)
            pairs = dict(kv.split("=", 1) for kv in labels.strip("{}").split(","))
            key = (pairs["model"].strip('"'), pairs["api"].strip('"'), pairs["status"].strip('"'))
            found[key] = float(value)
    return found


async def test_refused_requests_are_counted_with_their_status(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    """apifast_requests_total counts every inference request that ended, refused or not,
    once, by model, protocol and status; a model the catalog lacks is labelled "", never
    with the client's string."""
    port = free_port()
    settings = stack_settings_factory(
        models_toml(fake_openai.url), metrics_listen=f"127.0.0.1:{port}", max_body_bytes=4096
    )
    chat = {"model": "fast-chat", "messages": [{"role": "user", "content": "hi"}]}
    failing = {**chat, "messages": [{"role": "user", "content": "[[error:500]]"}]}
    embed = {"model": "embed-small", "input": "hi"}
    async with running_stack(settings) as stack:
        key = await stack.create_key("1.00")
        poor = {"Authorization": f"Bearer {await stack.create_key('0.00')}"}
        json_type = {"Content-Type": "application/json"}
        sent: list[tuple[str, Any, dict[str, str]]] = [
            ("/v1/chat/completions", chat, {}),  # 200
            ("/v1/chat/completions", chat, {"Authorization": ""}),
            ("/v1/chat/completions", chat, poor),
            ("/v1/chat/completions", {**chat, "model": "made-up-x9"}, {}),
            ("/v1/chat/completions", {**chat, "n": "many"}, {}),
            ("/v1/chat/completions", b"{" + b" " * 5000 + b"}", json_type),
            ("/v1/chat/completions", failing, {}),
            ("/v1/messages", {**chat, "max_tokens": 10}, poor),
            ("/v1/responses", {"model": "made-up-x9", "input": "hi"}, {}),
            ("/v1/embeddings", embed, poor),
            ("/v1/embeddings", embed, {}),
        ]
        async with stack.client(key) as c:
            answers = [
                await c.post(path, content=body, headers=headers)
                if isinstance(body, bytes)
                else await c.post(path, json=body, headers=headers)
                for path, body, headers in sent
            ]
        statuses = [r.status_code for r in answers]
        assert statuses == [200, 401, 402, 404, 400, 413, 502, 402, 404, 402, 200], statuses
        async with httpx.AsyncClient(timeout=10) as m:
            text = (await m.get(f"http://127.0.0.1:{port}/metrics")).text
    assert _requests_total(text) == {
        ("fast-chat", "chat", "200"): 1,
        ("", "chat", "401"): 1,  # refused before its body was read
        ("fast-chat", "chat", "402"): 1,
        ("", "chat", "404"): 1,
        ("fast-chat", "chat", "400"): 1,
        ("", "chat", "413"): 1,
        ("fast-chat", "chat", "502"): 1,  # finished (it took a hold), and counted once
        ("fast-chat", "messages", "402"): 1,
        ("", "responses", "404"): 1,
        ("embed-small", "embeddings", "402"): 1,
        ("embed-small", "embeddings", "200"): 1,
    }
    assert "made-up-x9" not in text


def _requests_by_worker(directory: Path) -> dict[int, float]:
    """apifast_requests_total in each worker's own file of the multiprocess directory."""
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    for path in directory.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
        counts[int(path.stem.rpartition("_")[2])] = sum(
            s.value for m in merged if m.name == "apifast_requests" for s in m.samples
            if s.name == "apifast_requests_total"
        )  # fmt: skip
    return counts


async def test_metrics_with_two_workers_serve_them_both(
    database_factory: Callable[[str], str], nats_url: str, fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:  # fmt: skip
    """`apifast serve` with two workers and metrics on: no worker binds the metrics port (the
    second would die of it), both serve, and the one /metrics counts the requests of both."""
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake_openai.url))
    settings = stack_settings(
        database_url=database_factory("workers"), nats_url=nats_url, clickhouse_url="",
        data_dir=tmp_path / "data", models_file=models,
    )  # fmt: skip
    await migrate_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            key, _, _ = await insert_key(conn, SECRET.encode(), Decimal("5.00"))
    finally:
        await conn.close()
    port = free_port()
    router = RouterProcess(
        settings, tmp_path / "r", WORKERS="2", METRICS_LISTEN=f"127.0.0.1:{port}"
    )
    router.env["TMPDIR"] = str(tmp_path / "tmp")  # where the multiprocess directory goes
    (tmp_path / "tmp").mkdir()
    router.start()
    body = {"model": "fast-chat", "messages": [{"role": "user", "content": "hi"}]}
    sent, by_worker = 0, {}
    try:
        await router.wait_ready()
        [directory] = (tmp_path / "tmp").glob("apifast-metrics-*")

        async def one() -> int:
            # A connection of its own each, so the kernel hands them to either worker.
            async with httpx.AsyncClient(base_url=router.base_url, timeout=30) as c:
                r = await c.post("/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                return r.status_code

        for _ in range(30):  # until both workers have answered some
            statuses = await asyncio.gather(*(one() for _ in range(8)))
            assert statuses == [200] * 8
            sent += 8
            by_worker = _requests_by_worker(directory)
            if len(by_worker) == 2 and all(by_worker.values()):
                break
        async with httpx.AsyncClient(timeout=10) as m:
            text = (await m.get(f"http://127.0.0.1:{port}/metrics")).text
        assert all(os.kill(pid, 0) is None for pid in by_worker)  # both still up
    finally:
        assert await router.stop() == 0
    assert len(by_worker) == 2 and all(by_worker.values()), by_worker
    assert sum(by_worker.values()) == sent
    assert _requests_total(text) == {("fast-chat", "chat", "200"): sent}  # both, merged
    assert "apifast_spool_events" in text and "apifast_leases" in text  # the gauges too
    assert "address already in use" not in router.log().lower()
    assert not directory.exists()  # removed when serve stops


async def test_a_nats_outage_is_logged_once_a_minute_not_per_reconnect_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py logs an ERROR line (a traceback, in text logs) for every reconnect attempt
    unless given an error callback: two a second per client for as long as NATS is down.
    The router's clients (usage events, route health) say it once a minute per kind. A
    private nats-server, killed; never the shared one."""
    from apifast.router.health_share import HealthShare
    from apifast.router.publisher import EventPublisher
    from apifast.router.route_book import RouteBook
    from apifast.router.route_health import BreakerPolicy
    from tests.fault_tools import OwnNats

    server = OwnNats(tmp_path / "nats")
    await server.start()
    publisher = EventPublisher(server.url, "OPS_LOGS", "ops.logs", tmp_path / "spool", 100)
    share = HealthShare(RouteBook(BreakerPolicy()), server.url, "ops.health", lambda _: None)
    await publisher.start()
    await share.start()
    try:
        await asyncio.wait_for(share.wait_ready(), 20)
        for _ in range(400):
            if publisher.connected():
                break
            await asyncio.sleep(0.05)
        assert publisher.connected()
        caplog.set_level(logging.WARNING)
        server.kill()
        for _ in range(600):  # until both clients failed several reconnect attempts
            if min(publisher.nats_errors.errors, share.nats_errors.errors) >= 6:
                break
            await asyncio.sleep(0.05)
        assert min(publisher.nats_errors.errors, share.nats_errors.errors) >= 6
    finally:
        await share.close()
        await publisher.close()
        server.stop()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nats")] == []
    said = [r.getMessage() for r in caplog.records if r.name == "apifast.stream"]
    kinds = {(m.split(")")[0], m.split(": ")[1].split(";")[0]) for m in said}
    assert said and len(said) == len(kinds)  # once per client and kind of error
