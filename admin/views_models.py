"""/admin/models: create, edit, disable and revert models, their routes and prices.

Saved models go to `db_models`; this server applies the change before answering, and every
other one within a moment (`catalog.live.CatalogSync`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Depends
from starlette.responses import Response

from apifast.admin.catalog_forms import (
    PRICE_FIELDS,
    FormError,
    model_form_values,
    model_spec,
    parse_model_form,
)  # fmt: skip
from apifast.admin.web import (
    Ctx,
    Unavailable,
    admin_ctx,
    audit,
    field,
    form_with_csrf,
    redirect,
    render,
)
from apifast.catalog.live import CatalogSync, StoredModel, load_overlay
from apifast.catalog.toml import MODEL_KINDS, STRATEGIES, Catalog
from apifast.db import Queries

router = APIRouter()
Q = Queries("apifast.admin")
_EDITOR_FIELDS = (
    "id", "type", "strategy", "description", *PRICE_FIELDS, "max_output_tokens",
    "context_window", "routes",
)  # fmt: skip


def sync_of(ctx: Ctx) -> CatalogSync:
    sync = ctx.state.catalog_sync
    if sync is None:
        raise Unavailable("The live catalog is not running on this server, so models and "
                          "providers cannot be managed here.")  # fmt: skip
    return sync


async def stored_models(ctx: Ctx) -> dict[str, StoredModel]:
    async with ctx.pool.acquire() as conn:
        overlay = await load_overlay(conn)
    return {m.id: m for m in overlay.models}


def _source(in_toml: bool, stored: StoredModel | None) -> str:
    if stored is None:
        return "TOML"
    return "TOML, overridden" if in_toml else "admin"


@router.get("/admin/models")
async def models_page(saved: str = "", ctx: Ctx = Depends(admin_ctx)) -> Response:
    sync = sync_of(ctx)
    stored = await stored_models(ctx)
    served = ctx.state.live.catalog.models
    rows = []
    for model_id in sorted({*sync.base.models, *stored, *served}):
        model = served.get(model_id) or sync.base.models.get(model_id)
        row = stored.get(model_id)
        spec = row.spec if row else model_spec(model) if model else {}
        rows.append({
            "id": model_id,
            "spec": spec,
            "served": model_id in served,
            "enabled": row.enabled if row else True,
            "source": _source(model_id in sync.base.models, row),
            "stored": row is not None,
            "problem": sync.problems.get(f"model {model_id}", ""),
        })  # fmt: skip
    return render(ctx.request, "models.html", ctx=ctx, rows=rows, saved=saved)


def _editor(ctx: Ctx, values: dict[str, Any], *, is_new: bool, error: str = "",
            status: int = 200) -> Response:  # fmt: skip
    return render(
        ctx.request, "model_edit.html", status=status, ctx=ctx, v=values, is_new=is_new,
        error=error, kinds=MODEL_KINDS, strategies=STRATEGIES,
        providers=sorted(ctx.state.live.catalog.providers),
    )  # fmt: skip


@router.get("/admin/models/new")
async def new_model(ctx: Ctx = Depends(admin_ctx)) -> Response:
    blank = {"type": "chat", "input_usd_per_mtok": "", "output_usd_per_mtok": "", "routes": []}
    return _editor(ctx, model_form_values("", blank, True), is_new=True)


def _current_spec(
    catalog: Catalog, base: Catalog, model_id: str, stored: dict[str, StoredModel]
) -> tuple[dict[str, Any], bool] | None:
    if model_id in stored:
        return stored[model_id].spec, stored[model_id].enabled
    model = catalog.models.get(model_id) or base.models.get(model_id)
    return (model_spec(model), True) if model else None


@router.get("/admin/models/edit")
async def edit_model(id: str, ctx: Ctx = Depends(admin_ctx)) -> Response:
    found = _current_spec(ctx.state.live.catalog, sync_of(ctx).base, id, await stored_models(ctx))
    if found is None:
        return render(ctx.request, "error.html", status=404, title="Not found",
                      message=f"No model {id!r}.")  # fmt: skip
    return _editor(ctx, model_form_values(id, *found), is_new=False)


@router.post("/admin/models/save")
async def save_model(ctx: Ctx = Depends(admin_ctx)) -> Response:
    form = await form_with_csrf(ctx)
    is_new = field(form, "is_new") == "1"
    try:
        parsed = parse_model_form(form, set(ctx.state.live.catalog.providers))
    except FormError as exc:
        values: dict[str, Any] = {k: field(form, k) for k in _EDITOR_FIELDS}
        values["enabled"] = form.get("enabled") == "on"
        return _editor(ctx, values, is_new=is_new, error=str(exc), status=400)
    stored = await stored_models(ctx)
    before = _current_spec(ctx.state.live.catalog, sync_of(ctx).base, parsed.id, stored)
    if is_new and before is not None:
        values = model_form_values(parsed.id, parsed.spec, parsed.enabled)
        error = f"id: a model {parsed.id!r} already exists; edit it instead"
        return _editor(ctx, values, is_new=True, status=409, error=error)
    await ctx.pool.execute(
        Q.admin_model_upsert, parsed.id, orjson.dumps(parsed.spec).decode(), parsed.enabled
    )
    await audit(
        ctx.pool, ctx.session.id, "model_created" if before is None else "model_updated",
        parsed.id, before=before[0] if before else None, after=parsed.spec,
        enabled=parsed.enabled,
    )  # fmt: skip
    await sync_of(ctx).refresh()
    return redirect("/admin/models?saved=" + _q(parsed.id))


def _q(text: str) -> str:
    return quote(text, safe="")


async def _set_enabled(ctx: Ctx, enabled: bool) -> Response:
    form = await form_with_csrf(ctx)
    model_id = field(form, "id", limit=200)
    found = _current_spec(
        ctx.state.live.catalog, sync_of(ctx).base, model_id, await stored_models(ctx)
    )
    if found is None:
        return render(ctx.request, "error.html", status=404, title="Not found",
                      message=f"No model {model_id!r}.")  # fmt: skip
    spec, _ = found
    await ctx.pool.execute(Q.admin_model_upsert, model_id, orjson.dumps(spec).decode(), enabled)
    await audit(
        ctx.pool, ctx.session.id, "model_enabled" if enabled else "model_disabled", model_id
    )
    await sync_of(ctx).refresh()
    return redirect("/admin/models?saved=" + _q(model_id))


@router.post("/admin/models/disable")
async def disable_model(ctx: Ctx = Depends(admin_ctx)) -> Response:
    return await _set_enabled(ctx, False)


@router.post("/admin/models/enable")
async def enable_model(ctx: Ctx = Depends(admin_ctx)) -> Response:
    return await _set_enabled(ctx, True)


@router.post("/admin/models/revert")
async def revert_model(ctx: Ctx = Depends(admin_ctx)) -> Response:
    """Delete the stored row: the TOML model (if any) is served again."""
    form = await form_with_csrf(ctx)
    model_id = field(form, "id", limit=200)
    deleted = await ctx.pool.fetchval(Q.admin_model_delete, model_id)
    if deleted is not None:
        await audit(ctx.pool, ctx.session.id, "model_reverted", model_id)
        await sync_of(ctx).refresh()
    return redirect("/admin/models?saved=" + _q(model_id))
