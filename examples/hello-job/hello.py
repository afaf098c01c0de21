"""Prints the rendezvous environment a fedbus job gets (torchrun's variables, plus fedbus's own)."""

import os

KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
        "NNODES", "CUDA_VISIBLE_DEVICES", "FEDBUS_JOB_ID", "FEDBUS_ATTEMPT", "FEDBUS_AGENT_ID")

print(os.environ.get("GREETING", "hello"))
for key in KEYS:
    print(f"{key}={os.environ.get(key, '')}")
