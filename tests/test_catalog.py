"""The TOML catalog: the documented example is valid; broken files name file, entry, problem."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from apifast.catalog.toml import CatalogError, load_catalog
from apifast.providers import Usage

EXAMPLE = """
[providers.local]
type = "openai"                       # the provider plugin
base_url = "http://127.0.0.1:18080/v1"
api_key_env = "LOCAL_UPSTREAM_KEY"    # read from the environment; unset means no auth header

[[models]]
id = "fast-chat"                      # the public name clients use
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
routes = [ { provider = "local", model = "upstream-model-a" } ]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_issue_example_is_valid(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_UPSTREAM_KEY", raising=False)
    catalog = load_catalog(write(tmp_path, EXAMPLE), known_types={"openai"})
    model = catalog.get("fast-chat")
    assert model is not None and model.routes[0].model == "upstream-model-a"
    assert catalog.providers["local"].api_key is None
    assert model.price.cost(Usage(input_tokens=1000, output_tokens=2000)) == Decimal("0.0035")


def test_cached_and_per_request_prices(tmp_path):
    text = EXAMPLE.replace(
        'output_usd_per_mtok = "1.50"',
        'output_usd_per_mtok = "1.50"\ncached_input_usd_per_mtok = "0.05"\n'
        'cache_write_usd_per_mtok = "0.625"\nrequest_usd = "0.0001"',
    )
    price = load_catalog(write(tmp_path, text)).models["fast-chat"].price
    usage = Usage(input_tokens=1000, output_tokens=10, cached_tokens=600, cache_write_tokens=100)
    expected = (
        Decimal(300) * Decimal("0.5")
        + Decimal(600) * Decimal("0.05")
        + Decimal(100) * Decimal("0.625")
        + Decimal(10) * Decimal("1.5")
    ) / 10**6
    assert price.cost(usage) == expected + Decimal("0.0001")


def test_bare_number_prices_are_read_exactly(tmp_path):
    text = EXAMPLE.replace('"0.50"', "0.1").replace('"1.50"', "0.3")
    price = load_catalog(write(tmp_path, text)).models["fast-chat"].price
    assert price.input_usd_per_mtok == Decimal("0.1") and price.output_usd_per_mtok == Decimal(
        "0.3"
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (('provider = "local"', 'provider = "nowhere"'), "unknown provider 'nowhere'"),
        (('input_usd_per_mtok = "0.50"', 'input_usd_per_mtok = "abc"'), "input_usd_per_mtok"),
        (('input_usd_per_mtok = "0.50"', 'input_usd_per_mtok = "-1"'), "must not be negative"),
        (('type = "openai"', 'type = "nosuch"'), "unknown provider type 'nosuch'"),
        (('id = "fast-chat"', 'id = "fast-chat"\ncolour = "red"'), "unknown field(s): colour"),
        (
            ('routes = [ { provider = "local", model = "upstream-model-a" } ]', ""),
            "needs at least one route",
        ),
        (("[[models]]", "[[models]\n"), "invalid TOML"),
        (
            ('type = "openai"', 'type = "openai"\nnative_responses = "yes"'),
            "native_responses must be true or false",
        ),
    ],
)
def test_broken_catalog_names_file_entry_and_problem(tmp_path, change, needle):
    path = write(tmp_path, EXAMPLE.replace(*change))
    with pytest.raises(CatalogError) as info:
        load_catalog(path, known_types={"openai"})
    message = str(info.value)
    assert str(path) in message and needle in message
    if "TOML" not in needle:
        assert "providers.local" in message or "models[0]" in message


def test_duplicate_model_ids(tmp_path):
    text = EXAMPLE + EXAMPLE.split("[[models]]")[1].join(["\n[[models]]", ""])
    with pytest.raises(CatalogError, match=r"models\[1\].*duplicate model id"):
        load_catalog(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read models file"):
        load_catalog(tmp_path / "missing.toml")


def test_native_responses_is_a_provider_option(tmp_path):
    text = EXAMPLE.replace('type = "openai"', 'type = "openai"\nnative_responses = true')
    options = load_catalog(write(tmp_path, text)).providers["local"].options
    assert options["native_responses"] is True
    assert (
        "native_responses" not in load_catalog(write(tmp_path, EXAMPLE)).providers["local"].options
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_a_broken_catalog_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    workers: str,
) -> None:  # fmt: skip
    """README: a broken catalog stops start-up with a message naming the file, the entry and
    the problem. `apifast dev` printed it; `apifast serve`, what production runs, printed a
    traceback (and with several workers, one per worker, after they started)."""
    from apifast.cli.main import main

    path = write(tmp_path, EXAMPLE.replace('provider = "local"', 'provider = "nowhere"'))
    monkeypatch.setenv("APIFAST_MODELS_FILE", str(path))
    monkeypatch.setenv("APIFAST_DATABASE_URL", "postgresql://postgres@127.0.0.1:9/none")
    monkeypatch.setenv("APIFAST_NATS_URL", "nats://127.0.0.1:9")
    monkeypatch.setenv("APIFAST_SECRET_KEY", "s" * 40)
    monkeypatch.setenv("APIFAST_WORKERS", workers)
    monkeypatch.delenv("APIFAST_CLICKHOUSE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"apifast: {path}: models[0] (id='fast-chat') routes[0]: unknown provider 'nowhere'\n"
    )
