"""Shared fixtures: real brokers started on free ports, per session or per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.bus.broker import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server (JetStream + MQTT listener) shared by the session's tests."""
    with NatsServer(data_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, for tests that stop, kill or restart it."""
    with NatsServer(data_dir=tmp_path / "nats") as server:
        yield server
