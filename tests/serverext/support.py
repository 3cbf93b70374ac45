"""Test support for the server extension and the Lab UI (reused by tests/ui).

- :class:`FakeBroker`: a tiny broker speaking the REST contract of docs/contracts.md
  (``me``, ``pool``, ``leases``, ``usage``) in a thread of the test process. The broker
  is another component; this stands in for it at the edge. Its state is plain data the
  test can change while the UI polls it, and it can be stopped and restarted on the same
  port to show the "unreachable" state.
- :class:`JupyterProcess`: a real ``jupyter server`` / ``jupyter lab`` in a subprocess on a
  free loopback port, token auth, temporary config/data/runtime dirs, this extension
  enabled, stopped (with its kernels) by ``stop()``.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jupyter_elastic_gpu.agent.local import free_port

REPO = Path(__file__).resolve().parents[2]
BUILT_LABEXTENSION = REPO / "jupyter_elastic_gpu" / "labextension"
API_PREFIX = "/services/elastic-gpu/api/"
GiB = 1 << 30


# ----------------------------------------------------------------------------- fake broker


def demo_state(now: float | None = None) -> dict[str, Any]:
    """A small, realistic world: 2 agents, 3 GPUs, alice (non-admin), bob, carol, admin."""
    now = time.time() if now is None else now
    agent1 = {"id": "gpu-node-1", "address": "10.0.0.11:7070"}
    agent2 = {"id": "gpu-node-2", "address": "10.0.0.12:7070"}

    def lease(id, user, session, notebook, fraction, state, agent=None, gpus=(), **kw):
        return {
            "id": id,
            "user": user,
            "session": session,
            "kernel_name": f"python3-gpu-{fraction:g}",
            "notebook": notebook,
            "fraction": fraction,
            "state": state,
            "blocked_by": [],
            "agent": agent if state == "granted" else None,
            "gpus": list(gpus) if state == "granted" else [],
            "created": now - 600,
            "granted_at": now - 185 if state == "granted" else None,
            "expires": now + 60,
            **kw,
        }

    leases = [
        lease(
            "L-a1", "alice", "kern-alice-train", "projects/train.ipynb", 0.5, "granted", agent1, [0]
        ),
        lease("L-b1", "bob", "kern-bob-1", "bob/finetune.ipynb", 0.25, "granted", agent1, [0]),
        lease("L-c1", "carol", "kern-carol-1", "carol/llm.ipynb", 1.0, "granted", agent1, [1]),
        lease(
            "L-a2",
            "alice",
            "kern-alice-eval",
            "projects/eval.ipynb",
            0.5,
            "queued",
            position=2,
            reason="quota",
            blocked_by=[
                {
                    "id": "L-a1",
                    "session": "kern-alice-train",
                    "notebook": "projects/train.ipynb",
                    "fraction": 0.5,
                }
            ],
        ),
    ]
    agents = [
        {
            **agent1,
            "device": "cuda",
            "alive": True,
            "last_heartbeat": now - 2,
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-1111",
                    "name": "NVIDIA H100 80GB HBM3",
                    "memory_total": 80 * GiB,
                    "memory_used": 31 * GiB,
                    "utilization": 64,
                    "mig": False,
                },
                {
                    "index": 1,
                    "uuid": "GPU-2222",
                    "name": "NVIDIA H100 80GB HBM3",
                    "memory_total": 80 * GiB,
                    "memory_used": 70 * GiB,
                    "utilization": 97,
                    "mig": False,
                },
            ],
        },
        {
            **agent2,
            "device": "cuda",
            "alive": True,
            "last_heartbeat": now - 1,
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-3333",
                    "name": "NVIDIA L4",
                    "memory_total": 24 * GiB,
                    "memory_used": 1 * GiB,
                    "utilization": 0,
                    "mig": False,
                }
            ],
        },
    ]
    return {
        "tokens": {"alice-token": "alice", "admin-token": "admin"},
        "admins": ["admin"],
        "limits": {"alice": 1.0, "bob": 0.5, "carol": 2.0, "admin": 2.0},
        "fractions": [0.25, 0.5, 1, 2],
        "max_lease": 2.0,
        "leases": leases,
        "agents": agents,
        "usage": {"alice": 5400.0, "bob": 12600.0, "carol": 30240.0},
        # data-plane sessions the agents report (for "idle sessions swapped to host")
        "sessions": {
            "gpu-node-1": [
                {
                    "session": "kern-alice-train",
                    "user": "alice",
                    "attached": True,
                    "fraction": 0.5,
                    "memory": 6 * GiB,
                    "swapped": False,
                },
                {
                    "session": "kern-alice-old",
                    "user": "alice",
                    "attached": False,
                    "fraction": 0.25,
                    "notebook": "scratch/explore.ipynb",
                    "memory": 3 * GiB,
                    "swapped": True,
                },
                {
                    "session": "kern-bob-1",
                    "user": "bob",
                    "attached": True,
                    "fraction": 0.25,
                    "memory": GiB,
                    "swapped": False,
                },
            ]
        },
    }


class FakeBroker:
    """The broker REST API (docs/contracts.md) over plain data, in a thread."""

    def __init__(self, state: dict[str, Any] | None = None, port: int | None = None):
        self.state = state if state is not None else demo_state()
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.fail_status: int | None = None  # answer every request with this (e.g. 500)
        self.delay = 0.0
        self.delaying = threading.Event()  # set when a request starts waiting out the delay
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    # -- lifecycle
    def start(self) -> FakeBroker:
        broker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                broker._handle(self)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> FakeBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the API
    def _user(self, auth: str | None) -> str | None:
        if not auth or not auth.startswith("token "):
            return None
        return self.state["tokens"].get(auth[len("token ") :])

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(req.path)
        auth = req.headers.get("Authorization")
        with self.lock:
            self.requests.append({"path": parts.path, "query": parts.query, "auth": auth})
        if self.delay:
            self.delaying.set()
            time.sleep(self.delay)  # the slow broker being simulated, not a synchronisation
        if self.fail_status:
            return self._send(req, self.fail_status, {"message": "broker exploded"})
        if not parts.path.startswith(API_PREFIX):
            return self._send(req, 404, {"message": "not found"})
        user = self._user(auth)
        if user is None:
            return self._send(req, 403, {"message": "invalid or missing token"})
        path = parts.path[len(API_PREFIX) :]
        query = parse_qs(parts.query)
        with self.lock:
            state = copy.deepcopy(self.state)
        admin = user in state["admins"]
        if path == "me":
            mine = [lease for lease in state["leases"] if lease["user"] == user]
            granted = [self._own(lease) for lease in mine if lease["state"] == "granted"]
            return self._send(
                req,
                200,
                {
                    "user": user,
                    "admin": admin,
                    "limit": state["limits"].get(user),
                    "in_use": sum(lease["fraction"] for lease in granted),
                    "fractions": state["fractions"],
                    "max_lease": state["max_lease"],
                    "leases": granted,
                    "queue": [self._own(lease) for lease in mine if lease["state"] == "queued"],
                },
            )
        if path == "pool":
            return self._send(req, 200, {"agents": self._pool(state, user, admin)})
        if path == "leases":
            if query.get("all", ["false"])[0] == "true":
                if not admin:
                    return self._send(req, 403, {"message": "only admins can list all leases"})
                return self._send(req, 200, {"leases": state["leases"]})
            mine = [self._own(lease) for lease in state["leases"] if lease["user"] == user]
            return self._send(req, 200, {"leases": mine})
        if path == "usage":
            if not admin:
                return self._send(req, 403, {"message": "usage is for admins only"})
            # "limits" is beyond the contract's {"users", "groups"}: the sidebar shows it
            # when the broker sends it ("—" otherwise).
            return self._send(
                req, 200, {"users": state["usage"], "groups": {}, "limits": state["limits"]}
            )
        return self._send(req, 404, {"message": f"no such endpoint: {path}"})

    @staticmethod
    def _own(lease: dict[str, Any]) -> dict[str, Any]:
        if lease["state"] == "granted":  # the owner sees the data-plane token
            return dict(lease, token=f"egl1.SECRET-LEASE-TOKEN-{lease['id']}")
        return lease

    @staticmethod
    def _pool(state: dict[str, Any], user: str, admin: bool) -> list[dict[str, Any]]:
        agents = []
        for a in state["agents"]:
            a = copy.deepcopy(a)
            for g in a["gpus"]:
                slices = [
                    {
                        "lease": lease["id"],
                        "fraction": lease["fraction"],
                        "user": lease["user"] if admin or lease["user"] == user else None,
                    }
                    for lease in state["leases"]
                    if lease["state"] == "granted"
                    and (lease.get("agent") or {}).get("id") == a["id"]
                    and g["index"] in lease.get("gpus", [])
                ]
                g["slices"] = slices
                g["free"] = max(0.0, 1.0 - sum(s["fraction"] for s in slices))
            sessions = state.get("sessions", {}).get(a["id"])
            if sessions is not None:
                a["sessions"] = [s for s in sessions if admin or s.get("user") in (user, None)]
            agents.append(a)
        return agents

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        try:
            req.send_response(status)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


# ----------------------------------------------------------------------------- jupyter


class JupyterProcess:
    """A real ``jupyter server`` (app="server") or ``jupyter lab`` (app="lab") subprocess.

    ``env`` is added to the environment (e.g. ``ELASTIC_GPU_BROKER_URL``,
    ``JUPYTERHUB_API_TOKEN``). With ``labextension_from_repo`` the Lab serves this checkout's
    build (``jupyter_elastic_gpu/labextension``) ahead of any installed copy.
    ``server_config`` is Python appended to the server's ``jupyter_server_config.py``.
    """

    def __init__(
        self,
        root: Path,
        *,
        app: str = "server",
        env: dict[str, str] | None = None,
        labextension_from_repo: bool = True,
        server_config: str = "",
        kernelspecs: dict[str, dict[str, Any]] | None = None,
        timeout: float = 90.0,
    ):
        self.root = Path(root)
        self.app = app
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.dirs = {
            name: self.root / name for name in ("config", "data", "runtime", "notebooks", "path")
        }
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        confd = self.dirs["config"] / "jupyter_server_config.d"
        confd.mkdir(exist_ok=True)
        (confd / "jupyter_elastic_gpu.json").write_text(
            json.dumps(
                {"ServerApp": {"jpserver_extensions": {"jupyter_elastic_gpu.serverext": True}}}
            )
        )
        (self.dirs["config"] / "jupyter_server_config.py").write_text(server_config)
        if app == "lab":
            # No news/announcement or update checks, no workspace from a previous test.
            lab_settings = self.dirs["config"] / "lab" / "user-settings" / "@jupyterlab"
            (lab_settings / "apputils-extension").mkdir(parents=True, exist_ok=True)
            (lab_settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
                json.dumps({"fetchNews": "false", "checkForUpdates": False})
            )
        if labextension_from_repo and BUILT_LABEXTENSION.exists():
            ext_dir = self.dirs["data"] / "labextensions"
            ext_dir.mkdir(exist_ok=True)
            link = ext_dir / "jupyter-elastic-gpu"
            if not link.exists():
                link.symlink_to(BUILT_LABEXTENSION, target_is_directory=True)
        for name, spec in (kernelspecs or {}).items():
            kdir = self.dirs["data"] / "kernels" / name
            kdir.mkdir(parents=True, exist_ok=True)
            (kdir / "kernel.json").write_text(json.dumps(spec))
        self.env = dict(os.environ)
        for key in (
            "ELASTIC_GPU_BROKER_URL",
            "ELASTIC_GPU_AGENT",
            "JUPYTERHUB_API_TOKEN",
            "JUPYTERHUB_API_URL",
            "JUPYTER_PATH",
        ):
            self.env.pop(key, None)
        self.env.update(
            JUPYTER_CONFIG_DIR=str(self.dirs["config"]),
            JUPYTER_DATA_DIR=str(self.dirs["data"]),
            JUPYTER_RUNTIME_DIR=str(self.dirs["runtime"]),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        self.env.update(env or {})
        module = "jupyterlab" if app == "lab" else "jupyter_server"
        self.log_path = self.root / f"{app}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.dirs['notebooks']}",
                "--ServerApp.shutdown_no_activity_timeout=0",
                *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter {self.app} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                status, _ = self.request("GET", "api/status")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"jupyter {self.app} not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = "default"
    ) -> tuple[int, Any]:
        """One HTTP call to the server; returns (status, parsed JSON or None)."""
        headers = {"Content-Type": "application/json"}
        tok = self.token if token == "default" else token
        if tok:
            headers["Authorization"] = f"token {tok}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self) -> None:
        """Stop the server (it shuts its kernels down), then anything left in its group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # jupyter shuts its kernels down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # kernels in the group we created
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def __enter__(self) -> JupyterProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# A stand-in for the GPU provisioner (another component): kernelspecs keep the real
# metadata ({"provisioner_name": "elastic-gpu-provisioner", "config": {"gpu": ...}}) that
# the server extension and the Lab read, but the kernel process is launched locally.
LOCAL_GPU_PROVISIONER_SHIM = """
from importlib.metadata import EntryPoint
from jupyter_client.provisioning.factory import KernelProvisionerFactory

_f = KernelProvisionerFactory.instance()
_f.provisioners["elastic-gpu-provisioner"] = EntryPoint(
    name="elastic-gpu-provisioner",
    value="tests.serverext.shim_provisioner:ShimGPUProvisioner",
    group="jupyter_client.kernel_provisioners",
)
"""


def gpu_kernelspec(fraction: float) -> dict[str, Any]:
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 (GPU: {fraction:g})",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "elastic-gpu-provisioner",
                "config": {"gpu": fraction},
            }
        },
    }
