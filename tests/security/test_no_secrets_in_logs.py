"""No secret ever reaches a log: run broker (debug logging), agent and a client program with
known secrets, exercise success and refusal paths, and search every byte they printed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import requests

from tests.conftest import AgentProcess

from .conftest import (
    AGENT_TOKEN,
    LEASE_SECRET,
    USER_TOKEN,
    hello,
    start_broker,
    stop_process,
    token,
)


def test_secrets_never_appear_in_agent_broker_or_client_output(tmp_path):
    broker, api = start_broker(tmp_path, extra="c.Application.log_level = 'DEBUG'\n")
    (tmp_path / "secret").write_text(LEASE_SECRET)
    agent_log = open(tmp_path / "agent.log", "wb")
    agent = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU_")}
        agent = AgentProcess(
            "--lease-secret-file",
            str(tmp_path / "secret"),
            "--agent-id",
            "a-logs",
            "--broker-url",
            api,
            "--agent-token",
            AGENT_TOKEN,
            "--session-grace",
            "1",
            device="cpu",
            env=env | {"PYTHONUNBUFFERED": "1"},
        )
        # (AgentProcess inherits our stdio; restart it into a file we can search.)
        agent.stop()
        agent.proc = subprocess.Popen(
            agent.proc.args,
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        from tests.conftest import wait_for_port

        wait_for_port(agent.port, agent.proc)
        user = {"Authorization": f"token {USER_TOKEN['alice']}"}
        for _ in range(100):  # the agent registers within a second or so
            if any(
                a["alive"]
                for a in requests.get(api + "pool", headers=user, timeout=5).json()["agents"]
            ):
                break
            import time

            time.sleep(0.1)

        prog = tmp_path / "prog.py"
        prog.write_text(
            textwrap.dedent("""
            import torch
            x = torch.arange(6.0, device="cuda").reshape(2, 3)
            print("sum", (x * 2).sum().item())
            print(torch.cuda.get_device_name(0))
        """)
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "jupyter_elastic_gpu",
                "run",
                "--gpu",
                "0.5",
                "--broker",
                api,
                "--",
                sys.executable,
                str(prog),
            ],
            env=env | {"JUPYTERHUB_API_TOKEN": USER_TOKEN["alice"]},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert "sum 30.0" in run.stdout

        # Refusals: a wrong user token, a wrong agent token, forged and stolen lease tokens.
        requests.get(
            api + "me", headers={"Authorization": f"token {USER_TOKEN['alice']}x"}, timeout=5
        )
        requests.post(
            api + "agents",
            json={"id": "x"},
            timeout=5,
            headers={"Authorization": f"token {AGENT_TOKEN}x"},
        )
        for tok in (
            token(secret="forged", agent="a-logs", session="s1"),
            token(agent="a-logs", session="other"),
            token(agent="a-logs", session="s1", ttl=-9),
        ):
            s, reply = hello(agent.address, "s1", "session-secret-xyz", tok)
            s.close()
            assert "error" in reply
            assert "egl1." not in reply["error"]["message"]  # refusals do not echo the token
    finally:
        if agent is not None:
            agent.stop()
        stop_process(broker)
        agent_log.close()
    output = {
        "client": run.stdout + run.stderr,
        "agent": (tmp_path / "agent.log").read_text(errors="replace"),
        "broker": (tmp_path / "broker.log").read_text(errors="replace"),
    }
    assert "registered with the broker" in output["agent"]
    assert "403" in output["broker"]  # the refusals were logged, just without their tokens
    for name, text in output.items():
        for secret in (
            LEASE_SECRET,
            AGENT_TOKEN,
            *USER_TOKEN.values(),
            "egl1.",
            "session-secret-xyz",
        ):
            assert secret not in text, f"{secret!r} appears in the {name}'s output"
