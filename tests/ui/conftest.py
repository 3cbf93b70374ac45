"""Browser-test helpers: a real JupyterLab, a real headless Chromium (Debian's), Playwright.

Reusable beyond these tests (e.g. a full-stack test with the real hub):

- :func:`chromium_or_skip` / the ``browser`` fixture: Debian's ``/usr/bin/chromium`` driven by
  Playwright; never downloads a browser. Skips cleanly when it (or Playwright) is missing.
- :func:`start_lab`: ``jupyter lab`` on a free loopback port with token auth and temp dirs.
- :func:`open_lab`, :func:`open_gpu_sidebar`, :func:`set_theme`: drive the page.
- :class:`ConsoleErrors`: collects console errors and page errors of a page.
- ``ARTIFACTS``: screenshots go to ``test-artifacts/`` (gitignored).
- Against a real hub (tests/ui/test_full_stack.py): :func:`hub_login` (the Hub's login form),
  :func:`wait_for_lab` (a Lab page however it was reached), :func:`kill_processes_with_env`
  (a safety net for processes a test started and whose parents are gone).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.serverext.support import BUILT_LABEXTENSION, REPO, JupyterProcess

CHROMIUM = os.environ.get("ELASTIC_GPU_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
SIDEBAR_ID = "elastic-gpu-sidebar"


def chromium_or_skip() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not path:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); browser tests skipped")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    return path


def labextension_or_skip() -> Path:
    if not (BUILT_LABEXTENSION / "package.json").exists():
        pytest.skip(
            f"the lab extension is not built ({BUILT_LABEXTENSION} missing): "
            "run `cd labextension && jlpm install && jlpm build`"
        )
    return BUILT_LABEXTENSION


@pytest.fixture(scope="session")
def browser():
    path = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    # Never let Playwright fetch a browser of its own.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def start_lab(root: Path, **kwargs: Any) -> JupyterProcess:
    """``jupyter lab`` with this extension (see :class:`JupyterProcess` for the options)."""
    return JupyterProcess(root, app="lab", **kwargs)


class ConsoleErrors:
    """Console errors and uncaught exceptions of a page. ``ignore`` holds substrings."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def take(self, ignore: tuple[str, ...] = ()) -> list[str]:
        out = [e for e in self.errors if not any(s in e for s in ignore)]
        self.errors.clear()
        return out


def open_lab(page, lab: JupyterProcess, path: str = "lab", timeout: float = 90_000) -> None:
    """Load JupyterLab and wait until the shell and its side bars are there."""
    sep = "&" if "?" in path else "?"
    page.goto(f"{lab.url}{path}{sep}token={lab.token}", timeout=timeout)
    page.wait_for_selector("#jp-main-dock-panel", timeout=timeout)
    page.wait_for_selector(f'.jp-SideBar [data-id="{SIDEBAR_ID}"]', timeout=timeout)


def open_gpu_sidebar(page, timeout: float = 30_000):
    """Click the GPU tab in the left side bar (if not open) and return the panel locator."""
    panel = page.locator(f"#{SIDEBAR_ID}")
    if not panel.is_visible():
        page.locator(f'.jp-SideBar [data-id="{SIDEBAR_ID}"]').click()
    panel.wait_for(state="visible", timeout=timeout)
    return panel


def set_theme(page, lab: JupyterProcess, theme: str) -> None:
    """Switch the Lab theme ("JupyterLab Light"/"JupyterLab Dark") and reload the page."""
    settings = lab.dirs["config"] / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "themes.jupyterlab-settings").write_text(f'{{"theme": "{theme}"}}')
    page.reload()
    page.wait_for_selector("#jp-main-dock-panel")
    light = "true" if theme == "JupyterLab Light" else "false"
    page.wait_for_selector(f'body[data-jp-theme-light="{light}"]', state="attached")


def wait_for_lab(page, timeout: float = 90_000) -> None:
    """Wait until the JupyterLab shell and the GPU tab of its left side bar are there."""
    page.wait_for_selector("#jp-main-dock-panel", timeout=timeout)
    page.wait_for_selector(f'.jp-SideBar [data-id="{SIDEBAR_ID}"]', timeout=timeout)


def hub_login(page, hub_url: str, user: str, password: str, timeout: float = 30_000) -> None:
    """Log in through JupyterHub's login page, as a person does (the page then goes on to
    spawn the server and open its default URL)."""
    page.goto(f"{hub_url}/hub/login", timeout=timeout)
    page.fill("#username_input", user)
    page.fill("#password_input", password)
    page.click("#login_submit")
    page.wait_for_url(lambda url: "/hub/login" not in url, timeout=timeout)


def kill_processes_with_env(marker: str) -> list[int]:
    """SIGKILL every process of ours whose environment contains ``marker`` (e.g. a test's
    temp state dir) and return their pids: catches servers and kernels that outlived
    their parents. Never matches this process."""
    me = os.getpid()
    killed = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return killed
