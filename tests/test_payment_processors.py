"""The built-in processors against the fake NOWPayments and BTCPay servers (real HTTP on
127.0.0.1): creating, fetching, options, auth errors, and settings-driven configuration."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import types
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web

from apifast.payments import PaymentError, PaymentOrder, PaymentStatus, WebhookSignatureError
from apifast.plugin_manager import make_plugin_manager, payment_processor_types
from apifast.plugins.payments.btcpay import BTCPayProcessor
from apifast.plugins.payments.nowpayments import NowPaymentsProcessor
from apifast.settings import Settings
from tests.fakes.btcpay import FakeBTCPay
from tests.fakes.nowpayments import FakeNowPayments


@pytest.fixture
async def fake_np() -> AsyncIterator[FakeNowPayments]:
    fake = await FakeNowPayments().start()
    yield fake
    await fake.close()


@pytest.fixture
async def fake_btcpay() -> AsyncIterator[FakeBTCPay]:
    fake = await FakeBTCPay().start()
    yield fake
    await fake.close()


@pytest.fixture
async def np(fake_np: FakeNowPayments) -> AsyncIterator[NowPaymentsProcessor]:
    processor = NowPaymentsProcessor(
        api_key=fake_np.api_key,
        ipn_secret=fake_np.ipn_secret,
        base_url=fake_np.base_url,
        coins=("btc", "xmr"),
    )
    await processor.start()
    yield processor
    await processor.close()


@pytest.fixture
async def btcpay(fake_btcpay: FakeBTCPay) -> AsyncIterator[BTCPayProcessor]:
    processor = BTCPayProcessor(
        url=fake_btcpay.url,
        api_key=fake_btcpay.api_key,
        store_id=fake_btcpay.store_id,
        webhook_secret=fake_btcpay.webhook_secret,
    )
    await processor.start()
    yield processor
    await processor.close()


def test_builtins_load_through_entry_points() -> None:
    types = payment_processor_types(make_plugin_manager())
    assert types["nowpayments"] is NowPaymentsProcessor
    assert types["btcpay"] is BTCPayProcessor


def test_unconfigured_processors_are_not_offered() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert NowPaymentsProcessor.from_settings(settings) is None
    assert BTCPayProcessor.from_settings(settings) is None


def test_half_configured_processor_names_the_missing_setting() -> None:
    settings = Settings(_env_file=None, nowpayments_api_key="k")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="APIFAST_NOWPAYMENTS_IPN_SECRET"):
        NowPaymentsProcessor.from_settings(settings)
    settings = Settings(_env_file=None, btcpay_url="http://127.0.0.1:1")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="APIFAST_BTCPAY_STORE_ID"):
        BTCPayProcessor.from_settings(settings)


async def test_nowpayments_payment_round_trip(
    np: NowPaymentsProcessor, fake_np: FakeNowPayments
) -> None:
    created = await np.create_payment(
        PaymentOrder(
            order_id="ord_t1",
            amount_usd=Decimal("10.00"),
            pay_currency="btc",
            callback_url="http://127.0.0.1:1/v1/webhooks/nowpayments",
        )
    )
    assert created.payment_id is not None and created.payment_id.isdigit()
    assert created.pay_amount == Decimal("0.0002")
    assert created.pay_address and created.pay_currency == "btc"
    assert created.expires_at is not None
    method, path, headers = fake_np.requests[-1]
    assert (method, path) == ("POST", "/v1/payment")
    assert headers["x-api-key"] == fake_np.api_key
    assert "User-Agent" not in headers
    sent = fake_np.payments[int(created.payment_id)]
    assert sent.price_amount == Decimal(10) and sent.order_id == "ord_t1"

    update = await np.fetch_payment(created.payment_id)
    assert (update.status, update.order_id, update.credit_usd) == (
        PaymentStatus.WAITING,
        "ord_t1",
        None,
    )
    fake_np.pay(created.payment_id, Decimal("0.25"))
    update = await np.fetch_payment(created.payment_id)
    assert update.status is PaymentStatus.PARTIALLY_PAID
    assert update.credit_usd == Decimal("2.5")


async def test_nowpayments_hosted_invoice(
    np: NowPaymentsProcessor, fake_np: FakeNowPayments
) -> None:
    created = await np.create_payment(
        PaymentOrder(order_id="ord_t2", amount_usd=Decimal("5"), pay_currency=None)
    )
    assert created.payment_id is None and created.invoice_id is not None
    assert created.payment_url and "iid=" in created.payment_url


async def test_nowpayments_errors(np: NowPaymentsProcessor, fake_np: FakeNowPayments) -> None:
    with pytest.raises(PaymentError) as excinfo:
        await np.create_payment(
            PaymentOrder(order_id="ord_t3", amount_usd=Decimal("0.10"), pay_currency="btc")
        )
    assert excinfo.value.status == 400
    with pytest.raises(PaymentError) as excinfo:
        await np.fetch_payment("1")
    assert excinfo.value.status == 404
    wrong = NowPaymentsProcessor(api_key="nope", ipn_secret="x", base_url=fake_np.base_url)
    with pytest.raises(PaymentError, match="INVALID_API_KEY"):
        await wrong.fetch_payment("1")
    await wrong.close()
    unreachable = NowPaymentsProcessor(api_key="k", ipn_secret="x", base_url="http://127.0.0.1:9")
    with pytest.raises(PaymentError):
        await unreachable.fetch_payment("1")
    await unreachable.close()


async def test_nowpayments_options_carry_minimums(np: NowPaymentsProcessor) -> None:
    options = await np.options()
    assert [(o.coin, o.min_amount_usd) for o in options] == [
        ("btc", Decimal("0.50")),
        ("xmr", Decimal("0.50")),
    ]


async def test_btcpay_invoice_round_trip(btcpay: BTCPayProcessor, fake_btcpay: FakeBTCPay) -> None:
    created = await btcpay.create_payment(
        PaymentOrder(order_id="ord_b1", amount_usd=Decimal("20.00"), pay_currency="btc")
    )
    assert created.payment_id in fake_btcpay.invoices
    assert created.payment_url and created.payment_url.startswith(fake_btcpay.url)
    assert created.expires_at is not None
    method, _, headers = fake_btcpay.requests[-1]
    assert method == "POST" and headers["Authorization"] == f"token {fake_btcpay.api_key}"
    invoice = fake_btcpay.invoices[created.payment_id]
    assert invoice.amount == Decimal("20.00") and invoice.metadata == {"orderId": "ord_b1"}

    assert (await btcpay.fetch_payment(created.payment_id)).status is PaymentStatus.WAITING
    fake_btcpay.pay(created.payment_id, Decimal("5"))
    fake_btcpay.expire(created.payment_id)
    update = await btcpay.fetch_payment(created.payment_id)
    assert (update.status, update.credit_usd, update.order_id) == (
        PaymentStatus.PARTIALLY_PAID,
        Decimal("5.00"),
        "ord_b1",
    )
    fake_btcpay.pay(created.payment_id, Decimal("15"))  # the rest, after expiry
    update = await btcpay.fetch_payment(created.payment_id)
    assert (update.status, update.credit_usd) == (PaymentStatus.FINISHED, Decimal("20.00"))


async def test_btcpay_settled_and_invalid(btcpay: BTCPayProcessor, fake_btcpay: FakeBTCPay) -> None:
    created = await btcpay.create_payment(PaymentOrder(order_id="o", amount_usd=Decimal("3")))
    assert created.payment_id is not None
    fake_btcpay.pay(created.payment_id)
    assert (await btcpay.fetch_payment(created.payment_id)).status is PaymentStatus.CONFIRMING
    fake_btcpay.settle(created.payment_id)
    update = await btcpay.fetch_payment(created.payment_id)
    assert (update.status, update.credit_usd) == (PaymentStatus.FINISHED, Decimal("3.00"))
    other = await btcpay.create_payment(PaymentOrder(order_id="p", amount_usd=Decimal("3")))
    assert other.payment_id is not None
    fake_btcpay.invalidate(other.payment_id)
    assert (await btcpay.fetch_payment(other.payment_id)).status is PaymentStatus.FAILED


async def test_btcpay_auth_and_store_errors(fake_btcpay: FakeBTCPay) -> None:
    wrong_key = BTCPayProcessor(
        url=fake_btcpay.url, api_key="nope", store_id=fake_btcpay.store_id, webhook_secret="s"
    )
    with pytest.raises(PaymentError) as excinfo:
        await wrong_key.fetch_payment("x")
    assert excinfo.value.status == 401
    await wrong_key.close()
    wrong_store = BTCPayProcessor(
        url=fake_btcpay.url, api_key=fake_btcpay.api_key, store_id="other", webhook_secret="s"
    )
    with pytest.raises(PaymentError, match="store-not-found"):
        await wrong_store.create_payment(PaymentOrder(order_id="o", amount_usd=Decimal("1")))
    await wrong_store.close()


# --- the example processor in docs/plugins.md --------------------------------------------------


def _doc_example() -> types.ModuleType:
    text = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    block = re.search(r"```python\n(# apifast_examplepay\.py\n.*?)```", text, re.S)
    assert block, "docs/plugins.md lost its payment example"
    module = types.ModuleType("apifast_examplepay")
    exec(compile(block.group(1), "docs/plugins.md", "exec"), module.__dict__)
    return module


async def test_documented_example_processor_works(monkeypatch: pytest.MonkeyPatch) -> None:
    checkouts: dict[str, dict[str, str]] = {}

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        checkout = {"id": f"co{len(checkouts) + 1}", "status": "open", "amount": body["amount"],
                    "reference": body["reference"], "url": "http://127.0.0.1/pay"}  # fmt: skip
        checkouts[checkout["id"]] = checkout
        return web.json_response(checkout)

    async def read(request: web.Request) -> web.Response:
        return web.json_response(checkouts[request.match_info["id"]])

    app = web.Application()
    app.router.add_post("/checkouts", create)
    app.router.add_get("/checkouts/{id}", read)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        module = _doc_example()
        types_found = payment_processor_types(make_plugin_manager(extra_plugins=(module,)))
        cls = types_found["examplepay"]
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert cls.from_settings(settings) is None
        monkeypatch.setenv("EXAMPLEPAY_URL", url)
        monkeypatch.setenv("EXAMPLEPAY_API_KEY", "k")
        monkeypatch.setenv("EXAMPLEPAY_WEBHOOK_SECRET", "whsec")
        processor = cls.from_settings(settings)
        await processor.start()
        created = await processor.create_payment(
            PaymentOrder(order_id="ord_x", amount_usd=Decimal("9.50"))
        )
        assert created.payment_id == "co1"
        checkouts["co1"]["status"] = "paid"
        update = await processor.fetch_payment("co1")
        assert (update.status, update.credit_usd, update.order_id) == (
            PaymentStatus.FINISHED,
            Decimal("9.50"),
            "ord_x",
        )
        raw = json.dumps({"checkout": checkouts["co1"]}).encode()
        sig = hmac.new(b"whsec", raw, hashlib.sha256).hexdigest()
        assert processor.verify_webhook({"x-examplepay-signature": sig}, raw) == update
        with pytest.raises(WebhookSignatureError):
            processor.verify_webhook({"x-examplepay-signature": sig}, raw + b" ")
        await processor.close()
    finally:
        await runner.cleanup()
