"""The bench's own child processes (servers it starts, stops by PID and measures)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, seconds: float) -> None:
    """Until `proc` accepts connections on 127.0.0.1:`port`; stops it and raises if it
    exits first or takes longer than `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{what} exited during start-up {err.strip()}".strip())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    stop_child(proc)
    raise RuntimeError(f"{what} did not start listening")


def stop_child(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM (a master stops its workers too), SIGKILL after 5 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
