"""Sub-keys (POST/GET /v1/keys, PATCH/DELETE /v1/keys/{id}): children draw on their parent's
balance under the same holds, their caps are exact (checked by each hold under the parent's
row lock), and a child can never create keys, see its siblings or read its parent's data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from apifast.keys import hash_key
from apifast.server.retention import RetentionJob, RetentionPass, apply_retention
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack

BODY = {"model": "fast-chat", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def sstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url), hold_wait_s=10)
    async with running_stack(settings) as running:
        yield running


async def _row(stack: Stack, key: str) -> Any:
    return await stack.pool.fetchrow(
        "SELECT id, balance_usd, reserved_usd, spent_usd, parent_id FROM api_keys "
        "WHERE key_hash = $1", hash_key(SECRET.encode(), key),
    )  # fmt: skip


async def _child(stack: Stack, parent: str, **fields: Any) -> dict[str, Any]:
    async with stack.client(parent) as c:
        r = await c.post("/v1/keys", json=fields)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def _cost(stack: Stack) -> Decimal:
    probe = await stack.create_key("1.00")
    async with stack.client(probe) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200
    return Decimal(str(r.json()["usage"]["cost"]))


async def _listed(stack: Stack, parent: str) -> dict[str, dict[str, Any]]:
    async with stack.client(parent) as c:
        r = await c.get("/v1/keys")
    assert r.status_code == 200, r.text
    return {k["id"]: k for k in r.json()["data"]}


async def test_a_child_spends_its_parents_balance_and_is_listed_with_its_usage(
    sstack: Stack,
) -> None:
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent, label="ci runner", spend_cap_usd="1.00",
                        daily_cap_usd="0.50", rpm_limit=100)  # fmt: skip
    assert made["id"].startswith("sk_") and made["key"].startswith("af-")
    assert made["label"] == "ci runner" and made["spend_cap_usd"] == "1.00"
    assert made["usage"] == {"spent_usd": "0.00", "spent_today_usd": "0.00", "held_usd": "0.00"}
    child = made["key"]
    async with sstack.client(child) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200, r.text
        cost = Decimal(str(r.json()["usage"]["cost"]))
        await sstack.wait_metered([r.json()["id"]])
        me = (await c.get("/v1/key")).json()
    # The parent paid, once; the child counted it, once.
    p, k = await _row(sstack, parent), await _row(sstack, child)
    assert p["balance_usd"] == Decimal("5.00") - cost and p["reserved_usd"] == 0
    assert k["balance_usd"] == 0 and k["spent_usd"] == cost and k["parent_id"] == p["id"]
    ledger = await sstack.pool.fetch(
        "SELECT key_id, sub_key_id, amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1",
        r.json()["id"],
    )
    assert [tuple(x) for x in ledger] == [(p["id"], k["id"], -cost)]
    listed = (await _listed(sstack, parent))[made["id"]]
    assert Decimal(listed["usage"]["spent_usd"]) == cost
    assert Decimal(listed["usage"]["spent_today_usd"]) == cost
    assert listed["usage"]["held_usd"] == "0.00" and listed["rpm_limit"] == 100
    # A child sees itself only: no balance (its parent's), no label (the holder's note).
    assert "balance_usd" not in me and "label" not in me
    assert me["id"] == made["id"] and Decimal(me["usage"]["spent_usd"]) == cost
    # The id is ApiFast's own, never the key's hash.
    assert hash_key(SECRET.encode(), child).hex()[:8] not in made["id"]


async def test_disable_enable_and_delete(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent)
    async with sstack.client(parent) as owner, sstack.client(made["key"]) as child:
        r = await owner.patch(f"/v1/keys/{made['id']}", json={"disabled": True, "label": "x"})
        assert r.status_code == 200 and r.json()["disabled"] is True and r.json()["label"] == "x"
        refused = await child.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "key_disabled"
        r = await owner.patch(f"/v1/keys/{made['id']}", json={"disabled": False})
        assert r.status_code == 200 and r.json()["disabled"] is False
        assert (await child.post("/v1/chat/completions", json=BODY)).status_code == 200
        assert (await owner.delete(f"/v1/keys/{made['id']}")).json()["deleted"] is True
        gone = await child.post("/v1/chat/completions", json=BODY)
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_api_key"
        assert made["id"] not in await _listed(sstack, parent)
        for r in (
            await owner.delete(f"/v1/keys/{made['id']}"),
            await owner.patch("/v1/keys/sk_nope", json={"disabled": True}),
        ):
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "sub_key_not_found"


async def test_caps_take_json_integers_exactly_and_refuse_fractions(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent, spend_cap_usd=2, daily_cap_usd=1)
    assert made["spend_cap_usd"] == "2.00" and made["daily_cap_usd"] == "1.00"
    async with sstack.client(parent) as c:
        changed = await c.patch(f"/v1/keys/{made['id']}", json={"spend_cap_usd": 3})
        assert changed.status_code == 200, changed.text
        assert changed.json()["spend_cap_usd"] == "3.00"
        for body in ({"spend_cap_usd": 1.5}, {"daily_cap_usd": 1.0}, {"spend_cap_usd": True}):
            for r in (await c.post("/v1/keys", json=body),
                      await c.patch(f"/v1/keys/{made['id']}", json=body)):  # fmt: skip
                assert r.status_code == 400, (body, r.text)
                error = r.json()["error"]
                assert error["param"] == next(iter(body))
                assert 'send a decimal string like "5.00"' in error["message"]
        too_high = await c.post("/v1/keys", json={"spend_cap_usd": 6})
        assert too_high.status_code == 400 and too_high.json()["error"]["param"] == "spend_cap_usd"
    assert (await _listed(sstack, parent))[made["id"]]["spend_cap_usd"] == "3.00"


async def test_a_cap_is_read_only_from_plain_decimal_digits(sstack: Stack) -> None:
    """Decimal() reads "0_5" (Python's digit grouping) as 5 and "５" (a full-width digit) as
    5: a holder typing half a dollar got a cap of 5.00. Plain ASCII decimals only now."""
    parent = await sstack.create_key("5.00")
    async with sstack.client(parent) as c:
        for value in ("0_5", "５", "1 0", "0x1"):
            r = await c.post("/v1/keys", json={"spend_cap_usd": value})
            assert r.status_code == 400, (value, r.text)
            assert r.json()["error"]["param"] == "spend_cap_usd"
        for value, shown in (("0.5", "0.50"), (" 1 ", "1.00"), ("5e-3", "0.005")):
            made = await c.post("/v1/keys", json={"spend_cap_usd": value})
            assert made.status_code == 201 and made.json()["spend_cap_usd"] == shown, made.text


async def test_bad_input_in_the_error_shape(sstack: Stack) -> None:
    parent = await sstack.create_key("2.00")
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    async with sstack.client(parent) as c:
        for body, param in (
            ({"spend_cap_usd": "2.01"}, "spend_cap_usd"),  # above the balance
            ({"daily_cap_usd": "9"}, "daily_cap_usd"),
            ({"spend_cap_usd": 1.5}, "spend_cap_usd"),  # a float is never money
            ({"expires_at": past}, "expires_at"),
            ({"expires_at": "tomorrow"}, "expires_at"),
            ({"allowed_models": ["no-such-model"]}, "allowed_models"),
            ({"rpm_limit": 0}, "rpm_limit"),
            ({"label": "x" * 101}, "label"),
            ({"label": "a\u0000b"}, "label"),  # NUL: a 500 when stored, before
            ({"label": "line\nbreak"}, "label"),
            ({"colour": "red"}, "colour"),
        ):
            r = await c.post("/v1/keys", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param
            assert r.json()["error"]["type"] == "invalid_request_error"
    async with sstack.client("af-" + "1" * 47) as c:
        assert (await c.get("/v1/keys")).status_code == 401
    await sstack.pool.execute(
        "UPDATE api_keys SET disabled = true WHERE key_hash = $1", hash_key(SECRET.encode(), parent)
    )
    async with sstack.client(parent) as c:
        r = await c.post("/v1/keys", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_disabled"


async def test_a_child_at_its_cap_gets_402_while_its_parent_has_funds(sstack: Stack) -> None:
    cost = await _cost(sstack)
    parent = await sstack.create_key("5.00")
    cap = cost * 2
    made = await _child(sstack, parent, spend_cap_usd=str(cap))
    ids: list[str] = []
    async with sstack.client(made["key"]) as c:
        for _ in range(6):
            r = await c.post("/v1/chat/completions", json=BODY)
            if r.status_code != 200:
                break
            ids.append(r.json()["id"])
            # The cap left less than the request's bound: max_tokens lowered, not refused.
            assert "x-apifast-max-tokens-lowered" in r.headers
            await sstack.wait_metered(ids)
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_balance" and "spend cap" in error["message"]
    assert 1 <= len(ids) <= 2
    spent = (await _row(sstack, made["key"]))["spent_usd"]
    assert 0 < spent <= cap  # exact: never beyond the cap
    async with sstack.client(parent) as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200


async def test_daily_cap_resets_the_next_day(sstack: Stack) -> None:
    cost = await _cost(sstack)
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent, daily_cap_usd=str(cost), spend_cap_usd="1.00")
    async with sstack.client(made["key"]) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        await sstack.wait_metered([r.json()["id"]])
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 402 and "daily spend cap" in r.json()["error"]["message"]
        # The spend counted for today, moved to yesterday: today starts afresh.
        await sstack.pool.execute("UPDATE sub_key_daily SET day = day - 1")
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200


DAYS_OF = (
    "SELECT (now() AT TIME ZONE 'UTC')::date - day AS ago, spent_usd FROM sub_key_daily "
    "WHERE key_id = $1 ORDER BY day"
)


async def _sweep(stack: Stack) -> RetentionPass:
    """One retention pass, as every router runs it hourly."""
    for _ in range(400):
        done = await apply_retention(stack.pool, stack.settings.order_retention_days)
        if done is not None:
            return done
        await asyncio.sleep(0.05)  # the router's own pass holds the lock: it ends soon
    raise AssertionError("the retention lock was never free")


async def test_past_days_of_a_childs_spend_go_and_its_caps_and_spend_stay_exact(
    sstack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sstack.settings.order_retention_days == 0  # pruned without order retention
    cost = await _cost(sstack)
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent, daily_cap_usd=str(cost), spend_cap_usd="1.00")
    sibling = await _child(sstack, parent)
    async with sstack.client(made["key"]) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        spent = Decimal(str(r.json()["usage"]["cost"]))  # max_tokens lowered to the cap
        await sstack.wait_metered([r.json()["id"]])
    child_id = (await _row(sstack, made["key"]))["id"]
    sibling_id = (await _row(sstack, sibling["key"]))["id"]
    # Past days, as the meter would have left them (a day's row is written by its debits).
    for key_id, days_ago in ((child_id, [1, 3, 30, 400]), (sibling_id, [4, 5])):
        await sstack.pool.execute(
            "INSERT INTO sub_key_daily (key_id, day, spent_usd) "
            "SELECT $1, (now() AT TIME ZONE 'UTC')::date - d, 0.25 FROM unnest($2::int[]) d",
            key_id, days_ago,
        )  # fmt: skip
    listed = await _listed(sstack, parent)
    paid = (await _row(sstack, parent))["balance_usd"]

    monkeypatch.setattr("apifast.server.retention._BATCH", 2)  # several batches
    done = await _sweep(sstack)
    assert done.sub_key_days == 5
    # Today's row and yesterday's (the margin) stay, exact; older days are gone.
    rows = [tuple(r) for r in await sstack.pool.fetch(DAYS_OF, child_id)]
    assert rows == [(1, Decimal("0.25")), (0, spent)]
    assert await sstack.pool.fetch(DAYS_OF, sibling_id) == []
    assert (await _sweep(sstack)).sub_key_days == 0

    # The holder sees the same usage, the parent's balance is untouched, and the daily cap
    # still counts today's spend: the child is refused until tomorrow.
    assert await _listed(sstack, parent) == listed
    assert Decimal(listed[made["id"]]["usage"]["spent_today_usd"]) == spent
    assert Decimal(listed[made["id"]]["usage"]["spent_usd"]) == spent
    assert (await _row(sstack, parent))["balance_usd"] == paid == Decimal("5.00") - spent
    async with sstack.client(made["key"]) as c:
        me = (await c.get("/v1/key")).json()
        assert Decimal(me["usage"]["spent_today_usd"]) == spent
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 402 and "daily spend cap" in r.json()["error"]["message"]


async def test_the_retention_job_prunes_past_days_with_order_retention_off(
    sstack: Stack,
) -> None:
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent)
    child_id = (await _row(sstack, made["key"]))["id"]
    await sstack.pool.execute(
        "INSERT INTO sub_key_daily (key_id, day, spent_usd) "
        "VALUES ($1, (now() AT TIME ZONE 'UTC')::date - 3, 1), "
        "($1, (now() AT TIME ZONE 'UTC')::date, 2)", child_id,
    )  # fmt: skip
    job = RetentionJob(sstack.pool, order_days=0)
    job.start()
    try:

        async def days_ago() -> list[int]:
            return [r["ago"] for r in await sstack.pool.fetch(DAYS_OF, child_id)]

        await sstack.wait_until(days_ago, [0])
    finally:
        await job.stop()


async def test_rpm_limit_per_child(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    limited = await _child(sstack, parent, rpm_limit=2)
    other = await _child(sstack, parent)
    async with sstack.client(limited["key"]) as c:
        statuses = [(await c.post("/v1/chat/completions", json=BODY)).status_code
                    for _ in range(3)]  # fmt: skip
        r = await c.post("/v1/chat/completions", json=BODY)
    assert statuses == [200, 200, 429] and r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in r.headers
    async with sstack.client(other["key"]) as c:  # a sibling's limit is not its own
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200


async def test_an_expired_child_gets_401(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    made = await _child(sstack, parent, expires_at=soon)
    assert made["expires_at"].endswith("Z")
    async with sstack.client(made["key"]) as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200
        await sstack.pool.execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE public_id = $1",
            made["id"],
        )
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "key_expired" and "expired" in r.json()["error"]["message"]


async def test_allowed_models_before_any_upstream_call(
    sstack: Stack, fake_openai: FakeOpenAI
) -> None:
    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent, allowed_models=["embed-small"])
    before = len(fake_openai.requests)
    async with sstack.client(made["key"]) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "model_not_allowed"
        assert r.json()["error"]["param"] == "model"
        # The Messages API answers in Anthropic's shape.
        m = await c.post(
            "/v1/messages", headers={"x-api-key": made["key"]},
            json={"model": "fast-chat", "max_tokens": 10,
                  "messages": [{"role": "user", "content": "hi"}]},
        )  # fmt: skip
        assert m.status_code == 403, m.text
        assert m.json()["type"] == "error" and m.json()["error"]["type"] == "permission_error"
        assert len(fake_openai.requests) == before  # nothing went upstream
        e = await c.post("/v1/embeddings", json={"model": "embed-small", "input": "hi"})
        assert e.status_code == 200, e.text


async def test_a_child_cannot_create_keys_see_siblings_or_read_its_parents_data(
    sstack: Stack,
) -> None:
    parent = await sstack.create_key("5.00")
    one = await _child(sstack, parent, label="one")
    two = await _child(sstack, parent, label="two")
    async with sstack.client(one["key"]) as c:
        for r in (
            await c.post("/v1/keys", json={}),
            await c.get("/v1/keys"),
            await c.patch(f"/v1/keys/{two['id']}", json={"disabled": True}),
            await c.delete(f"/v1/keys/{two['id']}"),
            await c.post("/v1/key/rotate"),
            await c.get("/v1/orders"),
            await c.delete("/v1/key/email"),
        ):
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "sub_key_not_allowed"
        me = (await c.get("/v1/key")).json()
    assert set(me) >= {"id", "usage", "spend_cap_usd"} and "balance_usd" not in me
    assert two["id"] in await _listed(sstack, parent)  # untouched
    async with sstack.client(two["key"]) as c:
        sibling = await c.post("/v1/chat/completions", json=BODY)
        assert sibling.status_code == 200
    async with sstack.client(parent) as c:
        own = await c.post("/v1/chat/completions", json=BODY)
        assert own.status_code == 200

        async def seen() -> int:  # the meter wrote both to ClickHouse
            a = (await c.get(f"/v1/generation/{own.json()['id']}")).status_code
            async with sstack.client(two["key"]) as t:
                b = (await t.get(f"/v1/generation/{sibling.json()['id']}")).status_code
            return a + b

        await sstack.wait_until(seen, 400)
    # Usage, generations and receipts answer a sub-key with its own requests only: none.
    today = datetime.now(UTC).date().isoformat()
    async with sstack.client(one["key"]) as c:
        usage = (await c.get("/v1/usage")).json()
        assert usage["total_requests"] == 0 and usage["data"] == []
        assert (await c.get("/v1/generations")).json()["data"] == []
        for gen in (own.json()["id"], sibling.json()["id"]):
            assert (await c.get(f"/v1/generation/{gen}")).status_code == 404
        receipts = await c.get(f"/v1/receipts?from={today}&to={today}")
        assert receipts.status_code == 200 and receipts.text == ""


async def test_concurrent_children_cannot_overspend_their_parent(sstack: Stack) -> None:
    cost = await _cost(sstack)
    # The parent pays for about ten requests; each of three children may spend four.
    parent = await sstack.create_key(str(cost * 10))
    cap = cost * 4
    children = [await _child(sstack, parent, spend_cap_usd=str(cap)) for _ in range(3)]
    clients = [sstack.client(k["key"]) for k in children]
    try:
        answers = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=BODY) for c in clients for _ in range(20))
        )
    finally:
        for c in clients:
            await c.aclose()
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 402}, statuses
    served = [r for r in answers if r.status_code == 200]
    assert len(served) >= 9, statuses
    await sstack.wait_metered([r.json()["id"] for r in served])
    charged = sum(Decimal(str(r.json()["usage"]["cost"])) for r in served)
    p = await _row(sstack, parent)
    assert p["balance_usd"] == cost * 10 - charged >= 0  # never below zero
    assert p["reserved_usd"] == 0
    ledger = await sstack.pool.fetch(
        "SELECT sub_key_id, sum(amount_usd) AS total, count(*) AS n FROM ledger "
        "WHERE kind = 'usage' AND key_id = $1 GROUP BY sub_key_id", p["id"],
    )  # fmt: skip
    assert sum(r["n"] for r in ledger) == len(served)  # each request debited once
    assert -sum(r["total"] for r in ledger) == charged
    per_child = {r["sub_key_id"]: -r["total"] for r in ledger}
    for made in children:
        row = await _row(sstack, made["key"])
        assert row["spent_usd"] == per_child.get(row["id"], 0) <= cap  # caps exact too


LEASES = "SELECT generation_id, amount_usd FROM reservations WHERE generation_id LIKE 'lease:%'"


async def test_a_busy_child_is_never_leased_and_its_parents_lease_is_a_hold_on_it(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    # Two holds within a tick open a lease: few enough that a loaded machine still gets
    # there (eight sequential requests within a second did not, under a parallel test run).
    settings = stack_settings_factory(
        models_toml(fake_openai.url), lease_idle_s=30, lease_min_rps=2
    )
    async with running_stack(settings) as stack:
        parent = await stack.create_key("20.00")
        made = await _child(stack, parent)
        body = {**BODY, "max_tokens": 40}
        async with stack.client(made["key"]) as c:
            busy = await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(40))
            )
        assert {r.status_code for r in busy} == {200}
        # Far past the lease threshold, yet every hold was the child's own, in Postgres.
        assert await stack.pool.fetch(LEASES) == [] and not stack.state.leases._live
        async with stack.client(parent) as c:
            for _ in range(200):
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
                if await stack.pool.fetch(LEASES):
                    break
        [(lease_id, leased)] = await stack.pool.fetch(LEASES)
        slow = {
            **body,
            "stream": True,
            "messages": [{"role": "user", "content": "hi [[slow:0.2]]"}],
        }
        async with (
            stack.client(made["key"]) as c,
            c.stream("POST", "/v1/chat/completions", json=slow) as s,
        ):
            assert s.status_code == 200
            # The child's hold sits on the parent's row next to the parent's lease: what the
            # lease holds is not available to the child, and nothing is promised twice.
            p = await _row(stack, parent)
            holds = await stack.pool.fetch(
                "SELECT generation_id, key_id, sub_key_id, amount_usd FROM reservations"
            )
            child_id = (await _row(stack, made["key"]))["id"]
            mine = [h for h in holds if h["sub_key_id"] == child_id]
            assert len(mine) == 1 and mine[0]["key_id"] == p["id"]
            assert p["reserved_usd"] >= leased + mine[0]["amount_usd"]
            async for _ in s.aiter_bytes():
                pass
        assert lease_id in {h["generation_id"] for h in holds}
        assert list(stack.state.leases._live) == [hash_key(SECRET.encode(), parent)]


async def test_reconcile_matches_a_childs_debits_to_its_own_usage(sstack: Stack) -> None:
    from apifast.metering.reconcile import reconcile

    parent = await sstack.create_key("5.00")
    made = await _child(sstack, parent)
    ids = []
    for key in (parent, made["key"], made["key"]):
        async with sstack.client(key) as c:
            r = await c.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200
            ids.append(r.json()["id"])
    await sstack.wait_metered(ids)
    start = datetime.now(UTC) - timedelta(hours=1)
    end = datetime.now(UTC) + timedelta(hours=1)

    async def clean() -> bool:  # ClickHouse is written just after the ledger
        return (await reconcile(sstack.settings, start, end)).clean

    await sstack.wait_until(clean, True)
    report = await reconcile(sstack.settings, start, end)
    totals = {k.key_hash: (k.ledger_events, k.clickhouse_events) for k in report.keys}
    assert totals[hash_key(SECRET.encode(), made["key"]).hex()] == (2, 2)
    assert totals[hash_key(SECRET.encode(), parent).hex()] == (1, 1)


async def test_a_child_refused_for_its_parents_balance_takes_back_the_parents_lease_first(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    # No waiting for holds in flight: without the give-back this would be a 429 at once.
    settings = stack_settings_factory(
        models_toml(fake_openai.url), lease_idle_s=30, lease_min_rps=2, hold_wait_s=0
    )
    async with running_stack(settings) as stack:
        parent = await stack.create_key("0.006")
        made = await _child(stack, parent)
        body = {**BODY, "max_tokens": 40}
        async with stack.client(parent) as c:
            for _ in range(100):
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
                if await stack.pool.fetch(LEASES):
                    break
        [(_, leased)] = await stack.pool.fetch(LEASES)
        p = await _row(stack, parent)
        available = p["balance_usd"] - p["reserved_usd"]
        # A prompt whose input bound alone needs more than the lease leaves available, but
        # less than the lease gives back: sized from what is held now, as the lease's size
        # depends on how many requests came before it.
        price = Decimal("0.0000005")  # per input byte of the bound, as for output tokens
        size = int((available + leased / 2) / price) - 16
        big = {**body, "messages": [{"role": "user", "content": "x" * size}]}
        need = Decimal(size + 16) * price
        assert available < need < available + leased, (available, leased, need)
        async with stack.client(made["key"]) as c:
            r = await c.post("/v1/chat/completions", json=big)
        assert r.status_code == 200, r.text
        assert not stack.state.leases._live  # the parent's lease went back for it


async def test_counting_endpoints_refuse_what_the_hold_would(
    sstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """`/v1/messages/count_tokens` and `/v1/responses/input_tokens` are free, but a sub-key
    limited to one model counted on any, and an expired one counted on: now the refusals
    the request's hold gives (403 `model_not_allowed`, 401 `key_expired`), each in its
    protocol's shape, with nothing held or sent upstream; an allowed model still counts."""
    parent = await sstack.create_key("5.00")
    limited = await _child(sstack, parent, allowed_models=["embed-small"])
    allowed = await _child(sstack, parent, allowed_models=["fast-chat"])
    expired = await _child(sstack, parent)
    await sstack.pool.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE public_id = $1",
        expired["id"],
    )
    count = {"model": "fast-chat", "messages": [{"role": "user", "content": "hi"}]}
    inputs = {"model": "fast-chat", "input": "hi"}

    async def counted(key: str) -> tuple[httpx.Response, httpx.Response]:
        async with sstack.client(key) as c:
            m = await c.post("/v1/messages/count_tokens", json=count,
                             headers={"x-api-key": key})  # fmt: skip
            r = await c.post("/v1/responses/input_tokens", json=inputs)
        return m, r

    before = len(fake_openai.requests)
    for key, status, code, kind in (
        (limited["key"], 403, "model_not_allowed", "permission_error"),
        (expired["key"], 401, "key_expired", "authentication_error"),
    ):
        m, r = await counted(key)
        assert m.status_code == status and r.status_code == status, (m.text, r.text)
        assert m.json()["type"] == "error" and m.json()["error"]["type"] == kind, m.text
        assert r.json()["error"]["code"] == code, r.text
    m, r = await counted(allowed["key"])
    assert m.status_code == 200 and m.json()["input_tokens"] > 0, m.text
    assert r.status_code == 200 and r.json()["input_tokens"] > 0, r.text
    assert len(fake_openai.requests) == before  # nothing went upstream
    assert await sstack.pool.fetchval("SELECT count(*) FROM reservations") == 0


async def test_a_child_that_no_longer_works_reads_nothing_either(sstack: Stack) -> None:
    """An expired child, one its holder disabled, and one whose parent is disabled got 401
    on every request, yet still read /v1/key, /v1/usage, /v1/generations, its generations
    and /v1/receipts (a leaked child key kept showing what it had been used for). Now each
    of these is the same 401 its requests get; enabled again, it reads its history again."""
    parent = await sstack.create_key("5.00")
    other = await sstack.create_key("5.00")
    made = {name: await _child(sstack, p, label=name)
            for name, p in (("expired", parent), ("disabled", parent), ("orphan", other))}  # fmt: skip
    gens = {}
    for name, child in made.items():
        async with sstack.client(child["key"]) as c:
            r = await c.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            gens[name] = r.json()["id"]
    await sstack.wait_metered(list(gens.values()))
    paths = ["/v1/key", "/v1/usage", "/v1/generations", "/v1/receipts"]

    async def answers(name: str) -> list[httpx.Response]:
        async with sstack.client(made[name]["key"]) as c:
            return [await c.get(p) for p in [*paths, f"/v1/generation/{gens[name]}"]]

    for response in await answers("orphan"):  # working: all of it readable
        assert response.status_code == 200, response.text
    await sstack.pool.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE public_id = $1",
        made["expired"]["id"],
    )
    async with sstack.client(parent) as c:
        r = await c.patch(f"/v1/keys/{made['disabled']['id']}", json={"disabled": True})
        assert r.status_code == 200, r.text
    await sstack.pool.execute(
        "UPDATE api_keys SET disabled = true WHERE key_hash = $1", hash_key(SECRET.encode(), other)
    )
    for name, code in (("expired", "key_expired"), ("disabled", "key_disabled"),
                       ("orphan", "key_disabled")):  # fmt: skip
        for response in await answers(name):
            assert response.status_code == 401, (name, response.url, response.text)
            assert response.json()["error"]["code"] == code, response.text
            assert response.json()["error"]["type"] == "authentication_error"
    async with sstack.client(parent) as c:
        r = await c.patch(f"/v1/keys/{made['disabled']['id']}", json={"disabled": False})
        assert r.status_code == 200, r.text
    for response in await answers("disabled"):
        assert response.status_code == 200, response.text


async def test_concurrent_creations_never_pass_the_sub_key_cap(sstack: Stack) -> None:
    """Counting a key's sub-keys and adding one happen under the parent's lock: of many
    creations at once, only as many as the cap leaves room for get a key."""
    from apifast.router.subkeys import MAX_SUB_KEYS

    parent = await sstack.create_key("5.00")
    parent_id = (await _row(sstack, parent))["id"]
    await sstack.pool.execute(
        "INSERT INTO api_keys (key_hash, prefix, parent_id, public_id) "
        "SELECT sha256(('probe-' || i)::bytea), 'af-probe', $1, 'sk_probe' || i "
        "FROM generate_series(1, $2) AS i", parent_id, MAX_SUB_KEYS - 2,
    )  # fmt: skip
    async with sstack.client(parent) as c:
        made = await asyncio.gather(*(c.post("/v1/keys", json={}) for _ in range(8)))
    assert sorted(r.status_code for r in made) == [201, 201] + [400] * 6
    refused = next(r for r in made if r.status_code == 400)
    assert refused.json()["error"]["code"] == "too_many_sub_keys"
    count = "SELECT count(*) FROM api_keys WHERE parent_id = $1 AND deleted_at IS NULL"
    assert await sstack.pool.fetchval(count, parent_id) == MAX_SUB_KEYS
