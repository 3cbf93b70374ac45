# jupyter-elastic-gpu: a working single-machine deployment.
#
#     jupyterhub -f config/jupyterhub_config.py        (from anywhere; paths are relative to this file)
#
# then open http://127.0.0.1:8000 and log in as a demo user:
#
#     user   password     GPU limit                       notes
#     alice  alice-demo   0.5  (default_limit)
#     bob    bob-demo     1.0  (group "research")
#     carol  carol-demo   0.25 (user_limits)
#     admin  admin-demo   1.0  (user_limits)              JupyterHub admin: sees everyone's leases
#
# What runs (all on 127.0.0.1):
#   - the Hub + configurable-http-proxy        public URL http://127.0.0.1:8000
#   - the broker, Hub service "elastic-gpu"    http://127.0.0.1:8090/services/elastic-gpu/
#   - a local agent, Hub service "elastic-gpu-agent" on 127.0.0.1:7070
#     (`jupyter-elastic-gpu agent --device auto`: a CUDA GPU if there is one, else the CPU;
#     its first log line says which)
#   - per user, a JupyterLab single-user server (SimpleLocalProcessSpawner: no Unix accounts,
#     homes under the state dir) with the kernels "Python 3 (GPU: 0.25 / 0.5 / 1)", the GPU
#     sidebar and the example notebooks copied into the home.
#
# State (Hub + broker SQLite databases, cookie secret, generated secrets, homes, kernelspecs)
# lives in .elastic-gpu-state/ next to config/ (gitignored), or in $ELASTIC_GPU_STATE_DIR.
# Delete that directory to start from scratch.
#
# Environment overrides (defaults in brackets), e.g. to run two demos side by side:
#   ELASTIC_GPU_STATE_DIR        [<repo>/.elastic-gpu-state]
#   ELASTIC_GPU_BIND_URL         [http://127.0.0.1:8000]   public URL of the Hub
#   ELASTIC_GPU_HUB_PORT         [8081]   Hub API (internal)
#   ELASTIC_GPU_PROXY_API_PORT   [8001]   proxy REST API (internal)
#   ELASTIC_GPU_BROKER_PORT      [8090]
#   ELASTIC_GPU_AGENT_PORT       [7070]
#   ELASTIC_GPU_AGENT_DEVICE     [auto]   auto | cuda | cpu
#   ELASTIC_GPU_DATA_TLS         [1]      1: mutual TLS between kernels and the agent (a private CA
#                                         and certificates made in the state dir's tls/); 0: plaintext
#   ELASTIC_GPU_DEMO_API_TOKEN   [unset]  if set (8+ characters): an admin API token (service "demo-api"),
#                                         for scripts and the end-to-end test
#
# This is a demo: SimpleLocalProcessSpawner gives users no isolation from each other and
# the passwords are in this file. config/jupyterhub_config.production.py is the shape of a
# real deployment; docs/admin-guide.md explains both.

import os
import secrets
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from jupyterhub.auth import DummyAuthenticator
from traitlets.config.loader import PyFileConfigLoader

from jupyter_elastic_gpu.lifecycle import check_ports

c = get_config()  # noqa: F821  (provided by traitlets when it loads this file)

HERE = Path(__file__).resolve().parent  # config/
REPO = HERE.parent
STATE = Path(os.environ.get("ELASTIC_GPU_STATE_DIR") or REPO / ".elastic-gpu-state").resolve()
STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
os.chmod(STATE, 0o700)

BIND_URL = os.environ.get("ELASTIC_GPU_BIND_URL", "http://127.0.0.1:8000")
HUB_PORT = int(os.environ.get("ELASTIC_GPU_HUB_PORT", "8081"))
PROXY_API_PORT = int(os.environ.get("ELASTIC_GPU_PROXY_API_PORT", "8001"))
BROKER_PORT = int(os.environ.get("ELASTIC_GPU_BROKER_PORT", "8090"))
AGENT_PORT = int(os.environ.get("ELASTIC_GPU_AGENT_PORT", "7070"))
AGENT_DEVICE = os.environ.get("ELASTIC_GPU_AGENT_DEVICE", "auto")

# Before anything starts: a port still held (an old proxy or agent of a hub that was killed)
# is one line saying which and what to do, not EADDRINUSE or a 403 from the old proxy later.
# The proxy named in the pid file is fine: JupyterHub replaces it itself.
_PROXY_PID_FILE = STATE / "jupyterhub-proxy.pid"
_proxy_pid = _PROXY_PID_FILE.read_text().strip() if _PROXY_PID_FILE.exists() else ""
_taken = check_ports(
    {
        f"public URL {BIND_URL}": (urlparse(BIND_URL).hostname, urlparse(BIND_URL).port or 80),
        "ELASTIC_GPU_HUB_PORT": ("127.0.0.1", HUB_PORT),
        "ELASTIC_GPU_PROXY_API_PORT": ("127.0.0.1", PROXY_API_PORT),
        "ELASTIC_GPU_BROKER_PORT": ("127.0.0.1", BROKER_PORT),
        "ELASTIC_GPU_AGENT_PORT": ("127.0.0.1", AGENT_PORT),
    },
    replaceable={int(_proxy_pid)} if _proxy_pid.isdigit() else set(),
)
if _taken:
    sys.exit(f"jupyterhub: {_taken}")

BROKER_CONFIG = HERE / "elastic_gpu_config.py"
BROKER_URL = f"http://127.0.0.1:{BROKER_PORT}"
# The agent reaches the broker directly (loopback); kernels, the sidebar, browsers and
# `jupyter-elastic-gpu run --broker` go through the proxy: BIND_URL + the same path.
BROKER_API = f"{BROKER_URL}/services/elastic-gpu/api/"


def _secret(name: str) -> str:
    """A secret kept in the state dir, generated at first start (mode 600, never committed)."""
    path = STATE / name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip()


LEASE_SECRET = _secret("lease_secret")  # broker signs lease tokens, the agent verifies them
AGENT_TOKEN = _secret("agent_token")  # the agent registers with the broker with it

# TLS on the data plane, the way JupyterHub's internal_ssl does it: a CA only this deployment
# trusts, a certificate for the agent, one for kernels (the agent requires it).
DATA_TLS = os.environ.get("ELASTIC_GPU_DATA_TLS", "1") not in ("0", "", "false", "no")
TLS_DIR = STATE / "tls"
if DATA_TLS and not (TLS_DIR / "client.key").exists():
    from jupyter_elastic_gpu.agent.certs import make_certs

    make_certs(TLS_DIR, hosts=("localhost", "127.0.0.1"), days=3650)
AGENT_TLS_ARGS = (
    ["--tls-cert", str(TLS_DIR / "agent.crt"), "--tls-key", str(TLS_DIR / "agent.key"),
     "--tls-client-ca", str(TLS_DIR / "ca.crt")]
    if DATA_TLS
    else []
)  # fmt: skip
KERNEL_TLS_ENV = {"ELASTIC_GPU_TLS_DIR": str(TLS_DIR)} if DATA_TLS else {}

# -- the Hub -----------------------------------------------------------------------------------
c.JupyterHub.bind_url = BIND_URL
# The address users reach the proxy by. JupyterHub passes it to single-user servers, whose
# kernels then find the broker through the proxy at <public URL>/services/elastic-gpu/api/
# without being told (provisioner/endpoints.py); behind a domain, set it to that URL.
c.JupyterHub.public_url = BIND_URL.rstrip("/") + "/"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = HUB_PORT
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{PROXY_API_PORT}"
c.ConfigurableHTTPProxy.pid_file = str(_PROXY_PID_FILE)
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")

# -- demo users --------------------------------------------------------------------------------
DEMO_PASSWORDS = {
    "alice": "alice-demo",
    "bob": "bob-demo",
    "carol": "carol-demo",
    "admin": "admin-demo",
}


class DemoAuthenticator(DummyAuthenticator):
    """DummyAuthenticator with one documented password per demo user."""

    async def authenticate(self, handler, data):
        name = (data.get("username") or "").strip()
        if name in DEMO_PASSWORDS and data.get("password") == DEMO_PASSWORDS[name]:
            return name
        return None


c.JupyterHub.authenticator_class = DemoAuthenticator
c.Authenticator.allowed_users = {"alice", "bob", "carol"}
c.Authenticator.admin_users = {"admin"}
# bob's limit comes from this group (c.ElasticGPUBroker.group_limits in elastic_gpu_config.py)
c.JupyterHub.load_groups = {"research": {"users": ["bob"]}}

# -- the broker and the agent: managed Hub services --------------------------------------------
# ELASTIC_GPU_EXIT_WITH_PARENT: broker and agent stop when the Hub dies (even by kill -9),
# so that they never hold their ports against the next start.
_agent_env = {
    "HOME": str(STATE),
    "ELASTIC_GPU_AGENT_TOKEN": AGENT_TOKEN,
    "ELASTIC_GPU_EXIT_WITH_PARENT": "1",
}
for _name in ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "CUDA_HOME"):
    if _name in os.environ:
        _agent_env[_name] = os.environ[_name]

c.JupyterHub.services = [
    {
        "name": "elastic-gpu",
        "url": BROKER_URL,
        "command": [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(BROKER_CONFIG)],
        "cwd": str(STATE),
        "environment": {
            "ELASTIC_GPU_STATE_DIR": str(STATE),
            "ELASTIC_GPU_EXIT_WITH_PARENT": "1",
            "ELASTIC_GPU_LEASE_SECRET": LEASE_SECRET,
            "ELASTIC_GPU_AGENT_TOKEN": AGENT_TOKEN,
        },
    },
    {
        "name": "elastic-gpu-agent",
        "command": [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "agent",
            "--device",
            AGENT_DEVICE,
            "--listen",
            f"127.0.0.1:{AGENT_PORT}",
            "--agent-id",
            "local",
            "--broker-url",
            BROKER_API,
            "--lease-secret-file",
            str(STATE / "lease_secret"),
            *AGENT_TLS_ARGS,
        ],  # fmt: skip
        "cwd": str(STATE),
        "environment": _agent_env,
    },
]
c.JupyterHub.load_roles = [
    # the broker reads users' admin flag and groups with its own token
    {
        "name": "elastic-gpu-service",
        "scopes": ["read:users", "read:groups"],
        "services": ["elastic-gpu"],
    },
    # users (and the tokens of their servers and kernels) may call the broker
    {"name": "user", "scopes": ["self", "access:services!service=elastic-gpu"]},
]

_demo_token = os.environ.get("ELASTIC_GPU_DEMO_API_TOKEN")
if _demo_token:  # an admin token for scripts and tests; unset: no such service
    c.JupyterHub.services.append({"name": "demo-api", "api_token": _demo_token})
    c.JupyterHub.load_roles.append(
        {
            "name": "demo-api",
            "scopes": ["admin:users", "admin:servers", "tokens", "read:groups", "access:services"],
            "services": ["demo-api"],
        }
    )

# -- single-user servers: JupyterLab with GPU kernels and the sidebar --------------------------
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = str(STATE / "homes" / "{username}")
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
if os.geteuid() == 0:
    # SimpleLocalProcessSpawner runs servers as the Hub's own user; as root (containers, CI)
    # jupyter_server refuses to start unless told it is fine.
    c.Spawner.args = ["--allow-root"]
c.Spawner.http_timeout = 120  # JupyterLab can take a while on a small, busy machine
c.Spawner.start_timeout = 120
# the server's token (kernels and the sidebar use it at the broker) may call the broker too
c.Spawner.server_token_scopes = [
    "access:services!service=elastic-gpu",
    "users:activity!user",
    "access:servers!server",
]

# "Python 3 (GPU: x)" kernelspecs, one per fraction the broker offers, in the state dir.
_broker_cfg = PyFileConfigLoader(BROKER_CONFIG.name, path=str(HERE)).load_config()
FRACTIONS = list(_broker_cfg.ElasticGPUBroker.get("fractions", [0.25, 0.5, 1.0]))
KERNEL_PREFIX = STATE / "jupyter"
shutil.rmtree(KERNEL_PREFIX / "share" / "jupyter" / "kernels", ignore_errors=True)
from jupyter_elastic_gpu.provisioner.kernelspecs import ElasticGPUKernelSpecs  # noqa: E402

_ks = ElasticGPUKernelSpecs()
_ks.log_level = "ERROR"
_ks.install(FRACTIONS, prefix=str(KERNEL_PREFIX))

c.Spawner.environment = {
    # the GPU kernelspecs above
    "JUPYTER_PATH": str(KERNEL_PREFIX / "share" / "jupyter"),
    # config/singleuser/jupyter_server_config.py: sidebar server extension + kernel picker
    "JUPYTER_CONFIG_PATH": str(HERE / "singleuser"),
    # kernels and the sidebar's inventory queries talk TLS to the agent
    **KERNEL_TLS_ENV,
}


def _copy_examples(spawner):
    """Put the example notebooks in a new home (never overwrite the user's copies)."""
    home = Path(spawner.home_dir)
    dest = home / "examples"
    dest.mkdir(parents=True, exist_ok=True)
    for nb in sorted((REPO / "examples").glob("*.ipynb")):
        if not (dest / nb.name).exists():
            shutil.copy(nb, dest / nb.name)


c.Spawner.pre_spawn_hook = _copy_examples
