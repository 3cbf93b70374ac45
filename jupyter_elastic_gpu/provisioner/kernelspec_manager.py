"""``ElasticGPUKernelSpecManager``: the kernel picker offers only GPU slices the user may take.

Enable it in a single-user server::

    c.ServerApp.kernel_spec_manager_class = "jupyter_elastic_gpu.provisioner.kernelspec_manager.ElasticGPUKernelSpecManager"

GPU kernelspecs whose fraction exceeds the user's limit (the broker's ``GET me`` → ``limit``,
capped by ``max_lease``) are left out of listings. Looking a hidden spec up by name still
works, so a notebook saved with one opens, and its first GPU cell gets the broker's clear
"above your limit" error. The broker's answer is cached; when it is slow or down the picker
shows every spec (with a warning in the log) rather than hanging the UI.
"""

from __future__ import annotations

import threading
import time

from jupyter_client.kernelspec import KernelSpecManager
from traitlets import Float, Unicode

from . import endpoints
from .kernelspecs import spec_fraction


class ElasticGPUKernelSpecManager(KernelSpecManager):
    """A KernelSpecManager that hides GPU kernelspecs above the user's GPU limit."""

    broker_url = Unicode(
        "",
        help="Broker API URL to ask for the user's limit. Default: $ELASTIC_GPU_BROKER_URL, else "
        "derived from JupyterHub's environment. With only $ELASTIC_GPU_AGENT (no broker) nothing is hidden.",
    ).tag(config=True)
    cache_seconds = Float(30.0, help="Seconds the user's limit from the broker is reused.").tag(
        config=True
    )
    error_cache_seconds = Float(
        10.0,
        help="Seconds to show all kernelspecs, without asking again, after the broker failed to answer.",
    ).tag(config=True)
    broker_timeout = Float(
        1.0, help="Seconds to wait for the broker; the kernel list waits at most this long, once."
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cached: tuple[float, float | None] | None = None  # (expires, limit)
        self._refreshing = threading.Lock()

    def get_all_specs(self) -> dict:
        specs = super().get_all_specs()
        limit = self.gpu_limit()
        if limit is None:
            return specs
        return {
            n: m
            for n, m in specs.items()
            if (f := spec_fraction(m["spec"])) is None or f.fits(limit)
        }

    # -- the user's limit ----------------------------------------------------------------------
    def gpu_limit(self) -> float | None:
        """GPUs the user may take in one kernel, or None when unknown (show everything)."""
        cached = self._cached
        if cached is not None:
            if cached[0] < time.monotonic() and self._refreshing.acquire(blocking=False):
                # Stale: answer with the old value now, refresh for the next listing.
                threading.Thread(target=self._refresh, args=(True,), daemon=True).start()
            return cached[1]
        with self._refreshing:
            if self._cached is None:
                self._refresh(False)
        return self._cached[1]

    def _refresh(self, locked: bool) -> None:
        try:
            limit, ttl = self._ask_broker(), self.cache_seconds
        except Exception as e:
            self.log.warning(
                "elastic-gpu: cannot read your GPU limit from the broker (%s); showing all GPU kernels",
                e,
            )
            limit, ttl = None, self.error_cache_seconds
        self._cached = (time.monotonic() + ttl, limit)
        if locked:
            self._refreshing.release()

    def _ask_broker(self) -> float | None:
        # Precedence as for kernels: a configured agent without a broker is single-user
        # mode, with no quotas to apply.
        broker, _ = endpoints.resolve(self.broker_url, "")
        if not broker:
            return None
        token = endpoints.hub_token()
        if not token:
            raise RuntimeError("no JUPYTERHUB_API_TOKEN to ask the broker with")
        from ..broker.client import BrokerClient

        me = BrokerClient(broker, token, timeout=self.broker_timeout).me()
        limit = float(me.get("limit", 0))
        if me.get("max_lease") is not None:
            limit = min(limit, float(me["max_lease"]))
        return limit
