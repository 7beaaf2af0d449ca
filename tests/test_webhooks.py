"""Webhooks and reconciliation against a running ApiFast: signatures, exactly-once crediting,
duplicates and out-of-order deliveries, partial payments, repeat deposits, closing statuses."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from apifast.orders.crediting import apply_update
from apifast.payments import PaymentStatus, PaymentUpdate
from tests.payments_harness import PayEnv, payments_env_fixture

env = payments_env_fixture("webhooks")


async def test_finished_credits_exactly_once(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    key, order_id = order["api_key"], order["order_id"]
    assert await env.balance(key) == 0
    pid = env.np_payment_id(order_id)
    confirming = env.np.set_status(pid, "confirming")
    finished = env.np.pay(pid)
    # Out of order, then repeated: finished first, the stale confirming after, finished again.
    assert await env.np.deliver(finished) == 200
    assert await env.np.deliver(confirming) == 200
    assert await env.np.deliver(finished) == 200
    assert await env.balance(key) == Decimal("10.00")
    info = await env.get_order(key, order_id)
    assert (info["status"], info["credited_usd"], info["closed"]) == ("finished", "10.00", True)
    assert info["payments"][0]["payment_id"] == str(pid)
    assert await env.ledger(order_id) == [(f"nowpayments:{pid}", Decimal(10))]
    events = await env.pool.fetch(
        "SELECT status, credited_usd, source FROM order_events WHERE order_id = $1 ORDER BY id",
        order_id,
    )
    assert [(e["status"], e["credited_usd"], e["source"]) for e in events] == [
        ("waiting", 0, "created"),
        ("finished", 10, "webhook"),
    ]


async def test_concurrent_duplicate_deliveries_credit_once(env: PayEnv) -> None:
    order = await env.new_order("7.00")
    pid = env.np_payment_id(order["order_id"])
    finished = env.np.pay(pid)
    statuses = await asyncio.gather(*(env.np.deliver(finished) for _ in range(8)))
    assert statuses == [200] * 8
    assert await env.balance(order["api_key"]) == Decimal("7.00")
    assert len(await env.ledger(order["order_id"])) == 1


async def test_statuses_never_move_backwards(env: PayEnv) -> None:
    order = await env.new_order("5.00")
    key, order_id = order["api_key"], order["order_id"]
    pid = env.np_payment_id(order_id)
    confirmed = env.np.set_status(pid, "confirmed")
    confirming = env.np.set_status(pid, "confirming")
    waiting = env.np.set_status(pid, "waiting")
    for body in (confirmed, confirming, waiting):
        assert await env.np.deliver(body) == 200
    info = await env.get_order(key, order_id)
    assert info["status"] == "confirmed" and not info["closed"]
    assert info["payments"][0]["status"] == "confirmed"


async def test_partial_payment_credits_in_proportion_then_the_rest(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    key, order_id = order["api_key"], order["order_id"]
    pid = env.np_payment_id(order_id)
    partial = env.np.pay(pid, Decimal("0.25"))
    assert partial["payment_status"] == "partially_paid"
    assert await env.np.deliver(partial) == 200
    assert await env.balance(key) == Decimal("2.50")
    info = await env.get_order(key, order_id)
    assert (info["status"], info["credited_usd"], info["closed"]) == (
        "partially_paid",
        "2.50",
        True,
    )
    # The processor later reports the payment finished: only the difference is credited.
    finished = env.np.pay(pid)
    assert await env.np.deliver(finished) == 200
    assert await env.np.deliver(partial) == 200
    assert await env.balance(key) == Decimal("10.00")
    assert await env.ledger(order_id) == [
        (f"nowpayments:{pid}", Decimal("2.5")),
        (f"nowpayments:{pid}:finished", Decimal("7.5")),
    ]


async def test_repeat_deposit_is_credited_as_its_own_payment(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    key, order_id = order["api_key"], order["order_id"]
    pid = env.np_payment_id(order_id)
    assert await env.np.deliver(env.np.pay(pid)) == 200
    child = env.np.repeat_deposit(pid, Decimal("0.0001"))  # 0.0001 BTC = $5 at the fake's rate
    assert child["parent_payment_id"] == pid and child["payment_id"] != pid
    for _ in range(2):
        assert await env.np.deliver(child) == 200
    assert await env.balance(key) == Decimal("15.00")
    info = await env.get_order(key, order_id)
    assert info["status"] == "finished" and info["credited_usd"] == "15.00"
    assert {p["payment_id"]: p["parent_payment_id"] for p in info["payments"]} == {
        str(pid): None,
        str(child["payment_id"]): str(pid),
    }
    refs = [ref for ref, _ in await env.ledger(order_id)]
    assert refs == [f"nowpayments:{pid}", f"nowpayments:{child['payment_id']}"]


async def test_repeat_deposit_without_order_id_follows_its_parent(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    pid = env.np_payment_id(order["order_id"])
    assert await env.np.deliver(env.np.pay(pid)) == 200
    child = env.np.repeat_deposit(pid, Decimal("0.00004"))
    child["order_id"] = None
    assert await env.np.deliver(child) == 200
    assert await env.balance(order["api_key"]) == Decimal("12.00")


@pytest.mark.parametrize("final", ["expired", "failed", "refunded"])
async def test_closing_statuses_credit_nothing(env: PayEnv, final: str) -> None:
    order = await env.new_order("3.00")
    key, order_id = order["api_key"], order["order_id"]
    pid = env.np_payment_id(order_id)
    assert await env.np.deliver(env.np.set_status(pid, final)) == 200
    info = await env.get_order(key, order_id)
    assert (info["status"], info["closed"], info["credited_usd"]) == (final, True, "0.00")
    assert await env.balance(key) == 0
    # A late "waiting" cannot reopen it.
    assert await env.np.deliver(env.np.set_status(pid, "waiting")) == 200
    assert (await env.get_order(key, order_id))["status"] == final


async def test_money_arriving_after_expiry_is_still_credited(env: PayEnv) -> None:
    order = await env.new_order("4.00")
    pid = env.np_payment_id(order["order_id"])
    assert await env.np.deliver(env.np.set_status(pid, "expired")) == 200
    assert await env.np.deliver(env.np.pay(pid)) == 200
    assert await env.balance(order["api_key"]) == Decimal("4.00")


async def test_bad_signatures_get_401_and_change_nothing(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    key, order_id = order["api_key"], order["order_id"]
    pid = env.np_payment_id(order_id)
    finished = env.np.pay(pid)
    assert await env.np.deliver(finished, signature="") == 401
    assert await env.np.deliver(finished, signature="00" * 64) == 401
    wrong = dict(finished, price_amount=1000)  # signed as 10, sent as 1000
    from tests.fakes.nowpayments import _node_json  # the fake's own serializer

    tampered = _node_json(wrong, sort=False).encode()
    assert await env.np.deliver(finished, raw=tampered) == 401
    raw_btc = b'{\n  "type": "InvoiceSettled",\n  "invoiceId": "x"\n}'
    assert await env.btcpay.deliver({}, raw=raw_btc, signature="sha256=" + "0" * 64) == 401
    assert await env.btcpay.deliver({}, raw=raw_btc, signature="") == 401
    assert await env.balance(key) == 0
    info = await env.get_order(key, order_id)
    assert info["status"] == "waiting" and info["payments"] == []


async def test_malformed_bodies_get_400(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    pid = env.np_payment_id(order["order_id"])
    body = env.np.ipn_body(pid)
    assert await env.np.deliver(body, raw=b"{not json", signature="ab") == 400
    garbage = b"[1, 2]"
    assert await env.btcpay.deliver({}, raw=garbage, signature=env.btcpay.sign(garbage)) == 400
    async with env.client() as client:
        response = await client.post(
            "/v1/webhooks/nowpayments", content=b"{}", headers={"x-nowpayments-sig": "zz"}
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_signature"
        response = await client.post("/v1/webhooks/nosuch", content=b"{}")
        assert response.status_code == 404


async def test_webhook_for_unknown_order_is_acknowledged(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    pid = env.np_payment_id(order["order_id"])
    body = env.np.pay(pid)
    body["order_id"] = "ord_doesnotexist"
    before = await env.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'payment'")
    assert await env.np.deliver(body) == 200
    assert await env.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'payment'") == before


async def test_btcpay_flow_refetches_the_invoice(env: PayEnv) -> None:
    order = await env.new_order("20.00", processor="btcpay", pay_currency=None)
    key, order_id = order["api_key"], order["order_id"]
    assert order["payment_url"].startswith(env.btcpay.url)
    invoice = env.btcpay.invoice_for_order(order_id)
    created = env.btcpay.created_event(invoice.id)
    paid = env.btcpay.pay(invoice.id)
    settled = env.btcpay.settle(invoice.id)
    # Settled first, then the rest, then a redelivery of everything.
    for event in [*settled, created, *paid]:
        assert await env.btcpay.deliver(event) == 200
    for event in settled:
        assert await env.btcpay.deliver(event, redelivery=True) == 200
    assert await env.balance(key) == Decimal("20.00")
    info = await env.get_order(key, order_id)
    assert (info["status"], info["credited_usd"]) == ("finished", "20.00")
    assert await env.ledger(order_id) == [(f"btcpay:{invoice.id}", Decimal(20))]


async def test_btcpay_partial_payment_then_expiry(env: PayEnv) -> None:
    order = await env.new_order("20.00", processor="btcpay", pay_currency="btc")
    key, order_id = order["api_key"], order["order_id"]
    invoice = env.btcpay.invoice_for_order(order_id)
    for event in env.btcpay.pay(invoice.id, Decimal("5")):
        assert await env.btcpay.deliver(event) == 200
    assert await env.balance(key) == 0
    for event in env.btcpay.expire(invoice.id):
        assert await env.btcpay.deliver(event) == 200
    assert await env.balance(key) == Decimal("5.00")
    assert (await env.get_order(key, order_id))["status"] == "partially_paid"


async def test_btcpay_payment_after_expiry_is_credited(env: PayEnv) -> None:
    order = await env.new_order("9.00", processor="btcpay")
    key, order_id = order["api_key"], order["order_id"]
    invoice = env.btcpay.invoice_for_order(order_id)
    for event in env.btcpay.expire(invoice.id):
        assert await env.btcpay.deliver(event) == 200
    assert (await env.get_order(key, order_id))["status"] == "expired"
    late = env.btcpay.pay(invoice.id)  # only "received payment (after expiration)" is sent
    assert [e["type"] for e in late] == ["InvoiceReceivedPayment"]
    assert late[0]["afterExpiration"] is True
    assert await env.btcpay.deliver(late[0]) == 200
    assert await env.balance(key) == Decimal("9.00")
    assert (await env.get_order(key, order_id))["status"] == "finished"


async def test_btcpay_webhook_gets_502_when_the_invoice_cannot_be_fetched(env: PayEnv) -> None:
    order = await env.new_order("9.00", processor="btcpay")
    invoice = env.btcpay.invoice_for_order(order["order_id"])
    events = env.btcpay.pay(invoice.id) + env.btcpay.settle(invoice.id)
    saved, env.btcpay.api_key = env.btcpay.api_key, "rotated"
    try:
        assert await env.btcpay.deliver(events[-1]) == 502  # BTCPay will deliver it again
    finally:
        env.btcpay.api_key = saved
    assert await env.balance(order["api_key"]) == 0
    assert await env.btcpay.deliver(events[-1], redelivery=True) == 200
    assert await env.balance(order["api_key"]) == Decimal("9.00")


async def test_btcpay_invalid_closes(env: PayEnv) -> None:
    order = await env.new_order("2.00", processor="btcpay")
    invoice = env.btcpay.invoice_for_order(order["order_id"])
    for event in env.btcpay.invalidate(invoice.id):
        assert await env.btcpay.deliver(event) == 200
    info = await env.get_order(order["api_key"], order["order_id"])
    assert (info["status"], info["closed"]) == ("failed", True)


async def test_reconciliation_credits_when_webhooks_are_lost(env: PayEnv) -> None:
    np_order = await env.new_order("6.00")
    bt_order = await env.new_order("8.00", processor="btcpay")
    open_order = await env.new_order("1.00")
    env.np.pay(env.np_payment_id(np_order["order_id"]))  # no IPN is delivered
    invoice = env.btcpay.invoice_for_order(bt_order["order_id"])
    env.btcpay.pay(invoice.id)
    env.btcpay.settle(invoice.id)  # no webhook is delivered
    await env.runtime.reconciler.run_once(interval_s=0)
    assert await env.balance(np_order["api_key"]) == Decimal("6.00")
    assert await env.balance(bt_order["api_key"]) == Decimal("8.00")
    # A webhook arriving afterwards changes nothing.
    assert await env.np.deliver(env.np.ipn_body(env.np_payment_id(np_order["order_id"]))) == 200
    assert await env.balance(np_order["api_key"]) == Decimal("6.00")
    events = await env.pool.fetch(
        "SELECT source FROM order_events WHERE order_id = $1 AND credited_usd > 0",
        np_order["order_id"],
    )
    assert [e["source"] for e in events] == ["reconcile"]
    info = await env.get_order(open_order["api_key"], open_order["order_id"])
    assert info["status"] == "waiting" and not info["closed"]
    # Closed orders are no longer fetched; the open one still is.
    fetched_before = len(env.np.requests)
    await env.runtime.reconciler.run_once(interval_s=0)
    fetched = [path for _, path, _ in env.np.requests[fetched_before:]]
    open_pid = env.np_payment_id(open_order["order_id"])
    assert f"/v1/payment/{open_pid}" in fetched
    assert f"/v1/payment/{env.np_payment_id(np_order['order_id'])}" not in fetched


async def test_partially_paid_policy_none_credits_nothing(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    pid = env.np_payment_id(order["order_id"])
    update = PaymentUpdate(
        processor="nowpayments",
        payment_id=str(pid),
        order_id=order["order_id"],
        status=PaymentStatus.PARTIALLY_PAID,
        raw_status="partially_paid",
        credit_usd=Decimal("4"),
    )
    result = await apply_update(env.pool, update, policy="none", source="webhook")
    assert (result.outcome, result.credited_usd) == ("applied", 0)
    assert await env.balance(order["api_key"]) == 0
    info = await env.get_order(order["api_key"], order["order_id"])
    assert info["status"] == "partially_paid"
