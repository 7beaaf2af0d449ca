"""`Core`: what every feature shares, built once by the composition root's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import pluggy

from apifast.settings import Settings


@dataclass(frozen=True, slots=True)
class Core:
    settings: Settings
    secret: bytes  # keys the API-key hashes
    pool: asyncpg.Pool
    plugin_manager: pluggy.PluginManager
