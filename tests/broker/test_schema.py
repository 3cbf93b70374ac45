"""Schema versions: a database from round 2 (no version recorded) is upgraded in place with
every lease and usage record intact; a database from a newer broker is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests
import sqlalchemy
from sqlalchemy import text

from jupyter_elastic_gpu.agent.local import free_port, wait_for_port
from jupyter_elastic_gpu.broker import db as dbmod

from .conftest import BOTH_DATABASES

# The tables as round 2's broker created them (git show 2b8440f:jupyter_elastic_gpu/broker/db.py),
# written out as plain SQL that SQLite and PostgreSQL both accept.
ROUND2_SCHEMA = """
CREATE TABLE elastic_gpu_leases (
    id VARCHAR(64) NOT NULL, "user" VARCHAR(255) NOT NULL, session VARCHAR(255) NOT NULL,
    fraction FLOAT NOT NULL, kernel_name VARCHAR(255), notebook VARCHAR(4096),
    groups JSON NOT NULL, state VARCHAR(16) NOT NULL, reason VARCHAR(32), agent VARCHAR(255),
    gpus JSON NOT NULL, created FLOAT NOT NULL, granted_at FLOAT, ended_at FLOAT,
    expires FLOAT NOT NULL, queue_deadline FLOAT, PRIMARY KEY (id)
);
CREATE INDEX ix_elastic_gpu_leases_user ON elastic_gpu_leases ("user");
CREATE INDEX ix_elastic_gpu_leases_state ON elastic_gpu_leases (state);
CREATE TABLE elastic_gpu_agents (
    id VARCHAR(255) NOT NULL, address VARCHAR(255) NOT NULL, device VARCHAR(64) NOT NULL,
    gpus JSON NOT NULL, sessions JSON NOT NULL, registered FLOAT NOT NULL,
    last_heartbeat FLOAT NOT NULL, alive BOOLEAN NOT NULL, PRIMARY KEY (id)
);
CREATE TABLE elastic_gpu_settings (
    "key" VARCHAR(64) NOT NULL, value VARCHAR(4096) NOT NULL, PRIMARY KEY ("key")
)
"""

NOW = 1_800_000_000.0
# (id, user, fraction, groups, state, reason, agent, gpus, created, granted_at, ended_at)
LEASES = [
    ("l-ended-1", "alice", 0.5, [], "ended", "released", "a1", [0], 100.0, 110.0, 710.0),
    ("l-ended-2", "bob", 1.0, ["ml"], "ended", "expired", "a1", [1], 200.0, 200.0, 3800.0),
    ("l-ended-3", "bob", 0.25, ["ml", "vision"], "ended", "agent-lost", "a1", [0], 300.0,
     400.0, 800.0),
    ("l-never", "carol", 0.25, ["vision"], "ended", "timeout", None, [], 500.0, None, 1100.0),
    ("l-granted", "alice", 0.25, [], "granted", None, "a1", [0], NOW - 50, NOW - 40, None),
    ("l-queued", "carol", 1.0, ["vision"], "queued", "quota", None, [], NOW - 5, None, None),
]  # fmt: skip
SECRET = "round-2-lease-secret"


def make_round2_database(url: str) -> None:
    engine = sqlalchemy.create_engine(dbmod._engine_url(url))
    with engine.begin() as conn:
        for statement in ROUND2_SCHEMA.split(";"):
            conn.execute(text(statement))
        for lid, user, frac, groups, state, reason, agent, gpus, created, granted, ended in LEASES:
            conn.execute(
                text(
                    'INSERT INTO elastic_gpu_leases (id, "user", session, fraction, kernel_name,'
                    " notebook, groups, state, reason, agent, gpus, created, granted_at,"
                    " ended_at, expires, queue_deadline) VALUES (:id, :user, :session, :fraction,"
                    " 'Python 3 (GPU)', 'work/train.ipynb', :groups, :state, :reason, :agent,"
                    " :gpus, :created, :granted, :ended, :expires, NULL)"
                ),
                dict(
                    id=lid, user=user, session=f"s-{lid}", fraction=frac,
                    groups=json.dumps(groups), state=state, reason=reason, agent=agent,
                    gpus=json.dumps(gpus), created=created, granted=granted, ended=ended,
                    expires=NOW + 60,
                ),
            )  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO elastic_gpu_agents VALUES ('a1', '127.0.0.1:9001', 'cuda',"
                " :gpus, '[]', 90.0, :now, TRUE)"
            ),
            dict(gpus=json.dumps([{"index": 0}, {"index": 1}]), now=NOW),
        )
        conn.execute(
            text("INSERT INTO elastic_gpu_settings VALUES ('lease_secret', :s)"), dict(s=SECRET)
        )
    engine.dispose()


def rows(url: str) -> list[tuple]:
    engine = sqlalchemy.create_engine(dbmod._engine_url(url))
    with engine.connect() as conn:
        out = conn.execute(
            text(
                'SELECT id, "user", fraction, groups, state, reason, agent, gpus, created,'
                " granted_at, ended_at FROM elastic_gpu_leases ORDER BY id"
            )
        ).all()
    engine.dispose()
    # JSON comes back parsed on PostgreSQL, as text on SQLite
    return [
        (*r[:3], json.loads(r[3]) if isinstance(r[3], str) else r[3], *r[4:7],
         json.loads(r[7]) if isinstance(r[7], str) else r[7], *r[8:])
        for r in out
    ]  # fmt: skip


def expected_usage() -> dict:
    users, groups = {}, {}
    for _, user, frac, grps, _, _, _, _, _, granted, ended in LEASES:
        if granted is None:
            continue
        secs = frac * ((ended or NOW) - granted)
        users[user] = users.get(user, 0.0) + secs
        for g in grps:
            groups[g] = groups.get(g, 0.0) + secs
    return {"users": users, "groups": groups}


@BOTH_DATABASES
def test_round2_database_is_upgraded_in_place_losing_nothing(db_url, caplog):
    make_round2_database(db_url)
    before = rows(db_url)
    assert len(before) == len(LEASES)

    with caplog.at_level("WARNING", logger="jupyter_elastic_gpu.broker"):
        session = dbmod.open_db(db_url)
    assert "to schema version 2" in caplog.text
    with session.bind.connect() as conn:
        assert dbmod.schema_version(conn) == dbmod.SCHEMA_VERSION
        indexes = {i["name"] for i in sqlalchemy.inspect(conn).get_indexes("elastic_gpu_leases")}
    assert "ix_elastic_gpu_leases_ended_at" in indexes

    assert rows(db_url) == before  # every lease, ended ones (the usage record) included
    active, agents = dbmod.load_state(session)
    assert [x.id for x in active] == ["l-granted", "l-queued"]
    assert active[0].gpus == [0] and active[1].groups == ["vision"]
    assert [(a.id, a.alive) for a in agents] == [("a1", True)]
    assert dbmod.stored_secret(session, "lease_secret") == SECRET  # lease tokens stay valid
    usage, expected = dbmod.usage(session, NOW), expected_usage()
    assert usage["users"] == pytest.approx(expected["users"])
    assert usage["groups"] == pytest.approx(expected["groups"])
    assert dbmod.usage(session, NOW, since=750.0)["users"] == pytest.approx(
        {"bob": 1.0 * (3800 - 750) + 0.25 * (800 - 750), "alice": 0.25 * 40}
    )
    session.close()
    session.bind.dispose()

    caplog.clear()
    with caplog.at_level("WARNING", logger="jupyter_elastic_gpu.broker"):
        dbmod.open_db(db_url).bind.dispose()  # the second start upgrades nothing
    assert "Upgrading" not in caplog.text
    assert rows(db_url) == before


@BOTH_DATABASES
def test_a_database_from_a_newer_broker_is_refused(db_url):
    dbmod.open_db(db_url).bind.dispose()
    engine = sqlalchemy.create_engine(dbmod._engine_url(db_url))
    with engine.begin() as conn:
        conn.execute(dbmod.schema.update().values(version=dbmod.SCHEMA_VERSION + 1))
    engine.dispose()
    with pytest.raises(dbmod.SchemaError, match="schema version 3, but this broker knows"):
        dbmod.open_db(db_url)


def test_the_broker_serves_an_upgraded_round2_file_and_refuses_a_newer_one(tmp_path):
    """The same through the broker process: old leases and usage over the REST API; a newer
    file stops it at start-up with one line naming the database."""
    url = f"sqlite:///{tmp_path / 'round2.sqlite'}"
    make_round2_database(url)
    port = free_port()
    cfg = tmp_path / "broker_config.py"
    cfg.write_text(
        f"c.ElasticGPUBroker.db_url = {url!r}\n"
        f"c.ElasticGPUBroker.bind_url = 'http://127.0.0.1:{port}'\n"
        "c.ElasticGPUBroker.static_tokens = {'admin-token': 'root'}\n"
        "c.ElasticGPUBroker.admin_users = {'root'}\n"
    )
    cmd = [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc, timeout=30)
        api = f"http://127.0.0.1:{port}/services/elastic-gpu/api/"
        auth = {"Authorization": "token admin-token"}
        leases = requests.get(api + "leases?all=true", headers=auth, timeout=10).json()["leases"]
        assert sorted(x["id"] for x in leases) == ["l-granted", "l-queued"]
        usage = requests.get(api + "usage", headers=auth, timeout=10).json()
        # bob's leases all ended: his GPU-seconds do not depend on the clock
        assert usage["users"]["bob"] == pytest.approx(expected_usage()["users"]["bob"])
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "Traceback" not in out

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(dbmod.schema.update().values(version=99))
    engine.dispose()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "schema version 99" in r.stderr and "round2.sqlite" in r.stderr
    assert "Traceback" not in r.stderr
