"""In-kernel GPU lease lifecycle: attach the remote client, release after cells, show waits.

A cell that never touches the GPU never takes a lease (the remote session takes it lazily at
the first GPU op). What this module adds around cells:

- ``pre_run_cell``: wait until the remote client is loaded (it loads in the background so
  the kernel is ready as fast as a plain ipykernel), and cancel a pending release, so a
  cell that follows right away keeps the lease.
- ``post_run_cell``: after ``linger`` seconds without a new cell, ``release()`` the lease:
  the remote session drains queued GPU work first, then gives the slice back. Tensors stay
  on the agent for the next cell.
- while a cell waits in the broker's queue, a live display in the cell's output says why
  (whose notebooks hold the quota, or a full pool) and at which position; interrupting the
  kernel leaves the queue (``BrokerClient.acquire`` does, on the ``KeyboardInterrupt``).
"""

from __future__ import annotations

import html
import logging
import os
import sys
import threading
import time

from ..broker.client import describe_wait

log = logging.getLogger("jupyter_elastic_gpu.kernel")

DEFAULT_LINGER = 0.5


def notebook_name(env=os.environ) -> str | None:
    """The kernel's notebook as its user knows it: jupyter_server passes the absolute path in
    JPY_SESSION_NAME; under the home directory (a Hub server's root) it is shown relative."""
    path = env.get("JPY_SESSION_NAME")
    if not path:
        return None
    home = os.path.expanduser("~")
    if os.path.isabs(path) and home not in ("", "/") and path.startswith(home.rstrip("/") + "/"):
        return os.path.relpath(path, home)
    return path


class WaitDisplay:
    """One live, updated display per cell while its lease request is queued."""

    def __init__(self):
        self.handle = None
        self.since = 0.0
        self.fraction = 0.0

    def reset(self) -> None:
        self.handle = None

    def finish(self) -> None:
        """The cell ended while still queued (interrupted, refused): say the wait is over."""
        if self.handle is not None:
            text = f"Stopped waiting for a {self.fraction:g} GPU slice (left the queue)."
            self.handle.update(self._bundle(text), raw=True)
            self.handle = None

    @staticmethod
    def _bundle(text: str) -> dict:
        return {
            "text/plain": text,
            "text/html": f'<div class="egpu-wait" style="color:#8a5300">{html.escape(text)}</div>',
        }

    def on_wait(self, lease: dict) -> None:
        from IPython.display import DisplayHandle

        self.fraction = lease.get("fraction", 0)
        bundle = self._bundle(describe_wait(lease))
        if self.handle is None:
            self.since = time.monotonic()
            # Keep the handle before sending: an interrupt landing mid-display must still
            # find it in finish(), or the cell would keep saying it is waiting.
            self.handle = DisplayHandle()
            self.handle.display(bundle, raw=True)
        else:
            self.handle.update(bundle, raw=True)

    def on_attach(self, session) -> None:
        if self.handle is not None:
            waited = time.monotonic() - self.since
            text = f"Got a {self.fraction:g} GPU slice after {waited:.1f} s in the queue."
            self.handle.update(self._bundle(text), raw=True)
            self.handle = None


class GPUCellHooks:
    """Attaches the remote client (in the background) and runs the lease lifecycle."""

    def __init__(self, shell, *, linger: float | None = None, env=os.environ):
        self.shell = shell
        self.env = env
        if linger is None:
            try:
                linger = max(0.0, float(env.get("ELASTIC_GPU_LINGER", DEFAULT_LINGER)))
            except ValueError:
                log.warning(
                    "elastic-gpu: ELASTIC_GPU_LINGER=%r is not a number of seconds; using %g",
                    env.get("ELASTIC_GPU_LINGER"),
                    DEFAULT_LINGER,
                )
                linger = DEFAULT_LINGER
        self.linger = linger
        self.session = None
        self.load_error: BaseException | None = None
        self.wait_display = WaitDisplay()
        self._loaded = threading.Event()
        self._told_load_error = False
        self._lock = threading.Lock()  # held while a release runs; taken by pre_run_cell
        self._cell = 0  # bumped by each cell, so a late release never hits a newer cell
        self._timer: threading.Timer | None = None
        self._release_error: str | None = None

    # -- loading -------------------------------------------------------------------------------
    def start(self) -> None:
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)
        threading.Thread(target=self._load, name="egpu-attach", daemon=True).start()

    def _load(self) -> None:
        # torch + the remote backend take ~1.5 s to import: done here, the kernel answers
        # kernel_info at once and only a cell (which needs "cuda") waits for it.
        try:
            from .. import remote

            session = remote.attach()
            secret = self.env.get("ELASTIC_GPU_SESSION_SECRET")
            if secret:
                # The provisioner frees a dead kernel's agent session with this secret.
                # RemoteSession has no parameter for it yet: nothing was sent, so set it.
                session.secret = secret
            lp = session.lease_provider
            if hasattr(lp, "on_wait"):  # a BrokerLease
                lp.on_wait = self.wait_display.on_wait
                lp.kernel_name = self.env.get("ELASTIC_GPU_KERNEL_NAME") or lp.kernel_name
                lp.notebook = notebook_name(self.env) or lp.notebook
            session.on_attach.append(self.wait_display.on_attach)
            self.session = session
            # Programs the user starts from the kernel (`!python train.py`) must not pose as
            # this kernel's session: they get sessions of their own.
            if self.env is os.environ:
                os.environ.pop("ELASTIC_GPU_SESSION_SECRET", None)
                os.environ.pop("ELASTIC_GPU_SESSION", None)
        except BaseException as e:
            self.load_error = e
            log.error("elastic-gpu: the remote GPU client failed to load: %s", e)
        finally:
            self._loaded.set()
        # attach() started the client's warm-up (remote.warm_up): it runs beside the user's
        # first cells, rather than inside the first GPU cell.

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    # -- cells ---------------------------------------------------------------------------------
    def pre_run_cell(self, info=None) -> None:
        self._loaded.wait()
        if self.load_error is not None and not self._told_load_error:
            self._told_load_error = True
            print(
                f"elastic-gpu: no remote GPU in this kernel: {self.load_error}",
                file=sys.stderr,
                flush=True,
            )
        # A release in flight (draining the previous cell's GPU work) ends before this
        # cell's first GPU op; say so if that takes a while rather than hang silently.
        if not self._lock.acquire(timeout=1.0):
            print(
                "elastic-gpu: waiting for the previous cell's GPU work to finish…",
                file=sys.stderr,
                flush=True,
            )
            self._lock.acquire()
        try:
            self._cell += 1
            timer, self._timer = self._timer, None
        finally:
            self._lock.release()
        if timer is not None:
            timer.cancel()
        self.wait_display.reset()
        error, self._release_error = self._release_error, None
        if error:
            print(
                f"elastic-gpu: GPU work of the previous cell failed after it ended: {error}",
                file=sys.stderr,
                flush=True,
            )

    def post_run_cell(self, result=None) -> None:
        self.wait_display.finish()
        session = self.session
        if session is None or not session.attached:
            return
        cell = self._cell
        timer = threading.Timer(self.linger, self._release, args=(cell,))
        timer.daemon = True
        timer.name = "egpu-release"
        self._timer = timer
        timer.start()

    def _release(self, cell: int) -> None:
        with self._lock:
            if cell != self._cell:
                return  # the next cell started within the linger: it keeps the lease
            try:
                self.session.release()  # drains queued GPU work, then gives the lease back
            except Exception as e:
                # An asynchronous error of the last cell's ops surfaces here: say it in the
                # next cell rather than losing it in this thread.
                self._release_error = f"{type(e).__name__}: {e}"
                log.warning("elastic-gpu: releasing the lease: %s", e)
