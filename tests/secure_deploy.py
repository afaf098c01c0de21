"""A secure deployment as real processes: `fedbus up` (TLS, auth, role permissions) and daemons started with
their own issued credentials, each in its own folder, all stopped at the end. Shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FEDBUS = [sys.executable, "-m", "fedbus.bus.cli"]


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDBUS_")}
        self.env.update(FEDBUS_CONTEXT=str(root / "context.json"), HOME=str(root / "home"))
        self.procs: list[subprocess.Popen[str]] = []
        up = self.spawn("up", "--json", "--data-dir", str(root / "data"), "--nats-port", "0", "--mqtt-port", "0",
                        log=None)
        assert up.stdout is not None
        self.info = json.loads(up.stdout.readline())

    def spawn(self, *args: str, log: str | None = "x") -> subprocess.Popen[str]:
        name = log if log not in (None, "x") else (args[1] if len(args) > 1 else args[0])
        out = subprocess.PIPE if log is None else open(self.root / f"{name}.log", "a")  # noqa: SIM115 - owned
        proc = subprocess.Popen([*FEDBUS, *args], env=self.env, cwd=self.root, stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FEDBUS, *args], env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def issue(self, role: str, ident: str) -> Path:
        path = self.root / f"{ident}.creds"
        done = self.run("creds", "issue", role, ident, "--out", str(path))
        assert done.returncode == 0, done.stderr
        return path

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_launch(self, *, gpu_args: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        """A scheduler and one GPU agent ("gpu-1") with their own credentials; returns the agent process once
        the agent is ready."""
        sched = self.issue("scheduler", "sched-1")
        gpu = self.issue("gpu-agent", "gpu-1")
        self.spawn("agent", "scheduler", "--creds", str(sched), "--state-dir", str(self.root / "st-sched"),
                   "--bid-window", "0.3")
        agent = self.spawn("agent", "gpu", "--creds", str(gpu), "--state-dir", str(self.root / "st-gpu"),
                           "--cpus", "2", "--memory-gb", "4", "--disk-gb", "5", *gpu_args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and agent.poll() is None:
            agents = self.run("agents")
            if agents.returncode == 0 and "gpu-1" in agents.stdout:
                return agent
            time.sleep(0.3)
        raise AssertionError(f"the GPU agent never showed up: {(self.root / 'gpu.log').read_text()[-2000:]}")
