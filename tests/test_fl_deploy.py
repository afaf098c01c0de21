"""The deployed shape: `fedbus agent aggregator` and two `fedbus fl client` processes on a real nats-server,
clients signing their updates with their own keys and the aggregator trusting them on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from fedbus.bus.broker import NatsServer


def _cli(group: str, *args: str) -> list[str]:
    return [sys.executable, "-c", f"from fedbus.aggregator.commands import {group}; {group}()", *args]


def test_aggregator_and_client_processes_federate(nats_server: NatsServer, tmp_path: Path) -> None:
    config = tmp_path / "fl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_id": "deployed",
                "rounds": 2,
                "model": {"name": "logreg"},
                "data": {"name": "digits", "partition": "iid"},
                "clients": {"count": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
                "round": {
                    "min_clients": 2,
                    "min_available": 2,
                    "heartbeat_s": 0.3,
                    "heartbeat_timeout_s": 3.0,
                    "evaluate_every": 1,
                },
            }
        )
    )
    url = nats_server.url
    aggregator = subprocess.Popen(
        _cli("agent", "aggregator", str(config), "--server", url, "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients = [
        subprocess.Popen(
            _cli(
                "fl",
                "client",
                str(config),
                "--index",
                str(i),
                "--server",
                url,
                "--key",
                str(tmp_path / f"client-{i}.pem"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        out, err = aggregator.communicate(timeout=90)
        assert aggregator.returncode == 0, err[-3000:]
        report = json.loads(out[out.index("{") :])
        assert report["status"] == "ok" and report["version"] == 2
        assert [h["clients"] for h in report["history"]] == [2, 2]
        assert report["history"][1]["eval_accuracy"] > report["history"][0]["eval_accuracy"] - 0.05
        assert "trusting a client key on first use" in err
        for i, client in enumerate(clients):
            _, client_err = client.communicate(timeout=30)
            assert client.returncode == 0, client_err[-3000:]
            assert f"client-{i:04d}: finished, 2 fits, 2 evaluations" in client_err
            assert (tmp_path / f"client-{i}.pem").exists()  # the key the client signed with
    finally:
        for proc in (aggregator, *clients):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
