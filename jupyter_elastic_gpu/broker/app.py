"""The broker application: configuration, authentication, persistence and the HTTP server.

Run it as the JupyterHub service ``elastic-gpu`` (the Hub passes ``JUPYTERHUB_*`` in the
environment) or standalone with ``jupyter-elastic-gpu broker -f elastic_gpu_config.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import signal
import time
from typing import NamedTuple
from urllib.parse import quote, urlparse

from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.locks import Condition
from traitlets import Bool, Dict, Float, List, Set, TraitError, Unicode, default
from traitlets.config import Application

from .. import __version__, lease_token
from ..lifecycle import exit_with_parent, exit_with_parent_requested
from ..protocol.fraction import GPUFraction
from . import db as dbmod
from .handlers import handlers
from .metrics import BrokerMetrics
from .scheduler import Policy, Scheduler

# Traits an admin may change with SIGHUP; the rest (addresses, database) need a restart.
RELOADABLE = (
    "default_limit",
    "user_limits",
    "group_limits",
    "fractions",
    "max_lease",
    "queue_timeout",
    "lease_heartbeat_timeout",
    "agent_heartbeat_timeout",
    "admin_users",
    "static_tokens",
    "static_groups",
    "authenticate_prometheus",
)


class ConfigError(ValueError):
    pass


class User(NamedTuple):
    name: str
    admin: bool
    groups: frozenset


class ElasticGPUBroker(Application):
    _stopping = False
    name = "jupyter-elastic-gpu-broker"
    version = __version__
    description = (
        "The elastic-gpu broker: GPU-slice leases, quotas, a fair queue and the agent pool."
    )
    aliases = {
        "f": "ElasticGPUBroker.config_file",
        "config": "ElasticGPUBroker.config_file",
        "bind-url": "ElasticGPUBroker.bind_url",
        "db-url": "ElasticGPUBroker.db_url",
        "log-level": "Application.log_level",
    }

    config_file = Unicode(
        "",
        help="Python config file to load (and to re-read on SIGHUP), e.g. elastic_gpu_config.py.",
    ).tag(config=True)
    bind_url = Unicode(
        help="Where to listen. Default: $JUPYTERHUB_SERVICE_URL (set by the Hub), else http://127.0.0.1:8090."
    ).tag(config=True)
    service_prefix = Unicode(
        help="URL prefix of every route. Default: $JUPYTERHUB_SERVICE_PREFIX, else /services/elastic-gpu/."
    ).tag(config=True)

    default_limit = Float(
        1.0,
        help="GPUs a user may hold at once (1.0 = one whole GPU) unless a user or group limit applies.",
    ).tag(config=True)
    user_limits = Dict(
        key_trait=Unicode(),
        value_trait=Float(),
        help="Per-user limits in GPUs, {name: gpus}; they override group limits and the default.",
    ).tag(config=True)
    group_limits = Dict(
        key_trait=Unicode(),
        value_trait=Float(),
        help="Per-group limits in GPUs, {JupyterHub group: gpus}; a user in several groups gets the largest.",
    ).tag(config=True)
    fractions = List(
        Float(),
        default_value=[0.25, 0.5, 1.0, 2.0],
        help="The slices offered: fractions of one GPU (<= 1) or whole numbers of GPUs of one agent (> 1).",
    ).tag(config=True)
    max_lease = Float(
        None,
        allow_none=True,
        help="Cap on a single lease in GPUs, whatever the user's limit (None: no cap).",
    ).tag(config=True)
    queue_timeout = Float(
        600.0,
        help="Seconds a request may wait in the queue before it is refused (0: wait forever).",
    ).tag(config=True)
    lease_heartbeat_timeout = Float(
        60.0,
        help="Seconds without a kernel heartbeat (or poll, while queued) after which its lease ends.",
    ).tag(config=True)
    agent_heartbeat_timeout = Float(
        30.0,
        help="Seconds without an agent heartbeat after which its GPUs leave the pool and its leases end.",
    ).tag(config=True)
    db_url = Unicode(
        "sqlite:///elastic_gpu.sqlite",
        help="SQLAlchemy URL of the database (PostgreSQL in production).",
    ).tag(config=True)
    lease_secret = Unicode(
        help="Secret that signs lease tokens; agents need the same one. Default: $ELASTIC_GPU_LEASE_SECRET, "
        "else a random secret kept in the database."
    ).tag(config=True)
    agent_token = Unicode(
        help="Token agents authenticate with. Default: $ELASTIC_GPU_AGENT_TOKEN. Empty: agents are refused."
    ).tag(config=True)
    admin_users = Set(
        Unicode(), help="Users who are broker admins in addition to the Hub's admins."
    ).tag(config=True)
    static_tokens = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="{token: user name} accepted without a Hub: for standalone brokers, tests and load tests.",
    ).tag(config=True)
    static_groups = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        help="{group: [user names]} for users of static_tokens (the Hub's groups apply to Hub users).",
    ).tag(config=True)
    authenticate_prometheus = Bool(True, help="Require an admin's token for /metrics.").tag(
        config=True
    )
    hub_user_cache_ttl = Float(
        30.0, help="Seconds a user's admin flag and groups read from the Hub API are reused."
    ).tag(config=True)

    @default("bind_url")
    def _default_bind_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL") or "http://127.0.0.1:8090"

    @default("service_prefix")
    def _default_service_prefix(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or "/services/elastic-gpu/"

    @default("lease_secret")
    def _default_lease_secret(self):
        return os.environ.get("ELASTIC_GPU_LEASE_SECRET", "")

    @default("agent_token")
    def _default_agent_token(self):
        return os.environ.get("ELASTIC_GPU_AGENT_TOKEN", "")

    # -- configuration ----------------------------------------------------------------------
    def check_config(self) -> None:
        """Refuse, with the offending name, what traitlets' types let through."""
        known = set(self.class_trait_names(config=True)) | set(
            Application.class_trait_names(config=True)
        )
        unknown = sorted(set(self.config.get("ElasticGPUBroker", {})) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join('ElasticGPUBroker.' + k for k in unknown)}"
            )
        limits = {"default_limit": self.default_limit}
        limits.update({f"user_limits[{k!r}]": v for k, v in self.user_limits.items()})
        limits.update({f"group_limits[{k!r}]": v for k, v in self.group_limits.items()})
        for name, value in limits.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"ElasticGPUBroker.{name} must be a number of GPUs >= 0, not {value}"
                )
        if not self.fractions:
            raise ConfigError("ElasticGPUBroker.fractions must offer at least one fraction")
        for f in self.fractions:
            try:
                GPUFraction(f, "ElasticGPUBroker.fractions:")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if len(set(self.fractions)) != len(self.fractions):
            raise ConfigError("ElasticGPUBroker.fractions lists a fraction twice")
        if self.max_lease is not None and not (
            math.isfinite(self.max_lease) and self.max_lease > 0
        ):
            raise ConfigError(
                f"ElasticGPUBroker.max_lease must be > 0 or None, not {self.max_lease}"
            )
        for name in ("lease_heartbeat_timeout", "agent_heartbeat_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ElasticGPUBroker.{name} must be > 0 seconds")
        if not self.queue_timeout >= 0:
            raise ConfigError("ElasticGPUBroker.queue_timeout must be >= 0 seconds (0: no timeout)")
        if not self.service_prefix.startswith("/") or not self.service_prefix.endswith("/"):
            raise ConfigError("ElasticGPUBroker.service_prefix must start and end with '/'")
        if not urlparse(self.bind_url).port:
            raise ConfigError(f"ElasticGPUBroker.bind_url needs a port: {self.bind_url!r}")

    def make_policy(self) -> Policy:
        return Policy(
            default_limit=self.default_limit,
            user_limits=dict(self.user_limits),
            group_limits=dict(self.group_limits),
            fractions=tuple(sorted(self.fractions)),
            max_lease=self.max_lease,
            queue_timeout=self.queue_timeout,
            lease_heartbeat_timeout=self.lease_heartbeat_timeout,
            agent_heartbeat_timeout=self.agent_heartbeat_timeout,
        )

    def _read_config(self):
        if self.config_file:
            if not os.path.isfile(self.config_file):
                raise ConfigError(f"config file not found: {self.config_file}")
            path, name = os.path.split(os.path.abspath(self.config_file))
            self.load_config_file(name, path=path)
        self.check_config()

    def reload_config(self) -> None:
        """SIGHUP: apply new limits to live leases and the queue; keep the old ones if invalid."""
        try:
            trial = ElasticGPUBroker(config=self.cli_config, config_file=self.config_file)
            trial.cli_config = self.cli_config
            trial._read_config()
        except Exception as e:
            self.log.error("Config reload failed, keeping the running config: %s", e)
            return
        for name in RELOADABLE:
            setattr(self, name, getattr(trial, name))
        self.scheduler.policy = self.make_policy()
        self.scheduler.schedule()
        self.commit()
        self.log.info("Config reloaded from %s", self.config_file or "(command line)")

    # -- start-up -----------------------------------------------------------------------------
    def initialize(self, argv=None):
        try:
            self.parse_command_line(argv)
            self._read_config()
        except (ConfigError, TraitError) as e:
            self.log.critical("elastic-gpu broker: bad configuration: %s", e)
            self.exit(1)
        try:
            self.db = dbmod.open_db(self.db_url)
        except dbmod.SchemaError as e:
            self.log.critical("elastic-gpu broker: %s", e)
            self.exit(1)
        if not self.lease_secret:
            self.log.warning(
                "No lease_secret configured: using a random one kept in the database; "
                "agents must be given it (ELASTIC_GPU_LEASE_SECRET) to verify lease tokens."
            )
            self.lease_secret = dbmod.stored_secret(self.db, "lease_secret")
        leases, agents = dbmod.load_state(self.db)
        # The broker being down is nobody's fault: give kernels and agents a full timeout
        # to find it again before their leases are reaped.
        now = time.time()
        for lease in leases:
            lease.expires = max(lease.expires, now + self.lease_heartbeat_timeout)
        for agent in agents:
            agent.last_heartbeat = max(agent.last_heartbeat, now)
        self.scheduler = Scheduler(self.make_policy(), leases, agents)
        self.metrics = BrokerMetrics(self)
        self.scheduler.on_grant = self.metrics.granted
        self.scheduler.on_end = self.metrics.ended
        self.scheduler.schedule()
        self.commit()
        self.log.info(
            "Loaded %i active lease(s) and %i agent(s) from %s",
            len(leases),
            len(agents),
            dbmod.safe_url(self.db_url),
        )
        self.changed = Condition()
        self.hub_auth = None
        if os.environ.get("JUPYTERHUB_API_TOKEN"):
            from jupyterhub.services.auth import HubAuth

            self.hub_auth = HubAuth(cache_max_age=60)
        elif not self.static_tokens:
            self.log.warning(
                "No JupyterHub (JUPYTERHUB_API_TOKEN unset) and no static_tokens: no user can log in"
            )
        self._hub_users: dict[str, tuple[float, bool, frozenset]] = {}
        self.web_app = web.Application(
            handlers(self.service_prefix),
            broker=self,
            log_function=self._log_request,
        )

    def start(self):
        url = urlparse(self.bind_url)
        self.http_server = self.web_app.listen(
            url.port, address=url.hostname or "127.0.0.1", xheaders=True
        )
        tick = min(1.0, self.lease_heartbeat_timeout / 4, self.agent_heartbeat_timeout / 4)
        PeriodicCallback(self._tick, tick * 1000).start()
        loop = asyncio.get_event_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload_config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        if exit_with_parent_requested():
            exit_with_parent("broker")
        self.log.info(
            "elastic-gpu broker listening on %s%s", self.bind_url.rstrip("/"), self.service_prefix
        )
        IOLoop.current().start()

    def stop(self):
        if self._stopping:  # a second signal while stopping
            return
        self._stopping = True
        self.log.info("Stopping; leases are kept in %s", dbmod.safe_url(self.db_url))
        self.http_server.stop()
        self.db.close()
        IOLoop.current().stop()

    def _tick(self):
        before = self.scheduler.version
        self.scheduler.tick()
        if self.scheduler.version != before:
            self.commit()

    def commit(self) -> None:
        self.db.add_all(self.scheduler.drain_new())
        self.db.commit()
        if hasattr(self, "changed"):
            self.changed.notify_all()

    def _log_request(self, handler):
        status = handler.get_status()
        log = self.log.debug if status < 400 else self.log.info if status < 500 else self.log.error
        log(
            "%d %s %.1fms",
            status,
            handler._request_summary(),
            1000 * handler.request.request_time(),
        )

    # -- what handlers use -------------------------------------------------------------------
    async def authenticate(self, request) -> User:
        token = _token(request)
        if not token:
            raise web.HTTPError(
                401, "missing token: send 'Authorization: token <JupyterHub API token>'"
            )
        for known, name in self.static_tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                groups = frozenset(g for g, users in self.static_groups.items() if name in users)
                return User(name, name in self.admin_users, groups)
        if self.hub_auth is None:
            raise web.HTTPError(403, "invalid token")
        model = await self.hub_auth.user_for_token(token, sync=False)
        if not model:
            raise web.HTTPError(403, "invalid or expired JupyterHub token")
        if model.get("kind", "user") != "user":
            raise web.HTTPError(
                403, f"only users' tokens may use the broker, not a {model.get('kind')}'s"
            )
        scopes = self.hub_auth.access_scopes
        if scopes and not self.hub_auth.check_scopes(scopes, model):
            raise web.HTTPError(403, f"token lacks the scope {' or '.join(sorted(scopes))}")
        admin, groups = await self._hub_user(model)
        return User(model["name"], admin or model["name"] in self.admin_users, groups)

    async def _hub_user(self, model) -> tuple[bool, frozenset]:
        """The user's admin flag and groups, asked with the broker's own token (users' server
        tokens usually may not read their groups)."""
        name = model["name"]
        hit = self._hub_users.get(name)
        if hit and hit[0] > time.monotonic():
            return hit[1], hit[2]
        url = f"{self.hub_auth.api_url.rstrip('/')}/users/{quote(name, safe='')}"
        try:
            resp = await AsyncHTTPClient().fetch(
                url, headers={"Authorization": f"token {self.hub_auth.api_token}"}
            )
            model = json.loads(resp.body)
        except Exception as e:
            self.log.warning(
                "Cannot read user %s from the Hub (%s); grant the service read:users and read:groups",
                name,
                e,
            )
        info = bool(model.get("admin")), frozenset(model.get("groups") or ())
        self._hub_users[name] = (time.monotonic() + self.hub_user_cache_ttl, *info)
        return info

    def is_agent(self, request) -> bool:
        token = _token(request)
        return bool(
            self.agent_token
            and token
            and hmac.compare_digest(token.encode(), self.agent_token.encode())
        )

    def authenticate_agent(self, request) -> None:
        if not self.agent_token:
            raise web.HTTPError(
                403, "agents are refused: no ElasticGPUBroker.agent_token configured"
            )
        if not _token(request):
            raise web.HTTPError(
                401, "missing agent token: send 'Authorization: token <agent token>'"
            )
        if not self.is_agent(request):
            raise web.HTTPError(403, "invalid agent token")

    def sign_lease(self, lease) -> str:
        claims = {
            "lease": lease.id,
            "user": lease.user,
            "session": lease.session,
            "agent": lease.agent,
            "gpus": list(lease.gpus),
            "fraction": lease.fraction,
            "exp": math.ceil(lease.expires),
        }
        return lease_token.sign(claims, self.lease_secret)

    def agent_reply(self, agent) -> dict:
        """What an agent learns on each heartbeat: when to call again, and which leases hold."""
        return {
            "heartbeat_interval": self.agent_heartbeat_timeout / 3,
            "leases": [
                {
                    "id": x.id,
                    "user": x.user,
                    "session": x.session,
                    "fraction": x.fraction,
                    "gpus": list(x.gpus),
                    "expires": x.expires,
                }
                for x in self.scheduler.agent_leases(agent.id)
            ],
        }

    def usage(self, since=None) -> dict:
        return dbmod.usage(self.db, time.time(), since)


def _token(request) -> str | None:
    kind, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if kind.lower() in ("token", "bearer") and token.strip() else None


def main(argv=None):
    ElasticGPUBroker.launch_instance(argv)
