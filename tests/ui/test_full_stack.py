"""The GPU sidebar against the real stack, in a real browser.

The shipped ``config/jupyterhub_config.py`` (JupyterHub + the broker + a CPU agent as managed
services, demo users) runs unchanged in a temp state dir on free ports (the e2e tests'
:class:`DemoHub`). Headless Chromium (Debian's) then:

1. logs in as alice through the Hub's login page; the Hub spawns her JupyterLab;
2. opens the GPU panel (her quota, no leases, the CPU agent's GPU in the pool);
3. starts a "Python 3 (GPU: 0.5)" notebook from the launcher and runs a cell that does GPU
   work for a few seconds: the lease shows up in the panel ("attached") and in the status bar
   ("GPU 0.5 · attached"), and goes away when the cell ends ("GPU 0.5 · idle");
4. starts a long GPU cell, and while it holds its slice logs in as bob (a new browser
   context): bob's pool view shows the slice as "0.5 · in use", without alice's name or her
   notebook; then alice interrupts her cell and the slice is given back.

Screenshots go to test-artifacts/ (``full-stack-*.png``).
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.e2e.support import DEMO_PASSWORDS, DemoHub

from .conftest import (
    ConsoleErrors,
    chromium_or_skip,
    hub_login,
    kill_processes_with_env,
    labextension_or_skip,
    open_gpu_sidebar,
    wait_for_lab,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

GPU_KERNEL = "Python 3 (GPU: 0.5)"
# Long enough for the panel (it polls every 2 s) to see the lease while the cell runs.
SHORT_CELL = (
    'import torch, time\nx = torch.ones(1000, device="cuda")\ntime.sleep(10)\nx.sum().item()'
)
LONG_CELL = 'y = torch.ones(10, device="cuda")\ntime.sleep(120)\ny.sum().item()'
# Chromium logs failed fetches itself (e.g. a favicon); our own errors are page errors.
NETWORK_NOISE = ("Failed to load resource",)
STATUS = ".jp-ElasticGpu-status"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if not shutil.which("configurable-http-proxy"):
        pytest.skip(
            "configurable-http-proxy not installed (npm install -g configurable-http-proxy)"
        )
    labextension_or_skip()
    chromium_or_skip()
    tmp = tmp_path_factory.mktemp("full-stack")
    h = None
    try:
        h = DemoHub(tmp)
        h.wait(
            lambda: any(a["alive"] for a in h.broker("GET", "pool", "admin").json()["agents"]),
            90,
            "the local agent in the broker's pool",
        )
        yield h
    finally:
        if h is not None:
            h.stop()
        # whatever outlived the Hub's process tree (servers, kernels, services)
        kill_processes_with_env(f"{tmp}/")


def status_text(page) -> str | None:
    return page.evaluate(f"() => document.querySelector('{STATUS}')?.textContent ?? null")


def wait_status(page, text: str, timeout: float = 30_000) -> None:
    page.wait_for_function(
        f"t => document.querySelector('{STATUS}')?.textContent === t", arg=text, timeout=timeout
    )


def run_cell(page, index: int, code: str) -> None:
    """Type ``code`` into the notebook's cell ``index`` and run it (Shift+Enter)."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.wait_for(timeout=15_000)
    cell.locator(".cm-content").click()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.insert_text(code)  # no auto-indent or bracket closing on the way
    page.keyboard.press("Shift+Enter")


def dismiss_news_prompt(page, timeout: float = 4_000) -> None:
    """Answer JupyterLab's first-start "notified about official Jupyter news?" toast with No
    (it would cover the notebook in the screenshots)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    no = page.locator(".Toastify__toast").get_by_role("button", name="No", exact=True)
    try:
        no.wait_for(timeout=timeout)
        no.click()
    except PlaywrightTimeout:
        pass  # not shown (yet): harmless


def log_in_and_open_lab(context, hub, user: str):
    page = context.new_page()
    page.console_errors = ConsoleErrors(page)
    hub_login(page, hub.url, user, DEMO_PASSWORDS[user])
    # the login goes on to spawn the server (a progress page) and then to /user/<name>/lab
    page.wait_for_url(f"**/user/{user}/lab**", timeout=150_000)
    wait_for_lab(page, timeout=90_000)
    return page


def test_lease_lifecycle_in_the_browser(hub, browser, artifacts):
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    alice_ctx = browser.new_context(
        viewport={"width": 1280, "height": 820}, reduced_motion="reduce"
    )
    bob_ctx = None
    passed = False
    try:
        # -- alice logs in; the Hub spawns her JupyterLab -------------------------------
        page = log_in_and_open_lab(alice_ctx, hub, "alice")
        timings["alice lab"] = time.monotonic() - t0
        panel = open_gpu_sidebar(page)
        quota = panel.locator('[data-testid="quota"]')
        quota.wait_for(timeout=30_000)
        assert panel.locator('[data-testid="user"]').inner_text().strip().startswith("alice")
        assert quota.locator('[data-testid="quota-text"]').inner_text() == "0 of 0.5 GPUs in use"
        assert panel.locator(".jp-ElasticGpu-lease").count() == 0
        gpu_card = panel.locator(".jp-ElasticGpu-gpu")
        gpu_card.first.wait_for(timeout=15_000)
        assert panel.locator('[data-agent="local"]').count() == 1
        assert "0 of 1 in use" in gpu_card.first.inner_text()

        # -- a "Python 3 (GPU: 0.5)" notebook from the launcher -------------------------
        card = page.locator(f'.jp-LauncherCard[data-category="Notebook"][title="{GPU_KERNEL}"]')
        card.wait_for(timeout=30_000)
        # the kernel picker hides fractions above alice's limit (0.5)
        assert page.locator('.jp-LauncherCard[title="Python 3 (GPU: 1)"]').count() == 0
        card.click()
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=30_000)
        wait_status(page, "GPU 0.5 · idle", timeout=60_000)
        dismiss_news_prompt(page)
        timings["gpu notebook"] = time.monotonic() - t0

        # -- a cell with GPU work: attached while it runs -------------------------------
        run_cell(page, 0, SHORT_CELL)
        lease = panel.locator(".jp-ElasticGpu-lease")
        lease.first.wait_for(timeout=60_000)  # the kernel imports torch first
        row = lease.first
        row.locator('[data-state="attached"]').wait_for(timeout=10_000)
        wait_status(page, "GPU 0.5 · attached", timeout=10_000)
        text = row.inner_text()
        assert "Untitled" in text and "0.5 GPU" in text, text
        assert "local · GPU 0" in text, text
        panel.locator('[data-testid="quota-text"]').filter(
            has_text="0.5 of 0.5 GPUs in use"
        ).wait_for(timeout=10_000)
        slices = panel.locator(".jp-ElasticGpu-sliceLabel")
        slices.filter(has_text="0.5 · alice (you)").wait_for(timeout=10_000)
        # an attached session is not also listed as idle (once its agent worker has started)
        panel.locator(".jp-ElasticGpu-session").first.wait_for(state="detached", timeout=10_000)
        assert status_text(page) == "GPU 0.5 · attached", "the cell ended before the checks"
        page.screenshot(path=str(artifacts / "full-stack-attached.png"))
        panel.screenshot(path=str(artifacts / "full-stack-sidebar-attached.png"))
        timings["attached"] = time.monotonic() - t0

        # -- the cell ends: the slice is given back -------------------------------------
        output = page.locator(".jp-Notebook .jp-Cell").first.locator(".jp-OutputArea-output")
        output.filter(has_text="1000.0").wait_for(timeout=60_000)
        wait_status(page, "GPU 0.5 · idle", timeout=20_000)
        lease.first.wait_for(state="detached", timeout=15_000)
        panel.locator('[data-testid="quota-text"]').filter(
            has_text="0 of 0.5 GPUs in use"
        ).wait_for(timeout=10_000)
        assert panel.locator(".jp-ElasticGpu-sliceLabel").count() == 0
        page.screenshot(path=str(artifacts / "full-stack-idle.png"))
        timings["idle"] = time.monotonic() - t0

        # -- a long GPU cell holds the slice while bob looks at the pool ---------------
        run_cell(page, 1, LONG_CELL)
        wait_status(page, "GPU 0.5 · attached", timeout=30_000)

        bob_ctx = browser.new_context(
            viewport={"width": 1280, "height": 820}, reduced_motion="reduce"
        )
        bob = log_in_and_open_lab(bob_ctx, hub, "bob")
        timings["bob lab"] = time.monotonic() - t0
        bob_panel = open_gpu_sidebar(bob)
        bob_panel.locator('[data-testid="quota"]').wait_for(timeout=30_000)
        assert bob_panel.locator('[data-testid="user"]').inner_text().strip().startswith("bob")
        # alice's slice, without a name
        bob_panel.locator(".jp-ElasticGpu-sliceLabel").filter(has_text="0.5 · in use").wait_for(
            timeout=15_000
        )
        assert status_text(page) == "GPU 0.5 · attached", "alice's cell ended too early"
        body = bob_panel.inner_text()
        assert "0.5 of 1 in use" in body
        for secret in ("alice", "Untitled"):
            assert secret not in body, f"bob's GPU panel shows {secret!r}:\n{body}"
        assert bob_panel.locator(".jp-ElasticGpu-lease").count() == 0
        assert bob_panel.locator(".jp-ElasticGpu-session").count() == 0
        assert bob_panel.locator('[data-section="users"]').count() == 0
        assert "alice" not in bob.content()
        bob_panel.screenshot(path=str(artifacts / "full-stack-bob-pool.png"))

        # -- alice interrupts: the slice is given back ----------------------------------
        page.locator('.jp-Toolbar [data-command="notebook:interrupt-kernel"]').click()
        wait_status(page, "GPU 0.5 · idle", timeout=30_000)
        panel.locator(".jp-ElasticGpu-lease").first.wait_for(state="detached", timeout=15_000)
        bob_panel.locator(".jp-ElasticGpu-sliceLabel").first.wait_for(
            state="detached", timeout=15_000
        )
        timings["interrupted"] = time.monotonic() - t0

        assert page.console_errors.take(ignore=NETWORK_NOISE) == []
        assert bob.console_errors.take(ignore=NETWORK_NOISE) == []
        passed = True
    finally:
        if not passed:
            print("hub log (tail):\n" + hub.logs(8000))
        print("full-stack timings (s since start):", {k: round(v, 1) for k, v in timings.items()})
        for ctx in (alice_ctx, bob_ctx):
            if ctx is not None:
                for p in ctx.pages:
                    name = "bob" if ctx is bob_ctx else "alice"
                    try:
                        p.screenshot(path=str(artifacts / f"full-stack-last-{name}.png"))
                    except Exception:
                        pass
                ctx.close()
