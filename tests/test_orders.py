"""Orders: creating keys and top-ups, field validation, reading orders, payment options."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from apifast.ip_limits import IpRateLimiter
from apifast.keys import is_well_formed
from tests.payments_harness import PayEnv, payments_env, payments_env_fixture

env = payments_env_fixture("orders", min_order_usd=Decimal("2.00"), max_order_usd=Decimal("500.00"))


async def test_order_without_key_creates_one(env: PayEnv) -> None:
    response = await env.order(amount_usd="10.00", processor="nowpayments", pay_currency="BTC")
    assert response.status_code == 201, response.text
    body = response.json()
    assert is_well_formed(body["api_key"])
    assert body["order_id"].startswith("ord_")
    assert body["status"] == "waiting"
    assert (body["amount_usd"], body["credited_usd"]) == ("10.00", "0.00")
    assert (body["processor"], body["pay_currency"]) == ("nowpayments", "btc")
    assert body["pay_address"] and body["pay_amount"] == "0.0002"
    assert body["expires_at"] and body["email_saved"] is False
    assert await env.balance(body["api_key"]) == 0
    # The processor was asked for exactly this, with a callback to our public URL.
    payment = env.np.payment_for_order(body["order_id"])
    assert payment.price_amount == Decimal("10.00") and payment.pay_currency == "btc"
    assert payment.ipn_callback_url == f"{env.stack.base_url}/v1/webhooks/nowpayments"
    # Only the hash of the key is stored.
    stored = await env.pool.fetch("SELECT key_hash, prefix FROM api_keys")
    assert all(body["api_key"].encode() not in bytes(r["key_hash"]) for r in stored)


async def test_order_with_key_tops_it_up_and_returns_no_key(env: PayEnv) -> None:
    first = await env.new_order("10.00")
    key = first["api_key"]
    response = await env.order(key, amount_usd="5", processor="btcpay")
    assert response.status_code == 201, response.text
    body = response.json()
    assert "api_key" not in body
    assert body["payment_url"].startswith(env.btcpay.url) and body["pay_address"] is None
    async with env.client(key) as client:
        listed = (await client.get("/v1/orders")).json()
    assert [o["order_id"] for o in listed["data"]] == [body["order_id"], first["order_id"]]
    assert listed["data"][0]["amount_usd"] == "5.00"


async def test_a_top_up_of_a_rotated_away_key_is_refused_before_any_payment(
    env: PayEnv,
) -> None:
    """A script still holding the key from before a rotation could start a top-up with it:
    201, and the payment would have credited the disabled old key, where nothing can spend
    it. Now 401 key_disabled, and no payment is asked of the processor."""
    key = (await env.new_order("10.00"))["api_key"]
    async with env.client(key) as c:
        rotated = await c.post("/v1/key/rotate")
    assert rotated.status_code == 201, rotated.text
    before = await env.pool.fetchval("SELECT count(*) FROM orders")
    for processor in ("nowpayments", "btcpay"):
        r = await env.order(key, amount_usd="10.00", processor=processor, pay_currency="btc")
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "key_disabled", r.text
    assert await env.pool.fetchval("SELECT count(*) FROM orders") == before
    fresh = await env.order(rotated.json()["key"], amount_usd="10.00", processor="btcpay")
    assert fresh.status_code == 201, fresh.text


async def test_a_top_up_placed_while_its_key_is_rotated_credits_the_new_key(
    env: PayEnv,
) -> None:
    """A top-up reads its key, asks the processor for a payment (a remote call, often a
    second), then writes the order. A rotation in that second moved the key's orders before
    this one existed: it was written on the old key, and its payment credited the disabled
    key, where nothing could spend it. Now it follows the rotation, at writing and at
    crediting (orders/sql/order_follow_rotation.sql)."""
    key = (await env.new_order("10.00"))["api_key"]
    env.np.create_gate = asyncio.Event()
    env.np.create_entered.clear()
    try:
        placing = asyncio.create_task(
            env.order(key, amount_usd="10.00", processor="nowpayments", pay_currency="btc")
        )
        await env.np.create_entered.wait()  # the processor is creating the payment
        async with env.client(key) as c:
            rotated = await c.post("/v1/key/rotate")
        assert rotated.status_code == 201, rotated.text
        env.np.create_gate.set()
        placed = await placing
    finally:
        env.np.create_gate = None
    assert placed.status_code == 201, placed.text
    order_id = placed.json()["order_id"]
    new = rotated.json()["key"]
    assert [o["order_id"] for o in (await _orders(env, new))][:1] == [order_id]
    # Were it written on the old key (as a rotation racing the insert still can), the
    # payment follows the rotation all the same.
    new_id = await env.pool.fetchval("SELECT key_id FROM orders WHERE id = $1", order_id)
    old_id = await env.pool.fetchval(
        "SELECT predecessor_id FROM key_predecessors WHERE key_id = $1", new_id
    )
    await env.pool.execute("UPDATE orders SET key_id = $2 WHERE id = $1", order_id, old_id)
    assert await env.np.deliver(env.np.pay(env.np_payment_id(order_id))) == 200
    assert await env.balance(new) == Decimal("10.00")
    assert await env.pool.fetchval("SELECT key_id FROM orders WHERE id = $1", order_id) == new_id
    assert await env.pool.fetchval(
        "SELECT balance_usd FROM api_keys WHERE id = $1", old_id
    ) == 0  # fmt: skip


async def _orders(env: PayEnv, key: str) -> list[dict[str, object]]:
    async with env.client(key) as c:
        r = await c.get("/v1/orders")
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


async def test_amount_given_as_a_json_number_is_exact(env: PayEnv) -> None:
    async with env.client() as client:
        response = await client.post(
            "/v1/orders",
            content=b'{"amount_usd": 12.34, "processor": "nowpayments", "pay_currency": "xmr"}',
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 201, response.text
    assert response.json()["amount_usd"] == "12.34"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"processor": "nowpayments", "pay_currency": "btc"}, "amount_usd", "required"),
        ({"amount_usd": "ten"}, "amount_usd", "decimal"),
        ({"amount_usd": "-5"}, "amount_usd", "negative"),
        ({"amount_usd": "1.99"}, "amount_usd", "at least 2.00"),
        ({"amount_usd": "500.01"}, "amount_usd", "at most 500.00"),
        ({"amount_usd": "10.001"}, "amount_usd", "decimal places"),
        ({"amount_usd": True}, "amount_usd", "decimal"),
        ({"amount_usd": "10", "processor": "paypal"}, "processor", "nowpayments"),
        ({"amount_usd": "10", "processor": None}, "processor", "required"),
        ({"amount_usd": "10", "processor": "nowpayments", "pay_currency": "doge"}, "pay_currency", "btc"),
        ({"amount_usd": "10", "processor": "nowpayments", "pay_currency": 5}, "pay_currency", "btc"),
        ({"amount_usd": "10", "processor": "btcpay", "pay_currency": "eth"}, "pay_currency", "btc"),
        ({"amount_usd": "10", "processor": "nowpayments", "pay_currency": "btc", "email": "nope"}, "email", "valid"),
    ],
)  # fmt: skip
async def test_bad_fields_get_400_naming_the_field(
    env: PayEnv, body: dict[str, object], param: str, words: str
) -> None:
    body = {"processor": "nowpayments", "pay_currency": "btc", **body}
    if body.get("processor") is None:
        body.pop("processor")
    response = await env.order(**body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(param) and words in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_malformed_json_gets_400(env: PayEnv) -> None:
    async with env.client() as client:
        for content in (b"{", b"[]", b""):
            response = await client.post("/v1/orders", content=content)
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "invalid_json"


async def test_bad_keys_get_401(env: PayEnv) -> None:
    response = await env.order("af-notakey", amount_usd="10", processor="btcpay")
    assert response.status_code == 401
    from apifast.keys import generate_key

    response = await env.order(generate_key(), amount_usd="10", processor="btcpay")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_orders_are_readable_only_with_their_key(env: PayEnv) -> None:
    mine = await env.new_order("10.00")
    other = await env.new_order("10.00")
    info = await env.get_order(mine["api_key"], mine["order_id"])
    assert info["order_id"] == mine["order_id"] and info["payments"] == []
    async with env.client(other["api_key"]) as client:
        response = await client.get(f"/v1/orders/{mine['order_id']}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "order_not_found"
        listed = (await client.get("/v1/orders")).json()["data"]
        assert [o["order_id"] for o in listed] == [other["order_id"]]
        assert (await client.get("/v1/orders?limit=0")).status_code == 400
    async with env.client() as client:
        assert (await client.get(f"/v1/orders/{mine['order_id']}")).status_code == 401
        assert (await client.get("/v1/orders")).status_code == 401


async def test_hosted_invoice_when_no_coin_is_chosen(env: PayEnv) -> None:
    order = await env.new_order("10.00", pay_currency=None)
    assert order["pay_currency"] is None and order["pay_address"] is None
    assert "iid=" in order["payment_url"]
    invoice_id = int(order["payment_url"].rsplit("=", 1)[1])
    # The buyer picks a coin on the hosted page; the payment's IPN carries our order id.
    pid = env.np.pay_invoice(invoice_id, "xmr")
    assert await env.np.deliver(env.np.pay(pid)) == 200
    info = await env.get_order(order["api_key"], order["order_id"])
    assert (info["status"], info["credited_usd"]) == ("finished", "10.00")


async def test_processor_failure_gets_502_and_stores_nothing(env: PayEnv) -> None:
    before = await env.pool.fetchval("SELECT count(*) FROM orders")
    keys_before = await env.pool.fetchval("SELECT count(*) FROM api_keys")
    saved, env.np.api_key = env.np.api_key, "rotated"  # the processor now refuses our key
    try:
        response = await env.order(amount_usd="10", processor="nowpayments", pay_currency="btc")
    finally:
        env.np.api_key = saved
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "processor_error" and "INVALID_API_KEY" not in error["message"]
    assert await env.pool.fetchval("SELECT count(*) FROM orders") == before
    assert await env.pool.fetchval("SELECT count(*) FROM api_keys") == keys_before


async def test_payment_options(env: PayEnv) -> None:
    async with env.client() as client:
        body = (await client.get("/v1/payments/options")).json()
    assert body["min_amount_usd"] == "2.00" and body["max_amount_usd"] == "500.00"
    assert body["email_recovery"] is True
    assert body["partially_paid_policy"] == "proportional"
    by_name = {p["processor"]: p for p in body["processors"]}
    assert set(by_name) == {"nowpayments", "btcpay"}
    # The fake's own minimum (0.50) is below ours, so ours shows.
    assert by_name["nowpayments"]["coins"] == [
        {"coin": "btc", "min_amount_usd": "2.00"},
        {"coin": "xmr", "min_amount_usd": "2.00"},
    ]
    assert by_name["btcpay"]["hosted_checkout"] is True


async def test_processor_minimum_applies(env: PayEnv) -> None:
    processor = env.runtime.processors["nowpayments"]
    processor._min_cache.clear()  # type: ignore[attr-defined]
    env.np.min_usd = Decimal("25")
    try:
        response = await env.order(amount_usd="20", processor="nowpayments", pay_currency="btc")
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "amount_usd: must be at least 25.00 for btc"
    finally:
        env.np.min_usd = Decimal("0.50")
        processor._min_cache.clear()  # type: ignore[attr-defined]


async def test_orders_are_rate_limited_per_ip(env: PayEnv) -> None:
    saved = env.runtime.order_limiter
    env.runtime.order_limiter = IpRateLimiter(2, 3600, name="order")
    try:
        codes = [
            (await env.order(amount_usd="10", processor="btcpay")).status_code for _ in range(3)
        ]
        assert codes == [201, 201, 429]
        response = await env.order(amount_usd="10", processor="btcpay")
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) > 0
    finally:
        env.runtime.order_limiter = saved


def test_ip_limiter_window_and_no_raw_ips() -> None:
    limiter = IpRateLimiter(2, 60, name="t")
    assert limiter.check("10.0.0.1", now=0) == 0
    assert limiter.check("10.0.0.1", now=1) == 0
    assert limiter.check("10.0.0.1", now=2) == pytest.approx(58)
    assert limiter.check("10.0.0.2", now=2) == 0
    assert limiter.check("10.0.0.1", now=61) == 0
    assert all(b"10.0.0" not in token for token in limiter._hits)


async def test_unconfigured_processors_are_not_offered(
    database_factory: Callable[[str], str],
    nats_url: str,
    clickhouse_url: str,
    tmp_path: Path,
) -> None:
    async with payments_env(
        database_url=database_factory("noproc"),
        nats_url=nats_url,
        clickhouse_url=clickhouse_url,
        data_dir=tmp_path,
        nowpayments_api_key="",
        nowpayments_ipn_secret="",
        btcpay_url="",
        btcpay_api_key="",
        btcpay_store_id="",
        btcpay_webhook_secret="",
        smtp_url="",
    ) as bare:
        async with bare.client() as client:
            options = (await client.get("/v1/payments/options")).json()
            assert options["processors"] == [] and options["email_recovery"] is False
            response = await client.post("/v1/orders", json={"amount_usd": "10"})
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "processor"
            response = await client.post("/v1/webhooks/nowpayments", content=b"{}")
            assert response.status_code == 404
