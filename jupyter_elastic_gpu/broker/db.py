"""Persistence: the scheduler's own Lease and Agent objects, mapped onto SQLAlchemy tables.

Mapping the dataclasses imperatively means there is one object per lease, not a row and a
copy: the scheduler mutates it, the app commits. Ended leases stay in the table: they are the
usage record.
"""

from __future__ import annotations

import secrets

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import Session, registry

from .scheduler import ENDED, Agent, Lease

metadata = MetaData()
_registry = registry(metadata=metadata)

leases = Table(
    "elastic_gpu_leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user", String(255), nullable=False, index=True),
    Column("session", String(255), nullable=False),
    Column("fraction", Float, nullable=False),
    Column("kernel_name", String(255)),
    Column("notebook", String(4096)),
    Column("groups", JSON, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("reason", String(32)),
    Column("agent", String(255)),
    Column("gpus", JSON, nullable=False),
    Column("created", Float, nullable=False),
    Column("granted_at", Float),
    Column("ended_at", Float),
    Column("expires", Float, nullable=False),
    Column("queue_deadline", Float),
)

agents = Table(
    "elastic_gpu_agents",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("address", String(255), nullable=False),
    Column("device", String(64), nullable=False),
    Column("gpus", JSON, nullable=False),
    Column("sessions", JSON, nullable=False),
    Column("registered", Float, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("alive", Boolean, nullable=False),
)

settings = Table(
    "elastic_gpu_settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(4096), nullable=False),
)

_registry.map_imperatively(Lease, leases)
_registry.map_imperatively(Agent, agents)


def open_db(url: str) -> Session:
    """Create the tables if needed and return a session that keeps objects usable after commit."""
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            # WAL + NORMAL: a commit per request stays cheap and a crash still loses nothing
            # committed before the last checkpoint-safe write.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")

    metadata.create_all(engine)
    return Session(engine, expire_on_commit=False)


def load_state(db: Session) -> tuple[list[Lease], list[Agent]]:
    active = db.scalars(select(Lease).where(Lease.state != ENDED).order_by(Lease.created)).all()
    return list(active), list(db.scalars(select(Agent)).all())


def stored_secret(db: Session, key: str) -> str:
    """A random secret generated once and kept in the database (stable across restarts)."""
    value = db.scalar(select(settings.c.value).where(settings.c.key == key))
    if value is None:
        value = secrets.token_hex(32)
        db.execute(settings.insert().values(key=key, value=value))
        db.commit()
    return value


def usage(db: Session, now: float, since: float | None = None) -> dict:
    """GPU-seconds per user and per group (a lease counts for every group its user was in)."""
    end = func.coalesce(Lease.ended_at, now)
    query = select(Lease.user, Lease.groups, Lease.fraction, Lease.granted_at, end).where(
        Lease.granted_at.is_not(None)
    )
    if since is not None:
        query = query.where(end > since)
    users: dict[str, float] = {}
    groups: dict[str, float] = {}
    for user, user_groups, fraction, granted_at, ended_at in db.execute(query):
        secs = fraction * max(ended_at - max(granted_at, since or granted_at), 0.0)
        users[user] = users.get(user, 0.0) + secs
        for g in user_groups or ():
            groups[g] = groups.get(g, 0.0) + secs
    return {"users": users, "groups": groups}
