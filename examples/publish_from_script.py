"""Publish fedbus events from a script: the async API, and the one-liner for code without an event loop.

    fedbus up &                                   # or any NATS server; prints `export FEDBUS_SERVER=...`
    fedbus tail --json &                          # watch what arrives
    python examples/publish_from_script.py        # uses FEDBUS_SERVER, or pass a URL: nats://… or mqtt://…
"""

from __future__ import annotations

import asyncio
import sys

from fedbus.bus import connect, publish_sync
from fedbus.bus.catalogue import Heartbeat, Ping, Record
from fedbus.bus.errors import FedbusError


async def main(url: str | None) -> None:
    # One connection for many events; `source` is the agent id the events carry.
    async with connect(url, source="my-script") as bus:
        for seq in range(3):
            env = await bus.publish(Heartbeat(agent_id="my-script", seq=seq, labels={"host": "laptop"}))
            print(f"heartbeat {seq}: {env.id}")
        # Request/reply: answered if an agent listens on fedbus.bus.ping.gpu-1.
        try:
            reply = await bus.request(Ping(agent_id="gpu-1", text="hello"), timeout=1.0)
            print(f"{reply.source} answered: {reply.event}")
        except FedbusError as exc:  # no agent answered (RequestTimeout), nobody listens (NoResponders), ...
            print(f"no answer from gpu-1: {exc}")


if __name__ == "__main__":
    server = sys.argv[1] if len(sys.argv) > 1 else None  # None: FEDBUS_SERVER, then nats://127.0.0.1:4222
    asyncio.run(main(server))
    # Without an event loop: connect, publish, flush, disconnect, in one call.
    sent = publish_sync(server, Record(topic="notes", text="published from a script"), source="my-script")
    print(f"record: {sent.id}")
