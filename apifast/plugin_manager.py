"""Builds the plugin manager. Built-in plugins load through the same entry points as
third-party ones (see pyproject.toml), so a third-party plugin can replace any of them."""

from __future__ import annotations

import os
from typing import TypeVar

import pluggy

from apifast import hookspecs
from apifast.payments import PaymentProcessor
from apifast.providers import Provider

PROVIDER_GROUP = "apifast.providers"
PAYMENT_GROUP = "apifast.payments"


class PluginError(RuntimeError):
    pass


def make_plugin_manager(
    *, extra_plugins: tuple[object, ...] = (), allowed_names: str | None = None
) -> pluggy.PluginManager:
    """A fresh manager with every installed plugin loaded and checked.

    `allowed_names` (the `APIFAST_PLUGINS` setting; None: read from the environment), when
    not empty, is a comma-separated allow-list of entry-point names.
    """
    pm = pluggy.PluginManager("apifast")
    pm.add_hookspecs(hookspecs)
    if allowed_names is None:
        allowed_names = os.environ.get("APIFAST_PLUGINS", "")
    allowed = {p.strip() for p in allowed_names.split(",") if p.strip()}
    for group in (PROVIDER_GROUP, PAYMENT_GROUP):
        if allowed:
            from importlib.metadata import entry_points

            for ep in entry_points(group=group):
                if ep.name in allowed and pm.get_plugin(ep.name) is None:
                    pm.register(ep.load(), name=ep.name)
        else:
            pm.load_setuptools_entrypoints(group)
    for plugin in extra_plugins:
        pm.register(plugin)
    # A misspelled hook in a plugin fails start-up instead of being silently ignored.
    pm.check_pending()
    return pm


_T = TypeVar("_T", Provider, PaymentProcessor)


def _collect(hook: pluggy.HookCaller, base: type[_T]) -> dict[str, type[_T]]:
    """What the plugins registered through `hook`. The classes are typed as `base` and not
    checked at run time: the contract is the hook, and a duck-typed class keeps working."""
    found: dict[str, type[_T]] = {}

    def register(name: str, cls: type[_T]) -> None:
        # setdefault: pluggy calls later-registered plugins first, so a third-party plugin
        # registered after the built-ins wins for a shared name.
        found.setdefault(name, cls)

    hook(register=register)
    return found


def provider_types(pm: pluggy.PluginManager) -> dict[str, type[Provider]]:
    return _collect(pm.hook.register_provider_types, Provider)


def payment_processor_types(pm: pluggy.PluginManager) -> dict[str, type[PaymentProcessor]]:
    return _collect(pm.hook.register_payment_processors, PaymentProcessor)
