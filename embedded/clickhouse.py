"""ClickHouse in-process: chdb, reached through clickhouse-connect's `chdb://` DSN."""

from __future__ import annotations

from pathlib import Path

# --- ClickHouse --------------------------------------------------------------------------------


def clickhouse_url_for(data_dir: Path) -> str:
    """The chdb DSN for <data_dir>/clickhouse, for clickhouse_connect.get_client(dsn=...)."""
    return f"chdb://{(data_dir.expanduser().resolve() / 'clickhouse').as_posix()}"
