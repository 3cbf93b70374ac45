"""Through a real jupyter_server, as JupyterLab uses it: the picker, a notebook session, a GPU cell."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

import pytest
import requests
from tornado.websocket import websocket_connect

from tests.broker.conftest import start, stop, wait_http
from tests.conftest import free_port

from .conftest import agent_session, leases_of, wait_until


@pytest.fixture
def server(tmp_path, kernels_dir, broker):
    port = free_port()
    token = uuid.uuid4().hex
    cfg = tmp_path / "jupyter_server_config.py"
    cfg.write_text(
        "c.ServerApp.kernel_spec_manager_class = "
        "'jupyter_elastic_gpu.provisioner.kernelspec_manager.ElasticGPUKernelSpecManager'\n"
        "c.ServerApp.open_browser = False\n"
    )
    (tmp_path / "nb").mkdir()
    env = {
        **os.environ,
        "JUPYTER_PATH": str(kernels_dir.parent),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "ELASTIC_GPU_BROKER_URL": broker.api,
        "JUPYTERHUB_API_TOKEN": "tok-alice",  # what a Hub-spawned server has
        "HOME": str(tmp_path),  # the server's root, as under JupyterHub
    }
    env.pop("ELASTIC_GPU_AGENT", None)
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "jupyter_server", f"--config={cfg}", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root"]  # fmt: skip
    proc = start(cmd, log, tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/status?token={token}", proc, log)
        yield url, token
    finally:
        stop(proc)


def api(server, method, path, **kw):
    url, token = server
    r = requests.request(
        method, f"{url}/api/{path}", headers={"Authorization": f"token {token}"}, timeout=30, **kw
    )
    r.raise_for_status()
    return r.json() if r.content else None


async def execute(server, kernel_id: str, code: str, timeout=60) -> tuple[dict, str]:
    url, token = server
    ws = await websocket_connect(f"ws{url[4:]}/api/kernels/{kernel_id}/channels?token={token}")
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex, "username": "test",
              "version": "5.3", "date": ""}  # fmt: skip
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
    }
    ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                                 "channel": "shell", "buffers": []}))  # fmt: skip
    out, reply = [], None
    deadline = time.monotonic() + timeout
    try:
        while reply is None:
            raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
    finally:
        ws.close()
    return reply, "".join(out)


def test_jupyter_server_picker_session_and_gpu_cell(server, broker):
    specs = api(server, "GET", "kernelspecs")["kernelspecs"]
    gpu = sorted(n for n in specs if n.startswith("python3-gpu-"))
    assert gpu == ["python3-gpu-0.25", "python3-gpu-0.5"], (
        "alice (limit 0.5) sees only what she may take"
    )
    assert specs["python3-gpu-0.5"]["spec"]["display_name"] == "Python 3 (GPU: 0.5)"
    assert "logo-svg" in specs["python3-gpu-0.5"]["resources"]

    session = api(server, "POST", "sessions",
                  json={"path": "nb/train.ipynb", "type": "notebook", "name": "train.ipynb",
                        "kernel": {"name": "python3-gpu-0.5"}})  # fmt: skip
    kernel_id = session["kernel"]["id"]
    reply, out = asyncio.run(execute(server, kernel_id, "import torch, time\nx = torch.ones(4, device='cuda')\n"
                                                         "print(x.sum().item())\ntime.sleep(0.5)"))  # fmt: skip
    assert reply["status"] == "ok" and "4.0" in out, (reply, out)
    wait_until(
        lambda: leases_of(broker, kernel_id) == [],
        timeout=5,
        what="lease given back after the cell",
    )

    # The broker knows which notebook holds the lease (what a queued user is told).
    async def hold_and_look():
        cell = asyncio.create_task(execute(server, kernel_id, "x.sum().item()\ntime.sleep(2)"))
        lease = await asyncio.to_thread(
            wait_until, lambda: leases_of(broker, kernel_id), what="a lease"
        )
        reply, _ = await cell
        return lease[0], reply

    lease, reply = asyncio.run(hold_and_look())
    assert reply["status"] == "ok"
    assert (
        lease["notebook"] == os.path.join("nb", "train.ipynb")
        and lease["kernel_name"] == "python3-gpu-0.5"
    )

    api(server, "DELETE", f"sessions/{session['id']}")
    assert leases_of(broker, kernel_id) == []
    assert agent_session(broker.agent.address, kernel_id) is None, (
        "shutdown frees the agent session"
    )
