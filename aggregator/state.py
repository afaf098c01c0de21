"""The aggregator's persistent state: what a restarted aggregator needs to resume the run exactly.

Saved in any :class:`~fedbus.bus.stores.ObjectStore` (JetStream's on a broker, a directory otherwise):

* ``<run>/model/v<version>``: every global model version, raw float32 (the run's lineage), and
  ``<run>/model/v<version>.json``: the metrics of the round that produced it;
* ``<run>/state/a`` and ``<run>/state/b``: checkpoints written alternately, each with a sequence number,
  so a crash while writing one leaves the other intact; :meth:`StateStore.load` takes the newest valid one.
  They name the sampled clients, so they go to a store of their own when one is given (``private``): the
  models are for every client to read, the sample is for the aggregator alone.

A checkpoint holds the round number, the global model version, the strategy's state (server optimizer
moments), the privacy accountant, and the round in progress: the sampled clients, who answered, and the
accumulator or buffered updates, so a restarted aggregator re-opens the same round and only asks the clients
that had not been folded in yet.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import structlog

from fedbus.bus.errors import IntegrityError, NotFound, StoreError
from fedbus.bus.events import Params
from fedbus.bus.stores import ObjectStore

__all__ = ["RoundProgress", "RunState", "StateStore"]

log = structlog.get_logger("fedbus.aggregator.state")
_ND = 1  # msgpack extension code of a numpy array


class RoundProgress(msgspec.Struct, kw_only=True):
    """A fit round (or async buffer) in progress."""

    round: int
    attempt: int
    sampled: list[str]
    received: list[str] = []
    rejected: list[str] = []
    late: list[str] = []
    aggregate: dict[str, Any] = {}
    started_version: int = 0


class RunState(msgspec.Struct, kw_only=True):
    """Everything the aggregator persists about a run."""

    run_id: str
    seq: int = 0
    round: int = 1
    """The round to run next (or the one in ``progress``)."""
    version: int = 0
    model_object: str = ""
    model_sha256: str = ""
    strategy: dict[str, Any] = {}
    dp_rdp: list[float] = []
    dp_steps: int = 0
    history: list[Params] = []
    progress: RoundProgress | None = None
    finished: bool = False


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return msgspec.msgpack.Ext(
            _ND, msgspec.msgpack.encode((arr.dtype.str, list(arr.shape), arr.tobytes()))
        )
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot persist {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _ND:
        raise StoreError(f"unknown extension {code} in a state checkpoint")
    dtype, shape, raw = msgspec.msgpack.decode(data)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_DECODER = msgspec.msgpack.Decoder(RunState, ext_hook=_ext_hook)


class StateStore:
    """Checkpoints and lineage of one run in an object store."""

    def __init__(self, store: ObjectStore, run_id: str, *, private: ObjectStore | None = None) -> None:
        self.store = store
        self.private = private if private is not None else store
        self.run_id = run_id
        self.seq = 0

    def model_name(self, version: int) -> str:
        return f"{self.run_id}/model/v{version}"

    async def save_model(self, version: int, model: np.ndarray, metrics: Params) -> str:
        """Store a global model version and its metrics; returns the object name."""
        name = self.model_name(version)
        await self.store.put_bytes(name, np.ascontiguousarray(model, np.float32).tobytes())
        await self.store.put_bytes(f"{name}.json", json.dumps(metrics, sort_keys=True).encode())
        return name

    async def load_model(self, version: int) -> np.ndarray:
        """A stored global model version (verified by the store's sha256)."""
        return np.frombuffer(await self.store.get_bytes(self.model_name(version)), np.float32).copy()

    async def lineage(self) -> list[tuple[int, Params]]:
        """Every stored version with its metrics, oldest first."""
        prefix = f"{self.run_id}/model/v"
        out = []
        for info in await self.store.list():
            if info.name.startswith(prefix) and info.name.endswith(".json"):
                version = int(info.name[len(prefix) : -len(".json")])
                out.append((version, json.loads(await self.store.get_bytes(info.name))))
        return sorted(out, key=lambda item: item[0])

    async def save(self, state: RunState) -> None:
        """Write a checkpoint into the older of the two slots."""
        self.seq = max(self.seq, state.seq) + 1
        state.seq = self.seq
        slot = "a" if self.seq % 2 else "b"
        await self.private.put_bytes(f"{self.run_id}/state/{slot}", _ENCODER.encode(state))

    async def load(self) -> RunState | None:
        """The newest valid checkpoint, or ``None`` for a new run."""
        best: RunState | None = None
        for slot in ("a", "b"):
            try:
                state = _DECODER.decode(await self.private.get_bytes(f"{self.run_id}/state/{slot}"))
            except NotFound:
                continue
            except (IntegrityError, msgspec.DecodeError, msgspec.ValidationError, StoreError) as exc:
                log.warning("ignoring a damaged checkpoint", slot=slot, error=str(exc), run_id=self.run_id)
                continue
            if best is None or state.seq > best.seq:
                best = state
        if best is not None:
            self.seq = best.seq
        return best
