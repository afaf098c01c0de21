"""Placement policies: which nodes a job goes to, given what each candidate has free. Pure functions.

A policy ranks one candidate node for a job; lower ranks are better and every rank ends with the agent id, so
ties are broken the same way on every run. :func:`choose` picks the nodes of a multi-node job all at once,
or none (all-or-nothing), and enforces the job's cost ceiling.

- ``binpack`` (default): the node left with the smallest free share of GPUs, then CPUs, then memory. Fills
  busy nodes first and keeps whole nodes free for large jobs (Nomad's default for the same reason).
- ``spread``: the opposite, the node left with the most free; spreads load and blast radius.
- ``lowest-cost``: the cheapest node for this job, then bin-pack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedbus.bus.errors import ConfigError

from .events import Capacity
from .jobspec import Computing

__all__ = ["POLICIES", "BinPack", "Candidate", "LowestCost", "Policy", "Spread", "choose", "fit_problem",
           "node_cost", "policy_named"]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node that could take one part of a job, with what it has free now."""

    agent_id: str
    capacity: Capacity
    address: str = ""
    port: int = 0


def node_cost(needs: Computing, cap: Capacity) -> float:
    """Cost per hour of one node of the job on this agent: price per GPU (per node for CPU-only jobs)."""
    return cap.price_per_hour * max(needs.gpus_per_node, 1)


def fit_problem(needs: Computing, cap: Capacity) -> str | None:
    """Why one node of a job cannot run on this capacity now, or ``None`` when it fits."""
    if needs.gpus_per_node > cap.gpus:
        return f"has {cap.gpus} GPU{'s' if cap.gpus != 1 else ''}, needs {needs.gpus_per_node}"
    wanted = needs.resource_type
    if needs.gpus_per_node and wanted and wanted.lower() not in cap.gpu_model.lower():
        return f"GPU model {cap.gpu_model or 'unknown'!r} is not {wanted!r}"
    if needs.gpus_per_node and needs.min_gpu_memory_gb > cap.gpu_memory_gb + _EPS:
        return f"{cap.gpu_memory_gb:g} GB per GPU, needs {needs.min_gpu_memory_gb:g}"
    for key, value in needs.labels.items():
        if cap.labels.get(key) != value:
            return f"label {key}={cap.labels.get(key, '(unset)')}, needs {value}"
    if needs.max_cost_per_hour is not None and node_cost(needs, cap) > needs.max_cost_per_hour + _EPS:
        return f"costs {node_cost(needs, cap):g}/h, over the job's budget of {needs.max_cost_per_hour:g}/h"
    if needs.cpus_per_node > cap.cpus + _EPS:
        return f"has {cap.cpus:g} CPUs, needs {needs.cpus_per_node:g}"
    if needs.min_memory_gb > cap.memory_gb + _EPS:
        return f"has {cap.memory_gb:g} GB memory, needs {needs.min_memory_gb:g}"
    # Above: never fits. Below: does not fit now (busy).
    if needs.gpus_per_node > cap.free_gpus:
        return f"{cap.free_gpus} of {cap.gpus} GPUs free, needs {needs.gpus_per_node}"
    if needs.cpus_per_node > cap.free_cpus + _EPS:
        return f"{cap.free_cpus:g} of {cap.cpus:g} CPUs free, needs {needs.cpus_per_node:g}"
    if needs.min_memory_gb > cap.free_memory_gb + _EPS:
        return f"{cap.free_memory_gb:g} GB memory free, needs {needs.min_memory_gb:g}"
    if needs.min_disk_gb > cap.free_disk_gb + _EPS:
        return f"{cap.free_disk_gb:g} GB disk free, needs {needs.min_disk_gb:g}"
    return None


def _left(needs: Computing, cap: Capacity) -> tuple[float, float, float]:
    """Free shares (0..1) of GPUs, CPUs and memory left on the node after placing the job."""
    gpus = (cap.free_gpus - needs.gpus_per_node) / cap.gpus if cap.gpus else 0.0
    cpus = (cap.free_cpus - needs.cpus_per_node) / cap.cpus if cap.cpus else 0.0
    mem = (cap.free_memory_gb - needs.min_memory_gb) / cap.memory_gb if cap.memory_gb else 0.0
    return (round(gpus, 6), round(cpus, 6), round(mem, 6))


class Policy(Protocol):
    """Ranks a candidate node for a job: lower is better; the last element must be the agent id."""

    name: str

    def rank(self, needs: Computing, candidate: Candidate) -> tuple[float | str, ...]: ...


class BinPack:
    """Fill the fullest node that fits first."""

    name = "binpack"

    def rank(self, needs: Computing, candidate: Candidate) -> tuple[float | str, ...]:
        return (*_left(needs, candidate.capacity), candidate.agent_id)


class Spread:
    """Use the emptiest node first."""

    name = "spread"

    def rank(self, needs: Computing, candidate: Candidate) -> tuple[float | str, ...]:
        return (*(-x for x in _left(needs, candidate.capacity)), candidate.agent_id)


class LowestCost:
    """The cheapest node first; bin-pack among equal prices."""

    name = "lowest-cost"

    def rank(self, needs: Computing, candidate: Candidate) -> tuple[float | str, ...]:
        return (round(node_cost(needs, candidate.capacity), 9), *_left(needs, candidate.capacity),
                candidate.agent_id)


POLICIES: dict[str, type[BinPack | Spread | LowestCost]] = {
    BinPack.name: BinPack, Spread.name: Spread, LowestCost.name: LowestCost,
}


def policy_named(name: str) -> Policy:
    """The policy called ``name`` (``binpack``, ``spread``, ``lowest-cost``)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown placement policy {name!r} (choose from {', '.join(POLICIES)})",
                          key="policy") from None


def choose(needs: Computing, nodes: int, candidates: Sequence[Candidate], policy: Policy
           ) -> tuple[list[Candidate] | None, str]:
    """Pick ``nodes`` distinct nodes by the policy, all or none; returns ``(chosen, why_not)``."""
    fitting = [c for c in candidates if fit_problem(needs, c.capacity) is None]
    unique = {c.agent_id: c for c in fitting}
    if len(unique) < nodes:
        return None, f"{len(unique)} of {nodes} node{'s' if nodes != 1 else ''} available"
    ranked = sorted(unique.values(), key=lambda c: policy.rank(needs, c))
    chosen = ranked[:nodes]
    budget = needs.max_cost_per_hour
    if budget is not None and sum(node_cost(needs, c.capacity) for c in chosen) > budget + _EPS:
        cheapest = sorted(ranked, key=lambda c: (node_cost(needs, c.capacity), policy.rank(needs, c)))[:nodes]
        total = sum(node_cost(needs, c.capacity) for c in cheapest)
        if total > budget + _EPS:
            return None, f"the cheapest {nodes} node(s) cost {total:g}/h, over the budget of {budget:g}/h"
        chosen = cheapest
    return chosen, ""
