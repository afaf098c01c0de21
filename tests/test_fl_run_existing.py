"""``fedbus fl run`` on a run id that already has state refuses in one line unless ``--resume``: the `fl run`
part of finding 10 of issue 7 (it used to show the old run's results as if they were new)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from fedbus.aggregator.commands import fl
from fedbus.bus.broker import NatsServer


def _config(tmp_path: Path, run_id: str) -> Path:
    path = tmp_path / "fl.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_id": run_id,
                "rounds": 1,
                "model": {"name": "logreg"},
                "data": {"name": "synthetic", "samples": 200, "features": 8, "classes": 2, "partition": "iid"},
                "clients": {"count": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
                "round": {
                    "min_clients": 2,
                    "min_available": 2,
                    "heartbeat_s": 0.2,
                    "heartbeat_timeout_s": 2.0,
                    "evaluate_every": 0,
                },
            }
        )
    )
    return path


def test_fl_run_refuses_an_existing_run_id_unless_resumed(nats_server: NatsServer, tmp_path: Path) -> None:
    path = _config(tmp_path, "existing-run")
    args = ["run", str(path), "--simulate", "2", "--server", nats_server.url, "--json"]
    runner = CliRunner()

    first = runner.invoke(fl, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout[first.stdout.index("{") :])["rounds"] == 1

    again = runner.invoke(fl, args)
    assert again.exit_code == 2, again.output
    errors = [line for line in again.output.splitlines() if line.strip()]
    assert "Traceback" not in again.output
    (line,) = [e for e in errors if "error" in e]
    assert "existing-run" in line and "already exists" in line and "--resume" in line
    assert "{" not in again.stdout  # no report of the old run's results

    resumed = runner.invoke(fl, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert report["status"] == "ok" and report["version"] == 1  # the finished run, not a second one
