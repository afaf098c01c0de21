"""The codec: envelopes, typed payload validation, limits before decoding, and fuzzing of bad frames."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.bus import Catalogue, Codec, Event, Limits, event, new_id
from fedbus.bus.errors import (
    CodecError,
    FrameTooLarge,
    MalformedFrame,
    SchemaError,
    UnknownEventType,
)

CAT = Catalogue()


@event("test", "sample", key="node", catalogue=CAT)
class Sample(Event):
    node: str
    gpus: int
    tags: list[str] = []
    blob: bytes = b""


@event("test", "sample", version=2, key="node", catalogue=CAT)
class SampleV2(Event):
    node: str
    gpus: int
    memory_gb: float = 0.0


class Capacity(msgspec.Struct, frozen=True):
    gpus: int
    price_per_hour: float


class Line(msgspec.Struct, frozen=True):
    text: str


@event("test", "nested", catalogue=CAT)
class Nested(Event):
    capacity: Capacity
    lines: list[Line] = []


@pytest.fixture
def codec() -> Codec:
    return Codec(catalogue=CAT, limits=Limits(max_frame_bytes=64 * 1024))


def test_round_trip_keeps_every_envelope_field(codec: Codec) -> None:
    env = codec.envelope(Sample(node="n1", gpus=2, tags=["a"]), source="agent-1", trace="t-1", reply="r.1")
    got = codec.unpack(codec.pack(env))
    assert got == env
    assert codec.decode(got) == Sample(node="n1", gpus=2, tags=["a"])
    assert (got.type, got.v, got.src, got.trace, got.reply) == ("test.sample", 1, "agent-1", "t-1", "r.1")


def test_versions_decode_to_their_own_class(codec: Codec) -> None:
    env = codec.envelope(SampleV2(node="n1", gpus=1, memory_gb=8.5), source="a")
    assert isinstance(codec.decode(codec.unpack(codec.pack(env))), SampleV2)


def test_plain_msgpack_reads_the_envelope(codec: Codec) -> None:
    frame = codec.pack(codec.envelope(Sample(node="n1", gpus=3), source="a"))
    raw = msgpack.unpackb(frame, raw=False)
    assert raw["type"] == "test.sample" and raw["src"] == "a"
    assert msgpack.unpackb(raw["data"], raw=False) == {"node": "n1", "gpus": 3, "tags": [], "blob": b""}


def test_schema_error_names_the_field(codec: Codec) -> None:
    env = codec.envelope(Sample(node="n1", gpus=1), source="a")
    env.data = msgpack.packb({"node": "n1", "gpus": "two"})
    with pytest.raises(SchemaError) as info:
        codec.decode(env, subject="fedbus.test.sample.n1")
    assert info.value.field == "gpus"
    assert info.value.event_type == "test.sample"
    assert "gpus" in str(info.value)


def test_missing_required_field_is_named(codec: Codec) -> None:
    env = codec.envelope(Sample(node="n1", gpus=1), source="a")
    env.data = msgpack.packb({"node": "n1"})
    with pytest.raises(SchemaError, match="gpus") as info:
        codec.decode(env)
    assert info.value.field == "gpus"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"capacity": {"gpus": 1, "price_per_hour": "cheap"}}, "capacity.price_per_hour"),
        ({"capacity": {"gpus": 1}}, "capacity.price_per_hour"),  # missing, one level down
        ({"capacity": {"gpus": 1, "price_per_hour": 2.0}, "lines": [{"text": "a"}, {"text": 7}]}, "lines[1].text"),
    ],
)
def test_nested_bad_value_names_its_path(codec: Codec, data: dict[str, object], field: str) -> None:
    env = codec.envelope(Nested(capacity=Capacity(gpus=1, price_per_hour=1.0)), source="a")
    env.data = msgpack.packb(data)
    with pytest.raises(SchemaError) as info:
        codec.decode(env)
    assert info.value.field == field


def test_a_wrong_whole_payload_names_no_field(codec: Codec) -> None:
    env = codec.envelope(Sample(node="n1", gpus=1), source="a")
    env.data = msgpack.packb([1, 2])
    with pytest.raises(SchemaError) as info:
        codec.decode(env)
    assert info.value.field is None


def test_unknown_type_and_version(codec: Codec) -> None:
    env = codec.envelope(Sample(node="n1", gpus=1), source="a")
    env.v = 9
    with pytest.raises(UnknownEventType) as info:
        codec.decode(env)
    assert (info.value.event_type, info.value.version) == ("test.sample", 9)


def test_oversized_frame_rejected_before_decoding(codec: Codec) -> None:
    with pytest.raises(FrameTooLarge) as info:
        codec.unpack(b"\x00" * (64 * 1024 + 1), subject="fedbus.test.sample.x")
    assert info.value.size == 64 * 1024 + 1 and info.value.limit == 64 * 1024
    assert info.value.subject == "fedbus.test.sample.x"


def test_oversized_event_refused_on_the_way_out(codec: Codec) -> None:
    env = codec.envelope(Sample(node="n1", gpus=1, blob=b"x" * 70_000), source="a")
    with pytest.raises(FrameTooLarge):
        codec.pack(env)


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"id": 1}), msgpack.packb("text"),
     msgpack.packb({"id": "x", "type": "t", "v": 1, "src": "a", "time": "now", "data": b""})],
)
def test_malformed_frames(codec: Codec, frame: bytes) -> None:
    with pytest.raises(MalformedFrame):
        codec.unpack(frame)


def test_untyped_decode_limits_depth_and_length() -> None:
    codec = Codec(catalogue=CAT, limits=Limits(max_depth=5, max_container_len=10))
    nested: object = 1
    for _ in range(8):
        nested = [nested]
    with pytest.raises(CodecError, match="deeper"):
        codec.decode_untyped(msgpack.packb(nested))
    with pytest.raises(MalformedFrame):
        codec.decode_untyped(msgpack.packb(list(range(11))))
    assert codec.decode_untyped(msgpack.packb({"a": [1, 2]})) == {"a": [1, 2]}


def test_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)


# -- fuzzing: whatever the bytes, the codec answers with a value or a CodecError, never anything else ---------

@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    codec = Codec(catalogue=CAT)
    try:
        env = codec.unpack(data)
        codec.decode(env)
    except CodecError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(payload=_json, node=st.text(max_size=10), gpus=_json)
def test_fuzz_structured_payloads(payload: object, node: str, gpus: object) -> None:
    """Well-formed msgpack in the wrong shape is a SchemaError, right shape decodes to the typed class."""
    codec = Codec(catalogue=CAT)
    env = codec.envelope(Sample(node="n", gpus=0), source="a")
    for data in (msgpack.packb(payload), msgpack.packb({"node": node, "gpus": gpus})):
        env.data = data
        try:
            decoded = codec.decode(codec.unpack(codec.pack(env)))
        except CodecError:
            continue
        assert isinstance(decoded, Sample)
        assert isinstance(decoded.gpus, int)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 199))
def test_fuzz_corrupted_valid_frames(noise: bytes, at: int) -> None:
    codec = Codec(catalogue=CAT)
    frame = bytearray(codec.pack(codec.envelope(Sample(node="n1", gpus=4, tags=["x", "y"]), source="a")))
    at %= len(frame)
    frame[at:at + len(noise)] = noise
    try:
        codec.decode(codec.unpack(bytes(frame)))
    except CodecError:
        pass


def test_msgspec_allocation_is_bounded_by_frame_size(codec: Codec) -> None:
    """A header claiming 2**32 elements must not allocate 2**32 slots."""
    evil = b"\xdd\xff\xff\xff\xff"  # array32 of 4 G elements, no body
    env = codec.envelope(Sample(node="n1", gpus=1), source="a")
    env.data = msgpack.packb({"node": "n1", "gpus": 1})[:-1] + evil
    with pytest.raises(CodecError):
        codec.decode(env)
    with pytest.raises(MalformedFrame):
        codec.unpack(evil)
