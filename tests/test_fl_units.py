"""Pure pieces of the round protocol: bookkeeping, liveness, sampling, model refs, checkpoints, config."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

import fedbus.aggregator as fl
from fedbus.aggregator import blobs
from fedbus.aggregator.config import parse_config
from fedbus.aggregator.errors import UpdateRejected
from fedbus.aggregator.events import ModelRef, ModelUpdate, RoundInvite, SecAggShares
from fedbus.aggregator.filestore import FileObjectStore
from fedbus.aggregator.privacy import CentralDp, poisson_sample
from fedbus.aggregator.registry import Registry, sample_clients
from fedbus.aggregator.round import EvalRound, FitRound, Verdict
from fedbus.aggregator.state import RoundProgress, RunState, StateStore
from fedbus.aggregator.strategies import MeanAggregate, Update
from fedbus.bus.codec import Codec
from fedbus.bus.errors import ConfigError, IntegrityError, SchemaError


def test_public_api_is_pinned() -> None:
    assert sorted(fl.__all__) == sorted(
        [
            "Aggregator",
            "ClientFaults",
            "CentralDp",
            "FlClient",
            "FlConfig",
            "FitOutcome",
            "EvalOutcome",
            "LocalTrainer",
            "RdpAccountant",
            "RoundSettings",
            "RunResult",
            "SimulationOptions",
            "Strategy",
            "Update",
            "load_config",
            "make_strategy",
            "parse_config",
            "simulate",
        ]
    )
    for name in fl.__all__:
        assert getattr(fl, name) is not None


def _round(**kw: object) -> FitRound:
    base: dict[str, object] = {
        "round": 3,
        "attempt": 0,
        "version": 2,
        "sampled": ["a", "b", "c"],
        "min_clients": 2,
        "deadline": 10.0,
        "aggregate": MeanAggregate(2),
    }
    base.update(kw)
    return FitRound(**base)  # type: ignore[arg-type]


def test_fit_round_verdicts_and_closing() -> None:
    r = _round()
    assert r.check("a", 3, 2) is Verdict.ACCEPTED
    assert r.check("z", 3, 2) is Verdict.NOT_SAMPLED
    assert r.check("a", 2, 1) is Verdict.LATE
    assert r.check("a", 3, 1) is Verdict.WRONG_VERSION
    r.accept(Update("a", np.ones(2, np.float32), 5))
    assert r.check("a", 3, 2) is Verdict.DUPLICATE
    assert not r.closed(0.0)
    r.reject("b", "wrong_shape")
    r.drop("c")
    assert r.pending == [] and r.closed(0.0)
    assert not r.succeeded  # one update < min_clients 2


def test_fit_round_closes_early_and_at_the_deadline() -> None:
    r = _round(close_early=True)
    r.accept(Update("a", np.ones(2, np.float32), 5))
    assert not r.closed(0.0)
    r.accept(Update("b", np.ones(2, np.float32), 5))
    assert r.closed(0.0) and r.succeeded
    assert _round().closed(10.0)


def test_eval_round_weights_metrics_by_examples() -> None:
    ev = EvalRound(round=1, version=1, sampled=["a", "b"], deadline=5.0)
    assert ev.offer("a", 1, 1, 10, 1.0, {"accuracy": 0.5}) is Verdict.ACCEPTED
    assert ev.offer("a", 1, 1, 10, 1.0, {"accuracy": 0.5}) is Verdict.DUPLICATE
    ev.offer("b", 1, 1, 30, 3.0, {"accuracy": 1.0})
    assert ev.closed(0.0)
    assert ev.summary() == pytest.approx({"eval_accuracy": 0.875, "eval_loss": 2.5})


def test_registry_notices_silence() -> None:
    reg = Registry(timeout=1.0)
    assert reg.seen("a", 0.0, num_examples=5)
    assert not reg.seen("a", 0.5)
    reg.seen("b", 0.9)
    assert reg.alive(1.2) == ["a", "b"]
    assert reg.alive(1.6) == ["b"]
    assert reg.next_expiry(1.6) == pytest.approx(1.9)
    assert reg.seen("a", 3.0)  # came back
    reg.leave("a")
    assert reg.alive(3.0) == []


def test_sampling_is_seeded_and_respects_minimums() -> None:
    pool = [f"c{i}" for i in range(20)]
    a = sample_clients(pool, fraction=0.3, min_clients=2, seed=1, round=4)
    assert a == sample_clients(list(reversed(pool)), fraction=0.3, min_clients=2, seed=1, round=4)
    assert len(a) == 6 and set(a) <= set(pool)
    assert a != sample_clients(pool, fraction=0.3, min_clients=2, seed=1, round=5)
    assert len(sample_clients(pool, fraction=0.01, min_clients=4, seed=1, round=1)) == 4
    assert sample_clients(pool[:3], fraction=0.5, min_clients=5, seed=1, round=1) == pool[:3]


def test_poisson_sample_draws_each_client_alone_with_rate_q() -> None:
    pool = [f"c{i:04d}" for i in range(2000)]
    a = poisson_sample(pool, 0.3, seed=7, key=(4, 0))
    assert a == poisson_sample(list(reversed(pool)), 0.3, seed=7, key=(4, 0))  # reproducible with a seed
    assert a != poisson_sample(pool, 0.3, seed=7, key=(5, 0))
    assert a == sorted(a) and set(a) <= set(pool)
    assert abs(len(a) - 600) < 5 * (2000 * 0.3 * 0.7) ** 0.5  # Binomial(2000, 0.3): the size varies too
    sizes = {len(poisson_sample(pool[:20], 0.3, seed=7, key=(r, 0))) for r in range(30)}
    assert len(sizes) > 3
    secret = [poisson_sample(pool[:200], 0.5) for _ in range(2)]  # no seed: the OS's CSPRNG
    assert secret[0] != secret[1]
    dp = CentralDp(expected_clients=3, population=10, seed=1)
    assert dp.sample(pool[:10], round=1) == dp.sample(pool[:10], round=1) == poisson_sample(
        pool[:10], 0.3, seed=1, key=(1, 0, 1)
    )


async def test_update_blobs_outside_the_rounds_prefix_are_refused(tmp_path: Path) -> None:
    """A client may not point the aggregator at the run's models (it deletes a round's blobs afterwards)."""
    store = FileObjectStore(tmp_path)
    model = np.arange(4, dtype=np.float32)
    ref = await blobs.ref_for(model, name="run/model/v0", store=store, inline_limit=0)
    with pytest.raises(UpdateRejected) as info:
        await blobs.fetch(ref, store=store, length=4, within="run/update/1/")
    assert info.value.reason == "bad_object"
    ok = await blobs.ref_for(model, name="run/update/1/abc", store=store, inline_limit=0)
    np.testing.assert_array_equal(await blobs.fetch(ok, store=store, length=4, within="run/update/1/"), model)


@pytest.mark.parametrize(
    "hostile",
    [
        {"client_id": "../../etc"},
        {"client_id": "a.b"},
        {"client_id": "x" * 65},
        {"run_id": "run.>"},
        {"update": {"sha256": "0" * 64, "length": 4, "object": "../state/a"}},
        {"update": {"sha256": "0" * 64, "length": 4, "object": "run/model/v0.json"}},
        {"update": {"sha256": "nothex", "length": 4, "inline": b""}},
    ],
)
def test_hostile_ids_and_object_names_fail_in_the_schema(hostile: dict[str, object]) -> None:
    codec = Codec()
    good = ModelUpdate(
        run_id="run",
        round=1,
        client_id="client-0001",
        base_version=0,
        update=ModelRef(sha256="0" * 64, length=4, object="run/update/1/abc"),
        num_examples=3,
    )
    env = codec.envelope(good, source="client-0001")
    assert codec.decode(env) == good
    payload = {**msgspec.msgpack.decode(env.data), **hostile}
    with pytest.raises(SchemaError):
        codec.decode(msgspec.structs.replace(env, data=msgspec.msgpack.encode(payload)))


def test_ids_in_secagg_maps_and_invites_are_checked() -> None:
    codec = Codec()
    for event in (
        SecAggShares(run_id="r", round=1, client_id="c1", ciphertexts={"../c2": b"x"}),
        RoundInvite(client_id="c1/", run_id="r", round=1, kind="fit", version=0),
    ):
        with pytest.raises(SchemaError):
            codec.decode(codec.envelope(event, source="c1"))


async def test_model_refs_inline_and_stored(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path)
    v = np.arange(1000, dtype=np.float32)
    small = await blobs.ref_for(v, name="x/small", store=store, inline_limit=1 << 20)
    assert small.inline is not None and small.object is None
    big = await blobs.ref_for(v, name="x/big", store=store, inline_limit=100)
    assert big.inline is None and big.object == "x/big"
    for ref in (small, big):
        np.testing.assert_array_equal(await blobs.fetch(ref, store=store, length=1000), v)


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        (ModelRef(sha256="0", length=3, inline=np.zeros(3, np.float32).tobytes()), "bad_hash"),
        (ModelRef(sha256="0", length=4, inline=np.zeros(3, np.float32).tobytes()), "wrong_shape"),
        (ModelRef(sha256="0", length=3, dtype="float64", inline=b"0" * 24), "bad_dtype"),
        (ModelRef(sha256="0", length=3, object="nowhere"), "missing_blob"),
        (
            ModelRef(
                sha256=blobs.sha256_of(np.array([1, np.nan, 2], np.float32)),
                length=3,
                inline=np.array([1, np.nan, 2], np.float32).tobytes(),
            ),
            "non_finite",
        ),
    ],
)
async def test_malformed_refs_are_rejected_with_a_reason(ref: ModelRef, reason: str, tmp_path: Path) -> None:
    with pytest.raises(UpdateRejected) as info:
        await blobs.fetch(ref, store=FileObjectStore(tmp_path), length=3)
    assert info.value.reason == reason


async def test_checkpoints_survive_a_torn_write(tmp_path: Path) -> None:
    states = StateStore(FileObjectStore(tmp_path), "run1")
    assert await states.load() is None
    progress = RoundProgress(
        round=2,
        attempt=0,
        sampled=["a", "b"],
        received=["a"],
        aggregate={"acc": np.arange(4, dtype=np.float32), "weight": 3.0, "count": 1, "clients": ["a"]},
    )
    await states.save(RunState(run_id="run1", round=2, version=1, progress=progress))
    await states.save(RunState(run_id="run1", round=3, version=2))
    # Corrupt the newest slot: the loader falls back to the other one.
    newest = tmp_path / "fl" / "run1" / "state" / "b"
    newest.write_bytes(b"garbage")
    with pytest.raises(IntegrityError):
        await states.store.get_bytes("run1/state/b")
    fresh = StateStore(FileObjectStore(tmp_path), "run1")
    loaded = await fresh.load()
    assert loaded is not None and loaded.round == 2 and loaded.progress is not None
    np.testing.assert_array_equal(loaded.progress.aggregate["acc"], np.arange(4, dtype=np.float32))
    await fresh.save(RunState(run_id="run1", round=4, version=3))
    again = await StateStore(FileObjectStore(tmp_path), "run1").load()
    assert again is not None and again.round == 4


async def test_lineage_keeps_every_version(tmp_path: Path) -> None:
    states = StateStore(FileObjectStore(tmp_path), "r")
    for v in range(3):
        await states.save_model(v, np.full(3, v, np.float32), {"round": v, "accuracy": 0.1 * v})
    assert [v for v, _ in await states.lineage()] == [0, 1, 2]
    np.testing.assert_array_equal(await states.load_model(2), np.full(3, 2, np.float32))


async def test_checkpoints_naming_the_sample_stay_out_of_the_shared_bucket(tmp_path: Path) -> None:
    shared, private = FileObjectStore(tmp_path, "fl"), FileObjectStore(tmp_path, "fl-state")
    states = StateStore(shared, "r", private=private)
    await states.save_model(0, np.zeros(3, np.float32), {"round": 0})
    await states.save(RunState(run_id="r", progress=RoundProgress(round=1, attempt=0, sampled=["c7"])))
    assert {i.name for i in await shared.list()} == {"r/model/v0", "r/model/v0.json"}
    assert [i.name for i in await private.list()] == ["r/state/a"]
    loaded = await StateStore(shared, "r", private=private).load()
    assert loaded is not None and loaded.progress is not None and loaded.progress.sampled == ["c7"]


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"clients": {"lr": "fast"}}, "clients.lr"),
        ({"clients": {"learning_rate": 0.1}}, "clients.learning_rate"),
        ({"model": {"name": "resnet"}}, "model.name"),
        ({"strategy": {"name": "fedmagic"}}, "strategy.name"),
        ({"round": {"mode": "sometimes"}}, "round.mode"),
        ({"round": {"min_clients": 5, "min_available": 3}}, "round.min_available"),
        ({"rounds": 0}, "rounds"),
        ({"privacy": {"clip_norm": 1.0}, "secure_aggregation": {"threshold": 2}}, "privacy"),
        ({"strategy": {"name": "fedavg", "beta": 0.1}}, "strategy"),
        ({"colour": "blue"}, "colour"),
        ({"run_id": "a.b"}, "run_id"),
        ({"run_id": "x" * 65}, "run_id"),
        ({"privacy": {"clip_norm": 1.0}, "round": {"mode": "async"}}, "round.mode"),
        ({"privacy": {"amplification": "yes"}}, "privacy.amplification"),
    ],
)
def test_config_errors_name_the_key(patch: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(patch, source="fl.yaml")
    assert info.value.key == key
    assert "fl.yaml" in str(info.value)


def test_example_config_is_valid() -> None:
    config = fl.load_config(Path(__file__).parent.parent / "examples" / "fl-digits.yaml")
    assert config.clients.count == 10 and config.data.partition == "dirichlet" and config.data.alpha == 0.5
    assert config.strategy.name == "fedavg"
