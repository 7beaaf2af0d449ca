"""Runs wrk (the load generator: C, one thread, almost no CPU) with bench/post.lua and parses
its one-line JSON result."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import orjson

LUA = Path(__file__).with_name("post.lua")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    rps_measured: float | None = None  # set when this is a median of several runs

    @property
    def rps(self) -> float:
        if self.rps_measured is not None:
            return self.rps_measured
        return self.requests / self.duration_s if self.duration_s else 0.0


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    url: str,
    body_file: Path,
    *,
    connections: int,
    seconds: float,
    key: str = "",
    threads: int = 1,
) -> WrkResult:
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError("wrk")
    env = dict(os.environ, BENCH_BODY_FILE=str(body_file), BENCH_KEY=key)
    cmd = [
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 30)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    data = orjson.loads(line.removeprefix("BENCH_RESULT "))
    errors = sum(
        data[k]
        for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
    )
