"""Federated learning benchmarks: aggregation speed and memory, round overhead on a real broker, and the
accuracy and robustness tables.

    python -m bench.bench_fl                      # default run, a few minutes on a 2-core machine
    python -m bench.bench_fl --only aggregation   # one part: aggregation | rounds | accuracy | robustness
    python -m bench.bench_fl --big                # + stack-then-average at 1,000 clients (~8 GB)

**Aggregation.** Each case runs in its own process so its peak RSS is its own. Updates are float32 vectors
that "arrive" one at a time (read from a pool of 8 pre-generated vectors, larger than the CPU caches, so
every fold reads memory). Compared:

* ``fedbus``: :class:`fedbus.aggregator.strategies.MeanAggregate` (one BLAS ``saxpy`` per update, in place);
* ``numpy``: the textbook streaming loop ``np.add(acc, u * w, out=acc)`` (writes a temporary per update);
* ``torch``: ``acc.add_(u, alpha=w)`` on CPU tensors;
* ``stack-then-average``: what Flower's ``aggregate`` does: keep every update, scale each into a new list,
  then reduce; memory grows with the number of clients.

GB/s = bytes of updates folded / seconds spent folding; "held" = the most resident memory the aggregation
added over the process before the first update (sampled after every fold; the pool itself is not counted).

**Rounds.** 100 clients (trivial training: one gradient step on a quadratic) and the aggregator in one
process, over an embedded nats-server; per-round time from RoundStart to RoundClose, signatures verified.
All 100 clients share this process's event loop and 2 cores: an upper bound on what separate machines see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._table import print_table

POOL = 8


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- aggregation: one case per process -----------------------------------------------------------------------
def _case(method: str, clients: int, params: int) -> dict[str, Any]:
    from fedbus.aggregator.strategies import MeanAggregate, Update, axpy

    if method == "torch":
        import torch

        torch.set_num_threads(1)  # as for BLAS: a memory-bound loop, on a shared machine
    axpy(np.zeros(8192, np.float32), np.ones(8192, np.float32), 1.0)  # load and configure BLAS first
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal(params, dtype=np.float32) for _ in range(min(POOL, clients))]
    weights = rng.integers(10, 1000, clients).astype(np.float64)
    before = _rss_mb()
    held = 0.0
    t_fold = 0.0
    if method == "fedbus":
        agg = MeanAggregate(params)
        for i in range(clients):
            u = Update("c", pool[i % len(pool)], int(weights[i]))
            t = time.perf_counter()
            agg.fold(u)
            t_fold += time.perf_counter() - t
            held = max(held, _rss_mb() - before)
        t = time.perf_counter()
        result = agg.result()
        t_fold += time.perf_counter() - t
    elif method == "numpy":
        acc = np.full(params, 0.0, np.float32)  # pre-faulted, as the other accumulators
        for i in range(clients):
            u = pool[i % len(pool)]
            t = time.perf_counter()
            np.add(acc, u * np.float32(weights[i]), out=acc)
            t_fold += time.perf_counter() - t
            held = max(held, _rss_mb() - before)
        t = time.perf_counter()
        result = np.multiply(acc, np.float32(1.0 / weights.sum()), out=acc)
        t_fold += time.perf_counter() - t
    elif method == "torch":
        tpool = [torch.from_numpy(p) for p in pool]
        tacc = torch.zeros(params)
        for i in range(clients):
            t = time.perf_counter()
            tacc.add_(tpool[i % len(tpool)], alpha=float(weights[i]))
            t_fold += time.perf_counter() - t
            held = max(held, _rss_mb() - before)
        t = time.perf_counter()
        result = tacc.div_(float(weights.sum())).numpy()
        t_fold += time.perf_counter() - t
    elif method == "stack":
        # The updates as a stack-then-average server receives them: every one kept until the round closes.
        received = [(pool[i % len(pool)].copy(), int(weights[i])) for i in range(clients)]
        t = time.perf_counter()
        total = sum(n for _, n in received)
        scaled = [u * np.float32(n) for u, n in received]
        t_fold = time.perf_counter() - t
        held = _rss_mb() - before  # every update, and a scaled copy of each
        t = time.perf_counter()
        acc = scaled[0]
        for s in scaled[1:]:
            acc = np.add(acc, s)
        result = acc / np.float32(total)
        t_fold += time.perf_counter() - t
        del scaled, received
    else:
        raise SystemExit(f"unknown method {method}")
    peak = _peak_mb()
    rel_err = None
    if clients <= 64:  # against a float64 reference, accumulated one update at a time
        ref = np.zeros(params)
        for i in range(clients):
            ref += weights[i] * pool[i % len(pool)]
        ref /= weights.sum()
        rel_err = float(np.abs(result - ref).max() / np.abs(ref).max())
    return {
        "method": method,
        "clients": clients,
        "params": params,
        "seconds": t_fold,
        "gbps": clients * params * 4 / t_fold / 1e9,
        "peak_mb": peak,
        "held_mb": held,
        "rel_err": rel_err,
    }


def _float32_error(clients: int = 1000, params: int = 100_000) -> float:
    """Max relative error of the float32 streaming mean against a float64 reference."""
    from fedbus.aggregator.strategies import MeanAggregate, Update

    rng = np.random.default_rng(1)
    agg = MeanAggregate(params)
    ref = np.zeros(params)
    total = 0.0
    for _ in range(clients):
        u = rng.standard_normal(params, dtype=np.float32)
        n = int(rng.integers(10, 1000))
        agg.fold(Update("c", u, n))
        ref += n * u.astype(np.float64)
        total += n
    ref /= total
    return float(np.abs(agg.result() - ref).max() / np.abs(ref).max())


def aggregation(big: bool) -> None:
    import psutil

    cases = [(10, 1_000_000), (100, 1_000_000), (1000, 1_000_000), (10, 25_000_000)]
    rows = []
    for clients, params in cases:
        for method in ("fedbus", "numpy", "torch", "stack"):
            need_gb = 2.2 * clients * params * 4 / 1e9 if method == "stack" else 1.0
            if method == "stack" and clients >= 1000 and not big:
                rows.append(
                    [f"{clients} × {params / 1e6:g} M", method, "-", "-", "-", "skipped (--big: ~8 GB)"]
                )
                continue
            if need_gb > psutil.virtual_memory().available / 1e9 * 0.7:
                rows.append(
                    [
                        f"{clients} × {params / 1e6:g} M",
                        method,
                        "-",
                        "-",
                        "-",
                        f"skipped: needs ~{need_gb:.0f} GB",
                    ]
                )
                continue
            best: dict[str, Any] | None = None
            repeats = 2 if method != "stack" and clients == 100 else 1
            for _ in range(repeats):  # the headline case best of two: the machine is shared
                out = subprocess.run(
                    [sys.executable, "-m", "bench.bench_fl", "--case", method, str(clients), str(params)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=Path(__file__).parent.parent,
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                if best is None or res["gbps"] > best["gbps"]:
                    best = res
            assert best is not None
            err = f"{best['rel_err']:.1e}" if best["rel_err"] is not None else ""
            rows.append(
                [
                    f"{clients} × {params / 1e6:g} M",
                    method,
                    f"{best['gbps']:.1f}",
                    f"{best['peak_mb']:.0f}",
                    f"{best['held_mb']:.0f}",
                    err,
                ]
            )
    print_table(
        "Aggregation (weighted mean of float32 updates; 100-client streaming cases best of 2)",
        ["clients × params", "method", "GB/s", "peak RSS MB", "held MB", "rel. error"],
        rows,
    )
    print(
        f"float32 accumulator, 1,000 clients × 100 k params: max relative error vs float64 = "
        f"{_float32_error():.1e}"
    )


# -- round overhead over a real broker -----------------------------------------------------------------------
async def _rounds(clients: int, rounds: int, dim: int) -> list[float]:
    from fedbus.aggregator.config import parse_config
    from fedbus.aggregator.events import RoundClose
    from fedbus.aggregator.federation import SimulationOptions, simulate
    from fedbus.aggregator.testing import quadratic_clients
    from fedbus.bus.broker import NatsServer

    config = parse_config(
        {
            "run_id": f"bench-{os.getpid()}",
            "rounds": rounds,
            "clients": {"count": clients, "lr": 0.5},
            "round": {
                "min_clients": clients,
                "min_available": clients,
                "heartbeat_s": 1.0,
                "heartbeat_timeout_s": 5.0,
                "evaluate_every": 0,
                "timeout_s": 30,
                "checkpoint_interval_s": 10,
            },
        }
    )
    durations: list[float] = []

    def on_event(e: Any) -> None:
        if isinstance(e, RoundClose) and e.kind == "fit":
            durations.append(e.duration_s)

    with NatsServer() as server:
        await simulate(
            config,
            quadratic_clients(clients, dim),
            np.zeros(dim, np.float32),
            options=SimulationOptions(server=server.url),
            on_event=on_event,
        )
    return durations[1:]  # round 1 includes thread-pool warm-up


def rounds_bench(quick: bool) -> None:
    rows = []
    for clients, dim in ((10, 1000), (100, 1000), (100, 50_000)):
        ds = asyncio.run(_rounds(clients, 6 if quick else 16, dim))
        rows.append(
            [clients, f"{dim:,}", len(ds), f"{1000 * statistics.median(ds):.1f}", f"{1000 * max(ds):.1f}"]
        )
    print_table(
        "Round overhead over an embedded nats-server (trivial training; RoundStart → RoundClose)",
        ["clients", "params", "rounds", "median ms", "max ms"],
        rows,
    )


# -- accuracy and robustness ---------------------------------------------------------------------------------
def _digits_config(
    run_id: str,
    *,
    rounds: int,
    strategy: dict[str, Any] | None = None,
    partition: str = "dirichlet",
    hidden: int = 64,
) -> Any:
    from fedbus.aggregator.config import parse_config

    return parse_config(
        {
            "run_id": run_id,
            "rounds": rounds,
            "seed": 0,
            "model": {"name": "mlp", "hidden": [hidden]},
            "data": {"name": "digits", "partition": partition, "alpha": 0.5},
            "clients": {"count": 10, "local_epochs": 2, "batch_size": 8, "lr": 0.3},
            "strategy": strategy or {"name": "fedavg"},
            "round": {
                "min_clients": 10,
                "min_available": 10,
                "heartbeat_s": 0.2,
                "heartbeat_timeout_s": 2.0,
                "evaluate_every": 0,
            },
        }
    )


def accuracy(quick: bool) -> None:
    import torch

    from fedbus.aggregator.events import RoundClose
    from fedbus.aggregator.federation import simulate
    from fedbus.trainer.local import evaluate_model, train_central
    from fedbus.trainer.setup import prepare

    torch.set_num_threads(1)
    rounds = 10 if quick else 30
    config = _digits_config("bench-acc", rounds=rounds)
    federation = prepare(config)
    curve: dict[int, float] = {}

    def on_event(e: Any) -> None:
        if isinstance(e, RoundClose) and e.kind == "summary":
            curve[e.round] = float(e.metrics["test_accuracy"])  # type: ignore[arg-type]

    asyncio.run(
        simulate(
            config,
            federation.trainers,
            federation.initial,
            evaluate_fn=federation.evaluate,
            on_event=on_event,
        )
    )
    model = federation.new_model()
    central: dict[int, float] = {}
    for r in range(1, rounds + 1):
        train_central(model, federation.train, config.client_config(), epochs=2, seed=r)
        central[r] = evaluate_model(model, federation.test)[1]
    marks = [r for r in (1, 2, 5, 10, 15, 20, 25, 30) if r <= rounds]
    rows = [
        [r, 2 * r, f"{curve[r]:.4f}", f"{central[r]:.4f}", f"{100 * (curve[r] - central[r]):+.1f}"]
        for r in marks
    ]
    print_table(
        "Accuracy: FedAvg on digits, 10 clients, Dirichlet α=0.5, MLP(64), 2 local epochs/round, "
        "vs central with the same total epochs",
        ["round", "total epochs", "FedAvg test acc", "central test acc", "Δ points"],
        rows,
    )


def robustness(quick: bool) -> None:
    import torch

    from fedbus.aggregator.federation import simulate
    from fedbus.trainer.attacks import ByzantineTrainer
    from fedbus.trainer.setup import prepare

    torch.set_num_threads(1)
    rounds = 6 if quick else 15
    strategies: list[dict[str, Any]] = [
        {"name": "fedavg"},
        {"name": "median"},
        {"name": "trimmed_mean", "beta": 0.2},
        {"name": "krum", "f": 2},
        {"name": "multi_krum", "f": 2},
        {"name": "norm_clip"},
    ]
    attacks = [(None, 0.0), ("sign_flip", 4.0), ("scale", 10.0)]
    rows = []
    run = 0
    for strategy in strategies:
        row: list[object] = [strategy["name"]]
        for attack, factor in attacks:
            run += 1
            config = _digits_config(
                f"bench-rob-{run}", rounds=rounds, strategy=strategy, partition="iid", hidden=32
            )
            federation = prepare(config)
            trainers: list[Any] = list(federation.trainers)
            if attack:
                for i in (0, 5):
                    trainers[i] = ByzantineTrainer(trainers[i], attack=attack, factor=factor)
            result = asyncio.run(simulate(config, trainers, federation.initial))
            row.append(f"{federation.evaluate(result.model)['test_accuracy']:.4f}")
        rows.append(row)
    print_table(
        f"Robustness: digits (IID), 10 clients of which 2 (20%) attack, {rounds} rounds; test accuracy",
        ["strategy", "no attack", "sign flip ×4", "scaled ×10"],
        rows,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["aggregation", "rounds", "accuracy", "robustness"])
    parser.add_argument("--big", action="store_true", help="include stack-then-average at 1,000 clients")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--case", nargs=3, metavar=("METHOD", "CLIENTS", "PARAMS"), help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.case:
        method, clients, params = args.case
        print(json.dumps(_case(method, int(clients), int(params))))
        return 0
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    parts = {
        "aggregation": lambda: aggregation(args.big),
        "rounds": lambda: rounds_bench(args.quick),
        "accuracy": lambda: accuracy(args.quick),
        "robustness": lambda: robustness(args.quick),
    }
    for name, part in parts.items():
        if args.only in (None, name):
            t = time.perf_counter()
            part()
            print(f"({name}: {time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
