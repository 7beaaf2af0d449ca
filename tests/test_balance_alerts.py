"""Low-balance alerts (POST/GET/DELETE /v1/key/alerts) for key holders who left an email: the
alert arrives at the real SMTP test server once per crossing, is armed again only by a credit
that lifts the balance above the threshold, says nothing about usage, and the address is
stored only encrypted."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from apifast.db import Queries
from apifast.keys import hash_key
from apifast.money import format_usd
from tests.harness import SECRET
from tests.payments_harness import PayEnv, payments_env_fixture

env = payments_env_fixture("alerts", balance_alert_interval_s=3600.0)  # sweeps run when asked
CORE = Queries("apifast")
BODY = {"model": "fast-chat", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


async def _key_id(env: PayEnv, key: str) -> int:
    found = await env.pool.fetchval(
        "SELECT id FROM api_keys WHERE key_hash = $1", hash_key(SECRET.encode(), key)
    )
    assert found is not None
    return int(found)


async def _credit(env: PayEnv, key_id: int, amount: Decimal, ref: str) -> None:
    async with env.pool.acquire() as conn, conn.transaction():
        await conn.fetchval(CORE.credit_key, key_id, "admin_credit", ref, amount, "test credit")


async def _spend(env: PayEnv, key: str) -> Decimal:
    async with env.client(key) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200, r.text
    await env.stack.wait_metered([r.json()["id"]])
    return Decimal(str(r.json()["usage"]["cost"]))


def _alerts(env: PayEnv, address: str) -> list[Any]:
    """The alert mails (the order's own mail, with the key, went to the address first)."""
    return [m for m in env.mailbox.to(address) if "balance is below" in m.message["Subject"]]


async def _sweep(env: PayEnv) -> int:
    sent = await env.runtime.alerts.sweep()
    await env.runtime.drain()  # delivered to the SMTP server
    return sent


async def test_the_alert_arrives_once_per_crossing(env: PayEnv) -> None:
    address = "alerts.holder@example.com"
    order = await env.new_order("10.00", email=address)
    key = order["api_key"]
    key_id = await _key_id(env, key)
    await _credit(env, key_id, Decimal("1.00"), "alerts-1")
    probe = await _spend(env, key)  # one request's cost, to place the threshold
    balance = Decimal("1.00") - probe
    threshold = balance - probe * Decimal("1.5")  # crossed by the second request from here
    async with env.client(key) as c:
        r = await c.post(
            "/v1/key/alerts", json={"low_balance_usd": str(threshold), "email": address.upper()}
        )
        assert r.status_code == 200, r.text
        assert r.json()["low_balance_usd"] == str(threshold) and r.json()["armed"] is True
        assert (await c.get("/v1/key/alerts")).json()["low_balance_usd"] == str(threshold)
    # Stored only encrypted.
    row = await env.pool.fetchrow("SELECT * FROM balance_alerts WHERE key_id = $1", key_id)
    assert "alerts.holder" not in repr(dict(row)).lower()

    await _spend(env, key)  # still above
    assert await _sweep(env) == 0 and _alerts(env, address) == []
    await _spend(env, key)  # crossed
    crossed_at = await env.balance(key)
    assert await _sweep(env) == 1
    await _spend(env, key)  # a second debit below the threshold: no second mail
    assert await _sweep(env) == 0
    mails = _alerts(env, address)
    assert len(mails) == 1
    body = mails[0].body
    assert f"${format_usd(crossed_at)}" in body and f"${format_usd(threshold)}" in body
    assert "fast-chat" not in body and "token" not in body.lower()  # nothing about usage
    assert key not in body  # never the key itself

    # A credit that leaves the balance at or below the threshold does not arm it...
    await _credit(env, key_id, Decimal("0.000001"), "alerts-2")
    assert await _sweep(env) == 0
    # ...one that lifts it above does; the next fall mails again, once.
    lift = threshold - await env.balance(key) + probe / 2
    await _credit(env, key_id, lift, "alerts-3")
    assert await _sweep(env) == 0
    assert await env.pool.fetchval("SELECT armed FROM balance_alerts WHERE key_id = $1", key_id)
    await _spend(env, key)
    assert await _sweep(env) == 1 and await _sweep(env) == 0
    assert len(_alerts(env, address)) == 2

    async with env.client(key) as c:
        gone = await c.delete("/v1/key/alerts")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert (await c.get("/v1/key/alerts")).json()["low_balance_usd"] is None


async def test_alerts_need_the_email_on_file(env: PayEnv) -> None:
    plain = await env.stack.create_key("1.00")  # bought without an email
    async with env.client(plain) as c:
        r = await c.post("/v1/key/alerts", json={"low_balance_usd": "0.50", "email": "a@b.cd"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_email_on_file"
    order = await env.new_order("10.00", email="right@example.com")
    async with env.client(order["api_key"]) as c:
        for body, param in (
            ({"low_balance_usd": "0.50", "email": "wrong@example.com"}, "email"),
            ({"low_balance_usd": "0.50"}, "email"),  # the address is needed once
            ({"low_balance_usd": 0.5, "email": "right@example.com"}, "low_balance_usd"),
            ({"low_balance_usd": 0.0, "email": "right@example.com"}, "low_balance_usd"),
            ({"low_balance_usd": [1], "email": "right@example.com"}, "low_balance_usd"),
            ({"low_balance_usd": "0", "email": "right@example.com"}, "low_balance_usd"),
        ):
            r = await c.post("/v1/key/alerts", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param
        ok = await c.post(
            "/v1/key/alerts", json={"low_balance_usd": "0.50", "email": "right@example.com"}
        )
        assert ok.status_code == 200, ok.text
        fraction = await c.post("/v1/key/alerts", json={"low_balance_usd": 0.5})
        assert fraction.status_code == 400
        assert 'send a decimal string like "5.00"' in fraction.json()["error"]["message"]
        # A JSON integer is exact, so it is taken as it is.
        whole = await c.post("/v1/key/alerts", json={"low_balance_usd": 1})
        assert whole.status_code == 200 and whole.json()["low_balance_usd"] == "1.00"
        # Later, the threshold alone.
        again = await c.post("/v1/key/alerts", json={"low_balance_usd": "0.25"})
        assert again.status_code == 200 and again.json()["low_balance_usd"] == "0.25"
        # Forgetting the email forgets the alert's copy of it too.
        assert (await c.delete("/v1/key/email")).status_code == 200
        assert (await c.get("/v1/key/alerts")).json()["low_balance_usd"] is None


async def test_the_alert_follows_a_rotation(env: PayEnv) -> None:
    address = "rotating.holder@example.com"
    order = await env.new_order("10.00", email=address)
    old = order["api_key"]
    await _credit(env, await _key_id(env, old), Decimal("1.00"), "alerts-rot")
    async with env.client(old) as c:
        r = await c.post("/v1/key/alerts", json={"low_balance_usd": "0.99999", "email": address})
        assert r.status_code == 200, r.text
        rotated = await c.post("/v1/key/rotate")
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["key"]
    async with env.client(new) as c:
        assert (await c.get("/v1/key/alerts")).json()["low_balance_usd"] == "0.99999"
    assert not await env.pool.fetchval(
        "SELECT count(*) FROM balance_alerts WHERE key_id = $1", await _key_id(env, old)
    )
    await _spend(env, new)  # below 0.99999 now
    assert await _sweep(env) == 1
    [mail] = _alerts(env, address)
    assert new[:11] in mail.body and old[:11] not in mail.body


async def test_a_rotation_does_not_send_a_crossings_alert_again(env: PayEnv) -> None:
    address = "sent.before.rotating@example.com"
    order = await env.new_order("10.00", email=address)
    old = order["api_key"]
    await _credit(env, await _key_id(env, old), Decimal("1.00"), "alerts-rot-sent")
    async with env.client(old) as c:
        r = await c.post("/v1/key/alerts", json={"low_balance_usd": "0.99999", "email": address})
        assert r.status_code == 200, r.text
    await _spend(env, old)
    assert await _sweep(env) == 1  # sent for this crossing, on the old key
    async with env.client(old) as c:
        sent_at = (await c.get("/v1/key/alerts")).json()["last_sent_at"]
        rotated = await c.post("/v1/key/rotate")
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["key"]
    assert await _sweep(env) == 0 and len(_alerts(env, address)) == 1  # not again
    async with env.client(new) as c:
        assert (await c.get("/v1/key/alerts")).json()["last_sent_at"] == sent_at
    # A credit lifts the new key above the threshold: armed again for the next crossing.
    new_id = await _key_id(env, new)
    armed = "SELECT armed FROM balance_alerts WHERE key_id = $1"
    assert await env.pool.fetchval(armed, new_id) is False
    await _credit(env, new_id, Decimal("1.00"), "alerts-rot-rearm")
    assert await env.pool.fetchval(armed, new_id) is True


async def test_setting_the_same_alert_again_sends_no_second_mail_for_one_crossing(
    env: PayEnv,
) -> None:
    """A holder's setup script that POSTs the same alert on every run re-armed it each time,
    so a balance sitting below the threshold was mailed again after every run. The same
    threshold now keeps the alert's state; a new threshold is a new ask and is armed."""
    address = "scripted.holder@example.com"
    order = await env.new_order("10.00", email=address)
    key = order["api_key"]
    await _credit(env, await _key_id(env, key), Decimal("1.00"), "alerts-again")
    first = {"low_balance_usd": "2.00", "email": address}
    async with env.client(key) as c:
        assert (await c.post("/v1/key/alerts", json=first)).status_code == 200
        assert await _sweep(env) == 1  # 1.00 is at or below 2.00: mailed once
        for body in (first, {"low_balance_usd": "2.00"}, {"low_balance_usd": 2}):
            again = await c.post("/v1/key/alerts", json=body)
            assert again.status_code == 200, again.text
            assert again.json()["armed"] is False  # still sent for this crossing
            assert await _sweep(env) == 0
        assert len(_alerts(env, address)) == 1
        moved = await c.post("/v1/key/alerts", json={"low_balance_usd": "3.00"})
        assert moved.status_code == 200 and moved.json()["armed"] is True
    assert await _sweep(env) == 1 and len(_alerts(env, address)) == 2


async def test_a_threshold_the_database_cannot_hold_is_a_400(env: PayEnv) -> None:
    """ "1e30" and a 21-digit integer were stored as they came: numeric overflow, a 500.
    "0_5" (Python's digit grouping) was read as 5.00. Each is now a 400 naming the field."""
    address = "huge.threshold@example.com"
    order = await env.new_order("10.00", email=address)
    async with env.client(order["api_key"]) as c:
        for value in ("1e30", 10**20, "1000000000000001", "0_5", "５"):
            r = await c.post("/v1/key/alerts", json={"low_balance_usd": value, "email": address})
            assert r.status_code == 400, (value, r.text)
            assert r.json()["error"]["param"] == "low_balance_usd", r.text
        assert (await c.get("/v1/key/alerts")).json()["low_balance_usd"] is None
