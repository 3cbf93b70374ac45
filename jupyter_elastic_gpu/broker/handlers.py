"""REST handlers under ``{prefix}api/`` and ``{prefix}metrics``: input checks and JSON views.

Every refusal is ``{"message": ...}`` with a 4xx status; the scheduler decides, the app
persists (``broker.commit()``) after each change.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timedelta, timezone

from tornado import web

from ..protocol.fraction import occupancy
from .openapi import OPENAPI
from .scheduler import GRANTED, QUEUED, Lease, RequestError

NAME_MAX = 255
GPU_FIELDS = ("index", "uuid", "name", "memory_total", "memory_used", "utilization", "mig")


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


class APIHandler(web.RequestHandler):
    auth = "user"  # "user" | "agent" | "none"

    @property
    def broker(self):
        return self.settings["broker"]

    @property
    def sched(self):
        return self.broker.scheduler

    def check_xsrf_cookie(self):
        pass  # token auth only: there is no cookie to forge

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")

    async def prepare(self):
        if self.auth == "user":
            self.current_user = await self.broker.authenticate(self.request)
        elif self.auth == "agent":
            self.broker.authenticate_agent(self.request)

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or getattr(exc, "message", None)
        if not message or status_code >= 500:
            message = self._reason if status_code < 500 else "internal broker error (logged)"
        self.finish({"message": message})

    def _handle_request_exception(self, e):
        # Scheduler refusals are ordinary answers, not crashes: map them to their status.
        if isinstance(e, RequestError):
            self.send_error(e.status, exc_info=(type(e), e, None))
            return
        super()._handle_request_exception(e)

    def body(self, required: dict, optional: dict) -> dict:
        """The JSON object body, with every field checked against {name: checker}."""
        try:
            data = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise web.HTTPError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "request body must be a JSON object")
        allowed = {**required, **optional}
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise web.HTTPError(
                400,
                f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
            )
        for name in required:
            if name not in data:
                raise web.HTTPError(400, f"missing required field {name!r}")
        for name, value in data.items():
            problem = allowed[name](value)
            if problem:
                raise web.HTTPError(400, f"field {name!r} {problem}")
        return data

    def lease_for(self, lease_id: str) -> Lease:
        """A lease the caller owns (or any, for admins); ended ones come from the db."""
        lease = self.sched.leases.get(lease_id) or self.broker.db.get(Lease, lease_id)
        if lease is None:
            raise web.HTTPError(404, f"no lease {lease_id!r}")
        if not self.may_see(lease):
            raise web.HTTPError(403, f"lease {lease_id!r} belongs to another user")
        return lease

    def may_see(self, lease: Lease) -> bool:
        return lease.user == self.current_user.name or self.current_user.admin

    def lease_model(self, lease: Lease) -> dict:
        sched, me = self.sched, self.current_user
        agent = sched.agents.get(lease.agent) if lease.agent else None
        model = {
            "id": lease.id,
            "user": lease.user,
            "session": lease.session,
            "kernel_name": lease.kernel_name,
            "notebook": lease.notebook,
            "fraction": lease.fraction,
            "state": lease.state,
            "position": sched.positions.get(lease.id) if lease.state == QUEUED else None,
            "reason": lease.reason,
            "blocked_by": [
                {"id": x.id, "session": x.session, "notebook": x.notebook, "fraction": x.fraction}
                for x in sched.blocked_by(lease)
            ],
            "agent": {"id": lease.agent, "address": agent.address if agent else None}
            if lease.agent
            else None,
            "gpus": list(lease.gpus),
            "token": None,
            "created": iso(lease.created),
            "granted_at": iso(lease.granted_at),
            "ended_at": iso(lease.ended_at),
            "expires": iso(lease.expires) if lease.state != "ended" else None,
        }
        if lease.state == GRANTED and me is not None and lease.user == me.name:
            model["token"] = self.broker.sign_lease(lease)
        return model


# -- field checkers: return a complaint or None ------------------------------------------------
def text(max_len=NAME_MAX, allow_empty=False):
    def check(v):
        if not isinstance(v, str):
            return "must be a string"
        if not v and not allow_empty:
            return "must not be empty"
        if len(v) > max_len:
            return f"must be at most {max_len} characters"
        return None

    return check


def optional(check):
    return lambda v: None if v is None else check(v)


def number(v):
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return "must be a finite number"
    return None


def gpu_list(v):
    if not isinstance(v, list) or len(v) > 256:
        return "must be a list of GPU objects (at most 256)"
    seen = set()
    for g in v:
        if not isinstance(g, dict):
            return "must contain objects with an integer 'index'"
        index = g.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 4096:
            return "must contain objects with an integer 'index' (0..4095)"
        if index in seen:
            return f"has GPU index {index} twice"
        seen.add(index)
    return None


def session_list(v):
    if not isinstance(v, list) or len(v) > 100_000:
        return "must be a list of session ids or {'session': id, ...} objects"
    for s in v:
        name = s.get("session") if isinstance(s, dict) else s
        if not isinstance(name, str):
            return "must be a list of session ids or {'session': id, ...} objects"
    return None


# -- users and kernels ------------------------------------------------------------------------
class MeHandler(APIHandler):
    def get(self):
        me = self.current_user
        mine = [x for x in self.sched.leases.values() if x.user == me.name]
        p = self.sched.policy
        self.finish(
            {
                "user": me.name,
                "admin": me.admin,
                "groups": sorted(me.groups),
                "limit": p.limit_for(me.name, me.groups),
                "in_use": self.sched.in_use(me.name),
                "fractions": list(p.fractions),
                "max_lease": p.max_lease,
                "queue_timeout": p.queue_timeout,
                "lease_heartbeat_timeout": p.lease_heartbeat_timeout,
                "leases": [self.lease_model(x) for x in mine if x.state == GRANTED],
                "queue": [
                    self.lease_model(x)
                    for x in sorted(mine, key=lambda x: self.sched.positions.get(x.id, 0))
                    if x.state == QUEUED
                ],
            }
        )


class PoolHandler(APIHandler):
    def get(self):
        sched, me = self.sched, self.current_user
        slices = sched.gpu_slices()
        agents = []
        for a in sorted(sched.agents.values(), key=lambda a: a.id):
            gpus = []
            for g in sorted(a.gpus, key=lambda g: g["index"]):
                held = slices.get((a.id, g["index"]), []) if a.alive else []
                gpus.append(
                    {
                        **dict.fromkeys(GPU_FIELDS),
                        **g,
                        "free": 1.0 - occupancy(x.fraction for x in held)
                        if a.alive
                        else 0.0,
                        "slices": [
                            {
                                "lease": x.id,
                                "fraction": x.fraction,
                                "user": x.user if me.admin or x.user == me.name else None,
                            }
                            for x in held
                        ],
                    }
                )
            agents.append(
                {
                    "id": a.id,
                    "address": a.address,
                    "device": a.device,
                    "alive": a.alive,
                    "last_heartbeat": iso(a.last_heartbeat),
                    "gpus": gpus,
                }
            )
        self.finish({"agents": agents, "queued": len(sched.positions)})


class LeasesHandler(APIHandler):
    def get(self):
        everyone = self.get_query_argument("all", "false").lower() in ("1", "true", "yes")
        if everyone and not self.current_user.admin:
            raise web.HTTPError(403, "only admins may list everyone's leases")
        leases = [
            x for x in self.sched.leases.values() if everyone or x.user == self.current_user.name
        ]
        leases.sort(
            key=lambda x: (x.state != GRANTED, self.sched.positions.get(x.id, 0), x.created)
        )
        self.finish({"leases": [self.lease_model(x) for x in leases]})

    def post(self):
        data = self.body(
            {"session": text(), "fraction": number},
            {"kernel_name": optional(text()), "notebook": optional(text(4096, allow_empty=True))},
        )
        me = self.current_user
        lease = self.sched.request(
            me.name,
            data["session"],
            float(data["fraction"]),
            groups=me.groups,
            kernel_name=data.get("kernel_name"),
            notebook=data.get("notebook"),
        )
        self.broker.commit()
        self.set_status(200 if lease.state == GRANTED else 202)
        self.finish({"lease": self.lease_model(lease)})


class LeaseHandler(APIHandler):
    async def get(self, lease_id):
        lease = self.lease_for(lease_id)
        wait = self.get_query_argument("wait", "0")
        try:
            wait = min(max(float(wait), 0.0), 30.0)
        except ValueError:
            raise web.HTTPError(400, f"wait must be a number of seconds, not {wait!r}") from None
        if lease.state == QUEUED and lease.user == self.current_user.name:
            self.sched.heartbeat(lease)  # polling keeps a queued request alive
        # Long poll: answer as soon as the lease's state or queue position changes.
        seen = (lease.state, self.sched.positions.get(lease.id))
        deadline = time.monotonic() + wait
        # Only a queued lease is worth waiting for: one granted meanwhile answers at once.
        while lease.state == QUEUED and (lease.state, self.sched.positions.get(lease.id)) == seen:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # tornado takes a number as an absolute deadline: pass a duration
            await self.broker.changed.wait(timeout=timedelta(seconds=left))
        self.finish({"lease": self.lease_model(lease)})

    def delete(self, lease_id):
        lease = self.lease_for(lease_id)
        self.sched.release(lease)
        self.broker.commit()
        self.set_status(204)
        self.finish()

    def finish(self, chunk=None):
        if self.get_status() == 204:
            self.clear_header("Content-Type")
            return super().finish()
        return super().finish(chunk)


class LeaseHeartbeatHandler(APIHandler):
    def post(self, lease_id):
        lease = self.lease_for(lease_id)
        if lease.user != self.current_user.name:
            raise web.HTTPError(403, "only the lease's owner heartbeats it")
        self.sched.heartbeat(lease)
        self.broker.commit()
        self.finish({"lease": self.lease_model(lease)})


class UsageHandler(APIHandler):
    def get(self):
        if not self.current_user.admin:
            raise web.HTTPError(403, "usage is for admins")
        since = self.get_query_argument("since", None)
        try:
            since = float(since) if since is not None else None
        except ValueError:
            raise web.HTTPError(400, "since must be unix seconds") from None
        self.finish(self.broker.usage(since))


# -- agents -------------------------------------------------------------------------------------
class AgentsHandler(APIHandler):
    async def prepare(self):
        # Listing is for admins (a user token) or agents (the agent token); registering for agents.
        if self.request.method == "GET" and not self.broker.is_agent(self.request):
            self.current_user = await self.broker.authenticate(self.request)
            if not self.current_user.admin:
                raise web.HTTPError(403, "listing agents is for admins")
        elif self.request.method != "GET":
            self.broker.authenticate_agent(self.request)

    def get(self):
        self.finish({"agents": [self.agent_model(a) for a in self.sched.agents.values()]})

    def agent_model(self, a):
        return {
            "id": a.id,
            "address": a.address,
            "device": a.device,
            "alive": a.alive,
            "registered": iso(a.registered),
            "last_heartbeat": iso(a.last_heartbeat),
            "gpus": a.gpus,
            "leases": len(self.sched.agent_leases(a.id)),
        }

    def post(self):
        data = self.body(
            {"id": text(), "address": text(), "gpus": gpu_list},
            {"device": text(64), "sessions": session_list},
        )
        agent = self.sched.register_agent(
            data["id"], data["address"], data.get("device", "cuda"), data["gpus"]
        )
        if "sessions" in data:
            agent.sessions = data["sessions"]
        self.broker.commit()
        self.finish(self.broker.agent_reply(agent))


class AgentHandler(APIHandler):
    auth = "agent"

    def delete(self, agent_id):
        agent = self.sched.agents.get(agent_id)
        if agent is None:
            raise web.HTTPError(404, f"agent {agent_id!r} is not registered")
        self.sched.remove_agent(agent, "agent-left")
        self.broker.commit()
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()


class AgentHeartbeatHandler(APIHandler):
    auth = "agent"

    def post(self, agent_id):
        data = self.body({}, {"gpus": gpu_list, "sessions": session_list})
        agent = self.sched.agent_heartbeat(agent_id, data.get("gpus"), data.get("sessions"))
        self.broker.commit()
        self.finish(self.broker.agent_reply(agent))


# -- public -------------------------------------------------------------------------------------
class OpenAPIHandler(APIHandler):
    auth = "none"

    def get(self):
        self.finish(OPENAPI)


class NotFoundHandler(APIHandler):
    auth = "none"

    def prepare(self):
        raise web.HTTPError(404, f"no such endpoint: {self.request.method} {self.request.path}")


class MetricsHandler(APIHandler):
    auth = "none"

    async def get(self):
        if self.broker.authenticate_prometheus:
            user = await self.broker.authenticate(self.request)
            if not user.admin:
                raise web.HTTPError(403, "metrics are for admins")
        self.set_header("Content-Type", self.broker.metrics.content_type)
        self.finish(self.broker.metrics.render())


def handlers(prefix: str) -> list:
    api = f"{prefix}api"
    lease = r"(?P<lease_id>[^/]+)"
    return [
        (rf"{api}/me", MeHandler),
        (rf"{api}/pool", PoolHandler),
        (rf"{api}/leases/?", LeasesHandler),
        (rf"{api}/leases/{lease}", LeaseHandler),
        (rf"{api}/leases/{lease}/heartbeat", LeaseHeartbeatHandler),
        (rf"{api}/usage", UsageHandler),
        (rf"{api}/agents/?", AgentsHandler),
        (rf"{api}/agents/(?P<agent_id>[^/]+)", AgentHandler),
        (rf"{api}/agents/(?P<agent_id>[^/]+)/heartbeat", AgentHeartbeatHandler),
        (rf"{api}/openapi.json", OpenAPIHandler),
        (rf"{prefix}metrics", MetricsHandler),
        (rf"{prefix}.*", NotFoundHandler),
    ]
