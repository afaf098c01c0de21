"""What a round helper needs from the aggregator that hosts it: the :class:`RoundHost` protocol.

The round helpers (:mod:`~fedbus.aggregator.sync_rounds`, :mod:`~fedbus.aggregator.async_rounds`,
:mod:`~fedbus.aggregator.secure_round`) drive rounds through this contract and nothing else;
:class:`~fedbus.aggregator.server.Aggregator` implements it. A helper may read and update :attr:`RoundHost.state`
(the checkpointed run state) but adopts a new global model only through :meth:`RoundHost.finish_round`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedbus.bus.client import Delivery
from fedbus.bus.events import Event, Params
from fedbus.bus.stores import ObjectStore

from .config import RoundSettings, SecureSpec
from .events import ModelRef, RoundStart
from .privacy import RdpAccountant
from .registry import Registry
from .state import RunState, StateStore
from .strategies import Strategy

__all__ = ["RoundHost"]

Vector = npt.NDArray[np.float32]


class RoundHost(Protocol):
    """The aggregator as a round helper sees it."""

    settings: RoundSettings
    strategy: Strategy
    store: ObjectStore
    states: StateStore
    state: RunState
    model: Vector
    """The current global model (replaced by :meth:`finish_round`)."""
    dim: int
    private: bool
    """Central DP: nothing published may name or count a round's clients."""
    client_config: Params
    secure: SecureSpec | None
    evaluate_fn: Callable[[Vector], Params] | None
    accountant: RdpAccountant | None
    registry: Registry
    log: Any
    clock: Callable[[], float]

    async def publish(self, event: Event) -> None:
        """Publish an event (and show it to the progress view)."""
        ...

    async def announce(self, start: RoundStart, invited: list[str]) -> None:
        """Open a round: ``start`` for everyone, an invitation for each invited client."""
        ...

    def sample(self, alive: list[str], *, round: int, attempt: int) -> list[str]:
        """A fit round's sample of the ``alive`` clients."""
        ...

    def account(self, *, count: int = 1) -> None:
        """Add ``count`` DP rounds to the accountant (nothing without DP)."""
        ...

    def model_ref(self) -> ModelRef:
        """A reference to the current global model (inline when small)."""
        ...

    async def checkpoint(self, *, force: bool = False) -> None:
        """Save :attr:`state` (at most once per checkpoint interval unless ``force``)."""
        ...

    async def next_delivery(self, wake_at: float) -> Delivery[Any] | None:
        """The next round-relevant delivery, or ``None`` when the caller should re-check its conditions."""
        ...

    def genuine(self, delivery: Delivery[Any], client_id: str) -> bool:
        """Whether ``delivery`` comes from the client it claims to be."""
        ...

    async def refuse(self, round: int, client_id: str, reason: str, detail: str = "") -> None:
        """Count and (unless private) announce a refused update."""
        ...

    async def wait_for_clients(self, needed: int) -> list[str]:
        """Wait until ``needed`` clients are alive; returns the live ones."""
        ...

    async def stray(self, delivery: Delivery[Any]) -> None:
        """Handle a delivery that belongs to no open round."""
        ...

    async def finish_round(
        self,
        round: int,
        *,
        kind: str = "fit",
        status: str = "ok",
        model: Vector | None = None,
        metrics: Params | None = None,
        received: Iterable[str] = (),
        late: Iterable[str] = (),
        dropped: Iterable[str] = (),
        rejected: Iterable[str] = (),
        duration_s: float | None = None,
        started: float | None = None,
    ) -> None:
        """End a round: adopt ``model`` as a new global version if given, then publish its ``RoundClose``."""
        ...
