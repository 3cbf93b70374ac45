"""Random JSON bodies against a standalone broker: always a JSON 4xx or success, never a 500,
and the pool still adds up afterwards."""

import json
import sys
from collections import defaultdict

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import AGENT_TOKEN, free_port, gpus, start, stop, wait_http

TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-root": "root"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
lease_fields = st.fixed_dictionaries(
    {},
    optional={
        "session": st.text(max_size=8) | json_values,
        "fraction": st.sampled_from([0.25, 0.5, 1, 2, 0, -0.5, 3, 1e308]) | json_values,
        "kernel_name": st.text(max_size=8) | json_values,
        "notebook": st.text(max_size=8) | json_values,
        "extra": json_values,
    },
)
gpu = st.fixed_dictionaries(
    {"index": st.integers(-2, 5) | json_values}, optional={"name": json_values}
)
agent_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["a1", "a2"]) | json_values,
        "address": st.text(max_size=12) | json_values,
        "device": st.text(max_size=6) | json_values,
        "gpus": st.lists(gpu, max_size=4) | json_values,
        "sessions": st.lists(st.text(max_size=5) | json_values, max_size=3) | json_values,
        "bogus": json_values,
    },
)
bodies = lease_fields | agent_fields | json_values


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    cfg = tmp / "config.py"
    cfg.write_text(
        f"c.ElasticGPUBroker.static_tokens = {TOKENS!r}\n"
        "c.ElasticGPUBroker.admin_users = {'root'}\n"
        f"c.ElasticGPUBroker.agent_token = {AGENT_TOKEN!r}\n"
        f"c.ElasticGPUBroker.bind_url = 'http://127.0.0.1:{port}'\n"
        f"c.ElasticGPUBroker.db_url = 'sqlite:///{tmp / 'fuzz.sqlite'}'\n"
        "c.ElasticGPUBroker.default_limit = 2.0\n"
    )
    log = tmp / "broker.log"
    proc = start([sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)], log, tmp)
    api = f"http://127.0.0.1:{port}/services/elastic-gpu/api/"
    wait_http(api + "openapi.json", proc, log)
    r = requests.post(
        api + "agents",
        json={"id": "a1", "address": "127.0.0.1:1", "gpus": gpus(2)},
        headers={"Authorization": f"token {AGENT_TOKEN}"},
    )
    assert r.status_code == 200
    yield api
    stop(proc)


def check(r):
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert isinstance(r.json()["message"], str) and r.json()["message"]
    elif r.status_code != 204:
        r.json()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies,
    target=st.sampled_from(["leases", "agents", "agents/a1/heartbeat", "leases/x/heartbeat"]),
    who=st.sampled_from(["tok-alice", "tok-bob", AGENT_TOKEN, "nonsense"]),
    raw=st.booleans(),
)
def test_random_bodies_get_4xx_json_never_500(broker, body, target, who, raw):
    headers = {"Authorization": f"token {who}"}
    if raw:  # not even JSON, or JSON with odd encodings
        data = repr(body).encode("utf-8", "surrogatepass")
        r = requests.post(broker + target, data=data, headers=headers, timeout=10)
    else:
        # json.dumps, unlike requests, lets NaN and Infinity through: they must be refused too
        r = requests.post(broker + target, data=json.dumps(body), headers=headers, timeout=10)
    check(r)


def test_state_is_consistent_after_fuzzing(broker):
    root = {"Authorization": "token tok-root"}
    leases = requests.get(broker + "leases?all=true", headers=root).json()["leases"]
    pool = requests.get(broker + "pool", headers=root).json()
    granted = {x["id"]: x for x in leases if x["state"] == "granted"}
    per_user = defaultdict(float)
    for x in granted.values():
        per_user[x["user"]] += x["fraction"]
    assert all(v <= 2.0 for v in per_user.values())
    seen = set()
    for agent in pool["agents"]:
        for g in agent["gpus"]:
            used = sum(min(s["fraction"], 1) for s in g["slices"])
            assert used <= 1 + 1e-9 and abs(g["free"] - max(0, 1 - used)) < 1e-9
            seen |= {s["lease"] for s in g["slices"]}
    assert seen == set(granted)
    # everything can still be released, leaving nothing behind
    for x in leases:
        owner = {"alice": "tok-alice", "bob": "tok-bob"}[x["user"]]
        r = requests.delete(
            broker + f"leases/{x['id']}", headers={"Authorization": f"token {owner}"}
        )
        assert r.status_code == 204
    assert requests.get(broker + "leases?all=true", headers=root).json()["leases"] == []
