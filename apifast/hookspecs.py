"""Hook specifications: the whole plugin surface. Each hook is documented in docs/plugins.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("apifast")


@hookspec
def register_provider_types(register: Callable[[str, type[Any]], None]) -> None:
    """Register provider classes: call ``register(type_name, ProviderSubclass)``."""


@hookspec
def register_payment_processors(register: Callable[[str, type[Any]], None]) -> None:
    """Register payment processor classes: call ``register(name, ProcessorSubclass)``."""
