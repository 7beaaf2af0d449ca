"""A running ApiFast wired to the fake NOWPayments and BTCPay servers and an in-process SMTP
server, for the payment tests (orders, webhooks, recovery, end to end)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from apifast.orders.runtime import PaymentsRuntime
from tests.fakes.btcpay import FakeBTCPay
from tests.fakes.mailbox import Mailbox
from tests.fakes.nowpayments import FakeNowPayments
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, models_toml, running_stack, stack_settings


@dataclass
class PayEnv:
    stack: Stack
    np: FakeNowPayments
    btcpay: FakeBTCPay
    mailbox: Mailbox
    upstream: FakeOpenAI

    @property
    def runtime(self) -> PaymentsRuntime:
        return self.stack.app.state.payments  # type: ignore[no-any-return]

    @property
    def pool(self) -> Any:
        return self.stack.pool

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        return self.stack.client(key)

    async def order(self, key: str | None = None, **body: Any) -> httpx.Response:
        async with self.client(key) as client:
            return await client.post("/v1/orders", json=body)

    async def new_order(self, amount: str = "10.00", **body: Any) -> dict[str, Any]:
        body.setdefault("processor", "nowpayments")
        body.setdefault("pay_currency", "btc")
        response = await self.order(amount_usd=amount, **body)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    async def get_order(self, key: str, order_id: str) -> dict[str, Any]:
        async with self.client(key) as client:
            response = await client.get(f"/v1/orders/{order_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def balance(self, key: str) -> Decimal:
        async with self.client(key) as client:
            response = await client.get("/v1/key")
        assert response.status_code == 200, response.text
        return Decimal(response.json()["balance_usd"])

    async def ledger(self, order_id: str) -> list[tuple[str, Decimal]]:
        rows = await self.pool.fetch(
            "SELECT ref, amount_usd FROM ledger WHERE kind = 'payment' AND reason = $1 ORDER BY id",
            f"order {order_id}",
        )
        return [(r["ref"], r["amount_usd"]) for r in rows]

    def np_payment_id(self, order_id: str) -> int:
        return self.np.payment_for_order(order_id).payment_id


def _write_models(data_dir: Path, text: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    models_file = data_dir / "models.toml"
    models_file.write_text(text)
    return models_file


@contextlib.asynccontextmanager
async def payments_env(
    *,
    database_url: str,
    nats_url: str,
    clickhouse_url: str,
    data_dir: Path,
    **overrides: Any,
) -> AsyncIterator[PayEnv]:
    upstream = await FakeOpenAI().start()
    np = await FakeNowPayments().start()
    btcpay = await FakeBTCPay().start()
    mailbox = Mailbox().start()
    models_file = _write_models(data_dir, models_toml(upstream.url))
    values: dict[str, Any] = {
        "nowpayments_api_key": np.api_key,
        "nowpayments_ipn_secret": np.ipn_secret,
        "nowpayments_base_url": np.base_url,
        "nowpayments_coins": "btc,xmr",
        "btcpay_url": btcpay.url,
        "btcpay_api_key": btcpay.api_key,
        "btcpay_store_id": btcpay.store_id,
        "btcpay_webhook_secret": btcpay.webhook_secret,
        "smtp_url": mailbox.url,
        "smtp_from": "ApiFast <keys@apifast.test>",
        "mail_retry_base_s": 0.0,
        # Reconciliation runs only when a test asks (run_once); the loop stays asleep.
        "reconcile_delay_s": 0.0,
        "reconcile_interval_s": 3600.0,
        "order_rate_limit": 1000,
        "recover_rate_limit": 1000,
    }
    values.update(overrides)
    settings = stack_settings(
        database_url=database_url,
        nats_url=nats_url,
        clickhouse_url=clickhouse_url,
        data_dir=data_dir,
        models_file=models_file,
        **values,
    )
    settings.public_url = f"http://127.0.0.1:{settings.port}"
    btcpay.webhook_url = f"{settings.public_url}/v1/webhooks/btcpay"
    try:
        async with running_stack(settings) as stack:
            yield PayEnv(stack, np, btcpay, mailbox, upstream)
    finally:
        mailbox.stop()
        await btcpay.close()
        await np.close()
        await upstream.stop()


def payments_env_fixture(label: str, **overrides: Any) -> Any:
    """A module-scoped `env` fixture: one running payments stack per test module."""

    @pytest.fixture(scope="module")
    async def env(
        database_factory: Callable[[str], str],
        nats_url: str,
        clickhouse_url: str,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> AsyncIterator[PayEnv]:
        async with payments_env(
            database_url=database_factory(label),
            nats_url=nats_url,
            clickhouse_url=clickhouse_url,
            data_dir=tmp_path_factory.mktemp(label),
            **overrides,
        ) as running:
            yield running

    return env
