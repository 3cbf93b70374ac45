"""A "kernel" on the CPU node, stepped cell by cell by a test over stdin/stdout (JSON lines).

It is an ordinary program using the remote GPU through the broker, exactly as a notebook
kernel does: ``attach(lease_provider=BrokerLease(...))`` and plain ``device="cuda"`` torch.
Every reply carries wall-clock times so the test can measure recovery across processes.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from jupyter_elastic_gpu import remote
from jupyter_elastic_gpu.remote.lease import BrokerLease


def say(**msg):
    print(json.dumps(msg), flush=True)


def failure(e: BaseException) -> dict:
    return {"ok": False, "error_type": type(e).__name__, "error": str(e), "t_error": time.time()}


def main():
    broker, token = os.environ["DRIVER_BROKER"], os.environ["DRIVER_TOKEN"]
    # Heartbeat every second so the test's short broker timeouts never expire a live lease.
    lease = BrokerLease(
        broker,
        token,
        float(os.environ.get("DRIVER_FRACTION", 0.5)),
        heartbeat_interval=1.0,
        on_wait=lambda lease: None,
    )
    sess = remote.attach(lease_provider=lease, fraction=lease.fraction)
    kept: dict[str, tuple] = {}
    say(ready=True, session=sess.session_id, pid=os.getpid())
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        try:
            if op == "put":  # a tensor that will live only on the current agent
                torch.manual_seed(cmd.get("seed", 0))
                host = torch.randn(cmd.get("n", 64), cmd.get("n", 64))
                dev = host.to("cuda")
                float(dev.sum().item())
                kept[cmd["name"]] = (dev, host)
                say(ok=True, address=sess.address, lease=lease.lease and lease.lease["id"])
            elif op == "check":  # read it back: equal, or an error; never silently different
                dev, host = kept[cmd["name"]]
                say(ok=True, equal=bool(torch.equal(dev.cpu(), host)), address=sess.address)
            elif op == "loop":  # a cell doing GPU work with a sync point per step
                dev, _ = kept[cmd["name"]]
                t0, n = time.time(), 0
                say(started=True, t=t0)
                try:
                    while time.time() - t0 < cmd["seconds"]:
                        float((dev * 2 + 1).sum().item())
                        n += 1
                    say(ok=True, iters=n, t_end=time.time())
                except Exception as e:
                    say(**failure(e), iters=n)
            elif op == "retry":  # the next cells, until one runs (bounded)
                t0, errors = time.time(), []
                while time.time() - t0 < cmd["seconds"]:
                    try:
                        v = float((torch.ones(4, device="cuda") * 3).sum().item())
                        say(
                            ok=True,
                            value=v,
                            address=sess.address,
                            t_ok=time.time(),
                            errors=errors[-5:],
                            attempts=len(errors) + 1,
                            lease=lease.lease and lease.lease["id"],
                        )
                        break
                    except Exception as e:
                        errors.append(f"{type(e).__name__}: {e}")
                        time.sleep(0.2)
                else:
                    say(
                        ok=False,
                        error="no GPU op succeeded",
                        errors=errors[-5:],
                        t_error=time.time(),
                    )
            elif op == "release":
                sess.release()
                say(ok=True)
            elif op == "exit":
                say(ok=True)
                break
            else:
                say(ok=False, error=f"unknown command {op}")
        except Exception as e:
            say(**failure(e))
    remote.detach()


if __name__ == "__main__":
    main()
