"""The client's side of a secure (SecAgg+) round: train while taking part in the protocol's stages.

The protocol itself is :mod:`fedbus.aggregator.secagg`; this module is its message flow for one client
(advertise keys, receive the roster, send shares, receive the neighbours' shares, send the masked input,
reveal shares for the survivors and the dropped). The aggregator's messages of a round may arrive before
the client waits for them, so they are held in a bounded :class:`Mailbox`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedbus.bus.client import Bus
from fedbus.bus.events import Event, Params
from fedbus.bus.stores import ObjectStore

from . import blobs
from .errors import SecAggError
from .events import (
    RoundStart,
    SecAggAdvertise,
    SecAggInbox,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from .secagg import PublicKeys, SecAggClient, SecAggParams

__all__ = ["Mailbox", "SecureHost", "secure_fit"]

Vector = npt.NDArray[np.float32]


class Mailbox:
    """Messages by (type, round), delivered before or after someone waits for them. Holds at most
    ``capacity`` entries (the oldest go first) and forgets rounds older than the newest delivered − 2, so a
    flood of messages for rounds this client takes no part in cannot grow it."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._mail: OrderedDict[tuple[type, int], asyncio.Future[Any]] = OrderedDict()

    def _future(self, key: tuple[type, int]) -> asyncio.Future[Any]:
        future = self._mail.get(key)
        if future is None:
            future = self._mail[key] = asyncio.get_running_loop().create_future()
            while len(self._mail) > self.capacity:
                self._mail.popitem(last=False)[1].cancel()
        return future

    def deliver(self, event: Event, round: int) -> None:
        """Hold ``event`` (of round ``round``) for :meth:`wait`; the first one of a kind and round wins."""
        for key in [k for k in self._mail if k[1] < round - 2]:
            self._mail.pop(key).cancel()
        future = self._future((type(event), round))
        if not future.done():
            future.set_result(event)

    async def wait(self, cls: type, round: int, timeout: float) -> Any:
        """The ``cls`` message of ``round``; :class:`SecAggError` after ``timeout`` seconds."""
        key = (cls, round)
        future = self._future(key)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                raise  # this task was cancelled (not only the mail forgotten): its owner decides
            raise SecAggError(f"no {cls.__name__} in {timeout:g}s", round=round, stage=cls.__name__) from None
        finally:
            if future.done():
                self._mail.pop(key, None)

    def __len__(self) -> int:
        return len(self._mail)


class SecureHost(Protocol):
    """What :func:`secure_fit` needs of the client it runs for."""

    bus: Bus
    client_id: str
    run_id: str
    store: ObjectStore | None
    inline_limit: int

    def crash_if(self, stage: str, round: int) -> None:
        """Fault injection: raise at ``stage`` of ``round`` if so configured."""

    def fitted(self, round: int) -> None:
        """Count a round this client trained in."""


async def secure_fit(
    host: SecureHost,
    start: RoundStart,
    weights: Vector,
    training: asyncio.Task[Any],
    mailbox: Mailbox,
    *,
    num_examples: int,
) -> None:
    """Take part in the secure round ``start`` while ``training`` (a task giving a ``FitOutcome`` from
    ``weights``) runs; cancels the training if the round is abandoned."""
    rnd, timeout, run_id, me = start.round, start.deadline_s, host.run_id, host.client_id
    try:
        # Keys are advertised before the roster fixes the parameters: they do not depend on them.
        session = SecAggClient(me, SecAggParams(), context=f"{run_id}|{rnd}|{start.attempt}".encode())
        enc, mask = session.advertise()
        await host.bus.publish(
            SecAggAdvertise(
                run_id=run_id, round=rnd, client_id=me, enc_key=enc, mask_key=mask, num_examples=num_examples
            )
        )
        host.crash_if("after_advertise", rnd)
        roster_ev = await mailbox.wait(SecAggRoster, rnd, timeout)
        session.params = SecAggParams(
            threshold=roster_ev.threshold,
            neighbours=roster_ev.neighbours,
            clip=roster_ev.clip,
            levels=roster_ev.levels,
        )
        roster = {p.client_id: PublicKeys(p.enc_key, p.mask_key, p.num_examples) for p in roster_ev.peers}
        if me not in roster:
            return  # advertised too late; not part of this round
        ciphertexts = session.share(roster, total_examples=roster_ev.total_examples)
        await host.bus.publish(SecAggShares(run_id=run_id, round=rnd, client_id=me, ciphertexts=ciphertexts))
        inbox_ev = await mailbox.wait(SecAggInbox, rnd, timeout)
        session.receive(dict(inbox_ev.ciphertexts))
        outcome = await training
        delta = np.ascontiguousarray(outcome.weights - weights, dtype=np.float32)
        masked = session.mask(delta, num_examples=num_examples)
        ref = await blobs.ref_for(
            masked,
            name=f"{run_id}/masked/{rnd}/{secrets.token_hex(16)}",  # names no client
            store=host.store,
            inline_limit=host.inline_limit,
        )
        metrics: Params = outcome.metrics
        await host.bus.publish(
            SecAggMasked(
                run_id=run_id,
                round=rnd,
                client_id=me,
                masked=ref,
                num_examples=outcome.num_examples,
                metrics=metrics,
            )
        )
        host.fitted(rnd)
        host.crash_if("after_masked", rnd)
        unmask = await mailbox.wait(SecAggUnmask, rnd, timeout)
        seeds, keys = session.reveal(list(unmask.survivors), list(unmask.dropped))
        await host.bus.publish(
            SecAggReveal(run_id=run_id, round=rnd, client_id=me, seed_shares=seeds, key_shares=keys)
        )
    finally:
        if not training.done():
            training.cancel()
