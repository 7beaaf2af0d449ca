"""The router's endpoints, registered on the app by the composition root."""

from __future__ import annotations

from fastapi import FastAPI

from apifast.router import (
    chat,
    embeddings,
    generations_api,
    key_api,
    messages,
    models_api,
    receipts_api,
    responses,
    subkeys_api,
    usage_api,
)


def install_router(app: FastAPI) -> None:
    """Register the /v1 endpoints; the lifespan puts a `RouterState` on app.state.apifast."""
    for module in (
        chat,
        embeddings,
        messages,
        responses,
        models_api,
        key_api,
        usage_api,
        generations_api,
        receipts_api,
        subkeys_api,
    ):
        app.include_router(module.api)
