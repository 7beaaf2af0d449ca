"""Webhook signatures: the reference test vectors, JavaScript number formatting, and tampering."""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal

import pytest

from apifast.payments import PaymentStatus, WebhookPayloadError, WebhookSignatureError
from apifast.plugins.payments.btcpay import BTCPayProcessor, webhook_signature
from apifast.plugins.payments.js_json import canonical_json, js_number, loads_exact
from apifast.plugins.payments.nowpayments import NowPaymentsProcessor, ipn_signature
from tests.fakes.btcpay import FakeBTCPay
from tests.fakes.nowpayments import FakeNowPayments, sign_ipn

VECTOR_A = (
    '{"actually_paid":15,"actually_paid_at_fiat":0,"fee":{"currency":"btc",'
    '"depositFee":0.09853637216235617,"serviceFee":0,"withdrawalFee":0},"invoice_id":null,'
    '"order_description":null,"order_id":null,"outcome_amount":14.8106,'
    '"outcome_currency":"trx","parent_payment_id":987654321,"pay_address":"address",'
    '"pay_amount":15,"pay_currency":"trx","payin_extra_id":null,"payment_extra_ids":null,'
    '"payment_id":123456789,"payment_status":"finished","price_amount":1,'
    '"price_currency":"usd","purchase_id":"123456789"}'
)
VECTOR_A_SIG = (
    "c5e1128c8cbb43994d215bf38d48f1d399fef169842f95d831a0260356436d89"
    "6cbc0cc5442eb18fcbd6f8da6a6f9d39b63c91f9659896a0dd62163b12109790"
)
VECTOR_B_SIG = (
    "1b6be51d5b318df11f120aaf9ee56ba94b34bd97a1a35fa90b3e46b6de55baf0"
    "94487d61d30a73bf589c3b5afa6c7aeb8e204ebfadfa66b1d26eb7031c1f6dec"
)
BTCPAY_BODY = b'{\n  "deliveryId": "d1",\n  "type": "InvoiceSettled"\n}'
BTCPAY_SIG = "sha256=a28d3b79283244dc951976491eae7e26d050bfe38ae67abcd9f0beaf7ce11dc3"


def _nowpayments(secret: str = "test_ipn_secret") -> NowPaymentsProcessor:
    return NowPaymentsProcessor(api_key="k", ipn_secret=secret, base_url="http://127.0.0.1:9/v1")


def _btcpay(secret: str = "HelloWorld", store: str = "S1") -> BTCPayProcessor:
    return BTCPayProcessor(
        url="http://127.0.0.1:9", api_key="k", store_id=store, webhook_secret=secret
    )


# --- reference vectors ----------------------------------------------------------------------


def test_vector_a_canonical_string_and_signature() -> None:
    body = loads_exact(VECTOR_A)
    assert canonical_json(body) == VECTOR_A
    assert ipn_signature("test_ipn_secret", body) == VECTOR_A_SIG


def test_vector_a_from_a_shuffled_body_verifies() -> None:
    # NOWPayments sends the fields in its own order; the signature is over the sorted form.
    body = loads_exact(VECTOR_A)
    shuffled = dict(reversed(list(body.items())))
    shuffled["fee"] = dict(reversed(list(body["fee"].items())))
    raw = json.dumps(shuffled, default=str).replace('"0.09853637216235617"', "0.09853637216235617")
    raw = raw.replace('"14.8106"', "14.8106")
    update = _nowpayments().verify_webhook({"x-nowpayments-sig": VECTOR_A_SIG}, raw.encode())
    assert update is not None
    assert update.payment_id == "123456789"
    assert update.parent_payment_id == "987654321"
    assert update.status is PaymentStatus.FINISHED
    assert update.credit_usd == Decimal(1)


def test_vector_b_sorts_nested_keys() -> None:
    body = loads_exact('{"b":2,"a":{"d":4,"c":3}}')
    assert canonical_json(body) == '{"a":{"c":3,"d":4},"b":2}'
    assert ipn_signature("secret", body) == VECTOR_B_SIG


def test_secret_is_trimmed_like_the_official_sdk() -> None:
    assert ipn_signature("  test_ipn_secret\n", loads_exact(VECTOR_A)) == VECTOR_A_SIG


def test_btcpay_vector() -> None:
    assert webhook_signature("HelloWorld", BTCPAY_BODY) == BTCPAY_SIG
    # The vector's signature is accepted; having no invoiceId, it is then an unreadable
    # event (400), not a forged one (401).
    with pytest.raises(WebhookPayloadError):
        _btcpay().verify_webhook({"BTCPay-Sig": BTCPAY_SIG}, BTCPAY_BODY)
    with pytest.raises(WebhookSignatureError):
        _btcpay().verify_webhook({"BTCPay-Sig": BTCPAY_SIG}, BTCPAY_BODY.replace(b"d1", b"d2"))


def test_btcpay_vector_signature_accepted_case_insensitively() -> None:
    body = b'{\n  "deliveryId": "d1",\n  "type": "InvoiceSettled",\n  "invoiceId": "INV1"\n}'
    sig = webhook_signature("HelloWorld", body)
    update = _btcpay().verify_webhook({"btcpay-sig": sig.upper().replace("SHA256", "sha256")}, body)
    assert update is not None and update.payment_id == "INV1"
    assert update.refetch


# --- JavaScript number formatting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (15, "15"),
        (15.0, "15"),
        (0, "0"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (0.0000123, "0.0000123"),
        (0.000001, "0.000001"),
        (0.0000001, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e21, "1.5e+21"),
        (0.1 + 0.2, "0.30000000000000004"),
        (123456789.123, "123456789.123"),
        (-2.5e-8, "-2.5e-8"),
        (5e-324, "5e-324"),
        (2**53, "9007199254740992"),
        (2**60, "1152921504606847000"),
        (Decimal("0.0000123"), "0.0000123"),
        (Decimal("1.23E-5"), "0.0000123"),
        (Decimal("1E-7"), "1e-7"),
        (Decimal("0.10"), "0.1"),
        (Decimal("10.00"), "10"),
        (Decimal("1E+2"), "100"),
        (Decimal("0.09853637216235617"), "0.09853637216235617"),
        (Decimal("0.30000000000000004"), "0.30000000000000004"),
        # More digits than a double holds: Node would print the double's shortest form.
        (Decimal("0.1000000000000000055511151231257827"), "0.1"),
        (Decimal("123456789012345678901"), "123456789012345680000"),
        (Decimal("-0"), "0"),
    ],
)
def test_js_number(value: object, expected: str) -> None:
    assert js_number(value) == expected  # type: ignore[arg-type]


def test_js_number_matches_python_float_shortest_repr_everywhere() -> None:
    # Whatever the magnitude, formatting a float and its exact-digits Decimal agree.
    for exponent in range(-12, 25):
        for mantissa in ("1", "1.5", "9.87654321", "3.14159265358979"):
            value = float(f"{mantissa}e{exponent}")
            assert js_number(value) == js_number(Decimal(repr(value)))


def test_canonical_json_escaping_and_key_order() -> None:
    body = {"b": "a/b", "a": "ünï\u2028", "c": 'q"\\\n\x01', "10": 1, "9": 2, "é": 3, "Z": 4}
    # Integer-like keys first in numeric order (JS own-property order), then code-unit order;
    # `/`, non-ASCII and U+2028 are not escaped; control characters are, in lowercase hex.
    assert canonical_json(body) == (
        '{"9":2,"10":1,"Z":4,"a":"ünï\u2028","b":"a/b","c":"q\\"\\\\\\n\\u0001","é":3}'
    )


def test_arrays_keep_order_and_their_objects_are_sorted() -> None:
    assert canonical_json({"x": [3, {"b": 1, "a": 2}, None]}) == '{"x":[3,{"a":2,"b":1},null]}'


def test_exact_parsing_keeps_digits_for_amounts() -> None:
    body = loads_exact('{"actually_paid":0.00012345678901234567,"pay_amount":0.0002}')
    assert body["actually_paid"] == Decimal("0.00012345678901234567")
    assert body["pay_amount"] == Decimal("0.0002")


# --- NOWPayments verification ----------------------------------------------------------------


def _signed_ipn(fake_body: dict[str, object], secret: str = "s3cret") -> tuple[bytes, str]:
    raw = json.dumps(fake_body, separators=(",", ":")).encode()
    return raw, sign_ipn(secret, fake_body)


def _ipn(status: str = "finished", **over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "payment_id": 5077000001,
        "parent_payment_id": None,
        "invoice_id": None,
        "payment_status": status,
        "pay_address": "btcaddr",
        "payin_extra_id": None,
        "price_amount": 10,
        "price_currency": "usd",
        "pay_amount": 0.0002,
        "actually_paid": 0.0002,
        "actually_paid_at_fiat": 10,
        "pay_currency": "btc",
        "order_id": "ord_abc",
        "order_description": "ApiFast credit",
        "purchase_id": "5977000001",
        "outcome_amount": 0.000199,
        "outcome_currency": "btc",
        "payment_extra_ids": None,
        "fee": {"currency": "btc", "depositFee": 8e-7, "withdrawalFee": 0, "serviceFee": 2e-7},
    }
    body.update(over)
    return body


def test_fake_signed_ipn_verifies_with_small_numbers() -> None:
    # depositFee 8e-7 is written by Node as 8e-7 and by Python as 8e-07: the formatter
    # must rebuild Node's form or the signature fails.
    raw, sig = _signed_ipn(_ipn())
    update = _nowpayments("s3cret").verify_webhook({"X-NOWPAYMENTS-SIG": sig}, raw)
    assert update is not None
    assert update.order_id == "ord_abc"
    assert update.payment_id == "5077000001"
    assert update.credit_usd == Decimal(10)


def test_partially_paid_credits_in_proportion_without_floats() -> None:
    raw, sig = _signed_ipn(_ipn("partially_paid", actually_paid=0.00015))
    update = _nowpayments("s3cret").verify_webhook({"x-nowpayments-sig": sig}, raw)
    assert update is not None and update.status is PaymentStatus.PARTIALLY_PAID
    assert update.credit_usd == Decimal("7.5")


def test_partial_credit_is_rounded_down_and_capped() -> None:
    raw, sig = _signed_ipn(_ipn("partially_paid", pay_amount=0.0003, actually_paid=0.0001))
    update = _nowpayments("s3cret").verify_webhook({"x-nowpayments-sig": sig}, raw)
    assert update is not None and update.credit_usd == Decimal("3.333333333333")
    raw, sig = _signed_ipn(_ipn("partially_paid", actually_paid=0.0009))
    update = _nowpayments("s3cret").verify_webhook({"x-nowpayments-sig": sig}, raw)
    assert update is not None and update.credit_usd == Decimal(10)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda raw: raw.replace(b'"price_amount":10', b'"price_amount":100'),
        lambda raw: raw.replace(b'"payment_status":"waiting"', b'"payment_status":"finished"'),
        lambda raw: raw.replace(b'"order_id":"ord_abc"', b'"order_id":"ord_xyz"'),
        lambda raw: raw.replace(b"8e-07", b"9e-07"),
    ],
)
def test_tampered_ipn_fails(tamper) -> None:  # type: ignore[no-untyped-def]
    raw, sig = _signed_ipn(_ipn("waiting"))
    tampered = tamper(raw)
    assert tampered != raw
    with pytest.raises(WebhookSignatureError):
        _nowpayments("s3cret").verify_webhook({"x-nowpayments-sig": sig}, tampered)


def test_ipn_with_wrong_secret_missing_or_garbage_signature_fails() -> None:
    raw, sig = _signed_ipn(_ipn())
    for headers in ({"x-nowpayments-sig": sig}, {}, {"x-nowpayments-sig": "zz\u00e9"}):
        with pytest.raises(WebhookSignatureError):
            _nowpayments("other").verify_webhook(headers, raw)


def test_malformed_ipn_is_a_payload_error() -> None:
    with pytest.raises(WebhookPayloadError):
        _nowpayments().verify_webhook({"x-nowpayments-sig": "ab"}, b"{not json")
    body = {"payment_status": "finished"}
    sig = sign_ipn("s3cret", body)
    with pytest.raises(WebhookPayloadError):
        _nowpayments("s3cret").verify_webhook({"x-nowpayments-sig": sig}, json.dumps(body).encode())


def test_unknown_status_is_acknowledged_and_ignored() -> None:
    raw, sig = _signed_ipn(_ipn("some_future_status"))
    assert _nowpayments("s3cret").verify_webhook({"x-nowpayments-sig": sig}, raw) is None


def test_fake_nowpayments_ipn_body_round_trips() -> None:
    # The fake's own serializer and ApiFast's verifier agree on a realistic body.
    fake = FakeNowPayments(ipn_secret="s3cret")
    payment = fake._new_payment(
        price=Decimal("12.34"), coin="btc", order_id="ord_1", description=None, callback=None
    )
    body = fake.pay(payment.payment_id, Decimal("0.5"))
    raw = json.dumps(body).encode()  # Python spacing and 1e-05 forms on the wire: still fine
    update = _nowpayments("s3cret").verify_webhook(
        {"x-nowpayments-sig": sign_ipn("s3cret", body)}, raw
    )
    assert update is not None and update.status is PaymentStatus.PARTIALLY_PAID
    assert update.credit_usd is not None and Decimal("6.16") < update.credit_usd <= Decimal("6.17")


# --- BTCPay verification ---------------------------------------------------------------------


def _btcpay_event(event_type: str = "InvoiceSettled", **extra: object) -> bytes:
    event = {
        "deliveryId": "D1",
        "webhookId": "W1",
        "originalDeliveryId": "D1",
        "isRedelivery": False,
        "type": event_type,
        "timestamp": 1700000000,
        "storeId": "S1",
        "invoiceId": "INV1",
        "metadata": {"orderId": "ord_abc"},
        **extra,
    }
    return json.dumps(event, indent=2).encode()


def test_btcpay_event_verifies_over_raw_bytes() -> None:
    raw = _btcpay_event()
    update = _btcpay().verify_webhook({"BTCPay-Sig": webhook_signature("HelloWorld", raw)}, raw)
    assert update is not None
    assert (update.payment_id, update.order_id, update.status) == (
        "INV1",
        "ord_abc",
        PaymentStatus.FINISHED,
    )


def test_btcpay_reserialized_body_fails() -> None:
    # Same JSON, different bytes: the signature is over the raw body, never re-serialized.
    raw = _btcpay_event()
    compact = json.dumps(json.loads(raw), separators=(",", ":")).encode()
    with pytest.raises(WebhookSignatureError):
        _btcpay().verify_webhook({"BTCPay-Sig": webhook_signature("HelloWorld", raw)}, compact)


def test_btcpay_bad_signatures_fail() -> None:
    raw = _btcpay_event()
    good = webhook_signature("HelloWorld", raw)
    bad_headers: list[dict[str, str]] = [
        {},
        {"BTCPay-Sig": ""},
        {"BTCPay-Sig": good[len("sha256=") :]},  # missing the scheme
        {"BTCPay-Sig": webhook_signature("wrong", raw)},
        {"BTCPay-Sig": "sha256=" + hmac.new(b"HelloWorld", raw, hashlib.sha1).hexdigest()},
    ]
    for headers in bad_headers:
        with pytest.raises(WebhookSignatureError):
            _btcpay().verify_webhook(headers, raw)
    with pytest.raises(WebhookSignatureError):
        _btcpay().verify_webhook({"BTCPay-Sig": good}, raw.replace(b"ord_abc", b"ord_xyz"))


def test_btcpay_partial_expiry_and_other_store() -> None:
    raw = _btcpay_event("InvoiceExpired", partiallyPaid=True)
    update = _btcpay().verify_webhook({"BTCPay-Sig": webhook_signature("HelloWorld", raw)}, raw)
    assert update is not None and update.status is PaymentStatus.PARTIALLY_PAID
    other = _btcpay(store="S2")
    assert other.verify_webhook({"BTCPay-Sig": webhook_signature("HelloWorld", raw)}, raw) is None


def test_btcpay_malformed_event_is_a_payload_error() -> None:
    for raw in (b"[1, 2]", b"not json", b'{"type": "InvoiceSettled"}'):
        with pytest.raises(WebhookPayloadError):
            _btcpay().verify_webhook({"BTCPay-Sig": webhook_signature("HelloWorld", raw)}, raw)


def test_fake_btcpay_signs_like_btcpay() -> None:
    fake = FakeBTCPay(webhook_secret="HelloWorld")
    assert fake.sign(BTCPAY_BODY) == BTCPAY_SIG


def test_absurd_bodies_are_payload_errors_not_crashes() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for raw in (deep, b'{"a": NaN}', b'{"a": 1e400}', b"\xff\xfe"):
        with pytest.raises(WebhookPayloadError):
            _nowpayments().verify_webhook({"x-nowpayments-sig": "ab"}, raw)
        with pytest.raises(WebhookPayloadError):
            _btcpay().verify_webhook({"BTCPay-Sig": webhook_signature("HelloWorld", raw)}, raw)
