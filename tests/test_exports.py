"""The public API is small and pinned; the core never pulls in torch."""

from __future__ import annotations

import subprocess
import sys

import fedbus.bus

BUS_API = {
    "CATALOGUE", "AgentKey", "Bus", "Capabilities", "Catalogue", "Codec", "Delivery", "Envelope", "Event",
    "EventSpec", "EventSubscription", "Frame", "Id", "Role", "validate_id", "KeyRing", "Limits", "MemoryBroker", "MemoryTransport", "Params",
    "ReplayGuard", "Scalar", "Security", "Subscription", "Transport", "connect", "event", "new_id",
    "publish_sync", "transport_for",
}


def test_bus_public_api_is_pinned() -> None:
    assert set(fedbus.bus.__all__) == BUS_API
    for name in BUS_API:
        assert getattr(fedbus.bus, name) is not None


def test_core_packages_do_not_import_torch() -> None:
    code = (
        "import sys, fedbus.bus, fedbus.bus.jetstream, fedbus.bus.mqtt_transport, fedbus.bus.commands, "
        "fedbus.agents.scheduler, fedbus.agents.gpu, fedbus.agents.commands, fedbus.edge_sdk; "
        "bad = sorted(m for m in ('torch', 'numpy', 'onnx') if m in sys.modules); print(bad); "
        "sys.exit(1 if 'torch' in bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch" not in result.stdout
