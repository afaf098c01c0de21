"""Launch on the secure broker, end to end: `fedbus up` (TLS, auth, role permissions), a scheduler and a GPU
agent with their own issued credentials, a job launched and followed from the CLI with the saved context — and
the attacks of the issue's findings 1 and 3 tried against it with real clients.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from secure_deploy import Deployment

from fedbus.bus.creds import Credentials

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-job"
MOSQUITTO_PUB = shutil.which("mosquitto_pub")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("secure-launch"))
    try:
        d.start_launch()
        shutil.copytree(EXAMPLE, d.root / "hello-job")
        yield d
    finally:
        d.close()


def test_a_job_runs_end_to_end_on_the_secure_broker(deployment: Deployment) -> None:
    done = deployment.run("launch", "hello-job/job.yaml", "--follow", "--timeout", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello from fedbus" in done.stdout
    assert "succeeded" in done.stderr  # status lines go to stderr, job output to stdout


def _submit_frame(job_id: str) -> bytes:
    """A schema-valid jobs.submit that runs a shell command: what an attacker would send."""
    from fedbus.agents.events import JobSubmit
    from fedbus.agents.jobspec import parse_jobspec
    from fedbus.bus.codec import Codec

    spec = parse_jobspec("name: evil\njob: id > /tmp/fedbus-pwned\n")
    codec = Codec()
    return codec.pack(codec.envelope(JobSubmit(job_id=job_id, jobspec=spec), source="admin"))


async def _raw_admin_publish(deployment: Deployment, subject: str, data: bytes) -> None:
    creds = Credentials.load(Path(deployment.info["creds"]))
    nc = await nats.connect(deployment.info["nats"], user=creds.user, password=creds.password,
                            tls=creds.ssl_context())
    try:
        await nc.jetstream().publish(subject, data)
    finally:
        await nc.close()


def test_a_device_credential_cannot_launch_anything(deployment: Deployment) -> None:
    """Finding 1 on the deployed system: a device's schema-valid jobs.submit, sent with mosquitto_pub, reaches
    no scheduler; the same frame from an admin credential but unsigned is refused and dead-lettered."""
    creds = json.loads(deployment.issue("device", "phone-9").read_text())
    ca = deployment.root / "ca.pem"
    ca.write_text(creds["ca"])
    host, port = creds["servers"]["mqtt"].split("://")[1].rsplit(":", 1)
    frame = deployment.root / "submit.bin"
    frame.write_bytes(_submit_frame("evil-1"))
    assert MOSQUITTO_PUB is not None, "mosquitto_pub is needed (Debian: mosquitto-clients)"
    done = subprocess.run([MOSQUITTO_PUB, "-h", host, "-p", port, "--cafile", str(ca), "-u", creds["user"], "-P",
                           creds["password"], "-q", "1", "-t", "fedbus/jobs/submit/evil-1", "-f", str(frame)],
                          capture_output=True, timeout=20, check=False)
    assert done.returncode == 0
    # The control: the same frame published with the admin credential (the context's), but unsigned.
    frame.write_bytes(_submit_frame("evil-2"))
    asyncio.run(_raw_admin_publish(deployment, "fedbus.jobs.submit.evil-2", frame.read_bytes()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "evil-2" not in deployment.run("dead-letters", "--json").stdout:
        time.sleep(0.3)
    dead = deployment.run("dead-letters", "--json").stdout
    assert "evil-2" in dead and "admin identity" in dead  # the scheduler saw it and refused it
    assert "evil-1" not in dead  # the device's never reached it
    for job in ("evil-1", "evil-2"):
        shown = deployment.run("job", job)
        assert shown.returncode != 0, shown.stdout
    assert not Path("/tmp/fedbus-pwned").exists()


def test_a_revoked_agent_stops_with_exit_77(deployment: Deployment) -> None:
    """A credential revoked while its agent runs: the broker closes it, and the agent does not retry forever."""
    creds = deployment.issue("gpu-agent", "gpu-doomed")
    agent = deployment.spawn("agent", "gpu", "--creds", str(creds), "--state-dir", str(deployment.root / "st-doomed"),
                             "--cpus", "1", "--memory-gb", "1", "--disk-gb", "1", log="gpu-doomed")
    deadline = time.monotonic() + 60
    while agent.poll() is None and time.monotonic() < deadline:
        if "gpu-doomed" in deployment.run("agents").stdout:
            break
        time.sleep(0.3)
    assert agent.poll() is None, (deployment.root / "gpu-doomed.log").read_text()[-2000:]
    revoked = deployment.run("creds", "revoke", "gpu-doomed")
    assert revoked.returncode == 0, revoked.stderr
    assert agent.wait(60) == 77
    errors = [line for line in (deployment.root / "gpu-doomed.log").read_text().splitlines()
              if line.startswith("error:")]
    assert len(errors) == 1 and "no longer accepts these credentials" in errors[0], errors
