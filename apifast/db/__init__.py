"""Postgres access: numbered migrations and named SQL statements, both plain .sql files.

Each file under `queries/` holds one statement and is loaded once by `Queries`.
"""

from apifast.db.migrate import migrate
from apifast.db.pool import create_pool
from apifast.db.statements import Queries

__all__ = ["Queries", "create_pool", "migrate"]
