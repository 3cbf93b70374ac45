"""Quotas, the fair queue, placement and expiry: the broker's decisions, free of I/O.

:class:`Scheduler` holds the live agents and the active (queued or granted) leases in memory
and changes them only through its methods; the app persists what they touch. Time comes from
an injectable clock so tests can drive it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..protocol.fraction import GPUFraction, occupancy

QUEUED, GRANTED, ENDED = "queued", "granted", "ended"


class RequestError(Exception):
    """A request the broker refuses; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Policy:
    """The admin's limits and timeouts, in GPUs and seconds (0 = no timeout / no cap)."""

    default_limit: float = 1.0
    user_limits: dict = field(default_factory=dict)
    group_limits: dict = field(default_factory=dict)
    fractions: tuple = (0.25, 0.5, 1.0, 2.0)
    max_lease: float | None = None
    queue_timeout: float = 600.0
    lease_heartbeat_timeout: float = 60.0
    agent_heartbeat_timeout: float = 30.0

    def limit_for(self, user: str, groups: Iterable[str] = ()) -> float:
        """A per-user override wins; else the most generous of the user's groups; else default."""
        if user in self.user_limits:
            return self.user_limits[user]
        group_limits = [self.group_limits[g] for g in groups if g in self.group_limits]
        return max(group_limits) if group_limits else self.default_limit

    def refusal(self, user: str, groups: Iterable[str], fraction: float) -> str | None:
        """Why a request can never be granted under this policy, or None."""
        limit = self.limit_for(user, groups)
        if not GPUFraction(fraction).fits(limit):
            return f"{fraction:g} GPU exceeds {user}'s limit of {limit:g} GPU"
        if self.max_lease and not GPUFraction(fraction).fits(self.max_lease):
            return f"{fraction:g} GPU exceeds the cap on a single lease ({self.max_lease:g} GPU)"
        return None


@dataclass(eq=False)
class Agent:
    id: str
    address: str = ""
    device: str = "cuda"
    gpus: list = field(default_factory=list)  # the agent's inventory dicts, each with "index"
    sessions: list = field(default_factory=list)  # sessions whose state the agent holds
    registered: float = 0.0
    last_heartbeat: float = 0.0
    alive: bool = True


@dataclass(eq=False)
class Lease:
    id: str
    user: str
    session: str
    fraction: float
    kernel_name: str | None = None
    notebook: str | None = None
    groups: list = field(default_factory=list)  # at request time, for per-group accounting
    state: str = QUEUED
    # queued: "quota" | "pool"; ended: released | expired | abandoned | timeout | agent-lost | limit
    reason: str | None = None
    agent: str | None = None
    gpus: list = field(default_factory=list)
    created: float = 0.0
    granted_at: float | None = None
    ended_at: float | None = None
    expires: float = 0.0  # heartbeat (granted) or poll (queued) deadline
    queue_deadline: float | None = None


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        leases: Iterable[Lease] = (),
        agents: Iterable[Agent] = (),
        clock: Callable[[], float] = time.time,
    ):
        self.policy = policy
        self.clock = clock
        self.agents = {a.id: a for a in agents}
        self.leases = {lease.id: lease for lease in leases if lease.state != ENDED}
        self.positions: dict[str, int] = {}
        self.version = 0  # bumped on every change, for long-polling clients
        self._new: list = []  # created objects the app has not persisted yet
        self.on_grant: Callable[[Lease], None] = lambda lease: None  # hooks for metrics
        self.on_end: Callable[[Lease], None] = lambda lease: None
        self._counter = itertools.count(1)
        # Round robin: the user served least recently goes first.
        self._served: dict[str, int] = {}
        granted = sorted((x for x in self.leases.values() if x.granted_at), key=_granted_key)
        for lease in granted:
            self._served[lease.user] = next(self._counter)
        # Affinity: where each (user, session) last ran, so its state is found again.
        self._placed = {(x.user, x.session): (x.agent, list(x.gpus)) for x in granted}

    # -- requests from kernels ----------------------------------------------------------
    def request(
        self,
        user: str,
        session: str,
        fraction: float,
        *,
        groups: Iterable[str] = (),
        kernel_name: str | None = None,
        notebook: str | None = None,
    ) -> Lease:
        """Queue a request and schedule at once: the lease comes back granted or queued."""
        groups = sorted(groups)
        try:
            fraction = GPUFraction(fraction)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        if not any(fraction.same(f) for f in self.policy.fractions):
            offered = ", ".join(f"{f:g}" for f in self.policy.fractions)
            raise RequestError(
                400, f"fraction {fraction:g} is not offered; choose one of {offered}"
            )
        refusal = self.policy.refusal(user, groups, fraction)
        if refusal:
            raise RequestError(403, refusal)
        for other in self.leases.values():
            if other.user == user and other.session == session:
                if fraction.same(other.fraction):
                    return other  # a retried request: same answer, no second lease
                raise RequestError(
                    409,
                    f"session {session!r} already has lease {other.id} "
                    f"({other.fraction:g} GPU, {other.state}); release it first",
                )
        now = self.clock()
        p = self.policy
        lease = Lease(
            id=uuid.uuid4().hex,
            user=user,
            session=session,
            fraction=fraction,
            kernel_name=kernel_name,
            notebook=notebook,
            groups=groups,
            created=now,
            expires=now + p.lease_heartbeat_timeout,
            queue_deadline=now + p.queue_timeout if p.queue_timeout else None,
        )
        self.leases[lease.id] = lease
        self._new.append(lease)
        self.schedule()
        return lease

    def heartbeat(self, lease: Lease) -> Lease:
        if lease.state == ENDED:
            raise RequestError(404, f"lease {lease.id} has ended ({lease.reason})")
        lease.expires = self.clock() + self.policy.lease_heartbeat_timeout
        return lease

    def release(self, lease: Lease, reason: str = "released") -> None:
        if lease.state != ENDED:
            self._end(lease, reason)
            self.schedule()

    # -- agents -------------------------------------------------------------------------
    def register_agent(self, agent_id: str, address: str, device: str, gpus: list) -> Agent:
        now = self.clock()
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = Agent(id=agent_id, registered=now)
            self._new.append(agent)
        agent.address, agent.device, agent.gpus = address, device, gpus
        agent.last_heartbeat, agent.alive = now, True
        self.schedule()
        return agent

    def agent_heartbeat(self, agent_id: str, gpus: list | None = None, sessions=None) -> Agent:
        agent = self.agents.get(agent_id)
        if agent is None:
            raise RequestError(404, f"agent {agent_id!r} is not registered; register it first")
        if gpus is not None:
            agent.gpus = gpus
        if sessions is not None:
            agent.sessions = sessions
        revived = not agent.alive
        agent.last_heartbeat, agent.alive = self.clock(), True
        if revived or gpus is not None:
            self.schedule()
        return agent

    def remove_agent(self, agent: Agent, reason: str = "agent-lost") -> None:
        """The agent and its GPUs leave the pool; leases on it end."""
        agent.alive = False
        for lease in list(self.leases.values()):
            if lease.agent == agent.id:
                self._end(lease, reason)
        self.schedule()

    def agent_leases(self, agent_id: str) -> list[Lease]:
        return [x for x in self.leases.values() if x.agent == agent_id]

    # -- time -----------------------------------------------------------------------------
    def tick(self) -> None:
        """End what timed out: silent kernels, waits past the queue timeout, dead agents."""
        now = self.clock()
        for agent in self.agents.values():
            if agent.alive and now > agent.last_heartbeat + self.policy.agent_heartbeat_timeout:
                agent.alive = False
                self.version += 1
                for lease in self.agent_leases(agent.id):
                    self._end(lease, "agent-lost")
        for lease in list(self.leases.values()):
            if now > lease.expires:
                self._end(lease, "expired" if lease.state == GRANTED else "abandoned")
            elif lease.state == QUEUED and lease.queue_deadline and now > lease.queue_deadline:
                self._end(lease, "timeout")
        self.schedule()

    # -- views ----------------------------------------------------------------------------
    def in_use(self, user: str) -> float:
        return sum(
            x.fraction for x in self.leases.values() if x.user == user and x.state == GRANTED
        )

    def blocked_by(self, lease: Lease) -> list[Lease]:
        """The user's own granted leases that hold the quota a queued lease waits for."""
        if lease.state != QUEUED or lease.reason != "quota":
            return []
        mine = (x for x in self.leases.values() if x.user == lease.user and x.state == GRANTED)
        return sorted(mine, key=lambda x: x.granted_at or 0)

    def gpu_slices(self) -> dict[tuple[str, int], list[Lease]]:
        """Granted leases per (agent id, GPU index)."""
        slices = defaultdict(list)
        for lease in self.leases.values():
            if lease.state == GRANTED:
                for index in lease.gpus:
                    slices[(lease.agent, index)].append(lease)
        return slices

    def queue(self) -> list[Lease]:
        """Queued leases in service order: users take turns, each user's requests FIFO."""
        per_user = defaultdict(list)
        # sorted() is stable: equal timestamps keep arrival (insertion) order.
        for lease in sorted(
            (x for x in self.leases.values() if x.state == QUEUED), key=lambda x: x.created
        ):
            per_user[lease.user].append(lease)
        users = sorted(per_user, key=lambda u: (self._served.get(u, 0), per_user[u][0].created, u))
        return [
            per_user[u][turn]
            for turn in range(max(map(len, per_user.values()), default=0))
            for u in users
            if turn < len(per_user[u])
        ]

    def drain_new(self) -> list:
        new, self._new = self._new, []
        return new

    # -- the decisions --------------------------------------------------------------------
    def schedule(self) -> None:
        """Grant what fits, in fair order; record why the rest waits."""
        self.version += 1
        free = self._free_capacity()
        use = defaultdict(float)
        for lease in self.leases.values():
            if lease.state == GRANTED:
                use[lease.user] += lease.fraction
        blocked = {}  # user -> reason of their head-of-line request (FIFO within a user)
        for lease in self.queue():
            if self.policy.refusal(lease.user, lease.groups, lease.fraction):
                self._end(lease, "limit")  # the admin lowered the limit below this request
                continue
            if lease.user in blocked:
                lease.reason = blocked[lease.user]
                continue
            limit = self.policy.limit_for(lease.user, lease.groups)
            if not GPUFraction(lease.fraction).fits(limit - use[lease.user]):
                lease.reason = blocked[lease.user] = "quota"
                continue
            placement = self._place(lease, free)
            if placement is None:
                lease.reason = blocked[lease.user] = "pool"
                continue
            lease.agent, lease.gpus = placement
            for index in lease.gpus:
                free[(lease.agent, index)] -= GPUFraction(lease.fraction).per_gpu
            use[lease.user] += lease.fraction
            now = self.clock()
            lease.state, lease.reason, lease.granted_at = GRANTED, None, now
            lease.expires = now + self.policy.lease_heartbeat_timeout
            self._served[lease.user] = next(self._counter)
            self._placed[(lease.user, lease.session)] = placement
            self.on_grant(lease)
        self.positions = {x.id: i for i, x in enumerate(self.queue(), 1)}

    def _free_capacity(self) -> dict[tuple[str, int], float]:
        free = {(a.id, g["index"]): 1.0 for a in self.agents.values() if a.alive for g in a.gpus}
        for (agent, index), leases in self.gpu_slices().items():
            if (agent, index) in free:
                free[(agent, index)] -= occupancy(x.fraction for x in leases)
        return free

    def _affinity(self, lease: Lease) -> tuple[str | None, list]:
        placed = self._placed.get((lease.user, lease.session))
        if placed:
            return placed
        for agent in self.agents.values():
            for s in agent.sessions:
                name = s.get("session") if isinstance(s, dict) else s
                if name == lease.session:
                    return agent.id, []
        return None, []

    def _place(self, lease: Lease, free: dict) -> tuple[str, list[int]] | None:
        """Best fit, preferring the agent (and GPUs) that hold the session's state."""
        home, home_gpus = self._affinity(lease)
        fraction = GPUFraction(lease.fraction)
        if fraction.gpus == 1:
            fits = [
                ((agent != home, index not in home_gpus, room - lease.fraction, agent, index))
                for (agent, index), room in free.items()
                if fraction.fits(room)
            ]
            if not fits:
                return None
            *_, agent, index = min(fits)
            return agent, [index]
        wanted = fraction.gpus
        whole = defaultdict(list)
        for (agent, index), room in free.items():
            if GPUFraction(1).fits(room):
                whole[agent].append(index)
        fits = [
            (agent != home, len(indices), agent, indices)
            for agent, indices in whole.items()
            if len(indices) >= wanted
        ]
        if not fits:
            return None
        *_, agent, indices = min(fits)
        indices.sort(key=lambda i: (i not in home_gpus, i))
        return agent, sorted(indices[:wanted])

    def _end(self, lease: Lease, reason: str) -> None:
        lease.state, lease.reason, lease.ended_at = ENDED, reason, self.clock()
        self.leases.pop(lease.id, None)
        self.positions.pop(lease.id, None)
        self.version += 1
        self.on_end(lease)


def _granted_key(lease: Lease):
    return (lease.granted_at, lease.id)
