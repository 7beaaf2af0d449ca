"""The newcomer's path: `apifast dev` on the embedded engines (a subprocess, as a user runs
it, one for the module), `apifast keys create --json` with the same environment, the official
SDKs unmodified: the `openai` SDK's chat and `client.responses.create`, the `anthropic` SDK's
`messages.create`, against an OpenAI-shaped and an Anthropic-shaped upstream, streaming and
not, a tool-call round trip and an image; the balance falling by exactly the priced usage,
the event in ClickHouse. Also `apifast migrate` twice."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from apifast.server.migrations import migrate_database
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
from tests.harness import free_port, models_toml
from tests.test_messages_api import CLAUDE

CLAUDE_TEXT = "Hello from the fake Claude."
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
# fast-chat is routed to an OpenAI-shaped upstream, claude-chat to an Anthropic-shaped one.
MODELS = ("fast-chat", "claude-chat")


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


@dataclass
class Dev:
    """One `apifast dev` for the module, and the fake upstreams it routes to."""

    base: str
    env: dict[str, str]
    upstream: FakeOpenAI
    claude: FakeAnthropic

    async def new_key(self, credit: str) -> str:
        made = await run_cli(self.env, "keys", "create", "--credit", credit, "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        assert created["balance_usd"] == credit and created["key"].startswith("af-")
        key: str = created["key"]
        return key

    async def balance_after(self, key: str, generation_ids: list[str]) -> Decimal:
        """The key's balance once every request is metered (ClickHouse is written after the
        ledger, so a generation found there has been debited)."""
        async with httpx.AsyncClient(
            base_url=self.base, headers={"Authorization": f"Bearer {key}"}
        ) as c:
            for gen in generation_ids:
                for _ in range(300):
                    if (await c.get(f"/v1/generation/{gen}")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"{gen} was not metered")
            return Decimal((await c.get("/v1/key")).json()["balance_usd"])


@pytest.fixture(scope="module")
async def dev(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dev]:
    tmp = tmp_path_factory.mktemp("dev")
    upstream = await FakeOpenAI().start()
    claude = FakeAnthropic()
    claude.api_key = "sk-ant-test-key"
    await claude.start()
    models = tmp / "models.toml"
    models.write_text(models_toml(upstream.url, CLAUDE.format(url=claude.url)))
    port = free_port()
    env = cli_env(tmp / "data", port, models)
    log = (tmp / "dev.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "apifast.cli", "dev"], env=env,  # noqa: ASYNC220
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base, proc)
        yield Dev(base, env, upstream, claude)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        log.close()
        await claude.stop()
        await upstream.stop()
    assert proc.returncode == 0, (tmp / "dev.log").read_text()[-2000:]
    # A clean stop leaves no dev state behind; the embedded engines were stopped.
    assert not (tmp / "data" / "dev.json").exists()


def _cost(usage: Any) -> Decimal:
    """usage.cost as the SDK parsed it (a float of a short decimal: its repr is exact)."""
    return Decimal(str(usage.model_extra["cost"]))


async def test_dev_stack_end_to_end(dev: Dev) -> None:
    key = await dev.new_key("5.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=dev.base + "/v1", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="fast-chat", messages=[{"role": "user", "content": "hello"}]
    )
    cost = raw.http_response.json(parse_float=Decimal)["usage"]["cost"]
    resp = raw.parse()
    assert cost > 0
    assert await dev.balance_after(key, [resp.id]) == Decimal("5.00") - cost
    async with httpx.AsyncClient(
        base_url=dev.base, headers={"Authorization": f"Bearer {key}"}
    ) as c:
        gen = (await c.get(f"/v1/generation/{resp.id}")).json()
    assert gen["model"] == "fast-chat" and Decimal(gen["cost_usd"]) == cost


async def test_anthropic_sdk_messages_on_both_upstreams(dev: Dev) -> None:
    key = await dev.new_key("1.00")
    client = anthropic.AsyncAnthropic(api_key=key, base_url=dev.base, max_retries=0)
    costs: dict[str, Decimal] = {}  # generation id -> usage.cost
    hello = [{"role": "user", "content": "hello"}]
    for model in MODELS:
        raw = await client.messages.with_raw_response.create(
            model=model,
            max_tokens=100,
            messages=hello,  # type: ignore[arg-type]
        )
        message = await raw.parse()  # the anthropic SDK's raw response parses asynchronously
        assert message.type == "message" and message.model == model
        assert message.stop_reason == "end_turn"
        assert "".join(b.text for b in message.content if b.type == "text") in (REPLY, CLAUDE_TEXT)
        costs[message.id.removeprefix("msg_")] = raw.http_response.json(parse_float=Decimal)[
            "usage"
        ]["cost"]

        stream = await client.messages.create(
            model=model,
            max_tokens=100,
            messages=hello,
            stream=True,  # type: ignore[arg-type]
        )
        kinds, text, stop, cost, message_id = [], "", None, None, ""
        async for event in stream:
            kinds.append(event.type)
            if event.type == "message_start":
                message_id = event.message.id
                assert event.message.model == model
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
            elif event.type == "message_delta":
                stop, cost = event.delta.stop_reason, _cost(event.usage)
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
        assert text in (REPLY, CLAUDE_TEXT) and stop == "end_turn" and cost is not None
        costs[message_id.removeprefix("msg_")] = cost

    # A tool-call round trip, translated to the OpenAI-shaped upstream and back.
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    ask = [{"role": "user", "content": "weather in Paris?"}]
    dev.upstream.behaviour = "tools"  # for this call only: the next one answers in text
    try:
        first = await client.messages.create(
            model="fast-chat",
            max_tokens=100,
            tools=tools,
            messages=ask,  # type: ignore[arg-type]
        )
    finally:
        dev.upstream.behaviour = "ok"
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    second = await client.messages.create(
        model="fast-chat", max_tokens=100, tools=tools,  # type: ignore[arg-type]
        messages=[
            *ask,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
            ]},
        ],
    )  # fmt: skip
    assert second.stop_reason == "end_turn"
    sent = dev.upstream.requests[-1]
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    # An image, to the Anthropic-shaped upstream.
    seen = await client.messages.create(
        model="claude-chat", max_tokens=50,
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "what is this?"},
        ]}],
    )  # fmt: skip
    assert seen.stop_reason == "end_turn"
    block = dev.claude.last_request.body["messages"][0]["content"][0]
    assert block["type"] == "image" and block["source"]["data"] == PNG
    for message in (first, second, seen):
        costs[message.id.removeprefix("msg_")] = _cost(message.usage)

    # Billing is exact: the balance fell by the sum of what each answer said it cost.
    assert all(cost > 0 for cost in costs.values())
    assert await dev.balance_after(key, list(costs)) == Decimal("1.00") - sum(costs.values())


async def test_openai_sdk_responses_on_both_upstreams(dev: Dev) -> None:
    key = await dev.new_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=dev.base + "/v1", max_retries=0)
    costs: dict[str, Decimal] = {}
    for model in MODELS:
        raw = await client.responses.with_raw_response.create(
            model=model, input="hello", max_output_tokens=100
        )
        response = raw.parse()
        assert response.object == "response" and response.status == "completed"
        assert response.model == model and response.output_text in (REPLY, CLAUDE_TEXT)
        costs[response.id.removeprefix("resp_")] = raw.http_response.json(parse_float=Decimal)[
            "usage"
        ]["cost"]

        stream = await client.responses.create(
            model=model, input=[{"role": "user", "content": "hello"}], stream=True
        )
        kinds, deltas, final = [], "", None
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas += event.delta
            elif event.type == "response.completed":
                final = event.response
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed" and final is not None
        assert final.status == "completed" and final.model == model
        assert deltas in (REPLY, CLAUDE_TEXT) and final.output_text == deltas
        assert final.usage is not None
        costs[final.id.removeprefix("resp_")] = _cost(final.usage)

    # A function-call round trip, translated to the Anthropic-shaped upstream and back.
    tools: Any = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    first = await client.responses.create(
        model="claude-chat", input="weather in Paris? [fake:tool_use]", tools=tools
    )
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and orjson.loads(call.arguments)["city"] == "Paris"
    second = await client.responses.create(
        model="claude-chat", tools=tools,
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )  # fmt: skip
    assert second.status == "completed" and second.output_text
    result = dev.claude.last_request.body["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call.call_id
    # An image, to the OpenAI-shaped upstream.
    seen = await client.responses.create(
        model="fast-chat",
        input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
            {"type": "input_text", "text": "what is this?"},
        ]}],
    )  # fmt: skip
    assert seen.status == "completed"
    part = dev.upstream.requests[-1]["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    for response in (first, second, seen):
        assert response.usage is not None
        costs[response.id.removeprefix("resp_")] = _cost(response.usage)

    assert all(cost > 0 for cost in costs.values())
    assert await dev.balance_after(key, list(costs)) == Decimal("1.00") - sum(costs.values())


async def test_dev_in_json_log_mode_writes_only_json_lines(tmp_path: Path) -> None:
    """With APIFAST_LOG_FORMAT=json every line `apifast dev` writes is a JSON object, its
    start-up banner too (it was plain text, which a log collector cannot read)."""
    port = free_port()
    env = {**cli_env(tmp_path / "data", port, None), "APIFAST_LOG_FORMAT": "json"}
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "apifast.cli", "dev"], env=env,  # noqa: ASYNC220
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-2000:]
    lines = [orjson.loads(line) for line in text.splitlines()]  # each one JSON, or this fails
    banner = [e for e in lines if e["message"].startswith("ApiFast dev stack on ")]
    assert len(banner) == 1 and banner[0]["logger"] == "apifast.dev", lines
    assert f"http://127.0.0.1:{port}" in banner[0]["message"]
    assert "apifast keys create --credit 5.00" in banner[0]["message"]


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


def test_a_bad_setting_is_one_line_by_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator who writes APIFAST_METRICS_LISTEN=9464 gets the setting's name and the
    problem, not a pydantic traceback naming `metrics_listen`; and never the value, which
    could be a secret."""
    from apifast.cli.main import main

    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    monkeypatch.setenv("APIFAST_METRICS_LISTEN", "9464")
    monkeypatch.setenv("APIFAST_PORT", "eighty")
    assert main(["serve"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "APIFAST_PORT", "APIFAST_METRICS_LISTEN"
    ]  # fmt: skip
    assert all(line.startswith("apifast: ") for line in lines)
    assert "eighty" not in "".join(lines) and "Traceback" not in "".join(lines)


async def test_a_log_level_is_a_standard_name_in_any_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APIFAST_LOG_LEVEL=trace (uvicorn's name, not logging's) once stopped start-up with a
    traceback from logging; now it is the one line of any bad setting. Any case is taken."""
    from apifast.settings import Settings

    env = {**cli_env(tmp_path / "data", free_port(), None), "APIFAST_LOG_LEVEL": "trace"}
    bad = await run_cli(env, "serve")
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.splitlines()
    assert line.startswith("apifast: APIFAST_LOG_LEVEL: ") and "DEBUG" in line, line
    for given, kept in (("debug", "DEBUG"), ("Warning", "WARNING"), ("warn", "WARNING")):
        monkeypatch.setenv("APIFAST_LOG_LEVEL", given)
        assert Settings(_env_file=None).log_level == kept  # type: ignore[call-arg]


def test_the_dev_banner_names_an_apifast_the_shell_can_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scripts/dev` runs the venv's apifast without activating the venv, so the banner's
    `apifast keys create` was "command not found" in the second terminal the README opens;
    it names the venv's apifast then (`.venv/bin/apifast` from the checkout), and plain
    `apifast` when that is the one on PATH."""
    from apifast.cli.dev import announce
    from apifast.settings import Settings

    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "apifast").exists():
        pytest.skip("the tests do not run from an installed venv")
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    monkeypatch.chdir(venv_bin.parent.parent)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    announce(settings)
    relative = (venv_bin / "apifast").relative_to(venv_bin.parent.parent)
    assert f"  new key:  {relative} keys create --credit 5.00\n" in capsys.readouterr().err
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    announce(settings)
    assert "  new key:  apifast keys create --credit 5.00\n" in capsys.readouterr().err
