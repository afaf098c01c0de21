"""fl.yaml, parsed and validated in one place: an unknown or mistyped key raises a
:class:`~fedbus.bus.errors.ConfigError` naming it (``clients.lr: expected a number, got 'fast'``).

::

    run_id: digits
    rounds: 20
    seed: 0
    model:    {name: mlp, hidden: [32]}
    data:     {name: digits, partition: dirichlet, alpha: 0.5}
    clients:  {count: 10, local_epochs: 1, batch_size: 16, lr: 0.05}
    strategy: {name: fedavg}                       # + its parameters, e.g. {name: fedadam, server_lr: 0.01}
    round:    {fraction: 1.0, min_clients: 8, timeout_s: 30, mode: sync, evaluate_every: 1}
    privacy:  {clip_norm: 1.0, noise_multiplier: 0.8, delta: 1.0e-5}      # optional: central DP (sync)
    secure_aggregation: {threshold: 6}                                      # optional: SecAgg+
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedbus.bus.errors import ConfigError
from fedbus.bus.events import Params
from fedbus.bus.roles import validate_id

from .errors import FlError
from .privacy import CentralDp
from .secagg import SecAggParams
from .strategies import STRATEGIES, Strategy, make_strategy

__all__ = [
    "ClientSpec",
    "DataSpec",
    "FlConfig",
    "ModelSpec",
    "PrivacySpec",
    "RoundSettings",
    "SecureSpec",
    "StrategySpec",
    "load_config",
    "parse_config",
]

MODELS = ("logreg", "mlp", "cnn")
DATASETS = ("digits", "synthetic", "npz")
PARTITIONS = ("iid", "dirichlet")


@dataclass(frozen=True, kw_only=True)
class RoundSettings:
    """How the aggregator runs rounds (the ``round:`` section, plus ``run_id``, ``rounds``, ``seed``)."""

    run_id: str = "fl"
    rounds: int = 10
    mode: str = "sync"
    """``sync``: rounds with a deadline; ``async``: FedBuff, a new version every ``buffer_size`` updates."""
    fraction: float = 1.0
    min_clients: int = 2
    """A round needs this many updates (and samples at least this many clients)."""
    min_available: int = 2
    """Clients that must be alive before a round samples."""
    timeout_s: float = 30.0
    close_early: bool = False
    """Close as soon as ``min_clients`` updates are in, instead of waiting for every sampled client."""
    max_attempts: int = 3
    """Attempts of one round (re-sampled each time) before the run fails."""
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 3.5
    wait_clients_s: float = 60.0
    evaluate_every: int = 1
    """Federated evaluation after every N fit rounds (0: never)."""
    fraction_evaluate: float = 1.0
    seed: int = 0
    inline_limit: int = 256 * 1024
    checkpoint_interval_s: float = 1.0
    """Mid-round checkpoints at most this often (0: after every update); always at round boundaries."""
    buffer_size: int = 4
    staleness_exponent: float = 0.5
    max_staleness: int = 20

    def __post_init__(self) -> None:
        validate_id(self.run_id, what="run_id")
        checks = [
            (self.rounds >= 1, "rounds", "must be >= 1"),
            (self.mode in ("sync", "async"), "round.mode", "must be 'sync' or 'async'"),
            (0 < self.fraction <= 1, "round.fraction", "must be in (0, 1]"),
            (0 < self.fraction_evaluate <= 1, "round.fraction_evaluate", "must be in (0, 1]"),
            (self.min_clients >= 1, "round.min_clients", "must be >= 1"),
            (self.min_available >= self.min_clients, "round.min_available", "must be >= round.min_clients"),
            (self.timeout_s > 0, "round.timeout_s", "must be > 0"),
            (
                self.heartbeat_timeout_s > self.heartbeat_s > 0,
                "round.heartbeat_timeout_s",
                "must be > round.heartbeat_s > 0",
            ),
            (self.buffer_size >= 1, "round.buffer_size", "must be >= 1"),
            (self.max_attempts >= 1, "round.max_attempts", "must be >= 1"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(message, key=key)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [32])


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    name: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    samples: int = 2000
    """synthetic only: number of samples"""
    features: int = 20
    classes: int = 4
    path: str = ""
    """npz only: a file with arrays ``x`` (n × features) and ``y`` (n,) of integer labels"""


@dataclass(frozen=True, kw_only=True)
class ClientSpec:
    count: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True, kw_only=True)
class StrategySpec:
    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PrivacySpec:
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    seed: int | None = None
    """Seeds the noise and the sample (reproducible runs): whoever knows it can re-draw the sample."""
    amplification: bool = True
    """Report ε with the amplification of the secret Poisson sample. Set ``false`` where the selection can
    be observed (a broker without per-client permissions): ε is then the unamplified one."""


@dataclass(frozen=True, kw_only=True)
class SecureSpec:
    threshold: int = 2
    neighbours: int = 0
    clip: float = 8.0
    levels: int = 1 << 22
    stage_timeout_s: float = 10.0

    def params(self) -> SecAggParams:
        return SecAggParams(
            threshold=self.threshold, neighbours=self.neighbours, clip=self.clip, levels=self.levels
        )


@dataclass(frozen=True, kw_only=True)
class FlConfig:
    """A whole federation, as described by fl.yaml."""

    settings: RoundSettings
    model: ModelSpec
    data: DataSpec
    clients: ClientSpec
    strategy: StrategySpec
    privacy: PrivacySpec | None = None
    secure: SecureSpec | None = None
    source: str = ""

    def client_config(self) -> Params:
        """What every fit round tells the clients (merged with the strategy's own config)."""
        c = self.clients
        return {
            "local_epochs": c.local_epochs,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "optimizer": c.optimizer,
            "momentum": c.momentum,
            "weight_decay": c.weight_decay,
        }

    def central_dp(self, population: int) -> CentralDp | None:
        """The central DP mechanism for ``population`` clients (``None`` without ``privacy:``); its fixed
        denominator is the expected size of every round's Poisson sample."""
        if self.privacy is None:
            return None
        p, s = self.privacy, self.settings
        expected = min(population, max(s.min_clients, math.ceil(s.fraction * population)))
        return CentralDp(
            clip_norm=p.clip_norm,
            noise_multiplier=p.noise_multiplier,
            delta=p.delta,
            expected_clients=expected,
            population=population,
            seed=p.seed,
            amplification=p.amplification,
        )

    def build_strategy(self, population: int) -> Strategy:
        """The configured strategy (with central DP when ``privacy`` is set)."""
        try:
            return make_strategy(self.strategy.name, self.strategy.params, dp=self.central_dp(population))
        except FlError as exc:
            raise ConfigError(str(exc), key="strategy", source=self.source) from None


# -- parsing -------------------------------------------------------------------------------------------------
_TOP = {
    "run_id",
    "rounds",
    "seed",
    "model",
    "data",
    "clients",
    "strategy",
    "round",
    "privacy",
    "secure_aggregation",
}


def load_config(path: str | Path) -> FlConfig:
    """Read and validate an fl.yaml file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc}", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, *, source: str = "") -> FlConfig:
    """Validate a parsed fl.yaml mapping."""
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level", source=source)
    unknown = set(raw) - _TOP
    if unknown:
        raise ConfigError(
            f"unknown key (known: {', '.join(sorted(_TOP))})", key=min(unknown), source=source
        )
    try:
        round_raw = dict(_section(raw, "round", source))
        for key in ("run_id", "rounds", "seed"):
            if key in raw:
                round_raw[key] = raw[key]
        settings = _build(RoundSettings, round_raw, "round", source)
        model = _build(ModelSpec, _section(raw, "model", source), "model", source)
        data = _build(DataSpec, _section(raw, "data", source), "data", source)
        clients = _build(ClientSpec, _section(raw, "clients", source), "clients", source)
        strat_raw = dict(_section(raw, "strategy", source))
        strategy = StrategySpec(name=str(strat_raw.pop("name", "fedavg")), params=strat_raw)
        privacy = (
            _build(PrivacySpec, _section(raw, "privacy", source), "privacy", source)
            if raw.get("privacy") is not None
            else None
        )
        secure = (
            _build(SecureSpec, _section(raw, "secure_aggregation", source), "secure_aggregation", source)
            if raw.get("secure_aggregation") is not None
            else None
        )
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), source=source) from None
    _choice(model.name, MODELS, "model.name", source)
    _choice(data.name, DATASETS, "data.name", source)
    _choice(data.partition, PARTITIONS, "data.partition", source)
    _choice(clients.optimizer, ("sgd", "adam"), "clients.optimizer", source)
    if strategy.name.lower().replace("-", "_") not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy {strategy.name!r} (known: {', '.join(sorted(STRATEGIES))})",
            key="strategy.name",
            source=source,
        )
    if clients.count < settings.min_available:
        raise ConfigError(
            f"{clients.count} clients cannot satisfy round.min_available={settings.min_available}",
            key="clients.count",
            source=source,
        )
    if data.name == "npz" and not data.path:
        raise ConfigError("the npz dataset needs data.path", key="data.path", source=source)
    config = FlConfig(
        settings=settings,
        model=model,
        data=data,
        clients=clients,
        strategy=strategy,
        privacy=privacy,
        secure=secure,
        source=source,
    )
    if privacy is not None and settings.mode != "sync":
        raise ConfigError(
            "central DP needs round.mode: sync (an asynchronous buffer is no sampled Gaussian mechanism)",
            key="round.mode",
            source=source,
        )
    if secure is not None:
        if privacy is not None:
            raise ConfigError(
                "central DP and secure aggregation are exclusive (the server cannot clip what it cannot see)",
                key="privacy",
                source=source,
            )
        if not config.build_strategy(clients.count).streaming or strategy.name.lower() not in (
            "fedavg",
            "fedprox",
        ):
            raise ConfigError(
                "secure aggregation computes a weighted mean: use fedavg or fedprox",
                key="strategy.name",
                source=source,
            )
        if settings.mode != "sync":
            raise ConfigError("secure aggregation needs round.mode: sync", key="round.mode", source=source)
    config.build_strategy(clients.count)  # strategy parameters are checked now, not mid-run
    return config


def _section(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping", key=name, source=source)
    return value


def _choice(value: str, allowed: tuple[str, ...], key: str, source: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{value!r} is not one of {', '.join(allowed)}", key=key, source=source)


def _build(cls: type[Any], raw: dict[str, Any], path: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        full = key if key in ("run_id", "rounds", "seed") and cls is RoundSettings else f"{path}.{key}"
        if key not in names:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(names))})", key=full, source=source)
        values[key] = _coerce(value, hints[key], full, source)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1], key=exc.key, source=source) from None


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key, source)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", key=key, source=source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"expected an integer, got {value!r}", key=key, source=source)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"expected a number, got {value!r}", key=key, source=source)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", key=key, source=source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", key=key, source=source)
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", key=key, source=source)
        return dict(value)
    return value
