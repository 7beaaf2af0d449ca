"""/admin/providers: add and edit provider endpoints, test their connection.

Upstream API keys are stored AES-GCM encrypted (`catalog.live.seal_api_key`) and only
ever shown masked; a blank key field keeps the stored key."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Depends
from starlette.responses import Response

from apifast.admin.catalog_forms import FormError, parse_provider_form
from apifast.admin.views_models import sync_of
from apifast.admin.web import Ctx, admin_ctx, audit, field, form_with_csrf, redirect, render
from apifast.catalog.live import (
    StoredProvider,
    load_overlay,
    mask_secret,
    open_api_key,
    seal_api_key,
)  # fmt: skip
from apifast.crypto import EncryptedKey, KeyRingError
from apifast.db import Queries
from apifast.providers import UpstreamError

router = APIRouter()
Q = Queries("apifast.admin")
TEST_TIMEOUT_S = 20.0
_EDITOR_FIELDS = ("name", "type", "base_url", "api_key_env", "timeout_s", "connect_timeout_s",
                  "native_responses")  # fmt: skip


async def stored_providers(ctx: Ctx) -> dict[str, StoredProvider]:
    async with ctx.pool.acquire() as conn:
        overlay = await load_overlay(conn)
    return {p.name: p for p in overlay.providers}


def _key_display(ctx: Ctx, name: str, stored: StoredProvider | None) -> str:
    sync = sync_of(ctx)
    if stored is not None:
        env = stored.options.get("api_key_env")
        if env:
            return f"from ${env}"
        if stored.sealed_key is None:
            return "none"
        try:
            return mask_secret(open_api_key(sync.ring, name, stored.sealed_key))
        except KeyRingError:
            return f"cannot decrypt (key id {stored.sealed_key.kid!r} is not in the key ring)"
    cfg = sync.base.providers.get(name)
    return mask_secret(cfg.api_key) if cfg is not None and cfg.api_key else "none"


async def _page(ctx: Ctx, *, saved: str = "", test: dict[str, str] | None = None,
                status: int = 200) -> Response:  # fmt: skip
    sync = sync_of(ctx)
    stored = await stored_providers(ctx)
    served = ctx.state.live.catalog.providers
    rows = []
    for name in sorted({*sync.base.providers, *stored, *served}):
        cfg = served.get(name) or sync.base.providers.get(name)
        row = stored.get(name)
        rows.append({
            "name": name,
            "type": row.type if row else cfg.type if cfg else "",
            "base_url": row.base_url if row else cfg.base_url if cfg else "",
            "key": _key_display(ctx, name, row),
            "source": ("TOML, overridden" if name in sync.base.providers else "admin") if row
            else "TOML",
            "stored": row is not None,
            "served": name in served,
            "problem": sync.problems.get(f"provider {name}", ""),
            "models": sorted(m.id for m in ctx.state.live.catalog.models.values()
                             if any(r.provider == name for r in m.routes)),
        })  # fmt: skip
    return render(ctx.request, "providers.html", status=status, ctx=ctx, rows=rows, saved=saved,
                  test=test)  # fmt: skip


@router.get("/admin/providers")
async def providers_page(saved: str = "", ctx: Ctx = Depends(admin_ctx)) -> Response:
    return await _page(ctx, saved=saved)


def _editor(ctx: Ctx, v: dict[str, Any], *, is_new: bool, key: str = "none", error: str = "",
            status: int = 200) -> Response:  # fmt: skip
    return render(
        ctx.request, "provider_edit.html", status=status, ctx=ctx, v=v, is_new=is_new, key=key,
        error=error, types=sorted(sync_of(ctx).types),
    )  # fmt: skip


@router.get("/admin/providers/new")
async def new_provider(ctx: Ctx = Depends(admin_ctx)) -> Response:
    values = {"name": "", "type": "openai", "base_url": "", "api_key_env": "",
              "timeout_s": "300", "connect_timeout_s": "10"}  # fmt: skip
    return _editor(ctx, values, is_new=True)


@router.get("/admin/providers/edit")
async def edit_provider(name: str, ctx: Ctx = Depends(admin_ctx)) -> Response:
    row = (await stored_providers(ctx)).get(name)
    cfg = ctx.state.live.catalog.providers.get(name) or sync_of(ctx).base.providers.get(name)
    if row is None and cfg is None:
        return render(ctx.request, "error.html", status=404, title="Not found",
                      message=f"No provider {name!r}.")  # fmt: skip
    if row is not None:
        opts = row.options
        values = {"name": name, "type": row.type, "base_url": row.base_url,
                  "api_key_env": opts.get("api_key_env", ""),
                  "timeout_s": str(opts.get("timeout_s", 300)),
                  "connect_timeout_s": str(opts.get("connect_timeout_s", 10)),
                  "native_responses": opts.get("native_responses") is True}  # fmt: skip
    else:
        assert cfg is not None
        values = {"name": name, "type": cfg.type, "base_url": cfg.base_url, "api_key_env": "",
                  "timeout_s": str(cfg.read_timeout_s),
                  "connect_timeout_s": str(cfg.connect_timeout_s),
                  "native_responses": cfg.options.get("native_responses") is True}  # fmt: skip
    return _editor(ctx, values, is_new=False, key=_key_display(ctx, name, row))


def _sealed_parts(sealed: EncryptedKey | None) -> tuple[bytes | None, bytes | None, str | None]:
    if sealed is None:
        return None, None, None
    return sealed.ciphertext, sealed.nonce, sealed.kid


@router.post("/admin/providers/save")
async def save_provider(ctx: Ctx = Depends(admin_ctx)) -> Response:
    form = await form_with_csrf(ctx)
    sync = sync_of(ctx)
    is_new = field(form, "is_new") == "1"
    name = field(form, "name", limit=100)
    row = (await stored_providers(ctx)).get(name)
    base = sync.base.providers.get(name)
    keep = row.options if row else dict(base.options) if base else {}
    try:
        parsed = parse_provider_form(form, set(sync.types), keep)
        if is_new and (row is not None or name in ctx.state.live.catalog.providers):
            raise FormError(f"name: a provider {name!r} already exists; edit it instead")
    except FormError as exc:
        values = {k: field(form, k) for k in _EDITOR_FIELDS}
        key = "none" if is_new else _key_display(ctx, name, row)
        return _editor(ctx, values, is_new=is_new, key=key, error=str(exc), status=400)
    if parsed.api_key:
        sealed: EncryptedKey | None = seal_api_key(sync.ring, name, parsed.api_key)
        key_change = "replaced"
    elif parsed.clear_api_key:
        sealed, key_change = None, "cleared"
    elif row is not None:
        sealed, key_change = row.sealed_key, "kept"
    elif base is not None and base.api_key:
        # Overriding a TOML provider keeps the key it already uses (from its env variable).
        sealed, key_change = seal_api_key(sync.ring, name, base.api_key), "kept"
    else:
        sealed, key_change = None, "none"
    await ctx.pool.execute(
        Q.admin_provider_upsert, name, parsed.type, parsed.base_url,
        orjson.dumps(parsed.options).decode(), *_sealed_parts(sealed),
    )  # fmt: skip
    await audit(
        ctx.pool, ctx.session.id, "provider_created" if row is None and base is None
        else "provider_updated", name, type=parsed.type, base_url=parsed.base_url,
        api_key=key_change, api_key_env=parsed.options.get("api_key_env"),
    )  # fmt: skip
    await sync.refresh()
    return redirect("/admin/providers?saved=" + name)


@router.post("/admin/providers/delete")
async def delete_provider(ctx: Ctx = Depends(admin_ctx)) -> Response:
    form = await form_with_csrf(ctx)
    sync = sync_of(ctx)
    name = field(form, "name", limit=100)
    users = sorted(m.id for m in ctx.state.live.catalog.models.values()
                   if any(r.provider == name for r in m.routes))  # fmt: skip
    if users and name not in sync.base.providers:
        return render(
            ctx.request, "error.html", status=409, title="Provider in use",
            message=f"Models route to {name!r}: {', '.join(users)}. Change their routes first.",
        )  # fmt: skip
    if await ctx.pool.fetchval(Q.admin_provider_delete, name) is not None:
        await audit(ctx.pool, ctx.session.id, "provider_deleted", name)
        await sync.refresh()
    return redirect("/admin/providers?saved=" + name)


@router.post("/admin/providers/test")
async def test_provider(ctx: Ctx = Depends(admin_ctx)) -> Response:
    """Ask the provider's upstream for something cheap (its model list) with its credentials."""
    form = await form_with_csrf(ctx)
    name = field(form, "name", limit=100)
    provider = ctx.state.live.providers.get(name)
    started = time.perf_counter()
    if provider is None:
        result = {"name": name, "ok": "", "message": "not served (see the problem shown)"}
    else:
        try:
            await asyncio.wait_for(provider.check(), TEST_TIMEOUT_S)
            ms = round((time.perf_counter() - started) * 1000)
            result = {"name": name, "ok": "1", "message": f"connected in {ms} ms"}
        except NotImplementedError:
            result = {"name": name, "ok": "", "message": "this provider type has no check"}
        except UpstreamError as exc:
            what = f"HTTP {exc.status}" if exc.status else str(exc) or "no response"
            result = {"name": name, "ok": "", "message": f"failed: {what}"}
        except TimeoutError:
            result = {"name": name, "ok": "", "message": "failed: timed out"}
    await audit(ctx.pool, ctx.session.id, "provider_tested", name, ok=bool(result["ok"]),
                result=result["message"])  # fmt: skip
    return await _page(ctx, test=result)
