"""/admin/keys and /admin/orders: finding keys, their ledger, credits and debits by hand,
disabling; orders filtered by status and date with their processor's status history."""

from __future__ import annotations

import re
from decimal import Decimal

import orjson

from apifast.keys import generate_key, key_prefix
from apifast.money import format_usd
from tests.admin_support import AdminClient, admin, admin_stack
from tests.fakes.openai_upstream import FakeOpenAI

__all__ = ["admin", "admin_stack"]


async def key_id_of(admin: AdminClient, key: str) -> int:
    r = await admin.post("/admin/keys/find", {"q": key})
    assert r.status_code == 303, r.text
    return int(r.headers["location"].rsplit("/", 1)[1])


async def test_find_credit_debit_and_disable_a_key(admin: AdminClient):
    stack = admin.stack
    key = await stack.create_key("2.00")
    prefix = key_prefix(key)
    found = await admin.get("/admin/keys", params={"q": prefix})
    assert prefix in found.text and key not in found.text
    # A whole key is looked up by POST only: in a URL it is cut to its prefix.
    by_url = await admin.get("/admin/keys", params={"q": key})
    assert prefix in by_url.text and key not in by_url.text
    posted_prefix = await admin.post("/admin/keys/find", {"q": prefix})
    assert posted_prefix.headers["location"] == f"/admin/keys?q={prefix}"
    unknown = await admin.post("/admin/keys/find", {"q": generate_key()})
    assert unknown.status_code == 404 and "No key matches." in unknown.text
    # Pasting the whole key finds it by its hash; the key is not echoed back.
    key_id = await key_id_of(admin, key)
    page = await admin.get(f"/admin/keys/{key_id}")
    assert key not in page.text and "initial_credit" in page.text

    r = await admin.post(f"/admin/keys/{key_id}/adjust",
                         {"direction": "credit", "amount": "3.25", "reason": "goodwill"})  # fmt: skip
    assert r.status_code == 303
    r = await admin.post(f"/admin/keys/{key_id}/adjust",
                         {"direction": "debit", "amount": "0.000001", "reason": "rounding"})  # fmt: skip
    assert r.status_code == 303
    async with stack.client(key) as c:
        assert Decimal((await c.get("/v1/key")).json()["balance_usd"]) == Decimal("5.249999")
    page = await admin.get(f"/admin/keys/{key_id}")
    assert "goodwill" in page.text and "admin_credit" in page.text and "+3.25" in page.text
    assert "-0.000001" in page.text

    too_much = await admin.post(f"/admin/keys/{key_id}/adjust",
                                {"direction": "debit", "amount": "6", "reason": "oops"})  # fmt: skip
    assert too_much.status_code == 409 and "below 0" in too_much.text
    for bad in ({"amount": "0"}, {"amount": "1.5e3"}, {"amount": "abc"}, {"reason": ""},
                {"amount": "0.1234567890123"}, {"direction": "steal"}):  # fmt: skip
        form = {"direction": "credit", "amount": "1", "reason": "x", **bad}
        assert (await admin.post(f"/admin/keys/{key_id}/adjust", form)).status_code == 400, bad

    assert (await admin.post(f"/admin/keys/{key_id}/disable", {"disabled": "1"})).status_code == 303
    async with stack.client(key) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "fast-chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code in (401, 403)
    await admin.post(f"/admin/keys/{key_id}/disable", {"disabled": "0"})
    async with stack.client(key) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "fast-chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200

    audit = await stack.pool.fetch("SELECT action, target, detail FROM admin_audit ORDER BY id")
    actions = [a["action"] for a in audit]
    assert actions[-4:] == ["admin_credit", "admin_debit", "key_disabled", "key_enabled"]
    assert "goodwill" in audit[-4]["detail"] and audit[-4]["target"] == f"key {key_id}"


async def test_prefix_search_is_literal(admin: AdminClient):
    await admin.stack.create_key("1.00")
    r = await admin.get("/admin/keys", params={"q": "af-%"})
    assert "No key matches." in r.text
    everything = await admin.get("/admin/keys", params={"q": ""})
    assert "No key matches." not in everything.text


async def test_orders_filtered_with_history(admin: AdminClient):
    stack = admin.stack
    key = await stack.create_key("0")
    key_id = await key_id_of(admin, key)
    pool = stack.pool
    for oid, status, age in (("ord_done", "finished", "1 day"), ("ord_wait", "waiting", "2 days"),
                             ("ord_old", "expired", "60 days")):  # fmt: skip
        await pool.execute(
            "INSERT INTO orders (id, key_id, amount_usd, processor, pay_currency, status, "
            "created_at) VALUES ($1, $2, 10, 'nowpayments', 'btc', $3, now() - $4::text::interval)",
            oid, key_id, status, age,
        )  # fmt: skip
    for status, raw, credited in (("waiting", "waiting", "0"), ("confirming", "confirming", "0"),
                                  ("finished", "finished", "10")):  # fmt: skip
        await pool.execute(
            "INSERT INTO order_events (order_id, payment_id, status, raw_status, credited_usd, "
            "source) VALUES ('ord_done', '5077125051', $1, $2, $3::numeric, 'webhook')",
            status, raw, credited,
        )  # fmt: skip
    page = await admin.get("/admin/orders")
    assert "ord_done" in page.text and "ord_wait" in page.text and "ord_old" not in page.text
    history = page.text.split('id="order-ord_done"')[1].split("</details>")[0]
    assert re.findall(r"<td>(waiting|confirming|finished)</td>", history) == [
        "waiting", "confirming", "finished"]  # fmt: skip
    assert "5077125051" in history and "3 events" in history
    finished = await admin.get("/admin/orders", params={"status": "finished"})
    assert "ord_done" in finished.text and "ord_wait" not in finished.text
    old = await admin.get("/admin/orders", params={"start": "2000-01-01", "status": "expired"})
    assert "ord_old" in old.text and "ord_done" not in old.text


async def test_a_debit_by_hand_cannot_take_what_requests_in_flight_hold(
    admin: AdminClient, fake_openai: FakeOpenAI
) -> None:
    """A debit larger than the available balance (balance less holds) is refused while a
    request holds part of it, saying what is available and held; the balance never goes
    below zero once the request is debited."""
    stack = admin.stack
    key = await stack.create_key("1.00")
    key_id = await key_id_of(admin, key)
    fake_openai.gate.clear()
    body = {"model": "fast-chat", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "[[gated]] hello"}]}  # fmt: skip
    async with stack.client(key) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks = r.aiter_lines()
        assert (await anext(chunks)).startswith("data: ")  # the request is in flight
        row = await stack.pool.fetchrow(
            "SELECT balance_usd, reserved_usd FROM api_keys WHERE id = $1", key_id
        )
        held, available = row["reserved_usd"], row["balance_usd"] - row["reserved_usd"]
        assert held > 0
        too_much = await admin.post(
            f"/admin/keys/{key_id}/adjust",
            {"direction": "debit", "amount": format_usd(available + Decimal("0.01")),
             "reason": "chargeback"},
        )  # fmt: skip
        assert too_much.status_code == 409
        assert f"Available: ${format_usd(available)}" in too_much.text
        assert f"held ${format_usd(held)}" in too_much.text
        assert await stack.pool.fetchval(
            "SELECT balance_usd FROM api_keys WHERE id = $1", key_id
        ) == Decimal("1.00")  # fmt: skip
        # All that is available may be taken: what is held stays for the request.
        exact = await admin.post(f"/admin/keys/{key_id}/adjust",
                                 {"direction": "debit", "amount": format_usd(available),
                                  "reason": "chargeback"})  # fmt: skip
        assert exact.status_code == 303, exact.text
        fake_openai.gate.set()
        lines = [line async for line in chunks]
    final = orjson.loads(next(line for line in reversed(lines) if '"usage"' in line)[6:])
    await stack.wait_metered([final["id"]])
    balance, reserved = await stack.pool.fetchrow(
        "SELECT balance_usd, reserved_usd FROM api_keys WHERE id = $1", key_id
    )
    assert balance == held - Decimal(str(final["usage"]["cost"])) >= 0
    assert reserved == 0
