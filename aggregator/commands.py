"""``fedbus fl run|client`` and ``fedbus agent aggregator``, registered through the ``fedbus.cli`` entry
point.

::

    fedbus fl run examples/fl-digits.yaml --simulate 10               # 10 clients, in-memory broker
    fedbus fl run examples/fl-digits.yaml --simulate 10 --server nats://127.0.0.1:4222   # same, real broker
    fedbus fl run examples/fl-digits.yaml --simulate 10 --server nats://… --resume  # continue that run
    fedbus agent aggregator examples/fl-digits.yaml --creds aggregator.creds   # deployed: the aggregator alone
    fedbus fl client examples/fl-digits.yaml --index 3 --creds silo-3.creds   # deployed: partition 3 of 10

On a secure broker (the default of ``fedbus up``) the aggregator logs in with a credential of role
``aggregator`` (or the admin context) and each client with its own ``fl-client`` credential: the client is
known by the credential's id, signs everything with its key, and the aggregator accepts only registered
client identities (:mod:`~fedbus.aggregator.trust`). ``--trust``/``--key`` are for ``--insecure`` brokers.

Commands parse options and render; the work is in :mod:`~fedbus.aggregator.federation` (simulation),
:mod:`~fedbus.aggregator.server` and :mod:`~fedbus.aggregator.client`. Training needs the ``ml`` extra
(torch); it is imported only by the commands that train or build a model.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from fedbus.bus.cli import server_option
from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import resolve, transport_for
from fedbus.bus.console import EXIT_NOPERM, EXIT_USAGE, configure_logging, err, fail, out, run_async
from fedbus.bus.creds import Credentials
from fedbus.bus.errors import ConfigError, FedbusError
from fedbus.bus.roles import Role
from fedbus.bus.signing import AgentKey, KeyRing

if TYPE_CHECKING:  # the commands import these when they run: `fedbus --help` needs neither numpy nor torch
    import numpy as np

    from .config import FlConfig
    from .server import RunResult

AGGREGATOR_ROLES = frozenset({Role.AGGREGATOR, Role.ADMIN})

__all__ = ["COMMANDS"]

_ML_MODULES = frozenset({"numpy", "scipy", "torch", "sklearn", "onnx", "onnxruntime"})


def _no_ml(what: str, exc: ImportError) -> NoReturn:
    fail(ConfigError(f"{what} needs the ml extra (pip install 'fedbus[ml]'): {exc}"))


@contextlib.contextmanager
def _ml_extra() -> Iterator[None]:
    """One line (exit 2) instead of a traceback when a command that needs the ``ml`` extra runs without it."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _ML_MODULES:
            raise
        _no_ml("this command", exc)


def _prepare(config: FlConfig, clients: int) -> Any:
    try:
        from fedbus.trainer.setup import prepare
    except ImportError as exc:  # pragma: no cover - the ml extra is missing
        _no_ml("training", exc)
    return prepare(config, clients=clients)


def _report(result: RunResult, *, as_json: bool, onnx: Path | None, federation: Any) -> None:
    final = dict(result.history[-1]) if result.history else {}
    if result.epsilon is not None:
        final["epsilon"] = result.epsilon
    if onnx is not None:
        from fedbus.trainer.export import export_onnx, verify_onnx
        from fedbus.trainer.models import set_flat

        model = federation.new_model()
        set_flat(model, result.model)
        export_onnx(model, onnx, features=federation.train.features)
        final["onnx"] = str(onnx)
        final["onnx_max_abs_diff"] = verify_onnx(onnx, model, federation.test.x[:64])
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "status": result.status,
                    "version": result.version,
                    "rounds": result.rounds,
                    "final": final,
                    "history": result.history,
                }
            )
        )
    else:
        from .progress import metrics_table

        out.print(
            metrics_table(final, title=f"final metrics (version {result.version}, {result.rounds} rounds)")
        )


@click.group("fl")
def fl() -> None:
    """Federated learning: run a federation described in fl.yaml."""


@fl.command("run")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--simulate",
    "-n",
    "simulate_n",
    type=click.IntRange(min=1),
    default=None,
    help="Run N clients in this process (same agents as a deployment).",
)
@click.option(
    "--server",
    default=None,
    envvar="FEDBUS_SERVER",
    help="Broker URL. With --simulate the default is an in-memory broker.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Checkpoints and lineage when the broker has no object store.",
)
@click.option(
    "--export-onnx",
    "onnx",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the final model to this ONNX file (checked with onnxruntime).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics and history as JSON.")
@click.option(
    "--resume", is_flag=True, help="Continue the run if its run_id already has state (else that is an error)."
)
@click.option("--log-level", default=None, help="Library log level (default: warning).")
def run_cmd(
    config_path: Path,
    simulate_n: int | None,
    server: str | None,
    state_dir: Path | None,
    onnx: Path | None,
    as_json: bool,
    resume: bool,
    log_level: str | None,
) -> None:
    """Run the federation in CONFIG_PATH; with --simulate N, with N clients in this process. A run_id that
    already has state on the broker (or in --state-dir) is refused unless --resume."""
    configure_logging(log_level)
    with _ml_extra():
        from .config import load_config
        from .federation import SimulationOptions, simulate
        from .progress import ProgressView
    try:
        config = load_config(config_path)
    except FedbusError as exc:
        fail(exc)
    if simulate_n is None:
        initial = _prepare(config, config.clients.count).initial
        _serve_aggregator(config, server, state_dir, as_json, initial, resume=resume)
        return
    federation = _prepare(config, simulate_n)
    import torch

    torch.set_num_threads(1)  # N clients train in parallel threads; one BLAS thread each

    async def main() -> RunResult:
        options = SimulationOptions(server=server, state_dir=state_dir, resume=resume)
        with ProgressView(
            err, config.settings.rounds, title=f"{config.settings.run_id} ({simulate_n} clients)"
        ) as view:
            return await simulate(
                config,
                federation.trainers,
                federation.initial,
                options=options,
                evaluate_fn=federation.evaluate,
                on_event=view,
            )

    result = run_async(main)
    _report(result, as_json=as_json, onnx=onnx, federation=federation)


def _serve_aggregator(
    config: FlConfig,
    server: str | None,
    state_dir: Path | None,
    as_json: bool,
    initial: np.ndarray,
    trust: Path | None = None,
    *,
    resume: bool = True,
) -> None:
    """The aggregator alone, for clients running elsewhere; ``resume=False`` refuses an existing run id.

    With a credential (``--creds``, ``FEDBUS_CREDS`` or the context's) the aggregator logs in as it and
    trusts only registered client identities (:mod:`fedbus.aggregator.trust`); without one it trusts the
    ``--trust`` keys, else client keys on first use."""
    from .federation import STATE_BUCKET, identity_clients, open_object_store
    from .progress import ProgressView
    from .server import Aggregator

    s = config.settings
    url, creds = _login(server)
    if creds is not None:
        _require_role(creds, AGGREGATOR_ROLES, "the aggregator")
        if trust is not None:
            fail("--trust is for a broker without credentials: with --creds, clients are who the authority "
                 "says they are", EXIT_USAGE)
    keyring = KeyRing.load(trust) if trust else KeyRing()
    source = creds.id if creds is not None else f"aggregator-{s.run_id}"

    async def main() -> RunResult:
        security = Security.OFF if creds else Security.STRICT if trust else Security.VERIFY
        bus = Bus(transport_for(url, client_id=source, creds=creds), source=source, keyring=keyring,
                  security=security)
        async with bus:
            fallback = None if creds else state_dir or Path(tempfile.gettempdir()) / "fedbus-fl"
            store = await open_object_store(bus, fallback=fallback)
            with ProgressView(err, s.rounds, title=f"{s.run_id} (aggregator)") as view:
                agg = Aggregator(
                    bus,
                    settings=s,
                    strategy=config.build_strategy(config.clients.count),
                    initial_model=initial,
                    store=store,
                    state_store=await open_object_store(bus, fallback=fallback, bucket=STATE_BUCKET),
                    client_config=config.client_config(),
                    secure=config.secure,
                    trust_on_first_use=creds is None and trust is None,
                    clients=await identity_clients(bus) if creds else None,
                    on_event=view,
                    resume=resume,
                )
                await agg.refuse_existing()
                return await agg.run()

    result = run_async(main)
    _report(result, as_json=as_json, onnx=None, federation=None)


def _login(server: str | None) -> tuple[str, Credentials | None]:
    """The broker URL and the credential (``--creds``, ``FEDBUS_CREDS`` or the context's) a command uses."""
    try:
        return resolve(server)
    except FedbusError as exc:
        fail(exc)


def _require_role(creds: Credentials, roles: frozenset[Role], what: str) -> None:
    if creds.role not in roles:
        fail(f"{what} needs a credential of role {' or '.join(sorted(roles))}; {creds.id!r} is a {creds.role} "
             f"(fedbus creds issue {max(roles)} ID --out FILE, then --creds FILE)", EXIT_NOPERM)


@fl.command("client")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--index", type=click.IntRange(min=0), required=True, help="This client's data partition.")
@click.option(
    "--clients", type=click.IntRange(min=1), default=None, help="Partitions (default clients.count)."
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ed25519 key to sign updates with (created if missing); without credentials only.",
)
@click.option("--log-level", default=None)
@server_option
def client_cmd(
    config_path: Path,
    index: int,
    clients: int | None,
    key_path: Path | None,
    log_level: str | None,
    server: str,
) -> None:
    """Run one client of the federation in CONFIG_PATH (a silo, or a client job launched by the scheduler) on
    data partition --index. With --creds the client's id is the credential's (role fl-client)."""
    configure_logging(log_level)
    with _ml_extra():
        from .config import load_config
        from .federation import client_id, open_object_store
        from .trust import CLIENT_ROLES
    try:
        config = load_config(config_path)
    except FedbusError as exc:
        fail(exc)
    n = clients or config.clients.count
    if index >= n:
        fail(ConfigError(f"index {index} is not below the {n} partitions", key="--index"))
    url, creds = _login(server)
    if creds is not None:
        _require_role(creds, CLIENT_ROLES, "an FL client")
        if key_path is not None:
            fail("--key is for a broker without credentials: the creds file holds the signing key", EXIT_USAGE)
    federation = _prepare(config, n)
    s = config.settings
    from .client import FlClient

    async def main() -> None:
        if creds is not None:  # known by its credential id, everything signed with the credential's key
            cid = creds.id
            bus = Bus(transport_for(url, client_id=cid, creds=creds), source=cid, key=creds.signing_key,
                      sign_all=True)
        else:
            cid = client_id(index)
            key = AgentKey.load_or_create(key_path) if key_path else AgentKey.generate()
            bus = Bus(transport_for(url, client_id=cid), source=cid, key=key)
        async with bus:
            fallback = None if creds else Path(tempfile.gettempdir()) / "fedbus-fl"
            store = await open_object_store(bus, fallback=fallback)
            stats = await FlClient(
                bus,
                federation.trainers[index],
                run_id=s.run_id,
                heartbeat_s=s.heartbeat_s,
                store=store,
                inline_limit=s.inline_limit,
            ).run()
            err.print(f"{cid}: {stats.status}, {stats.fits} fits, {stats.evaluations} evaluations")

    run_async(main)


@click.group("agent")
def agent() -> None:
    """Run a long-lived fedbus agent."""


@agent.command("aggregator")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Checkpoints and lineage when the broker has no object store.",
)
@click.option(
    "--trust",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Trusted client keys (JSON); updates must then be signed by one of them. Without credentials only.",
)
@click.option(
    "--initial-model",
    "initial_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Initial global model (.npy, flat float32); else built from the config (needs torch).",
)
@click.option("--json", "as_json", is_flag=True)
@click.option("--log-level", default=None)
@server_option
def aggregator_cmd(
    config_path: Path,
    state_dir: Path | None,
    trust: Path | None,
    initial_path: Path | None,
    as_json: bool,
    log_level: str | None,
    server: str,
) -> None:
    """The aggregator of the federation in CONFIG_PATH; resumes from its checkpoint after a restart."""
    configure_logging(log_level)
    with _ml_extra():
        import numpy as np

        from .config import load_config
    try:
        config = load_config(config_path)
    except FedbusError as exc:
        fail(exc)
    if initial_path is not None:
        initial = np.load(initial_path, allow_pickle=False).astype(np.float32).ravel()
    else:
        initial = _prepare(config, config.clients.count).initial
    _serve_aggregator(config, server, state_dir, as_json, initial, trust)


COMMANDS: list[click.Command] = [fl, agent]
"""The commands this package adds to ``fedbus`` (the ``fedbus.cli`` entry point)."""
