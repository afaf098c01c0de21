"""Learning results over a real broker: FedAvg on non-IID digits reaches central accuracy, robust strategies
survive Byzantine clients that break FedAvg; and the ``fedbus fl run`` command end to end."""

from __future__ import annotations

import itertools
import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from fedbus.aggregator.commands import fl
from fedbus.aggregator.config import parse_config
from fedbus.aggregator.federation import SimulationOptions, simulate
from fedbus.bus.broker import NatsServer
from fedbus.trainer.attacks import ByzantineTrainer
from fedbus.trainer.local import evaluate_model, train_central
from fedbus.trainer.setup import prepare

torch.set_num_threads(1)
_runs = itertools.count()  # a run id is a run: the broker keeps its state, so every run needs its own
FAST = {"heartbeat_s": 0.2, "heartbeat_timeout_s": 2.0, "evaluate_every": 0}


async def test_fedavg_on_non_iid_digits_is_within_two_points_of_central(nats_server: NatsServer) -> None:
    rounds, epochs = 20, 2
    config = parse_config(
        {
            "run_id": "digits-acc",
            "rounds": rounds,
            "seed": 0,
            "model": {"name": "mlp", "hidden": [64]},
            "data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5},
            "clients": {"count": 10, "local_epochs": epochs, "batch_size": 8, "lr": 0.3},
            "round": {"min_clients": 10, "min_available": 10, **FAST},
        }
    )
    federation = prepare(config)
    result = await simulate(
        config, federation.trainers, federation.initial, options=SimulationOptions(server=nats_server.url)
    )
    federated = federation.evaluate(result.model)["test_accuracy"]

    central = federation.new_model()
    train_central(central, federation.train, config.client_config(), epochs=rounds * epochs)
    central_accuracy = evaluate_model(central, federation.test)[1]
    assert central_accuracy > 0.9
    assert federated >= central_accuracy - 0.02, (federated, central_accuracy)


def _robust_config(
    strategy: dict[str, Any],
    *,
    data: dict[str, Any],
    model: dict[str, Any],
    rounds: int,
    lr: float,
    epochs: int,
) -> Any:
    return parse_config(
        {
            "run_id": f"rob-{strategy['name']}-{next(_runs)}",
            "rounds": rounds,
            "seed": 1,
            "model": model,
            "data": data,
            "clients": {"count": 10, "local_epochs": epochs, "batch_size": 8, "lr": lr},
            "strategy": strategy,
            "round": {"min_clients": 10, "min_available": 10, **FAST},
        }
    )


async def _accuracy(
    server: NatsServer, strategy: dict[str, Any], *, attack: str | None, factor: float, **kw: Any
) -> float:
    config = _robust_config(strategy, **kw)
    federation = prepare(config)
    trainers: list[Any] = list(federation.trainers)
    if attack:
        for i in (0, 5):  # 20% of the clients
            trainers[i] = ByzantineTrainer(trainers[i], attack=attack, factor=factor)
    result = await simulate(
        config, trainers, federation.initial, options=SimulationOptions(server=server.url)
    )
    return float(federation.evaluate(result.model)["test_accuracy"])


SYNTHETIC = {
    "data": {"name": "synthetic", "partition": "iid", "samples": 1500, "features": 16, "classes": 4},
    "model": {"name": "logreg"},
    "rounds": 8,
    "lr": 0.3,
    "epochs": 2,
}


async def test_sign_flipping_clients_break_fedavg_but_not_robust_strategies(nats_server: NatsServer) -> None:
    clean = await _accuracy(nats_server, {"name": "fedavg"}, attack=None, factor=0, **SYNTHETIC)
    broken = await _accuracy(nats_server, {"name": "fedavg"}, attack="sign_flip", factor=4, **SYNTHETIC)
    assert clean > 0.9 and broken < clean - 0.3, (clean, broken)
    for strategy in (
        {"name": "median"},
        {"name": "trimmed_mean", "beta": 0.2},
        {"name": "krum", "f": 2},
        {"name": "multi_krum", "f": 2},
        {"name": "norm_clip"},
    ):
        robust = await _accuracy(nats_server, strategy, attack="sign_flip", factor=4, **SYNTHETIC)
        assert robust >= clean - 0.03, (strategy, robust, clean)


async def test_scaled_updates_break_fedavg_but_not_norm_clipping(nats_server: NatsServer) -> None:
    digits = {
        "data": {"name": "digits", "partition": "iid"},
        "model": {"name": "mlp", "hidden": [32]},
        "rounds": 8,
        "lr": 0.3,
        "epochs": 2,
    }
    clean = await _accuracy(nats_server, {"name": "fedavg"}, attack=None, factor=0, **digits)
    broken = await _accuracy(nats_server, {"name": "fedavg"}, attack="scale", factor=10, **digits)
    clipped = await _accuracy(nats_server, {"name": "norm_clip"}, attack="scale", factor=10, **digits)
    assert broken < clean - 0.3, (clean, broken)
    assert clipped >= clean - 0.03, (clean, clipped)


def test_fl_run_command_simulates_and_exports_onnx(tmp_path: Path) -> None:
    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "fl-digits.yaml").read_text())
    raw["rounds"] = 2
    raw["round"].update({"heartbeat_s": 0.2, "heartbeat_timeout_s": 2.0, "evaluate_every": 1})
    raw["privacy"] = {"clip_norm": 5.0, "noise_multiplier": 0.5, "seed": 0}
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(
        fl, ["run", str(path), "--simulate", "10", "--json", "--export-onnx", str(tmp_path / "final.onnx")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["status"] == "ok" and report["rounds"] == 2 and len(report["history"]) == 2
    final = report["final"]
    assert 0 < final["epsilon"] < 100 and final["onnx_max_abs_diff"] < 1e-4
    assert "eval_accuracy" in final and "test_accuracy" in final
    assert (tmp_path / "final.onnx").stat().st_size > 0


def test_fl_run_names_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 3\nclients: {count: 10, lr: fast}\n")
    result = CliRunner().invoke(fl, ["run", str(path), "--simulate", "2"])
    assert result.exit_code == 2
    assert "clients.lr" in result.output


def test_commands_are_registered_for_the_fedbus_cli() -> None:
    (ep,) = [e for e in entry_points(group="fedbus.cli") if e.name == "aggregator"]
    names = {c.name for c in ep.load()}
    assert names == {"fl", "agent"}
    agent = next(c for c in ep.load() if c.name == "agent")
    assert "aggregator" in agent.commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["secure_aggregation: {threshold: 2}\nprivacy: {clip_norm: 1.0}\n"])
def test_exclusive_privacy_options(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    result = CliRunner().invoke(fl, ["run", str(path), "--simulate", "2"])
    assert result.exit_code == 2 and "privacy" in result.output
