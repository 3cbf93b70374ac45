"""REST handlers under ``{base_url}elastic-gpu/api/`` (authenticated, JSON, same origin)."""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from ..provisioner.kernelspecs import spec_fraction
from .app import BackendError, ElasticGPUServerExtension, kernel_gpu_state, strip_secrets


class BaseGPUHandler(APIHandler):
    """Common plumbing: backend selection, JSON answers, error rendering."""

    def initialize(self, ext: ElasticGPUServerExtension) -> None:
        self.ext = ext

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(strip_secrets(data)))

    def write_backend_error(self, e: BackendError) -> None:
        self.log.debug("elastic-gpu: %s (%s)", e.message, e.status)
        self.write_json(
            {"message": e.message, "reason": e.reason, "mode": self.ext.mode}, status=e.status
        )

    async def notebook_names(self) -> dict[str, str]:
        """kernel id -> notebook path, from this server's sessions (to label leases)."""
        try:
            sessions = await self.session_manager.list_sessions()
        except Exception:  # pragma: no cover - labels are best effort
            return {}
        out = {}
        for s in sessions:
            kernel = s.get("kernel") or {}
            if kernel.get("id") and s.get("path"):
                out[kernel["id"]] = s["path"]
        return out

    async def label_leases(self, leases: list[Any]) -> list[Any]:
        names = await self.notebook_names()
        for lease in leases:
            if isinstance(lease, dict) and not lease.get("notebook"):
                name = names.get(lease.get("session") or "")
                if name:
                    lease["notebook"] = name
        return leases


class MeHandler(BaseGPUHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            backend = self.ext.backend()
            me = await backend.me()
        except BackendError as e:
            return self.write_backend_error(e)
        await self.label_leases(me.get("leases", []))
        await self.label_leases(me.get("queue", []))
        me["mode"] = backend.mode
        self.write_json(me)


class PoolHandler(BaseGPUHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            backend = self.ext.backend()
            pool = await backend.pool()
        except BackendError as e:
            return self.write_backend_error(e)
        pool["mode"] = backend.mode
        self.write_json(pool)


class LeasesHandler(BaseGPUHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        all_users = self.get_argument("all", "false").lower() in ("1", "true", "yes")
        try:
            data = await self.ext.backend().leases(all_users)
        except BackendError as e:
            return self.write_backend_error(e)
        if not all_users:
            await self.label_leases(data.get("leases", []))
        self.write_json(data)


class UsageHandler(BaseGPUHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            data = await self.ext.backend().usage()
        except BackendError as e:
            return self.write_backend_error(e)
        self.write_json(data)


class SessionsHandler(BaseGPUHandler):
    """My data-plane sessions on the agents (idle ones may be swapped to host memory)."""

    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            sessions = await self.ext.backend().sessions()
        except BackendError as e:
            return self.write_backend_error(e)
        names = await self.notebook_names()
        for s in sessions:
            if not s.get("notebook") and s.get("session") in names:
                s["notebook"] = names[s["session"]]
        self.write_json({"sessions": sessions})


class KernelHandler(BaseGPUHandler):
    """The GPU state of one of this server's kernels, for the status bar."""

    def kernel_fraction(self, kernel_id: str) -> float | None:
        km = self.kernel_manager
        if kernel_id not in km:
            raise tornado.web.HTTPError(404, f"No such kernel: {kernel_id}")
        kernel = km.get_kernel(kernel_id)
        try:
            spec = self.kernel_spec_manager.get_kernel_spec(kernel.kernel_name)
        except Exception:
            return None
        return spec_fraction(spec)

    @tornado.web.authenticated
    async def get(self, kernel_id: str) -> None:
        fraction = self.kernel_fraction(kernel_id)
        result: dict[str, Any] = {
            "kernel_id": kernel_id,
            "gpu": fraction is not None,
            "fraction": fraction,
            "state": "idle",
            "position": None,
            "reason": None,
            "lease": None,
            "mode": self.ext.mode,
        }
        if fraction is None:
            return self.write_json(result)
        try:
            backend = self.ext.backend()
            if backend.mode == "agent":
                sessions = await backend.sessions()
                for s in sessions:
                    if s.get("session") == kernel_id:
                        result["state"] = "attached" if s.get("attached") else "idle"
                        result["swapped"] = bool(s.get("swapped"))
                return self.write_json(result)
            me = await backend.me()
        except BackendError as e:
            return self.write_backend_error(e)
        result.update(kernel_gpu_state(kernel_id, me))
        self.write_json(result)


def setup_handlers(web_app: Any, ext: ElasticGPUServerExtension) -> None:
    base = url_path_join(web_app.settings["base_url"], "elastic-gpu", "api")
    kwargs = {"ext": ext}
    handlers = [
        (url_path_join(base, "me"), MeHandler, kwargs),
        (url_path_join(base, "pool"), PoolHandler, kwargs),
        (url_path_join(base, "leases"), LeasesHandler, kwargs),
        (url_path_join(base, "usage"), UsageHandler, kwargs),
        (url_path_join(base, "sessions"), SessionsHandler, kwargs),
        (url_path_join(base, r"kernels/([^/]+)"), KernelHandler, kwargs),
    ]
    web_app.add_handlers(".*$", handlers)
