"""Helpers for end-to-end tests: the shipped demo hub in a temp state dir, process-tree
cleanup, and a notebook runner that talks to a kernel over the single-user server's
websocket, as JupyterLab does.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import nbformat
import requests

from jupyter_elastic_gpu.agent.local import free_port

REPO = Path(__file__).resolve().parents[2]
HUB_CONFIG = REPO / "config" / "jupyterhub_config.py"
EXAMPLES = REPO / "examples"
DEMO_PASSWORDS = {
    "alice": "alice-demo",
    "bob": "bob-demo",
    "carol": "carol-demo",
    "admin": "admin-demo",
}


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first found through /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def kill_tree(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process (it stops its services and servers), then SIGKILL what is left of
    its process tree: managed services and servers run in sessions of their own."""
    tree = set(descendants(proc.pid))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    tree |= set(descendants(proc.pid))
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the proxy, in the Hub's group
    except (ProcessLookupError, PermissionError):
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


class DemoHub:
    """``jupyterhub -f config/jupyterhub_config.py``, unchanged, in a temp state dir on free
    ports with a CPU agent; ``ELASTIC_GPU_DEMO_API_TOKEN`` gives the test an admin token."""

    def __init__(self, tmp: Path, device: str = "cpu", attempts: int = 3):
        self.tmp = tmp
        self.state = tmp / "state"
        self.device = device
        self.admin_token = secrets.token_hex(16)
        self.log = tmp / "jupyterhub.log"
        self._tokens: dict[str, str] = {}
        # Free ports are picked before the processes bind them: on a busy machine another
        # process may take one in between. Then start again on other ports.
        for attempt in range(1, attempts + 1):
            try:
                self._start()
                return
            except (RuntimeError, TimeoutError):
                kill_tree(self.proc)
                taken = any(
                    m in self.logs(200_000)
                    for m in ("Failed to bind", "Address already in use", "EADDRINUSE", "is already in use")
                )
                if attempt == attempts or not taken:
                    raise
                with open(self.log, "a") as f:
                    f.write(f"\n--- a port was taken; starting again (attempt {attempt + 1})\n")

    def _start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            ELASTIC_GPU_STATE_DIR=str(self.state),
            ELASTIC_GPU_BIND_URL=self.url,
            ELASTIC_GPU_HUB_PORT=str(free_port()),
            ELASTIC_GPU_PROXY_API_PORT=str(free_port()),
            ELASTIC_GPU_BROKER_PORT=str(free_port()),
            ELASTIC_GPU_AGENT_PORT=str(free_port()),
            ELASTIC_GPU_AGENT_DEVICE=self.device,
            ELASTIC_GPU_DEMO_API_TOKEN=self.admin_token,
        )
        for k in ("ELASTIC_GPU_AGENT", "ELASTIC_GPU_BROKER_URL", "JUPYTERHUB_API_TOKEN"):
            env.pop(k, None)
        self.env = env
        self._tokens.clear()
        # from a directory that is not the repo: the config must find its files itself
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["jupyterhub", "-f", str(HUB_CONFIG)],
                cwd=self.tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait(lambda: self._get(f"{self.url}/hub/api/").status_code == 200, 90, "the Hub")
        # the local agent registers with the broker on its own
        self.wait(
            lambda: any(a["alive"] for a in self.broker("GET", "pool", "admin").json()["agents"]),
            90,
            "the local agent in the broker's pool",
        )

    # -- plumbing ---------------------------------------------------------------------------
    def logs(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def _get(self, url, **kw):
        try:
            return requests.get(url, timeout=10, **kw)
        except requests.RequestException as e:
            r = requests.Response()
            r.status_code, r.reason = 599, str(e)
            return r

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                value = predicate()
            except (requests.RequestException, KeyError, ValueError):
                value = None
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{what} not ready after {timeout}s; hub log:\n{self.logs()}")

    def api(self, method: str, path: str, token: str | None = None, **kw):
        r = requests.request(
            method,
            f"{self.url}/hub/api/{path}",
            headers={"Authorization": f"token {token or self.admin_token}"},
            timeout=30,
            **kw,
        )
        return r

    def token(self, user: str) -> str:
        if user not in self._tokens:
            r = self.api("POST", f"users/{user}/tokens", json={"note": "e2e test"})
            assert r.status_code == 201, r.text
            self._tokens[user] = r.json()["token"]
        return self._tokens[user]

    def broker(self, method: str, path: str, user: str, **kw) -> requests.Response:
        return requests.request(
            method,
            f"{self.url}/services/elastic-gpu/api/{path}",
            headers={"Authorization": f"token {self.token(user)}"},
            timeout=30,
            **kw,
        )

    def login(self, user: str, password: str) -> requests.Session:
        """Log in through the Hub's login form, as a browser does."""
        s = requests.Session()
        s.get(f"{self.url}/hub/login", timeout=10)
        r = s.post(
            f"{self.url}/hub/login",
            data={"username": user, "password": password, "_xsrf": s.cookies.get("_xsrf", "")},
            allow_redirects=False,
            timeout=30,
        )
        s.login_status = r.status_code
        return s

    def spawn(self, user: str, timeout: float = 180) -> str:
        r = self.api("POST", f"users/{user}/server")
        assert r.status_code in (201, 202), r.text

        def ready():
            server = self.api("GET", f"users/{user}").json()["servers"].get("")
            return server and server.get("ready")

        self.wait(ready, timeout, f"{user}'s server")
        return f"{self.url}/user/{user}/"

    def server(self, method: str, user: str, path: str, **kw) -> requests.Response:
        return requests.request(
            method,
            f"{self.url}/user/{user}/{path}",
            headers={"Authorization": f"token {self.token(user)}"},
            timeout=60,
            **kw,
        )

    def stop(self):
        for user in ("alice", "bob", "carol", "admin"):
            try:
                self.api("DELETE", f"users/{user}/server")
            except requests.RequestException:
                pass
        kill_tree(self.proc)


class WebsocketKernel:
    """Run code in a kernel of a single-user server over its websocket (JupyterLab's way)."""

    def __init__(self, base_url: str, kernel_id: str, token: str):
        import websocket

        ws_url = base_url.replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels"
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"{ws_url}?session_id={self.session}",
            header=[f"Authorization: token {token}"],
            timeout=5,
        )

    def close(self):
        self.ws.close()

    def _send(self, msg_type: str, content: dict) -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": msg_type,
                        "session": self.session,
                        "username": "e2e",
                        "version": "5.3",
                        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        return msg_id

    def wait_ready(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg_id = self._send("kernel_info_request", {})
            try:
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    msg = self._recv(end)
                    if (
                        msg
                        and msg["parent_header"].get("msg_id") == msg_id
                        and msg["msg_type"] == "kernel_info_reply"
                    ):
                        return msg["content"]
            except TimeoutError:
                pass
        raise TimeoutError("the kernel did not answer kernel_info in time")

    def _recv(self, deadline: float):
        import websocket

        self.ws.settimeout(max(0.05, min(5.0, deadline - time.monotonic())))
        try:
            raw = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            if time.monotonic() >= deadline:
                raise TimeoutError("no message from the kernel") from None
            return None
        return json.loads(raw) if isinstance(raw, str) else None

    def execute(self, code: str, timeout: float = 300) -> tuple[dict, list[dict]]:
        """Run ``code``; return (execute_reply content, nbformat outputs)."""
        msg_id = self._send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        deadline = time.monotonic() + timeout
        reply, outputs, idle = None, [], False
        while not (reply is not None and idle):
            msg = self._recv(deadline)
            if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "execute_reply":
                reply = content
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "stream":
                outputs.append(
                    nbformat.v4.new_output("stream", name=content["name"], text=content["text"])
                )
            elif kind in ("execute_result", "display_data"):
                outputs.append(
                    nbformat.v4.new_output(
                        kind,
                        data=content.get("data", {}),
                        metadata=content.get("metadata", {}),
                        **(
                            {"execution_count": content.get("execution_count")}
                            if kind == "execute_result"
                            else {}
                        ),
                    )
                )
            elif kind == "error":
                outputs.append(
                    nbformat.v4.new_output(
                        "error",
                        ename=content["ename"],
                        evalue=content["evalue"],
                        traceback=content["traceback"],
                    )
                )
        return reply, outputs

    def run_notebook(self, path: Path, timeout_per_cell: float = 300) -> nbformat.NotebookNode:
        """Execute every code cell of ``path`` top to bottom; raise on the first error."""
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            reply, outputs = self.execute(cell.source, timeout_per_cell)
            cell.outputs = outputs
            cell.execution_count = reply.get("execution_count")
            if reply.get("status") != "ok":
                tb = "\n".join(
                    o.get("traceback", [""])[-1] for o in outputs if o.output_type == "error"
                )
                raise AssertionError(
                    f"{path.name} cell {i} failed: {reply.get('ename')}: {reply.get('evalue')}\n{tb}"
                )
        nbformat.validate(nb)
        return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o:
                parts.append(o.data.get("text/plain", ""))
    return "".join(parts)
