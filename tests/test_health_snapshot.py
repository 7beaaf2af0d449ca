"""A router that starts late learns the breakers and benches its peers already have: on
connect it asks them over real NATS (`<APIFAST_ROUTE_HEALTH_SUBJECT>.snapshot`) and applies
their answers like ordinary reports (router/health_share.py).

Fake clocks for the route books (the remaining durations are exact); the only waits are for
a message to arrive, never on a duration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apifast.catalog.toml import Model, parse_catalog
from apifast.providers import UpstreamError
from apifast.router.health_share import HealthShare
from apifast.router.route_book import RouteBook
from apifast.router.route_health import CLOSED, OPEN, BreakerPolicy
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import OwnNats
from tests.harness import free_port, running_stack
from tests.test_smart_routing import assert_nothing_named, catalog, chat


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _models(routes: dict[str, list[str]]) -> dict[str, Model]:
    data = {
        "providers": {"p": {"type": "openai"}},
        "models": [
            {"id": model_id, "input_usd_per_mtok": "1", "output_usd_per_mtok": "1",
             "routes": [{"provider": "p", "model": m} for m in upstream]}
            for model_id, upstream in routes.items()
        ],
    }  # fmt: skip
    return dict(parse_catalog(data, "t").models)


async def _until(read: Callable[[], Any], expected: Any) -> None:
    """Wait for a message to have been handled (bounded, so a lost one fails the test)."""
    for _ in range(400):
        if read() == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"waited for {expected!r}, last saw {read()!r}")


async def test_a_late_share_applies_its_peers_snapshot(nats_url: str) -> None:
    subject = f"t{os.urandom(6).hex()}.route_health"
    policy = BreakerPolicy(failures=1, cooldown_s=30.0)
    # Router A's catalog; B's differs on "n" (another upstream at index 0) and lacks "gone".
    a_models = _models({"m": ["a", "b"], "n": ["x"], "gone": ["y"]})
    b_models = _models({"m": ["a", "b"], "n": ["other"]})
    a_clock, b_clock = Clock(1000.0), Clock(5000.0)
    a_book = RouteBook(policy, clock=a_clock)
    b_book = RouteBook(policy, clock=b_clock)
    first = HealthShare(a_book, nats_url, subject, a_models.get)
    late = HealthShare(b_book, nats_url, subject, b_models.get)
    await first.start()
    try:
        await asyncio.wait_for(first.wait_ready(), 10)  # alone: ready, nobody answers
        assert first.applied == 0
        m1 = a_book.entries(a_models["m"])[1]
        for model_id in ("m", "n", "gone"):
            entry = a_book.entries(a_models[model_id])[0]
            assert a_book.admit(entry)
            a_book.failed(model_id, entry, UpstreamError(500))  # failures=1: it opens
        assert a_book.admit(m1)
        a_book.failed("m", m1, UpstreamError(429, retry_after_s=120))  # benched 120 s
        a_clock.now += 10  # A's breakers have 20 s of cooldown left, the bench 110 s

        await late.start()
        await asyncio.wait_for(late.wait_ready(), 10)
        # One answer, one message: "m"'s open breaker and its bench. "n" (another upstream
        # at that index here) and "gone" (not in this catalog) are ignored.
        await _until(lambda: late.applied, 2)
        b0, b1 = b_book.entries(b_models["m"])
        assert b0.breaker.state == OPEN and not b_book.admit(b0)
        assert b1.breaker.benched_until == 5000.0 + 110 and not b_book.admit(b1)
        assert b_book.entries(b_models["n"])[0].breaker.state == CLOSED
        b_clock.now += 20  # the cooldown A had left: B now lets one probe through
        assert b_book.admit(b0)
        # A asked nobody after B arrived, and ignores its own snapshot requests.
        assert first.applied == 0
    finally:
        await late.close()
        await first.close()


async def test_routers_that_reconnect_after_an_outage_catch_up(tmp_path: Path) -> None:
    """A breaker opened while NATS was down reaches the peer once both are back, whichever
    reconnects first. A private nats-server, killed and restarted; never the shared one."""
    server = OwnNats(tmp_path / "nats")
    await server.start()
    models = _models({"m": ["a", "b"]})
    clock = Clock(1000.0)
    a_book = RouteBook(BreakerPolicy(failures=1), clock=clock)
    b_book = RouteBook(BreakerPolicy(failures=1), clock=clock)
    first = HealthShare(a_book, server.url, "t.route_health", models.get)
    second = HealthShare(b_book, server.url, "t.route_health", models.get)
    try:
        for share in (first, second):
            await share.start()
            await asyncio.wait_for(share.wait_ready(), 10)
        server.kill()
        await _until(lambda: first._nc is not None and first._nc.is_connected, False)
        entry = a_book.entries(models["m"])[0]
        assert a_book.admit(entry)
        a_book.failed("m", entry, UpstreamError(500))  # told to nobody: NATS is down
        assert second.applied == 0
        await server.start()
        await _until(lambda: second.applied, 1)
        assert b_book.entries(models["m"])[0].breaker.state == OPEN
    finally:
        await second.close()
        await first.close()
        server.stop()


async def test_a_router_started_late_skips_a_route_its_peer_found_broken(
    stack_settings_factory: Any, alpha: FakeOpenAI, beta: FakeOpenAI
) -> None:
    # A long cooldown on the real clock: the breaker stays open for the whole test.
    settings = stack_settings_factory(
        catalog(alpha.url, beta.url), breaker_failures=1, breaker_cooldown_s=3600
    )
    async with running_stack(settings) as first:
        await asyncio.wait_for(first.state.health.wait_ready(), 10)
        key = await first.create_key("5.00")
        alpha.fail(500)
        async with first.client(key) as c:
            r = await chat(c)  # alpha fails, beta answers; alpha's breaker opens on A
        assert r.status_code == 200, r.text
        assert alpha.chat_requests == 1
        alpha.recover()
        # Router B starts only now: no change will be broadcast, only its snapshot tells it.
        late = settings.model_copy(update={"port": stack_settings_factory(None).port})
        async with running_stack(late, run_meter=False) as second:
            await first.wait_until(lambda: _applied(second), 1)
            shown = {
                row["index"]: row["state"]
                for row in second.state.route_health()
                if row["model"] == "chat"
            }
            assert shown == {0: "open", 1: "closed"}
            async with second.client(key) as c:
                for _ in range(3):
                    r = await chat(c)
                    assert r.status_code == 200, r.text
                    assert isinstance(r.json()["choices"][0]["message"]["content"], str)
            assert alpha.chat_requests == 1  # router B never called the broken route
            assert beta.chat_requests == 4
    assert_nothing_named()


async def _applied(stack: Any) -> int:
    return int(stack.state.health.applied)


async def test_routers_on_a_nats_cluster_share_breakers(nats_url: str) -> None:
    """APIFAST_NATS_URL names every node of a cluster, comma-separated (docs/scaling.md,
    deploy/scale.env). The route-health share passed that string to nats-py as one URL,
    which it refuses: on a cluster the routers never shared a breaker. Here the "cluster" is
    a node that is down and the shared server."""
    down = f"nats://127.0.0.1:{free_port()}"
    cluster = f"{down},{nats_url}"
    subject = f"t{os.urandom(6).hex()}.route_health"
    models = _models({"m": ["a"]})
    clock = Clock(1000.0)
    a_book = RouteBook(BreakerPolicy(failures=1), clock=clock)
    b_book = RouteBook(BreakerPolicy(failures=1), clock=clock)
    first = HealthShare(a_book, cluster, subject, models.get)
    second = HealthShare(b_book, cluster, subject, models.get)
    try:
        for share in (first, second):
            await share.start()
            await asyncio.wait_for(share.wait_ready(), 20)
        entry = a_book.entries(models["m"])[0]
        assert a_book.admit(entry)
        a_book.failed("m", entry, UpstreamError(500))
        await _until(lambda: second.applied, 1)
        assert b_book.entries(models["m"])[0].breaker.state == OPEN
    finally:
        await second.close()
        await first.close()
