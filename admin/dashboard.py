"""/dashboard: the key holder's usage page. Static HTML and scripts; the key is pasted into
the page and used from the browser against /v1/key, /v1/usage and /v1/generations. The page
sets no cookie and loads nothing from another origin (enforced by its CSP)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.admin.web import render

router = APIRouter()


@router.get("/dashboard", include_in_schema=False)
async def dashboard(request: Request) -> Response:
    response = render(request, "dashboard.html")
    # Forms post nowhere: the key never leaves the page except as a header to our own API.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    return response
