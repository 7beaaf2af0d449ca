"""Plugin loading: built-ins through entry points, a third-party distribution installed by
the test and routed to, check_pending, docs that cover every hook, and the native-protocol
part of the provider contract (native_protocols, native, stream_native)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import openai
import pluggy
import pytest

from apifast import hookspecs
from apifast.plugin_manager import make_plugin_manager, payment_processor_types, provider_types
from apifast.plugins.providers.openai_compat import OpenAIProvider
from apifast.providers import NativeRequest, Provider, ProviderConfig, UpstreamError
from tests.harness import running_stack

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tests" / "plugin_dist" / "apifast-echo"


def test_builtins_load_through_entry_points():
    pm = make_plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"openai", "anthropic", "demo"} <= names
    assert {"openai", "anthropic", "demo"} <= set(provider_types(pm))
    assert {"nowpayments", "btcpay"} <= set(payment_processor_types(pm))


def test_misspelled_hook_fails_start_up():
    hookimpl = pluggy.HookimplMarker("apifast")

    class Typo:
        @hookimpl
        def register_provider_typos(self, register):
            pass

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(extra_plugins=(Typo(),))


def test_every_hook_is_documented():
    text = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(fn, "apifast_spec")]  # fmt: skip
    assert hooks, "no hooks found"
    for name in hooks:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"### {name}({params})" in text, f"docs/plugins.md lacks a section for {name}"


# The client protocols a provider may speak natively, as docs/plugins.md documents them.
DOCUMENTED_PROTOCOLS = {"messages", "responses"}


async def test_native_protocol_contract_is_documented_and_kept():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for member in ("`native_protocols`", "`async native(request) -> ChatResponse`",
                   "`stream_native(request)`",
                   "`async count_tokens_native(request) -> int \\| None`"):  # fmt: skip
        assert member in text, f"docs/plugins.md lacks {member}"
    for protocol in DOCUMENTED_PROTOCOLS:
        assert f'`"{protocol}"`' in text, f"docs/plugins.md does not document {protocol!r}"
    # The documented members, with the documented signatures and defaults.
    assert Provider.native_protocols == frozenset()
    assert inspect.iscoroutinefunction(Provider.native)
    for method in (Provider.native, Provider.stream_native):
        assert list(inspect.signature(method).parameters) == ["self", "request"]
    base = Provider(ProviderConfig(name="p", type=""))
    with pytest.raises(UpstreamError) as refused:
        await base.native(NativeRequest("responses", {}, "m"))
    assert refused.value.retryable is False
    with pytest.raises(UpstreamError):
        base.stream_native(NativeRequest("responses", {}, "m", True))
    # No native count by default: the translated body is counted instead.
    assert await base.count_tokens_native(NativeRequest("messages", {}, "m")) is None
    # Every bundled provider declares only documented protocols, and implements both
    # methods for what it declares; the openai type only with native_responses = true.
    for name, cls in provider_types(make_plugin_manager()).items():
        assert cls.native_protocols <= DOCUMENTED_PROTOCOLS, name
        for options in ({}, {"native_responses": True}):
            provider = cls(ProviderConfig(name="p", type=name, options=options))
            protocols = provider.native_protocols
            assert isinstance(protocols, frozenset) and protocols <= DOCUMENTED_PROTOCOLS
            if protocols:
                assert cls.native is not Provider.native, name
                assert cls.stream_native is not Provider.stream_native, name
    plain = OpenAIProvider(ProviderConfig(name="p", type="openai"))
    native = OpenAIProvider(ProviderConfig(name="p", type="openai",
                                           options={"native_responses": True}))  # fmt: skip
    assert plain.native_protocols == frozenset()
    assert native.native_protocols == frozenset({"responses"})
    assert OpenAIProvider.native_protocols == frozenset()  # per instance, not per class
    with pytest.raises(UpstreamError):  # a protocol it does not speak
        await native.native(NativeRequest("messages", {}, "m"))


@pytest.fixture(scope="module")
def installed_echo(tmp_path_factory: pytest.TempPathFactory):
    target = tmp_path_factory.mktemp("echo-plugin")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(DIST)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("apifast_echo", None)
        importlib.invalidate_caches()


async def test_third_party_plugin_serves_a_model(installed_echo, stack_settings_factory):
    assert "echo" in provider_types(make_plugin_manager())
    models = """
        [providers.echo]
        type = "echo"

        [[models]]
        id = "echo-model"
        input_usd_per_mtok = "1.00"
        output_usd_per_mtok = "2.00"
        routes = [ { provider = "echo", model = "echo" } ]
    """
    async with running_stack(stack_settings_factory(models)) as stack:
        key = await stack.create_key("1.00")
        client = openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)
        resp = await client.chat.completions.create(
            model="echo-model",
            messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        )
        assert resp.choices[0].message.content == "echo: 2 messages"
        assert resp.usage is not None and resp.usage.prompt_tokens == 20
        await stack.wait_metered([resp.id])


def test_the_plugin_allow_list_is_read_from_dotenv_like_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Settings: every APIFAST_* setting is also read from `.env`. APIFAST_PLUGINS
    was read from the process environment only, so an allow-list in `.env` (or compose's
    apifast.env) was ignored and every installed plugin loaded."""
    from apifast.server.app import create_app
    from apifast.settings import Settings

    for name in ("APIFAST_PLUGINS", "APIFAST_MODELS_FILE", "APIFAST_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    models = tmp_path / "models.toml"
    models.write_text(
        '[providers.claude]\ntype = "anthropic"\nbase_url = "http://127.0.0.1:9"\n\n'
        '[[models]]\nid = "m"\ninput_usd_per_mtok = "1"\noutput_usd_per_mtok = "1"\n'
        'routes = [ { provider = "claude", model = "x" } ]\n'
    )
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"APIFAST_SECRET_KEY={'s' * 40}\nAPIFAST_MODELS_FILE={models}\n")
    create_app(Settings(_env_file=dotenv))  # type: ignore[call-arg]  # anthropic is installed
    dotenv.write_text(dotenv.read_text() + "APIFAST_PLUGINS=openai,demo\n")
    with pytest.raises(Exception, match="anthropic"):  # allowed out: the catalog names it
        create_app(Settings(_env_file=dotenv))  # type: ignore[call-arg]
