"""Wires the admin panel, the key holder's dashboard, /v1/generations and the live catalog
into the router app. Called once from `router.app.create_app`."""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from admin import dashboard, views_auth, views_keys, views_models, views_overview, views_providers
from admin.web import (
    PACKAGE_DIR,
    Ctx,
    admin_ctx,
    install_handlers,
    make_templates,
    redirect,
    render,
)
from apifast.settings import Settings
from router import generations_api
from router.catalog_sync import catalog_sync_service


def install_admin(app: FastAPI, services: MutableSequence[Any], settings: Settings) -> None:
    app.state.admin_templates = make_templates()
    install_handlers(app)
    # Assets are public (the login page needs them); they hold nothing secret.
    app.mount("/assets", StaticFiles(directory=PACKAGE_DIR / "static"), name="assets")
    app.include_router(generations_api.api)
    app.include_router(dashboard.router)
    if settings.admin_enabled:
        for module in (views_auth, views_overview, views_models, views_providers, views_keys):
            app.include_router(module.router, include_in_schema=False)
        _catch_all(app)
    # Every router keeps its catalog current, whether or not it serves the panel.
    services.append(catalog_sync_service)


def _catch_all(app: FastAPI) -> None:
    @app.get("/admin", include_in_schema=False)
    async def admin_root(ctx: Ctx = Depends(admin_ctx)) -> Response:
        return redirect("/admin/")

    @app.api_route("/admin/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def admin_unknown(path: str, ctx: Ctx = Depends(admin_ctx)) -> Response:
        # Reached only when logged in: admin_ctx sends anyone else to /admin/login.
        return render(ctx.request, "error.html", status=404, title="Not found",
                      message=f"No admin page /admin/{path}.")  # fmt: skip
