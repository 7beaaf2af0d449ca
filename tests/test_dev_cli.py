"""The newcomer's path: `apifast dev` on the embedded engines (a subprocess, as a user runs
it), `apifast keys create --json` with the same environment, the openai SDK, the balance
falling by exactly the priced usage, the event in ClickHouse. Also `apifast migrate` twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import openai

from apifast.server.migrations import migrate_database
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, models_toml


def cli_env(data_dir: Path, port: int, models: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIFAST_")}
    env.update({"APIFAST_DATA_DIR": str(data_dir), "APIFAST_PORT": str(port)})
    if models is not None:
        env["APIFAST_MODELS_FILE"] = str(models)
    return env


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "apifast.cli", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(600):
            assert proc.poll() is None, "apifast dev exited during start-up"
            try:
                if (await c.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("apifast dev did not become healthy")


async def test_dev_stack_end_to_end(tmp_path: Path, fake_openai: FakeOpenAI):
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake_openai.url))
    port = free_port()
    env = cli_env(tmp_path / "data", port, models)
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "apifast.cli", "dev"], env=env,  # noqa: ASYNC220
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base, proc)
        made = await run_cli(env, "keys", "create", "--credit", "5.00", "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        assert created["balance_usd"] == "5.00" and created["key"].startswith("af-")
        key = created["key"]

        client = openai.AsyncOpenAI(api_key=key, base_url=base + "/v1", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="fast-chat", messages=[{"role": "user", "content": "hello"}]
        )
        cost = raw.http_response.json(parse_float=Decimal)["usage"]["cost"]
        resp = raw.parse()
        assert cost > 0
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}"}
        ) as c:
            for _ in range(200):
                info = (await c.get("/v1/key")).json()
                if Decimal(info["spent_usd"]) > 0:
                    break
                await asyncio.sleep(0.1)
            assert Decimal(info["balance_usd"]) == Decimal("5.00") - cost
            gen = (await c.get(f"/v1/generation/{resp.id}")).json()
            assert gen["model"] == "fast-chat" and Decimal(gen["cost_usd"]) == cost
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        log.close()
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()[-2000:]
    # A clean stop leaves no dev state behind; the embedded engines were stopped.
    assert not (tmp_path / "data" / "dev.json").exists()


async def test_keys_create_without_a_running_dev_server(tmp_path: Path):
    env = cli_env(tmp_path / "data", free_port(), None)
    made = await run_cli(env, "keys", "create", "--credit", "1.50", "--json", "--rpm-limit", "5")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["balance_usd"] == "1.50"
    bad = await run_cli(env, "keys", "create", "--credit", "abc")
    assert bad.returncode == 2 and "--credit" in bad.stderr


async def test_migrating_twice_is_harmless(database_factory):
    url = database_factory("migrate")
    first = await migrate_database(url)
    assert first and first[0].startswith("0001_")
    assert await migrate_database(url) == []
