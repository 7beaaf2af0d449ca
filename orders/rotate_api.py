"""POST /v1/key/rotate: the key holder's remedy for a leaked key. A new key takes over the
whole balance, the limits, the orders (so a payment still on its way credits the new key), the
sub-keys (they keep their keys and now draw on the new one), the spend so far (spent_usd),
this minute's rate-limit counts, the low-balance alert and the opted-in recovery email (its
stored copy re-encrypted for the new key), in one transaction; the old key is disabled. The
new key is shown once, in the answer.

The history stays where it is (ClickHouse rows and receipts name the hash of the key that
made each request); the new key reads it through its lineage (key_predecessors, migration
0023), so /v1/usage, /v1/receipts and /v1/generation(s) show the old key's requests too, over
any number of rotations up to MAX_ROTATIONS.

Money in flight is never lost: the old key is disabled first (every router stops serving it
within a second: NOTIFY, and their leases on it are given back), then the rotation waits for
its holds to settle, up to APIFAST_ROTATE_WAIT_S. If they do not, the old key is enabled again
(unless an operator disabled it meanwhile) and the answer is 409 with Retry-After; nothing
has moved. A debit of the old key that comes
later still (a spooled event replayed after its hold expired, a reconcile repair) is billed by
the meter to the key it was rotated to (metering/sql/settle_usage_batch.sql).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import asyncpg
import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import holder_summary
from apifast.crypto import EncryptedKey
from apifast.db import Queries
from apifast.errors import ApiError
from apifast.key_admin import insert_key
from apifast.money import format_usd
from apifast.orders.balance_alerts import alert_aad
from apifast.orders.email_keys import key_aad
from apifast.orders.runtime import PaymentsRuntime, runtime

api = APIRouter(tags=["keys"])
Q = Queries("apifast.orders")
_POLL_S = 0.1
# A key's history is read as its hash plus its predecessors' in one ClickHouse query; this
# keeps that list (and the query's parameters) small.
MAX_ROTATIONS = 100


# Not in the OpenAPI schema: a client generated from it, or a fuzzer that calls every
# operation, would disable its own key. Documented in the README.
def _in_flight() -> ApiError:
    return ApiError(
        409,
        "This key has requests in flight; retry the rotation when they have finished.",
        code="requests_in_flight",
        headers={"Retry-After": "2"},
    )


def _in_progress() -> ApiError:
    return ApiError(
        409,
        "This key is being rotated by another request; retry to see how it ended.",
        code="rotation_in_progress",
        headers={"Retry-After": "2"},
    )


async def _move_alert(
    rt: PaymentsRuntime, conn: asyncpg.Connection, old_id: int, new_id: int
) -> None:
    """The low-balance alert follows the key: its address re-encrypted for the new row, its
    state (armed, last sent) kept, so a rotation never sends a crossing's alert twice."""
    row = await conn.fetchrow(Q.balance_alert_get, old_id)
    if row is None:
        return
    sealed = EncryptedKey(row["enc_key_id"], bytes(row["nonce"]), bytes(row["email_ciphertext"]))
    address = rt.keyring.decrypt(sealed, alert_aad(old_id))
    moved = rt.keyring.encrypt(address, alert_aad(new_id))
    await conn.execute(Q.balance_alert_move, new_id, old_id, moved.ciphertext, moved.nonce,
                       moved.kid)  # fmt: skip
    await conn.execute(Q.balance_alert_delete, old_id)


async def _move(rt: PaymentsRuntime, old_id: int) -> tuple[str, Decimal, bool]:
    """Once the disabled key's holds have settled, move everything to a new key in one
    transaction: (the new key, the balance moved, whether an email came along)."""
    pool = rt.core.pool
    deadline = time.monotonic() + rt.settings.rotate_wait_s
    while await pool.fetchval(Q.key_hold_count, old_id):
        if time.monotonic() >= deadline:
            raise _in_flight()
        await asyncio.sleep(_POLL_S)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(Q.rotate_key_lock, old_id)
        assert row is not None
        if row["holds"]:  # a hold slipped in before the disable took effect
            raise _in_flight()
        if row["predecessors"] >= MAX_ROTATIONS:
            raise ApiError(409, f"This key has been rotated {MAX_ROTATIONS} times, the most "
                           "one history may span.", code="rotation_limit")  # fmt: skip
        key, new_id, _ = await insert_key(conn, rt.core.secret)
        balance: Decimal = row["balance_usd"]
        await conn.execute(Q.rotate_key_move, old_id, new_id, f"rotate:{old_id}", balance)
        hashed = await conn.fetchval(Q.email_key_get, old_id)
        if hashed is not None:
            sealed = rt.keyring.encrypt(key.encode(), key_aad(new_id, hashed))
            await conn.execute(Q.email_key_upsert, new_id, hashed, sealed.ciphertext,
                               sealed.nonce, sealed.kid)  # fmt: skip
            await conn.execute(Q.email_key_delete, old_id)
            await _move_alert(rt, conn, old_id, new_id)
    return key, balance, hashed is not None


@api.post("/v1/key/rotate", status_code=201, include_in_schema=False)
async def rotate(request: Request) -> Response:
    rt = runtime(request)
    pool, secret = rt.core.pool, rt.core.secret
    _, old = await holder_summary(request, pool, secret)
    if old["disabled"]:
        raise ApiError(401, "This API key has been disabled.", code="key_disabled")
    if await pool.fetchval(Q.rotate_key_claim, old["id"]) is None:
        # Another rotation of this key disabled it after our read: that one goes on alone.
        # Re-enabling on our way out would give the rotated-away key back its life.
        raise _in_progress()
    try:
        key, balance, email_saved = await _move(rt, old["id"])
    except BaseException:
        # Nothing moved (the transaction rolled back): the old key serves again, unless an
        # operator disabled it meanwhile. Shielded, so that a cancelled request cannot leave
        # its holder locked out.
        await asyncio.shield(pool.execute(Q.rotate_key_release, old["id"]))
        raise
    body = {
        "key": key,
        "balance_usd": format_usd(balance),
        "email_saved": email_saved,
        "message": "Store this key now: it is shown only once. The old key is disabled.",
    }
    return Response(orjson.dumps(body), status_code=201, media_type="application/json")
