"""A hostile client with a device credential floods every subject it may reach while real work goes on.

10,000 frames over MQTT (TLS, the device's own login): garbage, decoder bombs, 2 MiB frames, and schema-valid
signed envelopes with hostile values — among them a forged "exited 0" report for the running job in the GPU
agent's name, fake capacity, and joins, updates and evaluations for the running federation. Meanwhile a job and
an FL run (a real aggregator and two clients, each with its own credential) go on. Afterwards: every daemon is
alive, the job ended as it really did (exit 3, not the forged 0), the federation finished every round, a new
job still runs, and every stream is within its limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import nats
import numpy as np
import pytest
import yaml
from hostile_frames import envelope, garbage, hostile_values
from secure_deploy import FEDBUS, Deployment

from fedbus.bus.catalogue_cli import load_events
from fedbus.bus.codec import Codec
from fedbus.bus.creds import Credentials
from fedbus.bus.permissions import grants_for
from fedbus.bus.roles import Role
from fedbus.bus.subjects import to_mqtt

pytestmark = pytest.mark.slow

FRAMES = 10_000
BIG_FRAMES = 4  # 2 MiB each: enough to prove they are refused, few enough to keep the test short


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("hostile"))
    try:
        d.start_launch()
        yield d
    finally:
        d.close()


def _job(d: Deployment, name: str, command: str) -> Path:
    folder = d.root / name
    folder.mkdir()
    (folder / "job.yaml").write_text(f"name: {name}\njob: {command}\nretries: 0\n")
    return folder / "job.yaml"


RUN_ID = "hostile-run"
ROUNDS = 4


def _start_federation(d: Deployment) -> list[subprocess.Popen[str]]:
    """A real aggregator and two FL clients, each logged in with its own credential."""
    config = d.root / "fl.yaml"
    config.write_text(yaml.safe_dump({
        "run_id": RUN_ID, "rounds": ROUNDS, "seed": 0, "model": {"name": "logreg"},
        "data": {"name": "digits", "partition": "iid"},
        "clients": {"count": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
        "round": {"min_clients": 2, "min_available": 2, "heartbeat_s": 0.3, "heartbeat_timeout_s": 5.0,
                  "evaluate_every": 1, "timeout_s": 90}}))
    initial = d.root / "initial.npy"
    np.save(initial, np.zeros(64 * 10 + 10, np.float32))
    aggregator = d.issue("aggregator", "agg-h")
    silos = [d.issue("fl-client", f"silo-h{i}") for i in range(2)]
    common = {"env": d.env, "cwd": d.root, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([*FEDBUS, "agent", "aggregator", str(config), "--creds", str(aggregator),
                               "--initial-model", str(initial), "--json"], **common)]  # type: ignore[call-overload]
    procs += [subprocess.Popen([*FEDBUS, "fl", "client", str(config), "--index", str(i), "--creds", str(silo)],
                               **common) for i, silo in enumerate(silos)]  # type: ignore[call-overload]
    return procs


def _targets(device: str, job_id: str) -> list[str]:
    """Every subject the device may publish, with keys filled in: its own, the victim job's, hostile ones."""
    subjects = []
    grants = grants_for(Role.DEVICE, device, list(load_events()))
    assert grants.publish is not None
    for allowed in grants.publish:
        if not allowed.startswith("fedbus."):
            continue
        if allowed.endswith(".*"):
            subjects += [allowed[:-1] + key for key in (job_id, RUN_ID, "victim", "x-1")]
        else:
            subjects.append(allowed)
    return subjects


async def _flood(creds: Credentials, job_id: str) -> int:
    codec, key, rng = Codec(), creds.signing_key, random.Random(11)
    targets = _targets(creds.id, job_id)
    ctx = ssl.create_default_context(cadata=creds.ca_pem)
    host, port = creds.servers["mqtt"].split("://")[1].rsplit(":", 1)
    big = 0
    sent = 0

    def frame(subject: str) -> bytes:
        nonlocal big
        event_type = ".".join(subject.split(".")[1:3])
        choice = rng.random()
        if choice < 0.3:
            junk = rng.choice(list(garbage(rng)))
            if len(junk) > 1024 * 1024:
                if big >= BIG_FRAMES:
                    return rng.randbytes(64)
                big += 1
            return junk
        if choice < 0.5 and event_type == "jobs.report":  # the forged completion, in the agent's name
            return envelope(codec, key, "jobs.report", {"job_id": job_id, "attempt": rng.choice([1, 2, 0, -1]),
                            "agent_id": rng.choice(["gpu-1", creds.id]), "node_rank": 0, "phase": "exited",
                            "exit_code": 0}, source=rng.choice(["gpu-1", creds.id]))
        if choice < 0.5 and event_type == "agents.heartbeat":  # a fake agent with a thousand free GPUs
            return envelope(codec, key, "agents.heartbeat", {
                "agent_id": creds.id, "kind": "gpu", "status": "ready", "instance": "i", "seq": rng.randint(0, 9),
                "interval_s": 1.0, "capacity": {"gpus": 1000, "free_gpus": 1000, "cpus": 512.0,
                                                "free_cpus": 512.0, "memory_gb": 4096.0,
                                                "free_memory_gb": 4096.0}}, source=creds.id)
        if choice < 0.5 and event_type == "fl.join":  # the attacker joins, or joins in a silo's name
            return envelope(codec, key, "fl.join", {"run_id": RUN_ID, "client_id": rng.choice([creds.id, "silo-h0"]),
                            "num_examples": 10**9}, source=rng.choice([creds.id, "silo-h0"]))
        if choice < 0.5 and event_type == "fl.update":  # a poisoned update in a silo's name, with a huge weight
            vector = np.full(64 * 10 + 10, 1e30, np.float32).tobytes()
            return envelope(codec, key, "fl.update", {
                "run_id": RUN_ID, "round": rng.randint(1, ROUNDS), "client_id": rng.choice(["silo-h0", creds.id]),
                "base_version": rng.randint(0, ROUNDS), "num_examples": 10**9,
                "update": {"sha256": hashlib.sha256(vector).hexdigest(), "length": 650, "inline": vector}},
                source=rng.choice(["silo-h0", creds.id]))
        return envelope(codec, key, event_type, hostile_values(rng), source=creds.id)

    async with aiomqtt.Client(host, int(port), tls_context=ctx, identifier=f"{creds.id}-flood",
                              username=creds.user, password=creds.password, timeout=30,
                              max_queued_outgoing_messages=0) as client:
        for i in range(FRAMES):
            subject = targets[i % len(targets)]
            await client.publish(to_mqtt(subject), frame(subject), qos=1 if i % 50 == 0 else 0)
            sent += 1
            if i % 500 == 0:
                await asyncio.sleep(0)
    return sent


async def _streams(d: Deployment) -> list[dict[str, int]]:
    creds = Credentials.load(Path(d.info["creds"]))
    nc = await nats.connect(d.info["nats"], user=creds.user, password=creds.password, tls=creds.ssl_context())
    try:
        infos = await nc.jetstream().streams_info()
        return [{"name": i.config.name, "bytes": i.state.bytes, "max_bytes": i.config.max_bytes or -1,
                 "max_msg_size": i.config.max_msg_size or -1} for i in infos if i.config.name.startswith(("FEDBUS",
                                                                                                     "KV_"))]
    finally:
        await nc.close()


def test_a_device_flood_stops_nothing(deployment: Deployment) -> None:
    d = deployment
    device = Credentials.load(d.issue("device", "phone-evil"))
    job_id = "victim-1"
    victim = d.spawn("launch", str(_job(d, "victim", "sleep 6; exit 3")), "--job-id", job_id, "--follow",
                     "--timeout", "150", log="launch-victim")
    federation = _start_federation(d)
    try:
        sent = asyncio.run(_flood(device, job_id))
        assert sent == FRAMES
        out, err = federation[0].communicate(timeout=180)
        assert federation[0].returncode == 0, err[-3000:]
        report = json.loads(out[out.index("{"):])
        assert (report["status"], report["version"]) == ("ok", ROUNDS), report
        assert [h["clients"] for h in report["history"]] == [2] * ROUNDS  # the attacker joined no round
        assert report["final"]["eval_accuracy"] > 0.8, report["final"]  # and poisoned none
        for client in federation[1:]:
            client.communicate(timeout=60)
            assert client.returncode == 0
    finally:
        for proc in federation:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert victim.wait(180) == 3  # `--follow` exits as the job did: no forged "exited 0" made it succeed
    shown = d.run("job", job_id)
    assert "failed" in shown.stdout and "3" in shown.stdout, shown.stdout
    # Every daemon is alive and still works.
    assert all(p.poll() is None for p in d.procs[:3]), [p.poll() for p in d.procs]
    after = d.run("launch", str(_job(d, "after", "echo still-here")), "--follow", "--timeout", "90")
    assert after.returncode == 0, after.stdout + after.stderr
    assert "still-here" in after.stdout
    # Nothing is stored beyond the limits, and every stream has limits.
    for stream in asyncio.run(_streams(d)):
        assert stream["max_bytes"] > 0 and stream["max_msg_size"] > 0, stream
        assert stream["bytes"] <= stream["max_bytes"], stream
        assert stream["max_msg_size"] < 2 * 1024 * 1024 or stream["name"].startswith("FEDBUS_OBJ"), stream
    listed = d.run("dead-letters", "--json")
    assert listed.returncode == 0, listed.stderr
    dead = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert all(entry["reason"] for entry in dead)
    # The forged reports reached the scheduler (they are on a subject a device may use) and were refused there.
    assert any(entry["type"] == "jobs.report" for entry in dead), dead[:3]
