"""The scheduler's pure state machine and placement policies: events and time in, effects out."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from fedbus.agents.events import (
    AgentHeartbeat,
    Capacity,
    JobAward,
    JobBid,
    JobCancel,
    JobOffer,
    JobRef,
    JobReject,
    JobReport,
    JobState,
    JobStop,
    JobSubmit,
    ReportPhase,
)
from fedbus.agents.jobspec import Computing, JobSpec
from fedbus.agents.placement import BinPack, Candidate, LowestCost, Spread, choose, policy_named
from fedbus.agents.scheduling import Effects, JobRecord, SchedulerConfig, SchedulingCore
from fedbus.bus.errors import ConfigError

CFG = SchedulerConfig(warmup_s=0.5, bid_window_s=0.3, accept_window_s=2.0, lease_s=3.0, agent_ttl_s=3.0,
                      backoff_s=1.0, requeue_s=5.0, spare_offers=1)


def cap(gpus: int = 1, free: int | None = None, *, model: str = "A100", price: float = 1.0,
        labels: dict[str, str] | None = None) -> Capacity:
    return Capacity(gpus=gpus, free_gpus=gpus if free is None else free, gpu_model=model, gpu_memory_gb=80,
                    cpus=8, free_cpus=8, memory_gb=64, free_memory_gb=64, disk_gb=100, free_disk_gb=100,
                    price_per_hour=price, labels=labels or {})


class World:
    """A core plus helpers that play the agents' part."""

    def __init__(self, config: SchedulerConfig = CFG, policy: str = "binpack") -> None:
        self.core = SchedulingCore(now=0.0, config=config, policy=policy_named(policy))
        self.now = 0.0
        self.caps: dict[str, Capacity] = {}
        self.instances: dict[str, str] = {}
        self.log: list[Effects] = []

    def effects(self) -> Effects:
        e = self.core.take_effects()
        self.log.append(e)
        return e

    def heartbeat(self, agent: str, capacity: Capacity | None = None, *, jobs: list[tuple[str, int]] = (),
                  instance: str | None = None, status: str = "ready") -> Effects:
        if capacity is not None:
            self.caps[agent] = capacity
        if instance is not None:
            self.instances[agent] = instance
        self.core.handle(AgentHeartbeat(
            agent_id=agent, kind="gpu", status=status, instance=self.instances.setdefault(agent, "i1"), seq=1,
            interval_s=1.0, address=f"10.0.0.{len(agent)}", capacity=self.caps.get(agent),
            jobs=[JobRef(j, a) for j, a in jobs]), self.now)
        return self.effects()

    def at(self, t: float) -> Effects:
        self.now = t
        self.core.tick(t)
        return self.effects()

    def submit(self, job_id: str, spec: JobSpec) -> Effects:
        self.core.handle(JobSubmit(job_id=job_id, jobspec=spec), self.now)
        return self.effects()

    def bid_all(self, offers: list[JobOffer], *, refuse: dict[str, str] | None = None) -> Effects:
        for offer in offers:
            if refuse and offer.to in refuse:
                self.core.handle(JobBid(job_id=offer.job_id, round=offer.round, agent_id=offer.to, ok=False,
                                        reason=refuse[offer.to]), self.now)
            else:
                self.core.handle(JobBid(job_id=offer.job_id, round=offer.round, agent_id=offer.to,
                                        capacity=self.caps[offer.to], address=f"addr-{offer.to}", port=29500),
                                 self.now)
        return self.effects()

    def report(self, job: str, attempt: int, agent: str, phase: ReportPhase, *, rank: int = 0,
               code: int | None = None) -> Effects:
        self.core.handle(JobReport(job_id=job, attempt=attempt, agent_id=agent, node_rank=rank, phase=phase,
                                   exit_code=code), self.now)
        return self.effects()

    def run(self, job: str, awards: list[JobAward]) -> Effects:
        for a in awards:
            self.report(job, a.attempt, a.agent_id, ReportPhase.ACCEPTED, rank=a.node_rank)
        effects = Effects()
        for a in awards:
            effects = self.report(job, a.attempt, a.agent_id, ReportPhase.RUNNING, rank=a.node_rank)
        return effects

    def state(self, job: str) -> JobState:
        return self.core.jobs[job].state


def sends(effects: Effects, cls: type) -> list:
    return [e for e in effects.sends if isinstance(e, cls)]


def gpu_job(nodes: int = 1, gpus: int = 1, **kw: object) -> JobSpec:
    computing = {k: v for k, v in kw.items() if k in Computing.__struct_fields__}
    rest = {k: v for k, v in kw.items() if k not in computing}
    return JobSpec(job="train", computing=Computing(nodes=nodes, gpus_per_node=gpus, **computing), **rest)


# -- placement policies ---------------------------------------------------------------------------------
def test_binpack_prefers_fullest_node_and_breaks_ties_by_agent_id() -> None:
    needs = Computing(gpus_per_node=1)
    cands = [Candidate("b", cap(4, 4)), Candidate("a", cap(4, 4)), Candidate("c", cap(4, 2))]
    chosen, _ = choose(needs, 1, cands, BinPack())
    assert [c.agent_id for c in chosen] == ["c"]
    chosen, _ = choose(needs, 2, cands[:2], BinPack())
    assert [c.agent_id for c in chosen] == ["a", "b"]  # equal: alphabetical, every time


def test_spread_and_lowest_cost_pick_differently() -> None:
    needs = Computing(gpus_per_node=1)
    cands = [Candidate("busy", cap(4, 1, price=1.0)), Candidate("idle", cap(4, 4, price=3.0))]
    assert choose(needs, 1, cands, Spread())[0][0].agent_id == "idle"
    assert choose(needs, 1, cands, BinPack())[0][0].agent_id == "busy"
    cands.append(Candidate("cheap", cap(4, 4, price=0.5)))
    assert choose(needs, 1, cands, LowestCost())[0][0].agent_id == "cheap"


def test_multi_node_is_all_or_nothing_and_respects_budget() -> None:
    needs = Computing(nodes=3, gpus_per_node=2, max_cost_per_hour=10)
    cands = [Candidate("a", cap(2, price=1)), Candidate("b", cap(2, price=1))]
    chosen, why = choose(needs, 3, cands, BinPack())
    assert chosen is None and "2 of 3 nodes" in why
    cands.append(Candidate("c", cap(2, price=4)))  # 2+2+8 = 12/h > 10
    chosen, why = choose(needs, 3, cands, BinPack())
    assert chosen is None and "budget" in why
    cands.append(Candidate("d", cap(2, price=1)))
    chosen, _ = choose(needs, 3, cands, BinPack())
    assert sorted(c.agent_id for c in chosen) == ["a", "b", "d"]


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="binpack"):
        policy_named("fastest")


# -- the contract-net flow ------------------------------------------------------------------------------
def test_directed_offer_awards_as_soon_as_all_candidates_answered() -> None:
    w = World()
    w.heartbeat("a", cap(2, 2))
    w.heartbeat("b", cap(2, 1))
    e = w.submit("j1", gpu_job())
    assert w.state("j1") is JobState.QUEUED and not e.sends
    assert "waiting" in w.core.jobs["j1"].reason  # warming up: says so
    e = w.at(0.6)
    offers = sends(e, JobOffer)
    assert sorted(o.to for o in offers) == ["a", "b"] and w.state("j1") is JobState.OFFERED
    e = w.bid_all(offers)  # no need to wait for the deadline
    awards = sends(e, JobAward)
    assert [(a.agent_id, a.attempt, a.master_addr, a.master_port) for a in awards] == [
        ("b", 1, "addr-b", 29500)]
    assert [(r.agent_id, r.round) for r in sends(e, JobReject)] == [("a", offers[0].round)]  # frees a's hold
    assert "j1" in e.saves and e.saves["j1"].state is JobState.AWARDED  # saved before it is sent
    w.run("j1", awards)
    assert w.state("j1") is JobState.RUNNING
    w.report("j1", 1, "b", ReportPhase.EXITED, code=0)
    assert w.state("j1") is JobState.SUCCEEDED
    states = [s.state for e in w.log for s in e.statuses]
    assert states == [JobState.QUEUED, JobState.QUEUED, JobState.OFFERED, JobState.AWARDED, JobState.STARTING,
                      JobState.RUNNING, JobState.SUCCEEDED]


def test_concurrent_offers_count_the_likely_winner_busy() -> None:
    w = World(SchedulerConfig(warmup_s=0.0, spare_offers=0))
    w.heartbeat("a", cap(2, 1))
    w.heartbeat("b", cap(2, 2))
    w.at(0.1)
    first = sends(w.submit("j1", gpu_job()), JobOffer)
    second = sends(w.submit("j2", gpu_job()), JobOffer)
    assert [o.to for o in first] == ["a"]  # bin-pack: the fuller node
    assert [o.to for o in second] == ["b"]  # a's last GPU is spoken for
    third = w.submit("j3", gpu_job())
    assert [o.to for o in sends(third, JobOffer)] == ["b"]


def test_two_node_job_gets_both_nodes_or_waits() -> None:
    w = World()
    w.heartbeat("a", cap(1))
    w.at(0.6)
    w.submit("j", gpu_job(nodes=2))
    rec = w.core.jobs["j"]
    assert rec.state is JobState.QUEUED and "1 of 1 live agents fit" in rec.reason and "2 nodes" in rec.reason
    e = w.heartbeat("b", cap(1))  # capacity appears: offered again on the next tick
    e = w.at(0.7)
    awards = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    assert sorted((a.agent_id, a.node_rank) for a in awards) == [("a", 0), ("b", 1)]
    assert {a.master_addr for a in awards} == {"addr-a"} and {a.nodes for a in awards} == {2}
    w.run("j", awards)
    w.report("j", 1, "a", ReportPhase.EXITED, code=0)
    assert w.state("j") is JobState.RUNNING  # one node still running
    w.report("j", 1, "b", ReportPhase.EXITED, rank=1, code=0)
    assert w.state("j") is JobState.SUCCEEDED


def test_refusals_and_no_bids_leave_the_job_queued_with_reasons() -> None:
    w = World()
    w.heartbeat("a", cap(1))
    w.at(0.6)
    e = w.submit("j", gpu_job())
    w.bid_all(sends(e, JobOffer), refuse={"a": "1 of 1 GPUs busy (someone else's process)"})
    rec = w.core.jobs["j"]
    assert rec.state is JobState.QUEUED and "someone else's process" in rec.reason
    # Capacity appears again (the next heartbeat shows more free): a new offer round, no bid by the deadline.
    assert "a: refused the last offer" in w.core.explain(gpu_job(), 0.6, job_id="j")[1]
    w.caps["a"] = cap(2)
    w.now = 0.7
    w.heartbeat("a")  # fresh news from a: it may be asked again
    assert not sends(w.at(0.8), JobOffer)  # a failed round waits a little before the next
    e = w.at(0.9)
    assert sends(e, JobOffer)
    w.at(1.3)
    assert w.state("j") is JobState.QUEUED and "no answer from a" in w.core.jobs["j"].reason


def test_unplaceable_job_explains_every_agent() -> None:
    w = World()
    w.heartbeat("a", cap(1, model="T4"))
    w.heartbeat("b", cap(2, 0, model="A100", labels={"zone": "eu"}))
    w.heartbeat("c", cap(4, labels={"zone": "us"}))
    w.at(0.6)
    w.submit("j", gpu_job(gpus=2, resource_type="A100", labels={"zone": "eu"}))
    reason = w.core.jobs["j"].reason
    assert "0 of 3 live agents fit" in reason
    assert "a: has 1 GPU, needs 2" in reason
    assert "b: 0 of 2 GPUs free" in reason
    assert "c: GPU model" not in reason and "c: label zone=us, needs eu" in reason


def test_no_live_agents_is_the_reason() -> None:
    w = World()
    w.at(1.0)
    w.submit("j", gpu_job())
    assert "no live agents" in w.core.jobs["j"].reason


# -- failures, leases, fencing ----------------------------------------------------------------------------
def _running(w: World, job: str = "j", spec: JobSpec | None = None) -> JobAward:
    w.heartbeat("a", cap(1))
    w.heartbeat("b", cap(1))
    w.at(0.6)
    e = w.submit(job, spec or gpu_job(retries=2))
    awards = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    w.run(job, awards)
    assert w.state(job) is JobState.RUNNING
    return awards[0]


def test_lost_agent_job_is_retried_with_backoff_elsewhere_and_fenced() -> None:
    w = World()
    first = _running(w)
    assert first.agent_id == "a"
    w.heartbeat("b", cap(1))  # b keeps beating; a goes silent
    w.now = 3.0
    w.heartbeat("b")
    e = w.at(3.7)  # a's lease (3 s after it accepted at 0.6) expired
    rec = w.core.jobs["j"]
    assert [s.state for s in e.statuses] == [JobState.LOST, JobState.QUEUED]
    assert rec.retries_used == 1 and "retry 1 of 2 in 1s" in rec.reason
    assert any(isinstance(s, JobStop) and s.agent_id == "a" and s.attempt == 1 for s in e.sends)
    assert not sends(e, JobOffer)  # backoff first
    e = w.at(4.8)
    awards = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    assert [(a.agent_id, a.attempt) for a in awards] == [("b", 2)]
    w.run("j", awards)
    # The presumed-dead agent comes back and reports the old attempt as done: ignored, and told to stop.
    e = w.report("j", 1, "a", ReportPhase.RUNNING)
    assert [s.attempt for s in sends(e, JobStop)] == [1]
    w.report("j", 1, "a", ReportPhase.EXITED, code=0)
    assert w.state("j") is JobState.RUNNING and w.core.counters["stale_reports"] == 2
    w.report("j", 2, "b", ReportPhase.EXITED, code=0)
    assert w.state("j") is JobState.SUCCEEDED
    successes = [s for e in w.log for s in e.statuses if s.state is JobState.SUCCEEDED]
    assert [(s.attempt, s.agents) for s in successes] == [(2, ["b"])]


def test_heartbeat_listing_a_stale_attempt_gets_a_stop() -> None:
    w = World()
    _running(w)
    e = w.heartbeat("b", jobs=[("j", 7), ("gone", 1)])
    stops = {(s.job_id, s.attempt) for s in sends(e, JobStop)}
    assert stops == {("j", 7), ("gone", 1)}
    e = w.heartbeat("b", jobs=[("j", 7)])
    assert not sends(e, JobStop)  # not repeated within a lease period


def test_restarted_agent_loses_its_jobs_at_once() -> None:
    w = World()
    _running(w, spec=gpu_job(retries=0))
    w.heartbeat("a", instance="i2")  # new process, holds nothing
    rec = w.core.jobs["j"]
    assert rec.state is JobState.FAILED and "restarted" in rec.reason and "no retries left" in rec.reason


def test_failure_stops_the_other_nodes_and_retry_on_failure() -> None:
    w = World()
    w.heartbeat("a", cap(1))
    w.heartbeat("b", cap(1))
    w.at(0.6)
    e = w.submit("j", gpu_job(nodes=2, retries=1, retry_on_failure=True))
    awards = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    w.run("j", awards)
    e = w.report("j", 1, "b", ReportPhase.EXITED, rank=1, code=3)
    assert [(s.agent_id, s.attempt) for s in sends(e, JobStop)] == [("a", 1)]
    assert w.state("j") is JobState.QUEUED and w.core.jobs["j"].exit_code == 3
    e = w.at(1.7)
    awards = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    w.run("j", awards)
    w.report("j", 2, "a", ReportPhase.EXITED, code=4)
    rec = w.core.jobs["j"]
    assert rec.state is JobState.FAILED and rec.exit_code == 4


def test_decline_and_accept_timeout_offer_again() -> None:
    w = World()
    w.heartbeat("a", cap(1))
    w.at(0.6)
    e = w.submit("j", gpu_job())
    [award] = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    e = w.report("j", 1, "a", ReportPhase.DECLINED)
    assert sends(e, JobOffer), "offered again at once"
    [award] = sends(w.bid_all(sends(e, JobOffer)), JobAward)
    assert award.attempt == 2  # every award is a new fencing token
    e = w.at(0.6 + CFG.accept_window_s + 0.1)
    rec = w.core.jobs["j"]
    assert "not accepted in 2s by a" in rec.history[-2].reason
    assert rec.state is JobState.OFFERED


@pytest.mark.parametrize("stage", ["queued", "offered", "awarded", "running"])
def test_cancel_at_any_state(stage: str) -> None:
    w = World()
    w.heartbeat("a", cap(1))
    w.at(0 if stage == "queued" else 0.6)
    e = w.submit("j", gpu_job())
    if stage in ("awarded", "running"):
        awards = sends(w.bid_all(sends(e, JobOffer)), JobAward)
        if stage == "running":
            w.run("j", awards)
    assert w.state("j").value == stage
    w.core.handle(JobCancel(job_id="j"), w.now)
    e = w.effects()
    assert w.state("j") is JobState.CANCELLED
    assert bool(sends(e, JobStop)) == (stage in ("awarded", "running"))
    w.report("j", 1, "a", ReportPhase.EXITED, code=0)
    assert w.state("j") is JobState.CANCELLED  # a late exit changes nothing


def test_cancel_before_submission_arrives() -> None:
    w = World()
    w.core.handle(JobCancel(job_id="j"), 0.0)
    w.submit("j", gpu_job())
    assert w.state("j") is JobState.CANCELLED


def test_restore_resumes_after_a_restart() -> None:
    w = World()
    _running(w, "run")
    w.heartbeat("b", cap(1, 0))
    w.submit("wait", gpu_job(gpus=1))
    saved = {job_id: rec for e in w.log for job_id, rec in e.saves.items()}
    # A new scheduler reads the records back (as encoded in the store) and resumes.
    records = [msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=JobRecord) for r in saved.values()]
    w2 = World()
    w2.core.restore(records, 10.0)
    w2.now = 10.0
    assert w2.state("run") is JobState.RUNNING and w2.state("wait") is JobState.QUEUED
    w2.heartbeat("a", cap(1, 0), jobs=[("run", 1)])
    w2.heartbeat("b", cap(1))
    e = w2.at(10.6)
    assert [o.job_id for o in sends(e, JobOffer)] == ["wait"]
    w2.report("run", 1, "a", ReportPhase.EXITED, code=0)
    assert w2.state("run") is JobState.SUCCEEDED
    w2.at(14.0)  # the placed node's lease was renewed by the heartbeat; nothing lost meanwhile
    assert w2.core.counters["lost"] == 0


def test_a_job_that_ended_while_the_scheduler_was_down_is_not_lost_before_its_report_is_read() -> None:
    w = World()
    _running(w, "run")
    saved = {job_id: rec for e in w.log for job_id, rec in e.saves.items()}
    records = [msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=JobRecord) for r in saved.values()]
    w2 = World(dataclasses.replace(CFG, restore_grace_s=8.0))
    w2.core.restore(records, 10.0)
    w2.now = 10.0
    w2.heartbeat("a", cap(1))  # the job ended while the scheduler was down: no longer in the heartbeat
    w2.at(10.0 + CFG.lease_s + 1.0)  # a plain lease would have run out by now; the report is still on its way
    assert w2.state("run") is JobState.RUNNING and w2.core.counters["lost"] == 0
    w2.report("run", 1, "a", ReportPhase.EXITED, code=0)
    assert w2.state("run") is JobState.SUCCEEDED
    w3 = World(dataclasses.replace(CFG, restore_grace_s=0.0))  # without the grace: lost, then failed
    w3.core.restore([msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=JobRecord) for r in saved.values()],
                    10.0)
    w3.heartbeat("a", cap(1))
    w3.at(10.0 + CFG.lease_s + 1.0)
    assert w3.core.counters["lost"] == 1


def test_submit_redelivery_is_ignored() -> None:
    w = World()
    w.submit("j", gpu_job())
    e = w.submit("j", gpu_job(gpus=2))
    assert not e and w.core.jobs["j"].spec.computing.gpus_per_node == 1


def test_a_refusal_sends_the_offer_to_the_next_candidate_at_once() -> None:
    w = World(SchedulerConfig(warmup_s=0.0))
    w.heartbeat("a", cap(2, 1))
    w.heartbeat("b", cap(2, 2))
    w.at(0.1)
    [offer] = sends(w.submit("j", gpu_job()), JobOffer)
    assert offer.to == "a"
    e = w.bid_all([offer], refuse={"a": "0 of 2 GPUs free, needs 1"})
    [again] = sends(e, JobOffer)
    assert again.to == "b" and again.round != offer.round
    [award] = sends(w.bid_all([again]), JobAward)
    assert award.agent_id == "b"


def test_an_agent_that_gives_a_job_up_has_it_retried_and_a_stopped_one_loses_nothing_early() -> None:
    w = World()
    _running(w, spec=gpu_job(retries=1))
    e = w.heartbeat("a", status="stopped")  # its exit report may still be on the way: leases decide
    assert w.state("j") is JobState.RUNNING and "a" not in w.core.agents and not e.statuses
    w.report("j", 1, "a", ReportPhase.LOST)
    rec = w.core.jobs["j"]
    assert rec.state is JobState.QUEUED and rec.retries_used == 1 and "a gave the job up" in rec.reason
