"""Configuration and backends of the server extension.

Two backends answer the handlers' questions:

- :class:`BrokerBackend` (under JupyterHub): forwards to the broker's REST API with the
  single-user server's Hub token, through ``broker.client.BrokerClient`` (the one client of
  the broker, as kernels and agents use it) in a worker thread, with short timeouts.
- :class:`AgentBackend` (no broker, ``ELASTIC_GPU_AGENT`` set): asks one agent for its
  inventory through ``jupyter_elastic_gpu.protocol.client.query_inventory`` in a worker
  thread (torch-free: the server never imports torch).

Both raise :class:`BackendError` with an HTTP status and a message the sidebar shows.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import os
from typing import Any

from traitlets import Float, Unicode, default
from traitlets.config import Configurable

from ..broker.client import BrokerClient, BrokerError
from ..protocol import client as agent_client
from ..provisioner import endpoints


class BackendError(Exception):
    """A failure the UI should render: ``status`` is the HTTP status we answer with."""

    def __init__(self, status: int, message: str, reason: str = "error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def strip_secrets(obj: Any) -> Any:
    """Drop lease tokens (data-plane credentials) from anything we send to the browser."""
    if isinstance(obj, dict):
        return {k: strip_secrets(v) for k, v in obj.items() if k != "token"}
    if isinstance(obj, list):
        return [strip_secrets(v) for v in obj]
    return obj


class ElasticGPUServerExtension(Configurable):
    """Settings of the jupyter-elastic-gpu single-user server extension."""

    broker_url = Unicode(
        help="""Base URL of the broker's REST API (ends with ``/services/elastic-gpu/api/``).

        Default: where this server's GPU kernels lease from (``provisioner.endpoints``):
        env ``ELASTIC_GPU_BROKER_URL``; else none when an agent is set (``agent_address``);
        else the broker derived from JupyterHub's environment; else empty (no broker).""",
    ).tag(config=True)

    @default("broker_url")
    def _default_broker_url(self) -> str:
        # The kernels' own resolver, so that the sidebar shows the broker they lease from.
        return endpoints.resolve(agent=self.agent_address)[0]

    agent_address = Unicode(
        help="``HOST:PORT`` of a local agent, used when no broker is configured "
        "(default: env ``ELASTIC_GPU_AGENT``).",
    ).tag(config=True)

    @default("agent_address")
    def _default_agent_address(self) -> str:
        return os.environ.get("ELASTIC_GPU_AGENT", "")

    api_token = Unicode(
        help="Token sent to the broker (default: env ``JUPYTERHUB_API_TOKEN``). Never sent "
        "to the browser.",
    ).tag(config=False)

    @default("api_token")
    def _default_api_token(self) -> str:
        return endpoints.hub_token()

    connect_timeout = Float(2.0, help="Seconds to wait for a connection to the broker/agent.").tag(
        config=True
    )
    request_timeout = Float(5.0, help="Seconds to wait for a broker/agent answer.").tag(config=True)

    @property
    def mode(self) -> str:
        if self.broker_url:
            return "broker"
        if self.agent_address:
            return "agent"
        return "none"

    def describe(self) -> str:
        if self.mode == "broker":
            return f"broker at {self.broker_url}"
        if self.mode == "agent":
            return f"local agent at {self.agent_address} (no broker)"
        return "no broker or agent configured"

    def backend(self) -> BrokerBackend | AgentBackend:
        if self.mode == "broker":
            return BrokerBackend(self)
        if self.mode == "agent":
            return AgentBackend(self)
        raise BackendError(
            503,
            "No GPU broker or agent configured: set ELASTIC_GPU_BROKER_URL (or run under "
            "JupyterHub) or ELASTIC_GPU_AGENT=host:port.",
            "not_configured",
        )


class BrokerBackend:
    """The broker's REST API through ``BrokerClient`` (the one broker client), in a worker
    thread so that a slow broker never blocks the server's event loop."""

    mode = "broker"

    def __init__(self, ext: ElasticGPUServerExtension):
        self.ext = ext
        self.base = ext.broker_url if ext.broker_url.endswith("/") else ext.broker_url + "/"
        self.client = BrokerClient(
            self.base,
            ext.api_token,
            timeout=ext.request_timeout,
            connect_timeout=ext.connect_timeout,
        )

    async def _ask(self, call, *args) -> Any:
        loop = asyncio.get_running_loop()
        try:
            # The client's own timeouts end the call; this bounds it should they not.
            return await asyncio.wait_for(
                loop.run_in_executor(None, functools.partial(call, *args)),
                self.ext.connect_timeout + self.ext.request_timeout + 1,
            )
        except asyncio.TimeoutError:
            raise BackendError(
                503, f"GPU broker unreachable at {self.base}: no answer", "unreachable"
            ) from None
        except BrokerError as e:
            raise _backend_error(e, self.base) from e

    async def me(self) -> dict[str, Any]:
        me = await self._ask(self.client.me)
        me.setdefault("leases", [])
        me.setdefault("queue", [])
        return me

    async def pool(self) -> dict[str, Any]:
        return await self._ask(self.client.pool)

    async def leases(self, all_users: bool) -> dict[str, Any]:
        return {"leases": await self._ask(self.client.leases, all_users)}

    async def usage(self) -> dict[str, Any]:
        return await self._ask(self.client.usage)

    async def sessions(self, user: str | None = None) -> list[dict[str, Any]]:
        """My data-plane sessions (idle ones may be swapped to host), best effort.

        Uses ``sessions`` in the broker's pool answer when it has them, else asks each
        live agent's inventory; unreachable agents are skipped.
        """
        me = await self.me()
        user = me.get("user")
        pool = await self.pool()
        out: list[dict[str, Any]] = []
        to_query = []
        for agent in pool.get("agents", []):
            if not agent.get("alive", True):
                continue
            if isinstance(agent.get("sessions"), list):
                sessions = agent["sessions"]
            elif agent.get("address"):
                to_query.append(agent)
                continue
            else:
                continue
            out.extend(_tag_sessions(sessions, agent, user))
        if to_query:
            results = await asyncio.gather(
                *(query_inventory(a["address"], self.ext.request_timeout) for a in to_query),
                return_exceptions=True,
            )
            for agent, inv in zip(to_query, results, strict=True):
                if isinstance(inv, BaseException) or not isinstance(inv, dict):
                    continue
                out.extend(_tag_sessions(inv.get("sessions", []), agent, user))
        return out


def _backend_error(e: BrokerError, base: str) -> BackendError:
    """What the sidebar shows for a broker failure (``reason`` tells the kinds apart)."""
    if e.reason == "unreachable":
        return BackendError(503, f"GPU broker unreachable at {base}: {e.message}", e.reason)
    if e.reason == "broker_error":
        return BackendError(502, f"GPU broker error ({e.status}): {e.message}", e.reason)
    if e.reason == "bad_answer":
        return BackendError(502, f"GPU broker: {e.message}", e.reason)
    return BackendError(e.status or 502, e.message, e.reason)


def _tag_sessions(sessions: list[Any], agent: dict[str, Any], user: Any) -> list[dict[str, Any]]:
    out = []
    for s in sessions:
        if not isinstance(s, dict):
            continue
        if user is not None and s.get("user") != user:
            continue  # never show another user's (or a not-yet-owned) session
        if user is None and s.get("user") is not None:
            continue
        item = dict(s)
        item["agent"] = {"id": agent.get("id"), "address": agent.get("address")}
        out.append(item)
    return out


async def query_inventory(address: str, timeout: float) -> dict[str, Any]:
    """Call the agent's inventory query without blocking the event loop."""
    loop = asyncio.get_running_loop()
    try:
        result = await asyncio.wait_for(
            loop.run_in_executor(None, agent_client.query_inventory, address, timeout), timeout
        )
    except asyncio.TimeoutError as e:
        raise BackendError(
            503,
            f"GPU agent unreachable at {address}: no answer in {timeout:g}s",
            "agent_unreachable",
        ) from e
    except Exception as e:
        raise BackendError(
            503, f"GPU agent unreachable at {address}: {e}", "agent_unreachable"
        ) from e
    if not isinstance(result, dict):
        raise BackendError(502, f"GPU agent at {address} sent a malformed inventory", "bad_answer")
    return result


class AgentBackend:
    """Single-user mode: one local agent, no broker, no quotas."""

    mode = "agent"

    def __init__(self, ext: ElasticGPUServerExtension):
        self.ext = ext
        self.address = ext.agent_address

    async def inventory(self) -> dict[str, Any]:
        return await query_inventory(self.address, self.ext.request_timeout)

    def _agent_entry(self, inv: dict[str, Any]) -> dict[str, Any]:
        info = inv.get("agent") or {}
        sessions = [s for s in inv.get("sessions", []) if isinstance(s, dict)]
        gpus = []
        for i, g in enumerate(inv.get("gpus", [])):
            if not isinstance(g, dict):
                continue
            g = dict(g)
            g.setdefault("index", i)
            if "slices" not in g:
                g["slices"] = [
                    {"lease": None, "fraction": s.get("fraction"), "user": s.get("user")}
                    for s in sessions
                    if s.get("attached") and _session_on_gpu(s, g["index"])
                ]
            gpus.append(g)
        return {
            "id": info.get("id") or self.address,
            "address": info.get("address") or self.address,
            "device": info.get("device"),
            "alive": True,
            "last_heartbeat": None,
            "gpus": gpus,
        }

    async def pool(self) -> dict[str, Any]:
        inv = await self.inventory()
        return {"agents": [self._agent_entry(inv)]}

    def _pseudo_leases(self, inv: dict[str, Any]) -> list[dict[str, Any]]:
        leases = []
        agent = self._agent_entry(inv)
        for s in inv.get("sessions", []):
            if not isinstance(s, dict) or not s.get("attached"):
                continue
            leases.append(
                {
                    "id": s.get("session"),
                    "user": s.get("user"),
                    "session": s.get("session"),
                    "kernel_name": s.get("kernel_name"),
                    "notebook": s.get("notebook"),
                    "fraction": s.get("fraction"),
                    "state": "granted",
                    "blocked_by": [],
                    "agent": {"id": agent["id"], "address": agent["address"]},
                    "gpus": s.get("gpus", []),
                    "created": s.get("since"),
                    "granted_at": s.get("since"),
                }
            )
        return leases

    async def me(self) -> dict[str, Any]:
        inv = await self.inventory()
        leases = self._pseudo_leases(inv)
        return {
            "user": _local_user(),
            "admin": False,
            "limit": None,
            "in_use": sum(float(lease.get("fraction") or 0) for lease in leases),
            "fractions": [],
            "max_lease": None,
            "leases": leases,
            "queue": [],
        }

    async def leases(self, all_users: bool) -> dict[str, Any]:
        inv = await self.inventory()
        return {"leases": self._pseudo_leases(inv)}

    async def usage(self) -> dict[str, Any]:
        raise BackendError(
            404, "Usage accounting needs the broker (single-user agent mode)", "no_broker"
        )

    async def sessions(self, user: str | None = None) -> list[dict[str, Any]]:
        inv = await self.inventory()
        agent = self._agent_entry(inv)
        # Single-user mode: every session on this agent is the user's own.
        return [
            dict(s, agent={"id": agent["id"], "address": agent["address"]})
            for s in inv.get("sessions", [])
            if isinstance(s, dict)
        ]


def kernel_gpu_state(kernel_id: str, me: dict[str, Any]) -> dict[str, Any]:
    """The status-bar state of one kernel from the broker's ``me`` answer.

    The broker lease whose ``session`` is the kernel id: granted -> ``attached``,
    queued -> ``waiting`` (with its 1-based queue position), none -> ``idle``.
    """
    state: dict[str, Any] = {"state": "idle", "position": None, "reason": None, "lease": None}
    for lease in list(me.get("leases") or []) + list(me.get("queue") or []):
        if not isinstance(lease, dict) or lease.get("session") != kernel_id:
            continue
        if lease.get("state") == "granted":
            return {"state": "attached", "position": None, "reason": None, "lease": lease}
        if lease.get("state") == "queued":
            state = {
                "state": "waiting",
                "position": lease.get("position"),
                "reason": lease.get("reason"),
                "lease": lease,
            }
    return state


def _session_on_gpu(session: dict[str, Any], index: Any) -> bool:
    gpus = session.get("gpus")
    if isinstance(gpus, list) and gpus:
        return index in gpus
    return True


def _local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover
        return "me"
