"""A SIGKILLed aggregator restarts, resumes the round it was in (from its JetStream checkpoint) and ends with
the model an uninterrupted run produces. The aggregator is the real ``fedbus agent aggregator`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from fedbus.aggregator.client import ClientFaults, FlClient
from fedbus.aggregator.events import ModelUpdate, RunFinished
from fedbus.aggregator.federation import client_id
from fedbus.aggregator.inbox import Inbox
from fedbus.aggregator.testing import quadratic_clients
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import transport_for
from fedbus.bus.signing import AgentKey

N, DIM, ROUNDS = 5, 32, 4


def _config(tmp: Path, run_id: str) -> Path:
    path = tmp / f"{run_id}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_id": run_id,
                "rounds": ROUNDS,
                "seed": 3,
                "clients": {"count": N, "lr": 0.5},
                "round": {
                    "fraction": 0.6,
                    "min_clients": 3,
                    "min_available": N,
                    "timeout_s": 20,
                    "heartbeat_s": 0.2,
                    "heartbeat_timeout_s": 2.0,
                    "evaluate_every": 0,
                    "checkpoint_interval_s": 0,
                },
            }
        )
    )
    return path


def _aggregator(config: Path, server: NatsServer, initial: Path, log: Path) -> subprocess.Popen[bytes]:
    code = "from fedbus.aggregator.commands import agent; agent()"  # `fedbus agent …`, without other packages
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "aggregator",
                str(config),
                "--server",
                server.url,
                "--initial-model",
                str(initial),
                "--log-level",
                "info",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _federation(server: NatsServer, tmp: Path, run_id: str, *, kill_in_round: int | None) -> np.ndarray:
    initial = tmp / "initial.npy"
    np.save(initial, np.zeros(DIM, np.float32))
    config, log = _config(tmp, run_id), tmp / f"{run_id}.log"
    trainers = quadratic_clients(N, DIM)
    # Staggered stragglers in the round to be interrupted, so the kill lands between updates.
    faults = {i: ClientFaults(delay_s=0.4 * (i + 1), delay_round=kill_in_round) for i in range(N)}
    async with contextlib.AsyncExitStack() as stack:
        spy = await stack.enter_async_context(
            Bus(
                transport_for(server.url, client_id=f"spy-{run_id}"),
                source=f"spy-{run_id}",
                security=Security.OFF,
            )
        )
        inbox = await stack.enter_async_context(Inbox(spy))
        await inbox.add(ModelUpdate, key=run_id)
        await inbox.add(RunFinished, key=run_id)
        await spy.transport.flush()
        buses = [
            await stack.enter_async_context(
                Bus(
                    transport_for(server.url, client_id=client_id(i)),
                    source=client_id(i),
                    key=AgentKey.generate(),
                )
            )
            for i in range(N)
        ]
        proc = _aggregator(config, server, initial, log)
        stack.callback(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
        async with asyncio.TaskGroup() as tg:
            for i, bus in enumerate(buses):
                tg.create_task(
                    FlClient(
                        bus,
                        trainers[i],
                        run_id=run_id,
                        heartbeat_s=0.2,
                        faults=faults.get(i) if kill_in_round else None,
                    ).run()
                )
            killed = False
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                delivery = await inbox.next(timeout=0.5)
                if delivery is None:
                    assert proc.poll() is None, f"the aggregator exited: {log.read_text()[-3000:]}"
                    assert asyncio.get_running_loop().time() < deadline, "the federation stalled"
                    continue
                match delivery.event:
                    case ModelUpdate(round=r) if r == kill_in_round and not killed:
                        await asyncio.sleep(0.15)  # let the aggregator fold and checkpoint it
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        killed = True
                        proc = _aggregator(config, server, initial, log)
                    case RunFinished(status=status, version=version, model=model):
                        assert status == "ok" and version == ROUNDS
                        assert model is not None and model.inline is not None
                        final = np.frombuffer(model.inline, np.float32).copy()
                        break
        assert proc.wait(timeout=20) == 0
    if kill_in_round is not None:
        assert killed
        events = _log_events(log)
        resumed = [e for e in events if e.get("event") == "run resumed"]
        assert resumed and resumed[0]["in_progress"] in (True, "True")
        reopened = [
            e for e in events if e.get("event") == "round started" and e.get("resumed") in (True, "True")
        ]
        assert reopened and int(reopened[0]["round"]) == kill_in_round
        assert int(reopened[0]["pending"]) < int(
            reopened[0]["sampled"]
        )  # folded updates were not asked again
    return final


def _log_events(log: Path) -> list[dict[str, object]]:
    """Structured log lines, whether rendered as JSON or as ``key=value`` pairs."""
    out: list[dict[str, object]] = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pairs = dict(re.findall(r"(\w+)=(\S+)", line))
            message = re.search(r"\]\s+(.+?)\s{2,}", line)
            if message:
                pairs["event"] = message.group(1)
            record = pairs
        if isinstance(record, dict):
            out.append(record)
    return out


async def test_sigkilled_aggregator_resumes_and_matches_an_uninterrupted_run(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    reference = await _federation(fresh_nats, tmp_path, "uninterrupted", kill_in_round=None)
    resumed = await _federation(fresh_nats, tmp_path, "killed", kill_in_round=2)
    np.testing.assert_allclose(resumed, reference, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(reference) > 0.5  # the model did move
