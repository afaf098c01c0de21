"""Shared test vectors: fedbus's typed codec (msgspec) and the edge SDK (plain msgpack) write and read the
same bytes, and signatures made by either verify with the other. Plus a property test on random events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.bus import subjects
from fedbus.bus.catalogue import EdgeStatus  # noqa: F401 - registers the edge event types
from fedbus.bus.codec import Codec, Envelope, signing_bytes
from fedbus.bus.events import CATALOGUE, Catalogue, Event, Params, event
from fedbus.bus.signing import AgentKey, KeyRing
from fedbus.edge_sdk import envelope as edge
from fedbus.edge_sdk.signing import Signer, Verifier

HERE = Path(__file__).parent / "vectors"
VECTORS = sorted(HERE.glob("*.json"))
TEST_SEED = bytes(range(32))
FEDBUS_KEY = AgentKey(Ed25519PrivateKey.from_private_bytes(TEST_SEED))
EDGE_SIGNER = Signer(TEST_SEED)
CODEC = Codec()


def load(path: Path) -> tuple[dict[str, Any], bytes]:
    return json.loads(path.read_text()), bytes.fromhex(path.with_suffix(".hex").read_text().strip())


def typed(doc: dict[str, Any]) -> Event:
    cls = CATALOGUE.lookup(doc["envelope"]["type"], doc["envelope"]["v"])
    return msgspec.convert(doc["data"], cls)


def test_there_are_signed_and_unsigned_vectors() -> None:
    docs = [load(p)[0] for p in VECTORS]
    assert len(docs) >= 5
    assert {d["envelope"]["sig_hex"] is None for d in docs} == {True, False}


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_fedbus_codec_produces_the_vector(path: Path) -> None:
    doc, frame = load(path)
    e = doc["envelope"]
    ev = typed(doc)
    env = CODEC.envelope(ev, source=e["src"], trace=e["trace"], reply=e["reply"], event_id=e["id"],
                         time_ns=e["time"])
    if e["sig_hex"]:
        FEDBUS_KEY.sign(env)
    assert CODEC.pack(env) == frame
    assert signing_bytes(env).hex() == doc["signing_bytes_hex"]
    assert ev.subject() == doc["subject"] and subjects.to_mqtt(ev.subject()) == doc["topic"]


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_edge_sdk_decodes_the_vector(path: Path) -> None:
    doc, frame = load(path)
    e = doc["envelope"]
    env = edge.unpack(frame)
    assert {k: env[k] for k in ("id", "type", "v", "src", "time", "trace", "reply", "kid")} == {
        k: e[k] for k in ("id", "type", "v", "src", "time", "trace", "reply", "kid")}
    assert env["data"].hex() == e["data_hex"]
    assert (env["sig"].hex() if env["sig"] else None) == e["sig_hex"]
    assert edge.decode_data(env) == doc["data"]
    assert edge.signing_bytes(env).hex() == doc["signing_bytes_hex"]
    if e["sig_hex"]:
        Verifier({"k": bytes.fromhex(doc["public_key_hex"])}).verify(env)  # a fedbus signature verifies


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_edge_sdk_encodes_the_vector_and_fedbus_reads_it(path: Path) -> None:
    doc, frame = load(path)
    e = doc["envelope"]
    env = edge.make_envelope(e["type"], doc["data"], source=e["src"], version=e["v"], trace=e["trace"],
                             reply=e["reply"], event_id=e["id"], time_ns=e["time"])
    if e["sig_hex"]:
        EDGE_SIGNER.sign(env)
    assert edge.pack(env) == frame
    decoded = CODEC.unpack(edge.pack(env))
    assert CODEC.decode(decoded) == typed(doc)
    if e["sig_hex"]:
        KeyRing({"k": EDGE_SIGNER.public_raw}).verify(decoded)  # an edge signature verifies in fedbus


# -- property: random valid events round-trip between the two codecs ---------------------------------------
_SAMPLES = Catalogue()


@event("vectors", "sample", key="key", catalogue=_SAMPLES)
class Sample(Event):
    key: str
    count: int
    ratio: float
    flag: bool
    note: str | None = None
    params: Params = {}
    values: list[int] = []
    blob: bytes = b""


_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False), st.text(max_size=20))
_samples = st.builds(
    Sample,
    key=st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
    count=_ints,
    ratio=st.floats(allow_nan=False),
    flag=st.booleans(),
    note=st.none() | st.text(max_size=40),
    params=st.dictionaries(st.text(max_size=12), _scalars, max_size=6),
    values=st.lists(_ints, max_size=8),
    blob=st.binary(max_size=64),
)
_optional = st.none() | st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,3}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(sample=_samples, trace=_optional, reply=_optional, sign=st.booleans(),
       time_ns=st.integers(min_value=0, max_value=2**63 - 1))
def test_random_events_round_trip_between_the_codecs(
        sample: Sample, trace: str | None, reply: str | None, sign: bool, time_ns: int) -> None:
    codec = Codec(catalogue=_SAMPLES)
    env: Envelope = codec.envelope(sample, source="prop", trace=trace, reply=reply, time_ns=time_ns)
    if sign:
        FEDBUS_KEY.sign(env)
    frame = codec.pack(env)
    # fedbus → edge
    got = edge.unpack(frame)
    data = edge.decode_data(got)
    assert data == msgspec.structs.asdict(sample)
    if sign:
        Verifier({"k": FEDBUS_KEY.public_raw}).verify(got)
    # edge → fedbus: the same fields give the same bytes, and decode to the same typed event
    again = edge.make_envelope(got["type"], data, source=got["src"], version=got["v"], trace=got["trace"],
                               reply=got["reply"], event_id=got["id"], time_ns=got["time"])
    if sign:
        EDGE_SIGNER.sign(again)
    assert edge.pack(again) == frame
    back = codec.unpack(edge.pack(again))
    assert codec.decode(back) == sample
    if sign:
        KeyRing({"k": EDGE_SIGNER.public_raw}).verify(back)
