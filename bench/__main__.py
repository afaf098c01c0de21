"""Run every benchmark (``make bench``), each in its own process, each printing its own table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["bench_bus", "bench_durable", "bench_mqtt", "bench_objects", "bench_launch", "bench_fl", "bench_auth"]


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        if not (here / f"{name}.py").exists():
            continue
        print(f"\n=== python -m bench.{name}", flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.{name}", *sys.argv[1:]]) != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
