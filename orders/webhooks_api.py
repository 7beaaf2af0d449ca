"""POST /v1/webhooks/{processor}: payment notifications from the processors.

401 for a missing or wrong signature and 400 for an unreadable body, both changing nothing;
502 when the processor must be asked and cannot be reached, so that it delivers again.
A genuine webhook for an order we do not know is acknowledged and ignored.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.errors import ApiError
from apifast.orders.crediting import settle_update
from apifast.orders.runtime import runtime
from apifast.payments import PaymentError, WebhookPayloadError, WebhookSignatureError
from apifast.request_body import read_body

api = APIRouter(tags=["payments"])
log = logging.getLogger("apifast.payments")

MAX_WEBHOOK_BODY = 256 * 1024


@api.post("/v1/webhooks/{processor_name}")
async def receive_webhook(processor_name: str, request: Request) -> Response:
    rt = runtime(request)
    processor = rt.processor(processor_name)
    if processor is None:
        raise ApiError(404, "no such payment processor", code="unknown_processor")
    raw = await read_body(request, MAX_WEBHOOK_BODY, rt.settings.body_read_timeout_s)
    try:
        update = processor.verify_webhook(request.headers, raw)
    except WebhookSignatureError as exc:
        log.warning("%s webhook rejected: %s", processor_name, exc)
        raise ApiError(401, "invalid webhook signature", code="invalid_signature") from None
    except WebhookPayloadError as exc:
        log.warning("%s webhook unreadable: %s", processor_name, exc)
        raise ApiError(400, f"invalid webhook body: {exc}", code="invalid_payload") from None
    outcome = "ignored"
    if update is not None:
        try:
            result = await settle_update(
                rt.core.pool,
                processor,
                processor_name,
                update,
                policy=rt.settings.partially_paid_policy,
                source="webhook",
            )
        except PaymentError as exc:
            log.warning("%s webhook: fetching the payment failed: %s", processor_name, exc)
            raise ApiError(
                502, "payment processor unreachable; deliver again", code="processor_error"
            ) from None
        outcome = result.outcome
    return Response(orjson.dumps({"status": outcome}), media_type="application/json")
