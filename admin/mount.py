"""Wires the admin panel and the key holder's dashboard into the app. Called once by the
composition root (`server.app.create_app`), which also sets `app.state.admin` to an
`AdminState` in its lifespan and runs the catalog sync the panel's pages use."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from apifast.admin import (
    dashboard,
    views_auth,
    views_keys,
    views_models,
    views_overview,
    views_providers,
)
from apifast.admin.web import (
    PACKAGE_DIR,
    Ctx,
    admin_ctx,
    install_handlers,
    make_templates,
    redirect,
    render,
)
from apifast.settings import Settings


def install_admin(app: FastAPI, settings: Settings) -> None:
    app.state.admin_templates = make_templates()
    install_handlers(app)
    # Assets are public (the login page needs them); they hold nothing secret.
    app.mount("/assets", StaticFiles(directory=PACKAGE_DIR / "static"), name="assets")
    app.include_router(dashboard.router)
    if settings.admin_enabled:
        for module in (views_auth, views_overview, views_models, views_providers, views_keys):
            app.include_router(module.router, include_in_schema=False)
        _catch_all(app)


def _catch_all(app: FastAPI) -> None:
    @app.get("/admin", include_in_schema=False)
    async def admin_root(ctx: Ctx = Depends(admin_ctx)) -> Response:
        return redirect("/admin/")

    @app.api_route("/admin/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def admin_unknown(path: str, ctx: Ctx = Depends(admin_ctx)) -> Response:
        # Reached only when logged in: admin_ctx sends anyone else to /admin/login.
        return render(ctx.request, "error.html", status=404, title="Not found",
                      message=f"No admin page /admin/{path}.")  # fmt: skip
