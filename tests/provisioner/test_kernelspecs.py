"""Kernelspecs CLI, the kernel picker (ElasticGPUKernelSpecManager), and broker discovery."""

from __future__ import annotations

import json
import logging
import time

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from jupyter_elastic_gpu.cli import main as cli
from jupyter_elastic_gpu.provisioner import endpoints
from jupyter_elastic_gpu.provisioner.kernelspec_manager import ElasticGPUKernelSpecManager
from jupyter_elastic_gpu.provisioner.kernelspecs import main as kernelspecs
from tests.conftest import free_port

GPU_ENV = ("ELASTIC_GPU_BROKER_URL", "ELASTIC_GPU_AGENT", "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN",
           "JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_BASE_URL")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in GPU_ENV:
        monkeypatch.delenv(name, raising=False)
    # Keep the user's own config and kernels out of it.
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "prefix" / "share" / "jupyter"))
    return tmp_path


def test_install_list_remove(clean_env, capsys):
    prefix = clean_env / "prefix"
    assert kernelspecs(["install", "--prefix", str(prefix), "--fractions", "0.5,0.25,1,2"]) == 0
    kdir = prefix / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kdir.iterdir()) == [
        "python3-gpu-0.25",
        "python3-gpu-0.5",
        "python3-gpu-1",
        "python3-gpu-2",
    ]
    spec = json.loads((kdir / "python3-gpu-0.5" / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (GPU: 0.5)"
    assert spec["argv"][1:] == [
        "-m",
        "jupyter_elastic_gpu.provisioner.kernel",
        "-f",
        "{connection_file}",
    ]
    assert spec["metadata"] == {
        "kernel_provisioner": {
            "provisioner_name": "elastic-gpu-provisioner",
            "config": {"gpu": 0.5},
        }
    }
    assert (kdir / "python3-gpu-0.5" / "logo-svg.svg").read_text().startswith("<svg")
    # jupyter_client finds them, with their provisioner
    ksm = KernelSpecManager()
    assert ksm.get_kernel_spec("python3-gpu-2").metadata["kernel_provisioner"]["config"] == {
        "gpu": 2.0
    }

    capsys.readouterr()
    kernelspecs(["list", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert {n: s["fraction"] for n, s in listed.items()} == {
        "python3-gpu-0.25": 0.25, "python3-gpu-0.5": 0.5, "python3-gpu-1": 1.0, "python3-gpu-2": 2.0,
    }  # fmt: skip

    kernelspecs(["remove", "python3-gpu-2", "--prefix", str(prefix)])
    assert not (kdir / "python3-gpu-2").exists()
    cli(["kernelspecs", "remove"])  # through the console script: all the rest
    assert list(kdir.iterdir()) == []


def test_bad_fractions_are_refused(clean_env, capsys):
    with pytest.raises(SystemExit) as e:
        kernelspecs(["install", "--prefix", str(clean_env), "--fractions", "0.5,1.5"])
    assert e.value.code == 2
    assert "1.5 fits no GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernelspecs(["remove", "python3-gpu-9", "--prefix", str(clean_env)])


def test_fractions_from_config(clean_env):
    config_dir = clean_env / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_elastic_gpu_config.py").write_text(
        "c.ElasticGPUKernelSpecs.fractions = [0.5, 1]\n"
    )
    kernelspecs(["install", "--prefix", str(clean_env / "prefix")])
    kdir = clean_env / "prefix" / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kdir.iterdir()) == ["python3-gpu-0.5", "python3-gpu-1"]


def test_fractions_from_the_broker(clean_env, broker, monkeypatch):
    monkeypatch.setenv("ELASTIC_GPU_BROKER_URL", broker.api)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-alice")
    kernelspecs(["install", "--prefix", str(clean_env / "prefix")])
    kdir = clean_env / "prefix" / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kdir.iterdir()) == [
        "python3-gpu-0.25",
        "python3-gpu-0.5",
        "python3-gpu-1",
        "python3-gpu-2",
    ]


def names(ksm) -> set[str]:
    return {n for n in ksm.get_all_specs() if n.startswith("python3-gpu-")}


def test_picker_hides_specs_above_the_users_limit(kernels_dir, broker, monkeypatch):
    monkeypatch.delenv("ELASTIC_GPU_AGENT", raising=False)
    monkeypatch.setenv("ELASTIC_GPU_BROKER_URL", broker.api)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-alice")  # limit 0.5
    ksm = ElasticGPUKernelSpecManager(kernel_dirs=[str(kernels_dir)])
    assert names(ksm) == {"python3-gpu-0.25", "python3-gpu-0.5"}
    assert "python3-gpu-1" in ksm.find_kernel_specs(), "a saved notebook's kernel still resolves"
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-bob")  # default limit 1
    assert names(ElasticGPUKernelSpecManager(kernel_dirs=[str(kernels_dir)])) == {
        "python3-gpu-0.25", "python3-gpu-0.5", "python3-gpu-1",
    }  # fmt: skip


def test_picker_shows_everything_fast_when_the_broker_is_down(kernels_dir, monkeypatch, caplog):
    monkeypatch.delenv("ELASTIC_GPU_AGENT", raising=False)
    monkeypatch.setenv(
        "ELASTIC_GPU_BROKER_URL", f"http://127.0.0.1:{free_port()}/services/elastic-gpu/api/"
    )
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-alice")
    ksm = ElasticGPUKernelSpecManager(kernel_dirs=[str(kernels_dir)], broker_timeout=0.5)
    with caplog.at_level(logging.WARNING):
        t0 = time.monotonic()
        assert len(names(ksm)) == 4
        assert time.monotonic() - t0 < 3
    assert "cannot read your GPU limit" in caplog.text
    t0 = time.monotonic()
    assert len(names(ksm)) == 4
    assert time.monotonic() - t0 < 0.2, "a failed broker is not asked again at once"


def test_picker_in_single_user_mode_hides_nothing(kernels_dir, monkeypatch):
    monkeypatch.delenv("ELASTIC_GPU_BROKER_URL", raising=False)
    monkeypatch.setenv("ELASTIC_GPU_AGENT", "127.0.0.1:1")
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:1/hub/api")
    assert len(names(ElasticGPUKernelSpecManager(kernel_dirs=[str(kernels_dir)]))) == 4


def test_broker_url_from_jupyterhub_environment_is_the_proxy_route_of_the_service():
    # what JupyterHub 5/6 gives a single-user server when c.JupyterHub.public_url is set
    env = {
        "JUPYTERHUB_API_URL": "http://10.0.0.5:8081/hub/api",
        "JUPYTERHUB_SERVICE_URL": "http://10.0.0.9:41234/user/alice/",
        "JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/user/alice/",
        "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/hub/",
        "JUPYTERHUB_BASE_URL": "/",
    }
    assert endpoints.resolve("", "", env) == (
        "https://hub.example.org/services/elastic-gpu/api/",
        "",
    )
    env.update(
        JUPYTERHUB_BASE_URL="/jhub/",
        JUPYTERHUB_PUBLIC_URL="https://hub.example.org/jhub/user/alice/",
        JUPYTERHUB_PUBLIC_HUB_URL="https://hub.example.org/jhub/hub/",
    )
    assert (
        endpoints.resolve("", "", env)[0]
        == "https://hub.example.org/jhub/services/elastic-gpu/api/"
    )
    # only the server's public URL (older Hubs): the same host
    del env["JUPYTERHUB_PUBLIC_HUB_URL"]
    assert (
        endpoints.resolve("", "", env)[0]
        == "https://hub.example.org/jhub/services/elastic-gpu/api/"
    )
    env["ELASTIC_GPU_AGENT"] = "gpu1:7070"  # an explicit agent beats a derived broker
    assert endpoints.resolve("", "", env) == ("", "gpu1:7070")
    env["ELASTIC_GPU_BROKER_URL"] = "http://b/api/"  # an explicit broker beats everything
    assert endpoints.resolve("", "", env) == ("http://b/api/", "")
    assert endpoints.resolve("", "", {}) == ("", "")


def test_no_broker_is_derived_from_the_hub_api_port_which_serves_no_services():
    """No public URL (empty, as JupyterHub sets it): the Hub's API host:8081 is not a guess
    worth making, and the server's own address (JUPYTERHUB_SERVICE_URL) is not the proxy."""
    env = {
        "JUPYTERHUB_API_URL": "http://10.0.0.5:8081/hub/api",
        "JUPYTERHUB_SERVICE_URL": "http://10.0.0.9:41234/user/alice/",
        "JUPYTERHUB_PUBLIC_URL": "",
        "JUPYTERHUB_PUBLIC_HUB_URL": "",
    }
    assert endpoints.resolve("", "", env) == ("", "")


def test_provisioner_refuses_to_launch_without_a_gpu_source(kernels_dir, monkeypatch):
    from jupyter_client.manager import KernelManager

    for name in GPU_ENV:
        monkeypatch.delenv(name, raising=False)
    km = KernelManager(
        kernel_name="python3-gpu-0.5",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]),
    )
    with pytest.raises(RuntimeError, match="no GPU broker or agent configured"):
        km.start_kernel()
    monkeypatch.setenv("ELASTIC_GPU_BROKER_URL", "http://127.0.0.1:1/api/")
    with pytest.raises(RuntimeError, match="needs a JupyterHub token"):
        km.start_kernel()
    assert not km.has_kernel
