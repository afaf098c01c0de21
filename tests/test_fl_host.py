"""The round helpers' contract: they reach the aggregator only through :class:`RoundHost` (public names), the
aggregator implements all of it, and a helper runs against any implementation of it (here an in-memory fake)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fedbus.aggregator import blobs
from fedbus.aggregator.async_rounds import AsyncRounds
from fedbus.aggregator.config import RoundSettings
from fedbus.aggregator.events import ModelRef, ModelUpdate, RoundStart
from fedbus.aggregator.filestore import FileObjectStore
from fedbus.aggregator.host import RoundHost
from fedbus.aggregator.registry import Registry
from fedbus.aggregator.server import Aggregator
from fedbus.aggregator.state import RunState
from fedbus.aggregator.strategies import make_strategy
from fedbus.bus.client import Bus, Delivery
from fedbus.bus.codec import Envelope
from fedbus.bus.memory import MemoryBroker, MemoryTransport

AGGREGATOR = Path(__file__).resolve().parent.parent / "aggregator"
HELPERS = ("sync_rounds.py", "async_rounds.py", "secure_round.py")


def _members() -> set[str]:
    methods = {n for n, v in vars(RoundHost).items() if callable(v) and not n.startswith("_")}
    return set(RoundHost.__annotations__) | methods


def _host_uses(tree: ast.AST) -> set[str]:
    """Attributes read on ``agg`` or ``self.agg`` (the helpers' name for their host)."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            v = node.value
            if (isinstance(v, ast.Name) and v.id == "agg") or (isinstance(v, ast.Attribute) and v.attr == "agg"):
                used.add(node.attr)
    return used


def test_the_helpers_use_only_the_protocol() -> None:
    members = _members()
    assert all(not m.startswith("_") for m in members)
    for name in HELPERS:
        tree = ast.parse((AGGREGATOR / name).read_text())
        used = _host_uses(tree)
        assert used, name  # the walk sees the helper's accesses at all
        assert used <= members, f"{name} uses {sorted(used - members)} outside RoundHost"
        imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "server" not in imports, f"{name} imports the aggregator itself"


def test_no_module_but_the_server_touches_aggregator_privates() -> None:
    for path in sorted(AGGREGATOR.glob("*.py")):
        if path.name == "server.py":
            continue
        private = {a for a in _host_uses(ast.parse(path.read_text())) if a.startswith("_")}
        assert not private, f"{path.name} uses private aggregator members {sorted(private)}"


def test_the_aggregator_implements_the_protocol(tmp_path: Path) -> None:
    bus = Bus(MemoryTransport(MemoryBroker()), source="aggregator")
    agg = Aggregator(
        bus,
        settings=RoundSettings(run_id="r1"),
        strategy=make_strategy("fedavg"),
        initial_model=np.zeros(3, np.float32),
        store=FileObjectStore(tmp_path),
    )
    missing = sorted(m for m in _members() if not hasattr(agg, m))
    assert not missing


class FakeHost:
    """Everything a round helper may use, in memory: feeds queued deliveries, records what the helper did."""

    def __init__(
        self, settings: RoundSettings, model: np.ndarray, deliveries: list[Delivery[Any]], store: Any
    ) -> None:
        self.settings = settings
        self.strategy = make_strategy("fedavg")
        self.store = store
        self.states: Any = None
        self.state = RunState(run_id=settings.run_id)
        self.model = model
        self.dim = model.size
        self.private = False
        self.client_config: dict[str, Any] = {}
        self.secure = None
        self.evaluate_fn = None
        self.accountant = None
        self.registry = Registry(timeout=settings.heartbeat_timeout_s)
        self.log = structlog.get_logger("test")
        self.now = 0.0
        self.deliveries = deliveries
        self.published: list[Any] = []
        self.refused: list[tuple[str, str]] = []
        self.finished: list[dict[str, Any]] = []
        self.checkpoints = 0

    def clock(self) -> float:
        return self.now

    async def publish(self, event: Any) -> None:
        self.published.append(event)

    async def announce(self, start: RoundStart, invited: list[str]) -> None:
        self.published.append(start)

    def sample(self, alive: list[str], *, round: int, attempt: int) -> list[str]:
        return alive

    def account(self, *, count: int = 1) -> None:
        pass

    def model_ref(self) -> ModelRef:
        return ModelRef(sha256=blobs.sha256_of(self.model), length=self.dim, inline=self.model.tobytes())

    async def checkpoint(self, *, force: bool = False) -> None:
        self.checkpoints += 1

    async def next_delivery(self, wake_at: float) -> Delivery[Any] | None:
        if not self.deliveries:
            self.now = wake_at  # nothing more will come: let the helper time out instead of spinning
            return None
        return self.deliveries.pop(0)

    def genuine(self, delivery: Delivery[Any], client_id: str) -> bool:
        return delivery.source == client_id

    async def refuse(self, round: int, client_id: str, reason: str, detail: str = "") -> None:
        self.refused.append((client_id, reason))

    async def wait_for_clients(self, needed: int) -> list[str]:
        return ["a", "b"]

    async def stray(self, delivery: Delivery[Any]) -> None:
        pass

    async def finish_round(self, round: int, *, model: Any = None, **close: Any) -> None:
        if model is not None:
            self.model = model
            self.state.version += 1
        self.finished.append({"round": round, "model": model, **close})


def _update(cid: str, delta: np.ndarray, examples: int, *, source: str | None = None) -> Delivery[Any]:
    data = delta.astype(np.float32).tobytes()
    ref = ModelRef(sha256=blobs.sha256_of(delta.astype(np.float32)), length=delta.size, inline=data)
    event = ModelUpdate(run_id="r1", round=1, client_id=cid, base_version=0, update=ref, num_examples=examples)
    envelope = Envelope(id="0", type="fl.update", v=1, src=source or cid, time=0, data=b"")
    return Delivery(subject="fl.update.r1", envelope=envelope, event=event)


def test_a_fake_host_drives_an_async_version(tmp_path: Path) -> None:
    settings = RoundSettings(run_id="r1", mode="async", rounds=1, buffer_size=2, min_clients=1, min_available=1)
    d_a, d_b = np.array([1.0, 0.0, 2.0], np.float32), np.array([0.0, 4.0, 2.0], np.float32)
    host = FakeHost(settings, np.zeros(3, np.float32), [
        _update("a", d_a, 10),
        _update("a", d_a, 10),  # the same client@version again: refused as a duplicate
        _update("b", d_b, 30, source="a"),  # claims b's id from a's envelope: ignored
        _update("b", d_b, 30),
    ], FileObjectStore(tmp_path))
    _: RoundHost = host  # the fake is a RoundHost as far as a type checker is concerned
    asyncio.run(AsyncRounds(host).run())
    assert host.refused == [("a", "duplicate")]
    assert len(host.finished) == 1
    close = host.finished[0]
    assert close["round"] == 1 and close["received"] == ["a", "b"]
    np.testing.assert_allclose(close["model"], (10 * d_a + 30 * d_b) / 40, rtol=1e-6)
    assert host.state.finished and host.state.round == 2 and host.state.version == 1
    assert not host.deliveries
