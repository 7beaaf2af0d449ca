"""schemathesis against the app's own OpenAPI schema: schema-valid and schema-violating
requests to every operation, with and without a valid key, never get a 500, and every
error answer is in OpenAI's shape. Bounded (few examples per operation) to stay fast."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import models_toml, running_stack

MAX_EXAMPLES = 10
# Deliberate 5xx answers, each in OpenAI's shape: upstream failures and unavailable features.
DELIBERATE_5XX = {502, 503, 504}


def _problems(response: Any, where: str) -> list[str]:
    status = response.status_code
    problems = []
    if status == 500 or (status >= 500 and status not in DELIBERATE_5XX):
        problems.append(f"{where}: {status}")
    content_type = response.headers.get("content-type") or [""]  # header values are lists
    if status >= 400 and content_type[0].startswith("application/json"):
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if " /v1/messages" in where:
            # Anthropic's Messages API answers in Anthropic's error shape.
            if body.get("type") != "error" or not isinstance(error, dict) or not {
                "type", "message"} <= set(error):  # fmt: skip
                problems.append(f"{where}: {status} not in Anthropic's error shape: {body!r:.200}")
        elif not isinstance(error, dict) or not {"message", "type", "code", "param"} <= set(error):
            problems.append(f"{where}: {status} not in OpenAI's error shape: {body!r:.200}")
    return problems


def _property(
    operation: Any, mode: GenerationMode, base_url: str, auth: dict[str, str],
    problems: list[str], seen: Counter[tuple[str, int]],
) -> Callable[[], None]:  # fmt: skip
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=auth, timeout=30)
        where = f"{case.method} {case.formatted_path} ({mode.value})"
        seen[(f"{case.method} {operation.path}", response.status_code)] += 1
        problems.extend(_problems(response, where))

    return run  # type: ignore[no-any-return]


def _with_real_models(raw_schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with `model` pinned to the served models, so that generated requests get
    past the catalog lookup into reservations, the upstream call and metering."""
    pinned = copy.deepcopy(raw_schema)
    for path, model in (("/v1/chat/completions", "fast-chat"), ("/v1/embeddings", "embed-small")):
        body = pinned["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        schema = body["schema"]
        schema["properties"]["model"] = {"type": "string", "enum": [model]}
        # Only `model`: generated `models` / `route` name unknown models or impossible caps,
        # and would keep this run in the validation errors the first run already covers.
        for name in ("models", "route"):
            schema["properties"].pop(name, None)
        schema.pop("anyOf", None)
        schema["required"] = sorted({*schema.get("required", ()), "model"})
    embeddings = pinned["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    embeddings["application/json"]["schema"]["properties"]["input"] = {
        "type": "string", "minLength": 1,
    }  # fmt: skip
    chat = pinned["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    chat["application/json"]["schema"]["properties"]["messages"]["items"] = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"type": "string"},
        },
    }
    pinned["paths"] = {p: pinned["paths"][p] for p in ("/v1/chat/completions", "/v1/embeddings")}
    return pinned


def _fuzz(
    raw_schema: dict[str, Any], base_url: str, key: str
) -> tuple[list[str], Counter[tuple[str, int]]]:
    problems: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    with_key = {"Authorization": f"Bearer {key}"}
    runs = [
        (raw_schema, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE), (with_key, {})),
        (_with_real_models(raw_schema), (GenerationMode.POSITIVE,), (with_key,)),
    ]
    for spec, modes, auths in runs:
        for result in schemathesis.openapi.from_dict(spec).get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]
            for mode in modes:
                for auth in auths:
                    try:
                        _property(operation, mode, base_url, auth, problems, seen)()
                    except hypothesis.errors.Unsatisfiable:
                        continue  # e.g. no way to violate the schema of an operation without inputs
    return problems, seen


async def test_no_server_errors_on_any_operation(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    settings = stack_settings_factory(models_toml(fake_openai.url))
    async with running_stack(settings) as stack:
        key = await stack.create_key("100.00")
        async with stack.client() as client:
            raw_schema = (await client.get("/openapi.json")).json()
        assert "/v1/chat/completions" in raw_schema["paths"]
        # schemathesis is synchronous: it runs in a thread while the server runs here.
        problems, seen = await asyncio.to_thread(_fuzz, raw_schema, stack.base_url, key)
    print(f"\nschemathesis: {sum(seen.values())} requests, statuses {sorted(seen.items())}")
    assert not problems, "\n".join(sorted(set(problems))[:30])
    # The fuzzing reached the real work, not only the validation errors.
    assert seen[("POST /v1/chat/completions", 200)] > 0
    assert seen[("POST /v1/embeddings", 200)] > 0
