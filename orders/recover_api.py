"""Email recovery: POST /v1/recover mails every key tied to an address; DELETE /v1/key/email
unties the calling key from its address.

The recovery answer is the same whether or not the address is known, and comes before any
lookup (which runs after the response), so neither its content nor its timing tells.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import holder_summary
from apifast.crypto import EncryptedKey, KeyRingError
from apifast.db import Queries
from apifast.errors import bad
from apifast.orders.email_keys import email_hash, key_aad, normalize_email
from apifast.orders.orders_api import key_mail, parse_body
from apifast.orders.runtime import PaymentsRuntime, runtime
from apifast.request_body import read_body

api = APIRouter(tags=["recovery"])
Q = Queries("apifast.orders")
log = logging.getLogger("apifast.payments")

ACCEPTED = {
    "status": "accepted",
    "message": "If any keys are tied to this address, they have been mailed to it.",
}


async def mail_keys(rt: PaymentsRuntime, email: str) -> None:
    hashed = email_hash(rt.core.secret, email)
    keys = []
    for row in await rt.core.pool.fetch(Q.email_keys_by_hash, hashed):
        sealed = EncryptedKey(row["enc_key_id"], bytes(row["nonce"]), bytes(row["key_ciphertext"]))
        try:
            keys.append(rt.keyring.decrypt(sealed, key_aad(row["key_id"], hashed)).decode())
        except KeyRingError as exc:
            log.error("a stored key copy does not open: %s", exc)
    if keys:
        rt.mailer.send(key_mail(email, keys))


@api.post("/v1/recover", status_code=202)
async def recover(request: Request) -> Response:
    rt = runtime(request)
    rt.recover_limiter.enforce(request)
    body = parse_body(await read_body(request, 4096, rt.settings.body_read_timeout_s))
    email = normalize_email(body.get("email"))
    if email is None:
        raise bad("email", "required, a valid email address")
    # Without SMTP nothing can be sent, but the answer is the same: it must not tell a
    # caller anything about this server or whether the address has keys on file.
    if rt.mailer.configured:
        rt.spawn(mail_keys(rt, email))
    return Response(orjson.dumps(ACCEPTED), status_code=202, media_type="application/json")


@api.delete("/v1/key/email")
async def delete_email(request: Request) -> Response:
    core = runtime(request).core
    _, key = await holder_summary(request, core.pool, core.secret)
    result = await core.pool.execute(Q.email_key_delete, key["id"])
    # The alerts' copy of the address goes with it: alerts are only for a saved email.
    await core.pool.execute(Q.balance_alert_delete, key["id"])
    deleted = result.endswith(" 1")
    return Response(
        orjson.dumps({"email_saved": False, "deleted": deleted}), media_type="application/json"
    )
