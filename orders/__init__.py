"""Payments: buying credit with crypto. Orders, processor webhooks, crediting, order
reconciliation, email key recovery and the mailer, with their SQL (`sql/`) and migrations.

May import the core (`apifast.*` modules: settings, money, keys, db, the payment contract);
never the router, admin or another feature. The composition root calls `install_payments`
for the routes, starts `runtime.start_payments(core)` in its lifespan and keeps the result
at `app.state.payments`.
"""

from __future__ import annotations

if __name__ != "apifast.orders":
    raise ImportError("import this package as apifast.orders")

from fastapi import FastAPI

from apifast.orders import alerts_api, orders_api, recover_api, rotate_api, webhooks_api


def install_payments(app: FastAPI) -> None:
    """Add the payment routes: /v1/orders, /v1/payments/options, /v1/webhooks/{processor},
    /v1/recover, /v1/key/email, /v1/key/rotate and /v1/key/alerts."""
    for module in (orders_api, webhooks_api, recover_api, rotate_api, alerts_api):
        app.include_router(module.api)


__all__ = ["install_payments"]
