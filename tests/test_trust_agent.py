"""The GPU agent against a hostile bus and a curious job, on a real nats-server (issue 7, findings 3, 4, 6).

- Finding 3: a job cannot read its agent's key or credentials (work dir outside the state dir, scrubbed env,
  an unprivileged job user when the agent is root: these tests run as root).
- Finding 4: two agents with default flags on one machine cannot both run: the second is refused, naming
  the PID that holds the state dir; default ids are unique per state dir.
- Finding 6: an award replayed after the agent restarted is refused; an award past ``accept_by_ns`` too.
- Identity bound to credentials: with creds the agent is its credential, and obeys only signatures of
  scheduler (or admin) identities of the registry, by the key registered for the id the envelope names.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fedbus.agents.awards import AwardBook
from fedbus.agents.events import JobAward, JobBid, JobLog, JobOffer, JobReport, ReportPhase
from fedbus.agents.gpu import GpuAgent, GpuAgentConfig
from fedbus.agents.jobhost import JobUser, WorkRoot, scrub_env
from fedbus.agents.jobspec import Computing, JobSpec
from fedbus.agents.resources import DeclaredResources
from fedbus.agents.runtime import RuntimeConfig
from fedbus.agents.statedir import DirHeld
from fedbus.agents.trust import KEYS_BUCKET
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import transport_for
from fedbus.bus.creds import IDENTITIES_BUCKET, Credentials
from fedbus.bus.errors import ConfigError
from fedbus.bus.roles import Role
from fedbus.bus.signing import AgentKey, KeyRing
from fedbus.bus.stores import KeyValue, open_stores

FEDBUS = str(Path(sys.executable).parent / "fedbus")
ROOT = os.geteuid() == 0
"""Tests run as root here and on CI; the job user is then ``nobody``."""
RESOURCES = DeclaredResources(gpus=1, cpus=8, memory_gb=8, disk_gb=10)


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(data_dir=tmp_path_factory.mktemp("nats"), mqtt_port=None) as server:
        yield server


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A work dir under /tmp (pytest's own tmp dirs are closed to the job user ``nobody``)."""
    path = Path(tempfile.mkdtemp(prefix="fedbus-trust-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def observer(nats: NatsServer) -> AsyncIterator[Bus]:
    """A client that sees everything and checks nothing (it only watches what agents do)."""
    async with Bus(transport_for(nats.url), source="observer", security=Security.OFF) as bus:
        yield bus


def _award(agent_id: str, job_id: str, command: str, *, accept_in_s: float = 30.0, attempt: int = 1) -> JobAward:
    return JobAward(agent_id=agent_id, job_id=job_id, attempt=attempt, round=1, node_rank=0, nodes=1,
                    master_addr="127.0.0.1", master_port=29500, jobspec=JobSpec(job=command),
                    accept_by_ns=time.time_ns() + int(accept_in_s * 1e9))


def _agent(nats: NatsServer, state: Path, work: Path, *, agent_id: str | None = None,
           trust: tuple[Path, ...] = (), creds: Credentials | None = None, **gpu: Any) -> GpuAgent:
    return GpuAgent(RuntimeConfig(server=nats.url, state_dir=state, agent_id=agent_id, heartbeat_s=0.2,
                                  health_port=None, trust=trust, creds=creds, drain_timeout_s=5),
                    GpuAgentConfig(declared=RESOURCES, address="127.0.0.1", work_dir=work, stop_grace_s=1, **gpu))


def _trust_file(path: Path, key: AgentKey) -> Path:
    ring = KeyRing()
    ring.trust(key.public_raw)
    ring.dump(path)
    return path


def _signed(bus: Bus, event: Any, *, source: str, key: AgentKey) -> Any:
    """An envelope for ``event`` claiming to come from ``source``, signed with ``key``."""
    env = bus.codec.envelope(event, source=source)
    key.sign(env)
    return env


async def _send(bus: Bus, event: Any, *, source: str, key: AgentKey) -> Any:
    env = _signed(bus, event, source=source, key=key)
    await bus.publish_envelope(event.subject(), env)
    return env


async def _next_report(reports: Any, job_id: str, timeout: float = 20.0) -> JobReport:
    async with asyncio.timeout(timeout):
        while True:
            report = (await reports.next()).event
            if report.job_id == job_id:
                return report


async def _job_output(logs: Any, timeout: float = 30.0) -> list[str]:
    """A job's output lines until the agent's ``exited with`` line."""
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while not any(line.startswith("exited with") for line in lines):
            batch: JobLog = (await logs.next()).event
            lines += [entry.text for entry in batch.lines]
    return lines


# -- finding 4: one agent per state dir, ids unique per state dir ------------------------------------------
async def test_a_second_agent_on_a_state_dir_is_refused_and_ids_differ_per_dir(
        nats: NatsServer, tmp_path: Path, work_dir: Path) -> None:
    first = _agent(nats, tmp_path / "a", work_dir / "a")
    with pytest.raises(DirHeld, match=rf"state dir .*a is held by another agent \(pid {os.getpid()}\)"):
        _agent(nats, tmp_path / "a", work_dir / "a2")
    other = _agent(nats, tmp_path / "b", work_dir / "b")
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", os.uname().nodename).strip("-")
    assert re.fullmatch(rf"{re.escape(host)}-[0-9a-f]{{6}}", first.agent_id)
    assert first.agent_id != other.agent_id
    async with first:  # the lock does not stop its own holder
        pass
    again = _agent(nats, tmp_path / "a", work_dir / "a")  # released on close: the same id comes back
    assert again.agent_id == first.agent_id and again.key.kid == first.key.kid
    with pytest.raises(DirHeld, match="work dir"):  # two agents cannot share a work dir either
        async with _agent(nats, tmp_path / "c", work_dir / "a"), again:
            pass


def test_two_default_agents_on_one_machine_the_second_refuses(nats: NatsServer, tmp_path: Path,
                                                              work_dir: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "FEDBUS_SERVER": nats.url, "TMPDIR": str(work_dir)}
    env.pop("FEDBUS_CREDS", None)
    env.pop("XDG_CONFIG_HOME", None)
    args = [FEDBUS, "agent", "gpu", "--gpus", "0", "--json-logs"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert first.stderr is not None
        for raw in first.stderr:  # its log says when it is up
            if b'"agent started"' in raw:
                break
        else:
            pytest.fail(f"the first agent exited with {first.wait()}")
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(20)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 69, second.stderr
    assert len(lines) == 1 and f"is held by another agent (pid {first.pid})" in lines[0], second.stderr
    assert str(tmp_path / ".fedbus" / "gpu") in lines[0]
    assert first.returncode == 0


# -- finding 3: jobs never see agent secrets ------------------------------------------------------------
async def test_a_job_cannot_read_the_agent_key_or_creds(nats: NatsServer, observer: Bus, tmp_path: Path,
                                                       work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root (here and on CI) the job runs as ``nobody`` and reaches none of the agent's files. Without root
    the job is the agent's own user, which can read them (documented): then only the environment counts."""
    scheduler = AgentKey.generate()
    creds_file = Credentials(id="ops", role=Role.ADMIN, user="ops", password="pw-in-the-creds-file",
                             signing_seed=os.urandom(32)).dump(tmp_path / "ops.creds")
    monkeypatch.setenv("FEDBUS_CREDS", str(creds_file))
    monkeypatch.setenv("MY_API_TOKEN", "token-of-the-agent")
    monkeypatch.setenv("DB_PASSWORD", "password-of-the-agent")
    state = tmp_path / "state"
    monkeypatch.setenv("WHERE_MY_KEY_IS", str(state / "agent.key"))
    agent = _agent(nats, state, work_dir / "jobs", agent_id="nosy-1",
                   trust=(_trust_file(tmp_path / "scheduler.json", scheduler),))
    snoop = (f'cat "$FEDBUS_WORKDIR/../../agent.key"; '
             f'find "$FEDBUS_WORKDIR/.." "$FEDBUS_WORKDIR/../.." {state} -type f | xargs -r cat; '
             f'cat {state}/agent.key "$WHERE_MY_KEY_IS" {creds_file}; ') if ROOT else ""
    command = f'echo "uid=$(id -u)"; echo "workdir=$FEDBUS_WORKDIR"; {snoop}cat "$FEDBUS_CREDS"; env; echo the-end'
    async with agent:
        secret_pem = (state / "agent.key").read_text()
        async with await observer.subscribe(JobLog, key="nosy") as logs:
            await _send(observer, _award("nosy-1", "nosy", command), source="scheduler", key=scheduler)
            lines = await _job_output(logs)
    text = "\n".join(lines)
    assert "the-end" in lines and "FEDBUS_JOB_ID=nosy" in lines  # the job ran to its end and printed env
    uid = next(line for line in lines if line.startswith("uid="))
    assert uid != "uid=0" if ROOT else uid == f"uid={os.geteuid()}"
    workdir = next(line for line in lines if line.startswith("workdir="))[len("workdir="):]
    assert not Path(workdir).resolve().is_relative_to(state.resolve())
    for secret in ("PRIVATE KEY", secret_pem.splitlines()[1], "pw-in-the-creds-file", "token-of-the-agent",
                   "password-of-the-agent", "signing_key"):
        assert secret not in text
    leaked = ("FEDBUS_CREDS=", "MY_API_TOKEN=", "DB_PASSWORD=", "WHERE_MY_KEY_IS=")
    assert not [line for line in lines if line.startswith(leaked)]
    assert oct((state).stat().st_mode & 0o777) == "0o700"


def test_scrubbed_env_and_work_dir_rules(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "FEDBUS_CREDS": "/x", "FEDBUS_CONTEXT": "/y",
           "FEDBUS_LOG_LEVEL": "debug", "AWS_SECRET_ACCESS_KEY": "s", "HF_TOKEN": "t", "SSH_AUTH_SOCK": "/s",
           "XDG_CONFIG_HOME": "/root/.config", "SOME_FILE": str(tmp_path / "state" / "agent.key"),
           "CUDA_HOME": "/usr/local/cuda"}
    assert scrub_env(env, secret_paths=[tmp_path / "state"]) == {
        "PATH": "/usr/bin", "LANG": "C.UTF-8", "FEDBUS_LOG_LEVEL": "debug", "CUDA_HOME": "/usr/local/cuda"}
    with pytest.raises(ConfigError, match="outside the state dir"):
        WorkRoot(tmp_path / "state" / "jobs", state_dir=tmp_path / "state")
    not_ours = tmp_path / "precious"
    not_ours.mkdir()
    (not_ours / "thesis-1").mkdir()
    with pytest.raises(ConfigError, match="not empty and not a fedbus work dir"):
        WorkRoot(not_ours, state_dir=tmp_path / "state").prepare(JobUser.choose(None))
    assert (not_ours / "thesis-1").exists()
    if ROOT:  # pytest's tmp dirs are 0700: closed to nobody
        with pytest.raises(ConfigError, match="cannot reach"):
            WorkRoot(tmp_path / "jobs", state_dir=tmp_path / "state").prepare(JobUser.choose(None))


# -- finding 6: awards replayed after a restart, awards past their deadline ------------------------------
async def test_an_award_replayed_after_a_restart_is_refused(nats: NatsServer, observer: Bus, tmp_path: Path,
                                                           work_dir: Path) -> None:
    scheduler = AgentKey.generate()
    trust = (_trust_file(tmp_path / "scheduler.json", scheduler),)
    state, work = tmp_path / "state", work_dir / "jobs"
    async with await observer.subscribe(JobReport) as reports:
        async with _agent(nats, state, work, agent_id="replay-1", trust=trust):
            award = _award("replay-1", "once", "true")
            captured = await _send(observer, award, source="scheduler", key=scheduler)
            assert (await _next_report(reports, "once")).phase == ReportPhase.ACCEPTED
            assert (await _next_report(reports, "once")).phase == ReportPhase.RUNNING
            assert (await _next_report(reports, "once")).phase == ReportPhase.EXITED
        async with _agent(nats, state, work, agent_id="replay-1", trust=trust) as again:
            await observer.publish_envelope(award.subject(), captured)  # the same bytes, signature and id
            # Past its deadline: declined, with why.
            await _send(observer, _award("replay-1", "late", "true", accept_in_s=-60), source="scheduler",
                        key=scheduler)
            late = await _next_report(reports, "late")
            assert late.phase == ReportPhase.DECLINED and "expired" in late.reason
            # Awards are handled in order: once a fresh one is accepted, the replay before it was handled.
            await _send(observer, _award("replay-1", "fresh", "true"), source="scheduler", key=scheduler)
            fresh = await _next_report(reports, "fresh")
            assert fresh.phase == ReportPhase.ACCEPTED
            assert again.metrics.value("replays_total") == 1 and again.metrics.value("expired_total") == 1
    stored = [r async for r in _stored_reports(observer, "once")]
    assert [r.phase for r in stored] == ["accepted", "running", "exited"]  # it ran once


async def _stored_reports(bus: Bus, job_id: str) -> AsyncIterator[JobReport]:
    log = (await open_stores(bus)).event_log()
    async for stored in log.replay(JobReport.pattern(job_id)):
        if isinstance(stored.event, JobReport):
            yield stored.event


def test_the_award_record_is_bounded_and_survives_reloads(tmp_path: Path) -> None:
    path = tmp_path / "awards.json"
    book = AwardBook(path, max_age_s=100, max_entries=3)
    for i in range(5):
        book.record(f"e{i}", accepted=(f"j{i}", 1), now=1000.0 + i)
    again = AwardBook(path, max_age_s=1e12, max_entries=3)
    assert [again.seen(f"e{i}") for i in range(5)] == [False, False, True, True, True]
    assert again.accepted("j4", 1) and not again.accepted("j4", 2) and not again.accepted("j0", 1)
    book.record("new", now=1200.0)  # everything before 1100 is too old to keep
    assert AwardBook(path, max_age_s=1e12).seen("new") and not AwardBook(path, max_age_s=1e12).seen("e4")
    path.write_text("{not json")
    assert len(AwardBook(path)) == 0  # a broken record is reported and replaced, never fatal


# -- identity bound to credentials ------------------------------------------------------------------------
def _creds(ident: str, role: Role) -> Credentials:
    return Credentials(id=ident, role=role, user=ident, password="pw", signing_seed=os.urandom(32))


async def _register(identities: KeyValue, *creds: Credentials) -> None:
    for c in creds:
        await identities.put(c.id, c.identity().encode())


async def test_with_creds_only_registered_schedulers_are_obeyed(nats: NatsServer, observer: Bus, tmp_path: Path,
                                                               work_dir: Path) -> None:
    me, sched, ops, peer = (_creds("gpu-sec", Role.GPU_AGENT), _creds("sched-1", Role.SCHEDULER),
                            _creds("ops", Role.ADMIN), _creds("gpu-peer", Role.GPU_AGENT))
    identities = await (await open_stores(observer)).key_value(IDENTITIES_BUCKET)
    await _register(identities, me, sched, ops, peer)
    agent = _agent(nats, tmp_path / "state", work_dir / "jobs", creds=me, scheduler_id="sched-1",
                   identity_refresh_s=0.0)
    assert (agent.agent_id, agent.key.kid) == ("gpu-sec", me.signing_key.kid)
    assert not (tmp_path / "state" / "agent.key").exists()
    async with agent, await observer.subscribe(JobReport) as reports, \
            await observer.subscribe(JobBid) as bids:
        keys = await (await open_stores(observer)).key_value(KEYS_BUCKET)
        assert "gpu-sec" not in await keys.keys()  # no first-come-first-served key
        # Offers name who sends them: a peer agent is no scheduler; an admin is (and so its key is learnt).
        for source, job in (("gpu-peer", "o1"), ("ops", "o2")):
            offer = JobOffer(to="gpu-sec", job_id=job, round=1, nodes=1, needs=Computing(), deadline_ns=0)
            await observer.publish_envelope(offer.subject(), observer.codec.envelope(offer, source=source))
        refused, accepted = (await bids.next(timeout=10)).event, (await bids.next(timeout=10)).event
        assert (refused.job_id, refused.ok, refused.reason) == ("o1", False,
                                                              "'gpu-peer' is a gpu-agent, not a scheduler")
        assert (accepted.job_id, accepted.ok) == ("o2", True)
        forged = [
            (_award("gpu-sec", "f-peer", "true"), "gpu-peer", peer.signing_key),     # a peer's own key
            (_award("gpu-sec", "f-self", "true"), "gpu-sec", me.signing_key),        # the agent's own key
            (_award("gpu-sec", "f-other", "true"), "sched-1", ops.signing_key),      # admin's key, sched's name
            (_award("gpu-sec", "f-mallory", "true"), "sched-1", AgentKey.generate()),  # nobody's key
        ]
        for award, source, key in forged:
            await _send(observer, award, source=source, key=key)
        await _send(observer, _award("gpu-sec", "real", "true"), source="sched-1", key=sched.signing_key)
        first = await _next_report(reports, "real")
        assert first.phase == ReportPhase.ACCEPTED and first.agent_id == "gpu-sec"
        assert agent.metrics.value("forged_total") == 2  # the other two failed the signature check itself
        # Revoked: the scheduler's identity is gone, so its key no longer counts.
        await identities.delete("sched-1")
        await _send(observer, _award("gpu-sec", "revoked", "true"), source="sched-1", key=sched.signing_key)
        await _send(observer, _award("gpu-sec", "by-admin", "true"), source="ops", key=ops.signing_key)
        assert (await _next_report(reports, "by-admin")).phase == ReportPhase.ACCEPTED
    stored = [r async for r in _stored_reports(observer, "*")]
    assert not [r for r in stored if r.job_id.startswith("f-") or r.job_id == "revoked"]


# -- no message stops the agent -------------------------------------------------------------------------
async def test_hostile_awards_and_garbage_do_not_stop_the_agent(nats: NatsServer, observer: Bus,
                                                                tmp_path: Path, work_dir: Path) -> None:
    scheduler = AgentKey.generate()
    trust = (_trust_file(tmp_path / "scheduler.json", scheduler),)
    async with _agent(nats, tmp_path / "state", work_dir / "jobs", agent_id="tough-1", trust=trust) as agent, \
            await observer.subscribe(JobReport) as reports:
        for subject in ("fedbus.jobs.award.tough-1", "fedbus.jobs.offer.tough-1", "fedbus.jobs.stop.tough-1"):
            for junk in (b"", b"\xc1" * 64, b"\x92\xa1x" * 1000, os.urandom(4096)):
                await observer.transport.publish(subject, junk)
        poisoned = msgspec.structs.replace(
            _award("tough-1", "nul", "true"),
            jobspec=JobSpec(job="true", env={"A": "x\x00y"}))  # the OS refuses this environment
        await _send(observer, poisoned, source="scheduler", key=scheduler)
        phases = [(await _next_report(reports, "nul")) for _ in range(3)]
        assert [r.phase for r in phases] == [ReportPhase.ACCEPTED, ReportPhase.RUNNING, ReportPhase.EXITED]
        assert phases[-1].exit_code == 1 and "ValueError" in phases[-1].reason
        await _send(observer, _award("tough-1", "after", "true"), source="scheduler", key=scheduler)
        phases = [(await _next_report(reports, "after")).phase for _ in range(3)]
        assert phases == [ReportPhase.ACCEPTED, ReportPhase.RUNNING, ReportPhase.EXITED]
        assert agent.status.value == "ready"
