"""A newcomer's first hour, end to end, with the shipped config/jupyterhub_config.py.

Start the Hub exactly as README says (in a temp state dir, on free ports, CPU agent), log in
as the demo users with their documented passwords, spawn JupyterLab, start a
"Python 3 (GPU: 0.5)" kernel through the server's REST API, run both example notebooks in it
over the websocket (as JupyterLab does), and check the lease lifecycle, the usage accounting
and that the demo users' quotas differ, in the broker's API and in the kernel picker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from .support import DEMO_PASSWORDS, EXAMPLES, DemoHub, WebsocketKernel, text_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if not shutil.which("configurable-http-proxy"):
        pytest.skip(
            "configurable-http-proxy not installed (npm install -g configurable-http-proxy)"
        )
    h = DemoHub(tmp_path_factory.mktemp("newcomer"))
    try:
        yield h
    finally:
        h.stop()


def test_demo_passwords_log_in(hub):
    for user, password in DEMO_PASSWORDS.items():
        s = hub.login(user, password)
        assert s.login_status == 302, f"{user} could not log in with {password!r}"
        assert any(c.name.startswith("jupyterhub-session") for c in s.cookies), s.cookies
    assert hub.login("alice", "wrong").login_status == 403
    assert hub.login("mallory", "mallory-demo").login_status == 403


def test_services_and_pool(hub):
    pool = hub.broker("GET", "pool", "admin").json()
    (agent,) = [a for a in pool["agents"] if a["alive"]]
    assert agent["id"] == "local" and agent["device"] == "cpu"
    assert len(agent["gpus"]) == 1
    # the agent's log says which device it picked
    assert "device=cpu" in hub.log.read_text()
    # secrets were generated into the state dir, private
    for name in ("lease_secret", "agent_token", "jupyterhub_cookie_secret"):
        path = hub.state / name
        assert path.stat().st_mode & 0o077 == 0, f"{name} is readable by others"


def test_quotas_differ_between_demo_users(hub):
    me = {u: hub.broker("GET", "me", u).json() for u in ("alice", "bob", "carol", "admin")}
    assert me["alice"]["limit"] == 0.5
    assert me["bob"]["limit"] == 1.0 and "research" in me["bob"]["groups"]
    assert me["carol"]["limit"] == 0.25
    assert me["admin"]["limit"] == 1.0 and me["admin"]["admin"] is True
    assert me["alice"]["fractions"] == [0.25, 0.5, 1.0]
    # above one's limit is never grantable
    r = hub.broker("POST", "leases", "carol", json={"session": "x", "fraction": 0.5})
    assert r.status_code == 403, r.text
    # only admins see everyone's leases and the usage
    assert hub.broker("GET", "leases?all=true", "alice").status_code == 403
    assert hub.broker("GET", "usage", "alice").status_code == 403


def _gpu_specs(hub, user) -> dict:
    specs = hub.server("GET", user, "api/kernelspecs").json()["kernelspecs"]
    return {n: s["spec"]["display_name"] for n, s in specs.items() if "gpu" in n}


def test_alice_runs_the_examples_on_a_half_gpu(hub):
    base = hub.spawn("alice")
    # the examples were copied into her home
    assert sorted(p.name for p in (hub.state / "homes" / "alice" / "examples").glob("*.ipynb")) == [
        "01-quickstart.ipynb",
        "02-train-mnist-like.ipynb",
    ]
    # the kernel picker: GPU kernels up to her limit only
    assert _gpu_specs(hub, "alice") == {
        "python3-gpu-0.25": "Python 3 (GPU: 0.25)",
        "python3-gpu-0.5": "Python 3 (GPU: 0.5)",
    }
    # the sidebar's server extension answers, through the broker
    side = hub.server("GET", "alice", "elastic-gpu/api/me").json()
    assert side["user"] == "alice" and side["limit"] == 0.5
    # a JupyterLab page is served with the extension
    lab = hub.server("GET", "alice", "lab")
    assert lab.status_code == 200 and "jupyter-elastic-gpu" in lab.text

    r = hub.server("POST", "alice", "api/kernels", json={"name": "python3-gpu-0.5"})
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    k = WebsocketKernel(base, kernel_id, hub.token("alice"))
    try:
        k.wait_ready()
        # no GPU op yet: no lease
        assert hub.broker("GET", "leases", "alice").json()["leases"] == []

        nb1 = k.run_notebook(EXAMPLES / "01-quickstart.ipynb")
        out1 = text_of(nb1)
        assert "CUDA available: True" in out1 and "device='cuda:0'" in out1
        assert "elastic-gpu agent in --device cpu mode" in out1

        # the lease lifecycle: taken by a GPU cell, held while it runs, given back after
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.extend(hub.broker("GET", "leases", "alice").json()["leases"])
                time.sleep(0.2)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        reply, _ = k.execute(
            "import time\nt = torch.ones(8, device='cuda') * 2\nprint(t.sum().item())\ntime.sleep(3)"
        )
        stop.set()
        w.join()
        assert reply["status"] == "ok", reply
        granted = [le for le in seen if le["state"] == "granted"]
        assert granted, f"no granted lease seen while the cell ran: {seen}"
        lease = granted[0]
        assert lease["fraction"] == 0.5 and lease["session"] == kernel_id
        assert lease["agent"]["id"] == "local" and lease["user"] == "alice"
        assert "token" in lease  # the owner sees the token; nobody else does
        hub.wait(
            lambda: hub.broker("GET", "leases", "alice").json()["leases"] == [],
            30,
            "the lease to be given back after the cell",
        )
        ended = hub.broker("GET", f"leases/{lease['id']}", "alice").json()["lease"]
        assert ended["state"] == "ended" and ended["reason"] == "released"
        # admins see it in everyone's list while granted, and in the usage afterwards
        usage = hub.broker("GET", "usage", "admin").json()
        assert usage["users"].get("alice", 0) > 0, usage

        nb2 = k.run_notebook(EXAMPLES / "02-train-mnist-like.ipynb")
        out2 = text_of(nb2)
        assert "final test accuracy" in out2 and "parameters on cuda:0" in out2
        hub.wait(
            lambda: hub.broker("GET", "leases", "alice").json()["leases"] == [],
            30,
            "the lease to be given back after the training notebook",
        )
        assert (
            hub.broker("GET", "usage", "admin").json()["users"]["alice"] > usage["users"]["alice"]
        )
    finally:
        k.close()
        hub.server("DELETE", "alice", f"api/kernels/{kernel_id}")


def test_run_a_script_through_the_hub(hub, tmp_path):
    """README: ``jupyter-elastic-gpu run --gpu F --broker <hub>/services/elastic-gpu/api/``
    with one's own Hub token, through the proxy, quotas applied."""
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "x = torch.randn(16, 16, device='cuda')\n"
        "print('result', (x @ x.T).trace().item() > 0, torch.cuda.get_device_properties(0).total_memory)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU_")}
    env["JUPYTERHUB_API_TOKEN"] = hub.token("carol")
    env["ELASTIC_GPU_TLS_DIR"] = str(hub.state / "tls")  # the demo's agent takes TLS only
    api = f"{hub.url}/services/elastic-gpu/api/"

    def run(fraction):
        return subprocess.run(
            [sys.executable, "-m", "jupyter_elastic_gpu", "run", "--gpu", fraction,
             "--broker", api, "--", "python", str(script)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    check = subprocess.run(
        [sys.executable, "-m", "jupyter_elastic_gpu", "check", "--broker", api],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert "user carol, limit 0.25 GPU" in check.stdout and "device=cpu" in check.stdout

    ok = run("0.25")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "result True" in ok.stdout
    # carol's limit is 0.25: half a GPU is refused with a message that says so
    refused = run("0.5")
    assert refused.returncode != 0
    assert "limit" in refused.stderr.lower(), refused.stderr[-2000:]
    hub.wait(
        lambda: hub.broker("GET", "leases", "carol").json()["leases"] == [],
        30,
        "carol's lease to end when her script exits",
    )
    assert hub.broker("GET", "usage", "admin").json()["users"].get("carol", 0) > 0


def test_second_user_sees_a_different_quota(hub):
    hub.spawn("bob")
    assert _gpu_specs(hub, "bob") == {
        "python3-gpu-0.25": "Python 3 (GPU: 0.25)",
        "python3-gpu-0.5": "Python 3 (GPU: 0.5)",
        "python3-gpu-1": "Python 3 (GPU: 1)",
    }
    side = hub.server("GET", "bob", "elastic-gpu/api/me").json()
    assert side["limit"] == 1.0 and side["user"] == "bob"
    # bob cannot see alice's leases or her kernels' sessions
    assert hub.broker("GET", "leases?all=true", "bob").status_code == 403


def test_browser_login_lab_and_gpu_panel(hub, tmp_path):
    """In a real browser: the login form, JupyterLab with the GPU kernels in the launcher, and
    the GPU panel showing this user's quota and the local agent."""
    from tests.ui.conftest import CHROMIUM_ARGS, chromium_or_skip

    path = chromium_or_skip()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{hub.url}/hub/login")
            page.fill("#username_input", "carol")
            page.fill("#password_input", DEMO_PASSWORDS["carol"])
            page.click("#login_submit")
            page.wait_for_url("**/user/carol/lab**", timeout=180_000)
            page.locator(".jp-Launcher").wait_for(timeout=120_000)
            labels = page.locator(".jp-LauncherCard-label").all_inner_texts()
            assert "Python 3 (GPU: 0.25)" in labels
            assert not any("GPU: 0.5" in t or "GPU: 1" in t for t in labels), labels
            page.locator('.jp-SideBar [data-id="elastic-gpu-sidebar"]').click()
            panel = page.locator("#elastic-gpu-sidebar")
            quota = panel.locator('[data-testid="quota-text"]')
            quota.wait_for(timeout=30_000)
            assert "0.25" in quota.inner_text()
            page.screenshot(path=str(tmp_path / "carol-lab.png"))
        finally:
            browser.close()
