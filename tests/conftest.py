"""Shared fixtures: real services (tests/services.py), a fake upstream, and a running stack."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, models_toml, running_stack, stack_settings

pytest_plugins = ["tests.services"]


async def _upstream() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    try:
        yield fake
    finally:
        await fake.stop()


fake_openai = pytest.fixture(_upstream, name="fake_openai")
# Two more, for a model routed to several upstreams (smart routing, route health).
alpha = pytest.fixture(_upstream, name="alpha")
beta = pytest.fixture(_upstream, name="beta")


@pytest.fixture
def stack_settings_factory(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str, tmp_path: Path
) -> Callable[..., object]:
    def make(models: str | None, **overrides: object) -> object:
        models_file = None
        if models is not None:
            models_file = tmp_path / "models.toml"
            models_file.write_text(models)
        return stack_settings(
            database_url=database_factory("stack"),
            nats_url=nats_url,
            clickhouse_url=clickhouse_url,
            data_dir=tmp_path / "data",
            models_file=models_file,
            **overrides,
        )

    return make


@pytest.fixture
async def stack(
    stack_settings_factory: Callable[..., object], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url))
    async with running_stack(settings) as running:  # type: ignore[arg-type]
        yield running
