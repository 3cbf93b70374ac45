"""The GPU sidebar and status bar in a real JupyterLab + headless Chromium, fake broker."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.serverext.support import LOCAL_GPU_PROVISIONER_SHIM, FakeBroker, gpu_kernelspec

from .conftest import (
    ConsoleErrors,
    labextension_or_skip,
    open_gpu_sidebar,
    open_lab,
    set_theme,
    start_lab,
)

pytestmark = pytest.mark.slow

# Failed fetches (our 503s while the broker is down) are logged by Chromium itself.
NETWORK_NOISE = ("Failed to load resource",)


@pytest.fixture(scope="module")
def broker():
    b = FakeBroker().start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def lab(broker, tmp_path_factory):
    labextension_or_skip()
    root = tmp_path_factory.mktemp("lab")
    proc = start_lab(
        root,
        env={"ELASTIC_GPU_BROKER_URL": broker.url, "JUPYTERHUB_API_TOKEN": "alice-token"},
        server_config=LOCAL_GPU_PROVISIONER_SHIM,
        kernelspecs={"gpu-half": gpu_kernelspec(0.5)},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def page(browser, lab):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, reduced_motion="reduce")
    p = context.new_page()
    p.console_errors = ConsoleErrors(p)
    open_lab(p, lab)
    yield p
    context.close()


def test_sidebar_shows_quota_leases_and_pool(page, artifacts):
    panel = open_gpu_sidebar(page)
    tab = page.locator('.jp-SideBar [data-id="elastic-gpu-sidebar"]')
    assert tab.get_attribute("title") == "GPU"

    quota = panel.locator('[data-testid="quota"]')
    quota.wait_for()
    assert quota.locator('[data-testid="quota-text"]').inner_text() == "0.5 of 1 GPU in use"
    bar = quota.locator('[role="progressbar"]')
    assert bar.get_attribute("aria-valuenow") == "50"

    leases = panel.locator(".jp-ElasticGpu-lease")
    assert leases.count() == 2
    train = panel.locator('[data-lease="L-a1"]')
    assert "train.ipynb" in train.inner_text()
    assert train.locator("[data-state]").inner_text() == "attached"
    assert "gpu-node-1 · GPU 0" in train.inner_text()
    evaluation = panel.locator('[data-lease="L-a2"]')
    assert evaluation.locator("[data-state]").inner_text() == "waiting (#2, your limit)"
    assert "behind: train.ipynb (0.5)" in evaluation.inner_text()

    idle = panel.locator(".jp-ElasticGpu-session")
    assert idle.count() == 1 and "explore.ipynb" in idle.inner_text()
    assert "swapped to host" in idle.inner_text()

    agents = panel.locator("[data-agent]")
    assert agents.count() == 2
    gpu0 = panel.locator('[data-gpu="gpu-node-1/GPU-1111"]')
    text = gpu0.inner_text()
    assert "NVIDIA H100" in text and "0.75 of 1 in use" in text
    assert "64%" in text and "31 GiB / 80 GiB" in text
    assert "0.5 · alice (you)" in text and "0.25 · in use" in text

    # A non-admin sees nobody else's name and no admin table.
    body = panel.inner_text()
    for other in ("bob", "carol", "finetune", "llm.ipynb"):
        assert other not in body
    assert panel.locator('[data-section="users"]').count() == 0

    panel.screenshot(path=str(artifacts / "sidebar-light.png"))
    page.screenshot(path=str(artifacts / "lab-light.png"))
    assert page.console_errors.take() == []


def test_sidebar_updates_in_place(page, broker):
    panel = open_gpu_sidebar(page)
    row = panel.locator('[data-lease="L-a1"]')
    row.wait_for()
    row.evaluate("el => { el.dataset.marker = 'same-node'; }")
    lease = next(lease for lease in broker.state["leases"] if lease["id"] == "L-a2")
    lease["position"] = 1
    try:
        panel.locator('[data-lease="L-a2"] [data-state]').filter(
            has_text="waiting (#1, your limit)"
        ).wait_for(timeout=10_000)
        # Same DOM node: rows are keyed and updated, not re-created (no flicker).
        assert row.get_attribute("data-marker") == "same-node"
    finally:
        lease["position"] = 2


def test_admin_sees_all_users(page, broker, artifacts):
    broker.state["tokens"]["alice-token"] = "admin"
    try:
        panel = open_gpu_sidebar(page)
        users = panel.locator('[data-section="users"]')
        users.wait_for(timeout=15_000)
        carol = users.locator('tr[data-user="carol"]')
        carol.wait_for()
        cells = [c.inner_text() for c in carol.locator("td").all()]
        assert cells == ["carol", "2", "1", "8.40 GPU-h"]
        assert "0.25 · bob" in panel.inner_text()
        panel.screenshot(path=str(artifacts / "sidebar-admin.png"))
        assert page.console_errors.take() == []
    finally:
        broker.state["tokens"]["alice-token"] = "alice"
    panel.locator('[data-section="users"]').wait_for(state="detached", timeout=15_000)


def test_broker_unreachable_then_back(page, broker, artifacts):
    panel = open_gpu_sidebar(page)
    broker.stop()
    try:
        banner = panel.locator('[data-testid="unreachable"]')
        banner.wait_for(timeout=15_000)
        assert re.search(r"GPU broker unreachable — retrying in \d+s", banner.inner_text())
        assert banner.get_attribute("role") == "alert"
        # The last good data stays visible (dimmed) under the banner.
        assert panel.locator('[data-lease="L-a1"]').count() == 1
        panel.screenshot(path=str(artifacts / "sidebar-unreachable.png"))
    finally:
        broker.start()
    panel.get_by_role("button", name="Retry now").click()
    panel.locator('[data-testid="unreachable"]').wait_for(state="detached", timeout=15_000)
    assert page.console_errors.take(ignore=NETWORK_NOISE) == []


def test_status_bar_follows_the_kernel(page, lab, broker, artifacts):
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "source": "x = 1",
                "metadata": {},
                "outputs": [],
                "execution_count": None,
            }
        ],
        "metadata": {
            "kernelspec": {
                "name": "gpu-half",
                "display_name": "Python 3 (GPU: 0.5)",
                "language": "python",
            }
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    status, _ = lab.request(
        "PUT", "api/contents/gpu.ipynb", {"type": "notebook", "format": "json", "content": nb}
    )
    assert status in (200, 201)
    open_lab(page, lab, "lab/tree/gpu.ipynb")
    item = page.locator(".jp-ElasticGpu-status")
    item.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => document.querySelector('.jp-ElasticGpu-status')?.textContent === 'GPU 0.5 · idle'",
        timeout=30_000,
    )
    sessions = lab.request("GET", "api/sessions")[1]
    kernel_id = next(s["kernel"]["id"] for s in sessions if s["path"] == "gpu.ipynb")

    lease = {
        "id": "L-nb",
        "user": "alice",
        "session": kernel_id,
        "kernel_name": "gpu-half",
        "notebook": "gpu.ipynb",
        "fraction": 0.5,
        "state": "queued",
        "position": 2,
        "reason": "pool",
        "blocked_by": [],
        "agent": None,
        "gpus": [],
        "created": time.time(),
    }
    broker.state["leases"].append(lease)
    try:
        page.wait_for_function(
            "() => document.querySelector('.jp-ElasticGpu-status')?.textContent"
            " === 'GPU 0.5 · waiting (#2)'",
            timeout=15_000,
        )
        lease.update(state="granted", position=None, agent={"id": "gpu-node-2"}, gpus=[0])
        page.wait_for_function(
            "() => document.querySelector('.jp-ElasticGpu-status')?.textContent"
            " === 'GPU 0.5 · attached'",
            timeout=15_000,
        )
        assert item.get_attribute("role") == "button"
        assert item.get_attribute("tabindex") == "0"
        assert "GPU 0.5 · attached" in (item.get_attribute("aria-label") or "")
        page.screenshot(path=str(artifacts / "lab-statusbar.png"))
        # Keyboard: Enter on the item opens the GPU panel.
        page.locator('.jp-SideBar [data-id="filebrowser"]').click()
        item.focus()
        page.keyboard.press("Enter")
        page.locator("#elastic-gpu-sidebar").wait_for(state="visible", timeout=10_000)
        panel = page.locator("#elastic-gpu-sidebar")
        panel.locator('[data-lease="L-nb"]').wait_for(timeout=15_000)
        page.screenshot(path=str(artifacts / "lab-notebook-sidebar.png"))
    finally:
        broker.state["leases"].remove(lease)
    assert page.console_errors.take(ignore=NETWORK_NOISE) == []


def test_dark_theme(page, lab, artifacts):
    set_theme(page, lab, "JupyterLab Dark")
    try:
        panel = open_gpu_sidebar(page)
        panel.locator('[data-testid="quota"]').wait_for(timeout=15_000)
        bg = panel.evaluate("el => getComputedStyle(el).backgroundColor")
        rgb = [int(x) for x in re.findall(r"\d+", bg)[:3]]
        assert sum(rgb) < 3 * 128, f"sidebar background {bg} is not dark"
        panel.screenshot(path=str(artifacts / "sidebar-dark.png"))
    finally:
        set_theme(page, lab, "JupyterLab Light")
    assert page.console_errors.take(ignore=NETWORK_NOISE) == []


def test_no_token_in_the_page(page, lab):
    html = page.content()
    assert "alice-token" not in html and "SECRET-LEASE-TOKEN" not in html
    payload = page.evaluate(
        """async () => {
            const r = await fetch('/elastic-gpu/api/me', {credentials: 'same-origin'});
            return await r.text();
        }"""
    )
    assert "SECRET-LEASE-TOKEN" not in payload and "alice-token" not in payload
    assert json.loads(payload)["user"] == "alice"
