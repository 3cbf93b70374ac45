"""Broker load test: many simulated kernels acquire and release GPU slices on loopback.

Starts a standalone broker (static tokens, its own SQLite file in a temp dir), registers fake
agents, then runs ``--kernels`` kernels, each acquiring a slice ``--rounds`` times, holding it
briefly and releasing it, from a pool of ``--workers`` threads. Reports the API round trip
(POST leases) and the grant latency (request to grant, queueing included) at p50/p99, and
throughput; fails if any lease is left behind.

    python benchmarks/broker_load.py --kernels 1000
    python benchmarks/broker_load.py --kernels 1000 --db postgresql   # a throw-away server

``--db postgresql`` starts PostgreSQL from Debian's binaries in a temp dir (the test suite's
``tests/broker/postgres.py``, run from the repository root), unix socket only, fsync off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from jupyter_elastic_gpu.agent.local import free_port
from jupyter_elastic_gpu.broker.client import BrokerClient


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=1000)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--workers", type=int, default=32, help="concurrent client threads")
    ap.add_argument("--rounds", type=int, default=2, help="acquire/release cycles per kernel")
    ap.add_argument("--hold", type=float, default=0.01, help="mean seconds a lease is held")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=4, help="GPUs per agent")
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--db-url", default=None, help="an existing database (overrides --db)")
    args = ap.parse_args(argv)
    if args.db == "postgresql" and not args.db_url:
        from tests.broker.postgres import PostgresServer, binaries

        if binaries() is None:
            sys.exit("--db postgresql: no PostgreSQL installed (apt-get install postgresql)")
        server = PostgresServer(binaries())
        try:
            args.db_url = server.new_database()
            return run(args)
        finally:
            server.stop()
    return run(args)


def run(args):

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # still stop the broker
    tmp = Path(tempfile.mkdtemp(prefix="broker-load-"))
    port = free_port()
    tokens = {f"tok-{i}": f"user{i}" for i in range(args.users)}
    cfg = tmp / "config.py"
    db_url = args.db_url or f"sqlite:///{tmp / 'broker.sqlite'}"
    cfg.write_text(
        f"c.ElasticGPUBroker.static_tokens = {tokens | {'tok-root': 'root'}!r}\n"
        "c.ElasticGPUBroker.admin_users = {'root'}\n"
        "c.ElasticGPUBroker.agent_token = 'agent'\n"
        f"c.ElasticGPUBroker.bind_url = 'http://127.0.0.1:{port}'\n"
        f"c.ElasticGPUBroker.db_url = {db_url!r}\n"
        "c.ElasticGPUBroker.default_limit = 1.0\n"
        "c.ElasticGPUBroker.log_level = 'WARN'\n"
    )
    log = open(tmp / "broker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/services/elastic-gpu/api/"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                sys.exit(f"broker exited: {(tmp / 'broker.log').read_text()[-2000:]}")
            try:
                requests.get(api + "openapi.json", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        agent = BrokerClient(api, "agent")
        for a in range(args.agents):
            agent.register_agent(
                f"agent{a}", f"127.0.0.1:{9000 + a}", [{"index": i} for i in range(args.gpus)]
            )

        done = threading.Event()

        def agents_alive():  # the broker drops agents that stop heartbeating
            while not done.wait(5):
                for a in range(args.agents):
                    agent.agent_heartbeat(f"agent{a}")

        threading.Thread(target=agents_alive, daemon=True).start()
        clients = {name: BrokerClient(api, tok, timeout=60) for tok, name in tokens.items()}
        users = list(clients)
        round_trips, grants, lock = [], [], threading.Lock()

        def kernel(k):
            rng = random.Random(k)
            client = clients[users[k % len(users)]]
            for r in range(args.rounds):
                t0 = time.perf_counter()
                lease = client.request(f"kernel-{k}-{r}", rng.choice([0.25, 0.25, 0.5, 1.0]))
                t1 = time.perf_counter()
                while lease["state"] == "queued":
                    lease = client.lease(lease["id"], wait=10)
                t2 = time.perf_counter()
                assert lease["state"] == "granted", lease
                time.sleep(rng.expovariate(1 / args.hold))
                client.release(lease["id"])
                with lock:
                    round_trips.append(t1 - t0)
                    grants.append(t2 - t0)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(kernel, range(args.kernels)))
        elapsed = time.perf_counter() - start
        done.set()

        root = BrokerClient(api, "tok-root")
        left = root.leases(all=True)
        slices = [s for a in root.pool()["agents"] for g in a["gpus"] for s in g["slices"]]
        result = {
            "database": db_url.split(":", 1)[0],
            "kernels": args.kernels,
            "leases": len(grants),
            "workers": args.workers,
            "pool_gpus": args.agents * args.gpus,
            "seconds": round(elapsed, 2),
            "leases_per_s": round(len(grants) / elapsed, 1),
            "post_leases_ms_p50": round(pct(round_trips, 0.5), 2),
            "post_leases_ms_p99": round(pct(round_trips, 0.99), 2),
            "grant_ms_p50": round(pct(grants, 0.5), 2),
            "grant_ms_p99": round(pct(grants, 0.99), 2),
            "grant_ms_mean": round(statistics.mean(grants) * 1000, 2),
            "leaked_leases": len(left),
            "leaked_slices": len(slices),
        }
        print(json.dumps(result, indent=2))
        assert not left and not slices, f"leaked: {left[:3]} {slices[:3]}"
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
