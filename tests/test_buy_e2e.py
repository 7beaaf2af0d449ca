"""Buying credit end to end, as a new user would (issue #3 §7): create an order, the processor
confirms, the balance shows the credit, the `openai` SDK spends it through the router, the
same key is topped up, and the key is recovered by email."""

from __future__ import annotations

from decimal import Decimal

import openai

from tests.payments_harness import PayEnv, payments_env_fixture

env = payments_env_fixture("buy_e2e")


async def test_buy_spend_top_up_and_recover(env: PayEnv) -> None:
    email = "new.user@example.com"
    async with env.client() as anonymous:
        # 1. Create an order: no account, just an amount, a processor and a coin.
        options = (await anonymous.get("/v1/payments/options")).json()
        assert "nowpayments" in [p["processor"] for p in options["processors"]]
        response = await anonymous.post(
            "/v1/orders",
            json={
                "amount_usd": "10.00",
                "processor": "nowpayments",
                "pay_currency": "btc",
                "email": email,
            },
        )
    assert response.status_code == 201, response.text
    order = response.json()
    key, order_id = order["api_key"], order["order_id"]
    assert order["pay_address"] and order["pay_amount"] == "0.0002"

    # 2. The buyer pays; the processor confirms through its IPN.
    pid = env.np_payment_id(order_id)
    for status in ("confirming", "confirmed", "sending"):
        assert await env.np.deliver(env.np.set_status(pid, status)) == 200
    assert await env.np.deliver(env.np.pay(pid)) == 200

    # 3. The key's balance shows the credit.
    assert await env.balance(key) == Decimal("10.00")
    assert (await env.get_order(key, order_id))["status"] == "finished"

    # 4. The official openai SDK spends it through the router.
    client = openai.AsyncOpenAI(api_key=key, base_url=env.stack.base_url + "/v1", max_retries=0)
    completion = await client.chat.completions.create(
        model="fast-chat", messages=[{"role": "user", "content": "Hello, bought model"}]
    )
    assert completion.model == "fast-chat"
    raw = await client.chat.completions.with_raw_response.create(
        model="fast-chat", messages=[{"role": "user", "content": "Hello, bought model"}]
    )
    cost = raw.http_response.json(parse_float=Decimal)["usage"]["cost"]
    assert cost > 0
    await env.stack.wait_metered([completion.id, raw.parse().id])
    spent = 2 * cost
    assert await env.balance(key) == Decimal("10.00") - spent

    # 5. Top up the same key, this time through BTCPay.
    async with env.client(key) as holder:
        response = await holder.post("/v1/orders", json={"amount_usd": "25", "processor": "btcpay"})
        assert response.status_code == 201, response.text
        top_up = response.json()
        assert "api_key" not in top_up and top_up["payment_url"]
        invoice = env.btcpay.invoice_for_order(top_up["order_id"])
        for event in [*env.btcpay.pay(invoice.id), *env.btcpay.settle(invoice.id)]:
            assert await env.btcpay.deliver(event) == 200
        orders = (await holder.get("/v1/orders")).json()["data"]
    assert [o["status"] for o in orders] == ["finished", "finished"]
    assert await env.balance(key) == Decimal("35.00") - spent
    models = await client.models.list()
    assert "fast-chat" in [m.id for m in models.data]

    # 6. Lost the key? Recover it by email.
    async with env.client() as anonymous:
        response = await anonymous.post("/v1/recover", json={"email": email})
    assert response.status_code == 202
    await env.runtime.drain()
    mails = env.mailbox.to(email)
    assert len(mails) == 2  # one with the order, one for the recovery
    assert key in mails[-1].body
    recovered = openai.AsyncOpenAI(api_key=key, base_url=env.stack.base_url + "/v1", max_retries=0)
    again = await recovered.chat.completions.create(
        model="fast-chat", messages=[{"role": "user", "content": "Still works"}]
    )
    assert again.choices[0].message.content
