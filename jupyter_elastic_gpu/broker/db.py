"""Persistence: the scheduler's own Lease and Agent objects, mapped onto SQLAlchemy tables.

Mapping the dataclasses imperatively means there is one object per lease, not a row and a
copy: the scheduler mutates it, the app commits. Ended leases stay in the table: they are the
usage record.

The schema is versioned (``elastic_gpu_schema``): ``open_db`` upgrades an older database in
place with the steps in ``MIGRATIONS`` and refuses one made by a newer broker. A small list
rather than Alembic: three tables, one broker per database, upgrades only ever forward;
docs/broker.md says more.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
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

schema = Table(
    "elastic_gpu_schema",
    metadata,
    Column("version", Integer, nullable=False),
)

# create_all makes it in a new database, migration 2 in an old one
ended_at_index = Index("ix_elastic_gpu_leases_ended_at", leases.c.ended_at)

_registry.map_imperatively(Lease, leases)
_registry.map_imperatively(Agent, agents)

log = logging.getLogger("jupyter_elastic_gpu.broker")


class SchemaError(RuntimeError):
    """The database cannot be used by this broker (made by a newer one, or unreadable)."""


def _v2(conn: Connection) -> None:
    # usage(since=...) filters ended leases by ended_at; the table grows by every lease ever.
    ended_at_index.create(conn, checkfirst=True)


# (version, what it changes, step). Version 1 is the schema of round 2, which recorded no
# version; a step may only add (tables, columns with defaults, indexes), never drop data.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (2, "record the schema version; index leases by ended_at", _v2),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def _engine_url(url: str):
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        # plain postgresql:// means psycopg2 to SQLAlchemy; the driver we declare is psycopg 3
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            u = u.set(drivername="postgresql+psycopg")
    return u


def schema_version(conn: Connection) -> int | None:
    """The database's schema version; 1 for round 2's unversioned tables; None when empty."""
    tables = set(inspect(conn).get_table_names())
    if schema.name in tables:
        return conn.scalar(select(schema.c.version))
    if leases.name in tables:
        return 1
    return None


def upgrade(conn: Connection, where: str) -> None:
    """Bring the database to SCHEMA_VERSION, or refuse it."""
    version = schema_version(conn)
    if version is None:
        metadata.create_all(conn)
        conn.execute(schema.insert().values(version=SCHEMA_VERSION))
        return
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database {where} has schema version {version}, but this broker knows "
            f"versions up to {SCHEMA_VERSION}: it was used by a newer jupyter-elastic-gpu. "
            "Run that version (or newer), or restore a backup taken before the upgrade."
        )
    for target, what, step in MIGRATIONS:
        if target > version:
            log.warning("Upgrading the database %s to schema version %i: %s", where, target, what)
            step(conn)
    metadata.create_all(conn, tables=[schema], checkfirst=True)
    if conn.scalar(select(func.count()).select_from(schema)):
        conn.execute(schema.update().values(version=SCHEMA_VERSION))
    else:
        conn.execute(schema.insert().values(version=SCHEMA_VERSION))


def open_db(url: str) -> Session:
    """Create or upgrade the tables and return a session that keeps objects usable after
    commit. Raises SchemaError, naming the database, when it cannot be used."""
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True  # a server restart must not fail the next request
    try:
        engine = create_engine(_engine_url(url), **kwargs)
    except (ArgumentError, ImportError) as e:
        raise SchemaError(f"cannot use the database URL {safe_url(url)}: {e}") from None
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            # WAL + NORMAL: a commit per request stays cheap and a crash still loses nothing
            # committed before the last checkpoint-safe write.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")

    try:
        with engine.begin() as conn:  # one transaction: PostgreSQL rolls back a failed step
            upgrade(conn, safe_url(url))
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise SchemaError(f"cannot open the database {safe_url(url)}: {reason}") from None
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
    if since is not None:  # spelt so that the ended_at index serves it
        query = query.where(or_(Lease.ended_at.is_(None), Lease.ended_at > since))
    users: dict[str, float] = {}
    groups: dict[str, float] = {}
    for user, user_groups, fraction, granted_at, ended_at in db.execute(query):
        secs = fraction * max(ended_at - max(granted_at, since or granted_at), 0.0)
        users[user] = users.get(user, 0.0) + secs
        for g in user_groups or ():
            groups[g] = groups.get(g, 0.0) + secs
    return {"users": users, "groups": groups}
