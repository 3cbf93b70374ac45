"""deploy/kubernetes/*.yaml are valid and consistent with each other and with the product.

Kubernetes objects (DaemonSet, Service, ConfigMap, Secret) are validated against the
Kubernetes OpenAPI schemas of the ``kubernetes-validate`` package (strict: unknown fields are
errors), for the oldest and newest Kubernetes versions we document. The Zero to JupyterHub
values snippet is Helm values, not a Kubernetes object: it is checked with jsonschema against
the minimal schema below (the parts of the chart's values we use, with their types).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from traitlets.config.loader import Config, PyFileConfigLoader

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
VALUES = DEPLOY / "z2jh-values.yaml"
K8S_VERSIONS = ("1.29.0", "1.33.0")


def k8s_docs():
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path == VALUES:
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield pytest.param(doc, id=f"{path.name}[{i}]:{doc.get('kind')}")


def all_k8s():
    return [p.values[0] for p in k8s_docs()]


def by_kind(kind):
    return [d for d in all_k8s() if d["kind"] == kind]


def test_manifests_exist():
    kinds = sorted(d["kind"] for d in all_k8s())
    assert kinds == ["ConfigMap", "DaemonSet", "Secret", "Service"], kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", k8s_docs())
def test_kubernetes_schema(doc, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_agent_daemonset_matches_the_cli_and_the_broker():
    (ds,) = by_kind("DaemonSet")
    (svc,) = by_kind("Service")
    (secret,) = by_kind("Secret")
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    # every flag is one `jupyter-elastic-gpu agent` knows
    from jupyter_elastic_gpu import cli

    flags = {a.split("=", 1)[0] for a in c["args"]}
    src = Path(cli.__file__).read_text()
    for flag in flags:
        assert f'"{flag}"' in src, f"the agent has no {flag} option"
    args = dict(a.split("=", 1) for a in c["args"])
    assert args["--device"] == "cuda"
    listen_port = int(args["--listen"].rsplit(":", 1)[1])
    assert listen_port == c["ports"][0]["containerPort"]
    # the broker URL is the broker Service's
    m = re.fullmatch(
        r"http://([^.]+)\.([^.]+)\.svc:(\d+)/services/elastic-gpu/api/", args["--broker-url"]
    )
    assert m, args["--broker-url"]
    assert m.group(1) == svc["metadata"]["name"] and m.group(2) == svc["metadata"]["namespace"]
    assert int(m.group(3)) == svc["spec"]["ports"][0]["port"]
    # secrets come from the Secret that exists
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    refs |= {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert refs == {secret["metadata"]["name"]}
    keys = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    keys |= {i["key"] for v in spec["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert keys <= set(secret["stringData"])
    assert "nvidia.com/gpu" in c["resources"]["limits"]


def test_broker_configmap_is_a_valid_broker_config(tmp_path, monkeypatch):
    (cm,) = by_kind("ConfigMap")
    (cfg_py,) = cm["data"].values()
    path = tmp_path / "elastic_gpu_config.py"
    path.write_text(cfg_py)
    monkeypatch.setenv("ELASTIC_GPU_DB_URL", "postgresql://u:p@db/elastic_gpu")
    config = PyFileConfigLoader(path.name, path=str(tmp_path)).load_config()
    from jupyter_elastic_gpu.broker.app import ElasticGPUBroker

    app = ElasticGPUBroker(config=config)
    app.check_config()  # raises on bad limits, misspelt keys, fractions that fit no GPU
    assert app.db_url.startswith("postgresql://")


VALUES_SCHEMA = {
    "type": "object",
    "required": ["hub", "singleuser"],
    "properties": {
        "hub": {
            "type": "object",
            "required": ["services", "loadRoles", "extraEnv"],
            "properties": {
                "image": {"$ref": "#/$defs/image"},
                "db": {
                    "type": "object",
                    "properties": {
                        "type": {
                            "enum": ["sqlite-pvc", "sqlite-memory", "mysql", "postgres", "other"]
                        },
                        "url": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                "extraEnv": {"$ref": "#/$defs/env"},
                "extraVolumes": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name"]},
                },
                "extraVolumeMounts": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "mountPath"]},
                },
                "services": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "url": {"type": "string"},
                            "command": {"type": "array", "items": {"type": "string"}},
                            "api_token": {"type": "string"},
                            "admin": {"type": "boolean"},
                            "environment": {"type": "object"},
                        },
                        "additionalProperties": False,
                    },
                },
                "loadRoles": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "description": {"type": "string"},
                            "scopes": {"type": "array", "items": {"type": "string"}},
                            "users": {"type": "array", "items": {"type": "string"}},
                            "services": {"type": "array", "items": {"type": "string"}},
                            "groups": {"type": "array", "items": {"type": "string"}},
                        },
                        "additionalProperties": False,
                    },
                },
                "extraConfig": {"type": "object", "additionalProperties": {"type": "string"}},
                "networkPolicy": {"$ref": "#/$defs/netpol"},
            },
            "additionalProperties": False,
        },
        "singleuser": {
            "type": "object",
            "properties": {
                "image": {"$ref": "#/$defs/image"},
                "defaultUrl": {"type": "string"},
                "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "cpu": {
                    "type": "object",
                    "properties": {"limit": {"type": "number"}, "guarantee": {"type": "number"}},
                },
                "memory": {
                    "type": "object",
                    "properties": {"limit": {"type": "string"}, "guarantee": {"type": "string"}},
                },
                "extraEnv": {"$ref": "#/$defs/env"},
                "networkPolicy": {"$ref": "#/$defs/netpol"},
            },
            "additionalProperties": False,
        },
        "scheduling": {"type": "object"},
    },
    "additionalProperties": False,
    "$defs": {
        "image": {
            "type": "object",
            "required": ["name", "tag"],
            "properties": {"name": {"type": "string"}, "tag": {"type": "string"}},
        },
        "env": {
            "type": "object",
            "additionalProperties": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "required": ["valueFrom"],
                        "properties": {"valueFrom": {"type": "object"}},
                    },
                ]
            },
        },
        "netpol": {
            "type": "object",
            "properties": {
                "ingress": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
                "egress": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
            },
        },
        "rule": {
            "type": "object",
            "properties": {
                "ports": {"type": "array", "items": {"type": "object", "required": ["port"]}},
                "from": {"type": "array"},
                "to": {"type": "array"},
            },
            "additionalProperties": False,
        },
    },
}


def test_z2jh_values_snippet():
    values = yaml.safe_load(VALUES.read_text())
    jsonschema.validate(values, VALUES_SCHEMA)
    hub = values["hub"]
    svc = hub["services"]["elastic-gpu"]
    cmd = svc["command"]
    assert cmd[:3] == ["python3", "-m", "jupyter_elastic_gpu.broker"]
    # the config file it reads is where the ConfigMap is mounted
    (cm,) = by_kind("ConfigMap")
    mount = {m["name"]: m["mountPath"] for m in hub["extraVolumeMounts"]}
    vol = {v["name"]: v for v in hub["extraVolumes"]}
    (name,) = [
        n for n, v in vol.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
    ]
    assert cmd[cmd.index("-f") + 1] == f"{mount[name]}/{next(iter(cm['data']))}"
    # it listens where the broker Service points
    (k8s_svc,) = by_kind("Service")
    bind = [a for a in cmd if a.startswith("--bind-url=")][0]
    assert bind.endswith(f":{k8s_svc['spec']['ports'][0]['targetPort']}")
    # roles: what docs/broker.md says the broker and users need
    roles = hub["loadRoles"]
    assert set(roles["elastic-gpu-service"]["scopes"]) >= {"read:users", "read:groups"}
    assert "access:services!service=elastic-gpu" in roles["user"]["scopes"]
    assert "access:services!service=elastic-gpu" in hub["extraConfig"]["elastic-gpu"]
    for key in ("ELASTIC_GPU_LEASE_SECRET", "ELASTIC_GPU_AGENT_TOKEN", "ELASTIC_GPU_DB_URL"):
        assert key in hub["extraEnv"]
    broker_url = values["singleuser"]["extraEnv"]["ELASTIC_GPU_BROKER_URL"]
    assert broker_url.startswith(f"http://{k8s_svc['metadata']['name']}.")
    # the extraConfig is Python that runs
    c = Config()
    exec(compile(hub["extraConfig"]["elastic-gpu"], "extraConfig", "exec"), {"c": c})
    assert c.Spawner.server_token_scopes
    # no shell quoting surprises in the command
    assert shlex.split(shlex.join(cmd)) == cmd
