"""The dev state file (`dev.json`) that a running `apifast dev` publishes, and the generated
secret key, so other CLI commands find the same engines and hash keys the same way."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apifast.embedded.processes import EmbeddedError, ProcessId, ensure_data_dir, write_atomic
from apifast.settings import Settings

DEV_STATE_FILE = "dev.json"
SECRET_KEY_FILE = "secret_key"


# --- secret key --------------------------------------------------------------------------------


def ensure_secret_key(data_dir: Path) -> str:
    """The HMAC key stored in <data_dir>/secret_key, generated (mode 0600) on first use.

    Creation is race-free: the key is written to a private temporary file and hard-linked into
    place, so concurrent callers all end up with the one key that won.
    """
    data_dir = ensure_data_dir(data_dir)
    path = data_dir / SECRET_KEY_FILE
    if not path.exists():
        tmp = data_dir / f".{SECRET_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_text().strip()
    if not key:
        raise EmbeddedError(f"{path} is empty; delete it to have a new key generated")
    return key


# --- dev state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevState:
    """What a running `apifast dev` publishes in <data_dir>/dev.json."""

    pid: int
    start: str
    database_url: str
    nats_url: str
    clickhouse_url: str
    started_at: str

    def owner_alive(self) -> bool:
        return ProcessId(self.pid, self.start).alive()


def read_dev_state(data_dir: Path) -> DevState | None:
    """The dev state if its `apifast dev` is still running, else None."""
    path = data_dir.expanduser().resolve() / DEV_STATE_FILE
    try:
        state = DevState(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return state if state.owner_alive() else None


def write_dev_state(data_dir: Path, settings: Settings) -> None:
    me = ProcessId.current()
    state = DevState(
        pid=me.pid,
        start=me.start,
        database_url=settings.database_url,
        nats_url=settings.nats_url,
        clickhouse_url=settings.clickhouse_url,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    # 0600: an externally configured URL may carry a password.
    write_atomic(data_dir / DEV_STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")


def clear_dev_state(data_dir: Path) -> None:
    """Remove dev.json if this process wrote it."""
    path = data_dir.expanduser().resolve() / DEV_STATE_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (FileNotFoundError, ValueError, AttributeError):
        pass


def resolve_dev_urls(settings: Settings) -> Settings:
    """`settings` with empty URLs taken from a running `apifast dev`, and the secret key filled.

    For CLI commands other than `dev`: explicit settings (APIFAST_*) always win; the secret key
    comes from <data_dir>/secret_key (generated if missing) so keys made here match the server.
    URLs stay empty when no `apifast dev` is running.
    """
    data_dir = settings.resolved_data_dir()
    update: dict[str, Any] = {}
    state = read_dev_state(data_dir)
    if state is not None:
        for name in ("database_url", "nats_url", "clickhouse_url"):
            if not getattr(settings, name) and getattr(state, name):
                update[name] = getattr(state, name)
    if not settings.secret_key:
        update["secret_key"] = ensure_secret_key(data_dir)
    return settings.model_copy(update=update)
