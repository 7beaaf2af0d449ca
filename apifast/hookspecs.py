"""Hook specifications: the whole plugin surface. Each hook is documented in docs/plugins.md."""

from __future__ import annotations

import pluggy

from apifast.payments import RegisterPaymentProcessor
from apifast.providers import RegisterProviderType

hookspec = pluggy.HookspecMarker("apifast")


@hookspec
def register_provider_types(register: RegisterProviderType) -> None:
    """Register provider classes: call ``register(type_name, ProviderSubclass)``."""


@hookspec
def register_payment_processors(register: RegisterPaymentProcessor) -> None:
    """Register payment processor classes: call ``register(name, ProcessorSubclass)``."""
