"""The client's `models` fallback, one loop for every endpoint (chat and the protocols
translated to it, and embeddings): the chosen models in turn, each with its own hold at its
own price, until one answers or fails for good.

A model whose routes all failed retryably before any byte (`NextModel`) gives its hold back
and the next is tried. A model the balance cannot hold (402), a sub-key may not use (403) or
no route of which can express the request (400) is passed over too. When no model could be
held, the client gets the last held model's failure, else the 402, else the 403, else the
400: the answer that says most about why nothing answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from apifast.catalog.toml import Model
from apifast.errors import ApiError
from apifast.metering.event import UsageEvent
from apifast.money import ZERO
from apifast.router.reservations import ModelNotAllowed, Refused
from apifast.router.route_book import Budget
from apifast.router.route_calls import RoutesFailed, finish_failed
from apifast.router.route_fit import UnfitRequest
from apifast.router.state import RouterState

if TYPE_CHECKING:
    from apifast.router.route_prefs import Choice

T = TypeVar("T")


class NextModel(Exception):
    """Every route of this model failed retryably before any byte: its hold is given back
    and the client's next model is tried. Should no later model be held (402), the client
    gets this model's failure: `answer()` finishes its event (once) and gives its error."""

    def __init__(self, answer: Callable[[], ApiError]) -> None:
        super().__init__("next model")
        self.answer = answer


def _failed_after_give_back(
    state: RouterState, event: UsageEvent, model: Model, failed: RoutesFailed, budget: Budget
) -> ApiError:
    # Its hold went back when the next model was tried: the event holds nothing, and has
    # no lease to return to (it would be returned twice).
    event.reserved_usd, event.lease, event.settle_early = ZERO, "", False
    return finish_failed(state, event, model, failed, budget)


def routes_failed(
    state: RouterState,
    event: UsageEvent,
    model: Model,
    failed: RoutesFailed,
    budget: Budget,
    more: bool,
) -> BaseException:
    """What a model whose routes all failed raises: `NextModel` when another of the
    client's models may follow (the caller gives the hold back), else the client's error,
    with the failed request finished."""
    if more and failed.retryable and not budget.spent(state.routes.clock()):
        return NextModel(lambda: _failed_after_give_back(state, event, model, failed, budget))
    return finish_failed(state, event, model, failed, budget)


async def across_models(
    choice: Choice, attempt: Callable[[int, Model, bool, bool], Awaitable[T]]
) -> T:
    """`attempt(i, model, more, limits)` for each of the chosen models until one returns.
    `more`: another model may follow; `limits`: this model's hold counts the request toward
    the key's rate limits (only until a model has been held: one request counts once)."""
    refused: Refused | None = None  # of the models not held, the one that needed least
    held_and_failed: NextModel | None = None  # the last model held whose routes all failed
    not_allowed: ModelNotAllowed | None = None  # a model the sub-key may not use
    unfit: UnfitRequest | None = None  # a model none of whose routes can express it
    for i, candidate in enumerate(choice.models):
        more = i + 1 < len(choice.models)
        try:
            return await attempt(i, candidate, more, held_and_failed is None)
        except NextModel as next_model:
            held_and_failed = next_model
        except ModelNotAllowed as exc:  # refused before anything was counted or held
            not_allowed = exc
        except UnfitRequest as exc:
            unfit = unfit or exc
        except Refused as exc:
            if exc.status != 402:
                raise  # held up by requests in flight (429): the wait was the hold's
            if refused is None or (exc.needed_usd or ZERO) < (refused.needed_usd or ZERO):
                refused = exc
    if held_and_failed is not None:
        raise held_and_failed.answer()
    # The last model either answers, fails for good or is refused.
    if refused is not None:
        raise refused
    if not_allowed is not None:
        raise not_allowed
    assert unfit is not None
    raise unfit
