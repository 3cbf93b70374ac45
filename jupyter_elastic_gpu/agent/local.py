"""Start an agent as a child process on a free loopback port (tests, benchmarks, demos)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class LocalAgent:
    """``jupyter-elastic-gpu agent --device DEVICE`` on 127.0.0.1; ``stop()`` ends it."""

    def __init__(self, *extra, device="cpu", env=None, quiet=False):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        agent_env = dict(os.environ, **(env or {}))
        if device == "cuda":  # the agent needs the GPU even where its parent hides it
            agent_env.pop("CUDA_VISIBLE_DEVICES", None)
        cmd = [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "agent",
            "--device",
            device,
            "--listen",
            self.address,
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd, env=agent_env, start_new_session=True, stderr=subprocess.DEVNULL if quiet else None
        )
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
