"""``jupyter-elastic-gpu check``: can this process reach its broker and agents, and how?

What a kernel would do before its first GPU op, step by step, each step saying what it found
or exactly what failed: the transport (plaintext or TLS, and which files), the broker (who
the token is, the user's limit, the pool), and every agent (reachable, TLS accepted, device).
"""

from __future__ import annotations

import argparse
import os

from ..protocol import tls
from ..protocol.client import query_inventory


def _agent_line(address: str) -> tuple[bool, str]:
    try:
        inv = query_inventory(address, timeout=5.0)
    except (OSError, RuntimeError, ValueError) as e:
        return False, f"agent {address}: FAILED: {e}"
    gpus = ", ".join(g["name"] for g in inv["gpus"]) or "no GPUs"
    return True, (
        f"agent {address}: ok ({inv['agent']['id']}, device={inv['agent']['device']}: {gpus}; "
        f"{len(inv['sessions'])} session(s))"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="jupyter-elastic-gpu check",
        description="Check the way to the broker and the GPU agents, as a kernel would take it.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--agent", help="HOST:PORT of one agent (default: $ELASTIC_GPU_AGENT)")
    g.add_argument(
        "--broker",
        help="broker API URL (default: $ELASTIC_GPU_BROKER_URL); token: $JUPYTERHUB_API_TOKEN",
    )
    opts = p.parse_args(argv)
    broker = opts.broker or (None if opts.agent else os.environ.get("ELASTIC_GPU_BROKER_URL"))
    agent = opts.agent or (None if broker else os.environ.get("ELASTIC_GPU_AGENT"))
    if not (broker or agent):
        p.error("give --agent HOST:PORT or --broker URL (or set ELASTIC_GPU_AGENT / _BROKER_URL)")

    ok = True
    files = tls.client_files()
    if files:
        try:
            tls.client_context()
            named = ", ".join(f"{k}={v}" for k, v in files.items())
            print(f"transport: TLS ({named})")
        except tls.TLSRefused as e:
            print(f"transport: FAILED: {e}")
            return 1
    else:
        print("transport: plaintext (set ELASTIC_GPU_TLS_DIR for agents that require TLS)")

    agents = [agent] if agent else []
    if broker:
        from ..broker.client import BrokerClient, BrokerError

        client = BrokerClient(broker, os.environ.get("JUPYTERHUB_API_TOKEN", ""), timeout=10)
        try:
            me = client.me()
            pool = client.pool()
        except BrokerError as e:
            print(f"broker {broker}: FAILED: {e.message}")
            return 1
        print(
            f"broker {broker}: ok (user {me['user']}, limit {me['limit']:g} GPU, "
            f"in use {me['in_use']:g}, fractions {', '.join(f'{f:g}' for f in me['fractions'])})"
        )
        alive = [a for a in pool["agents"] if a["alive"]]
        if not alive:
            ok = False
            print("pool: FAILED: no live agent is registered with the broker")
        agents = [a["address"] for a in alive]
    for address in agents:
        good, line = _agent_line(address)
        ok = ok and good
        print(line)
    print("all good" if ok else "some checks failed")
    return 0 if ok else 1
