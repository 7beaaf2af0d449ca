"""Which of a model's routes can express a request, decided before the hold: a field a
route's provider has no equivalent for (an Anthropic-only `top_k` on an OpenAI route,
`temperature` above Anthropic's 1, `n` > 1 on Anthropic) is never silently dropped. Such
routes are passed over; when none is left, the client gets a 400 naming the field, and
nothing was held or sent upstream."""

from __future__ import annotations

from apifast.catalog.toml import Model
from apifast.errors import ApiError
from apifast.providers import ChatRequest, Provider, UnsupportedParameter
from apifast.router.core_types import Generation, speaks_native
from apifast.router.state import RouterState

NO_SKIP: frozenset[str] = frozenset()


class UnfitRequest(ApiError):
    """No route of the model can express the request: a 400 naming the field."""


def unsupported_error(exc: UnsupportedParameter) -> ApiError:
    return UnfitRequest(400, f"{exc.param}: {exc.reason}", param=exc.param,
                        code="unsupported_parameter")  # fmt: skip


def unfit_providers(state: RouterState, model: Model, gen: Generation) -> frozenset[str]:
    """The providers (by name) of `model`'s routes that cannot express `gen`; raises
    `UnfitRequest` when that is all of them. A native route takes the client's own body,
    which its provider's API judges; a translated one must not need a native-only field."""
    unfit: set[str] = set()
    first: UnsupportedParameter | None = None
    usable = 0
    for route in model.routes:
        provider = state.providers.get(route.provider)
        if provider is None or route.provider in unfit:
            continue
        try:
            if not speaks_native(provider, gen):
                if gen.native_only:
                    param, reason = gen.native_only[0]
                    raise UnsupportedParameter(param, reason)
                # The default accepts everything: no request object to build for it.
                if type(provider).check_request is not Provider.check_request:
                    provider.check_request(ChatRequest(body=gen.body, model=route.model))
        except UnsupportedParameter as exc:
            unfit.add(route.provider)
            first = first or exc
            continue
        usable += 1
    if first is not None and not usable:
        raise unsupported_error(first)
    return frozenset(unfit) if unfit else NO_SKIP
