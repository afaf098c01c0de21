"""Write the shared envelope test vectors from fedbus's typed codec. Run by hand when adding a vector:

    .venv/bin/python tests/vectors/make_vectors.py

Tests never run this: ``tests/test_vectors.py`` checks that both codecs still produce and read exactly the
stored bytes. Changing a stored vector is a wire-format change. The signing key is a fixed TEST key (seed
bytes 0..31); never use it for anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedbus.bus import subjects
from fedbus.bus.catalogue import EdgeMetrics, EdgeStatus, Heartbeat, MetricPoint, Notice
from fedbus.bus.codec import Codec, signing_bytes
from fedbus.bus.events import Event
from fedbus.bus.signing import AgentKey

HERE = Path(__file__).parent
TEST_SEED = bytes(range(32))
T0 = 1_700_000_000_123_456_789

VECTORS: list[tuple[str, str, Event, dict[str, Any], bool]] = [
    ("status_unsigned", "an edge device's retained online status: Params with str, int, float, None, bool",
     EdgeStatus(device_id="pi-7", online=True, sdk="fedbus-edge/0.1.0",
                info={"arch": "aarch64", "cpus": 4, "temp_c": 41.5, "charging": None, "beta": False}),
     {"event_id": "01HF3Z8Q4N6V7W8X9YAZBC0DE1", "source": "pi-7", "time_ns": T0}, False),
    ("metrics_trace", "a telemetry batch with nested points, a null step and a trace id",
     EdgeMetrics(device_id="pi-7", seq=3, points=[
         MetricPoint(name="loss", value=0.25, time=T0, step=10),
         MetricPoint(name="temp_c", value=-3.5, time=T0 + 1, step=None)]),
     {"event_id": "01HF3Z8Q4N6V7W8X9YAZBC0DE2", "source": "pi-7", "time_ns": T0 + 5, "trace": "trace-01"},
     False),
    ("heartbeat_reply", "an agent event with a reply subject and integers of every width",
     Heartbeat(agent_id="gpu-1", seq=70_000, role="gpu",
               labels={"small": -5, "byte": 200, "neg16": -300, "big": 2**40, "max": 2**63 - 1}),
     {"event_id": "01HF3Z8Q4N6V7W8X9YAZBC0DE3", "source": "gpu-1", "time_ns": T0 + 7,
      "reply": "fedbus._inbox.pi-7-0a1b2c3d.0"}, False),
    ("status_signed", "the status event signed with the test key",
     EdgeStatus(device_id="pi-8", online=False, sdk="fedbus-edge/0.1.0"),
     {"event_id": "01HF3Z8Q4N6V7W8X9YAZBC0DE4", "source": "pi-8", "time_ns": T0 + 9}, True),
    ("notice_signed", "a signed event type with non-ASCII text, a trace and a reply",
     Notice(agent_id="gpu-1", text="hello, édge ✓ " + "x" * 40),
     {"event_id": "01HF3Z8Q4N6V7W8X9YAZBC0DE5", "source": "gpu-1", "time_ns": T0 + 11, "trace": "t-9",
      "reply": "fedbus._inbox.gpu-1-ffffffff.12"}, True),
]


def main() -> None:
    codec = Codec()
    key = AgentKey(Ed25519PrivateKey.from_private_bytes(TEST_SEED))
    for name, description, ev, fields, signed in VECTORS:
        env = codec.envelope(ev, **fields)
        if signed:
            key.sign(env)
        frame = codec.pack(env)
        subject = ev.subject()
        doc = {
            "name": name,
            "description": description,
            "subject": subject,
            "topic": subjects.to_mqtt(subject),
            "envelope": {
                "id": env.id, "type": env.type, "v": env.v, "src": env.src, "time": env.time,
                "data_hex": env.data.hex(), "trace": env.trace, "reply": env.reply,
                "sig_hex": env.sig.hex() if env.sig else None, "kid": env.kid,
            },
            "data": msgspec.to_builtins(ev),
            "signing_bytes_hex": signing_bytes(env).hex(),
            "public_key_hex": key.public_raw.hex() if signed else None,
        }
        (HERE / f"{name}.hex").write_text(frame.hex() + "\n")
        (HERE / f"{name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
