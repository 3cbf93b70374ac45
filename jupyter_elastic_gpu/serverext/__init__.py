"""Single-user server extension behind the JupyterLab GPU sidebar and status bar.

It exposes ``{base_url}elastic-gpu/api/{me,pool,leases,usage,sessions,kernels/<id>}`` to the
browser and talks to the broker (a JupyterHub service) with the single-user server's
``JUPYTERHUB_API_TOKEN``; the token never reaches JavaScript. Outside JupyterHub, with
``ELASTIC_GPU_AGENT=host:port`` and no broker, it shows that agent's inventory only.

Enable it with ``c.ServerApp.jpserver_extensions = {"jupyter_elastic_gpu.serverext": True}``
(``pip install`` drops a config file that does this).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from .app import ElasticGPUServerExtension

__all__ = ["ElasticGPUServerExtension", "_jupyter_server_extension_points"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "jupyter_elastic_gpu.serverext"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .handlers import setup_handlers

    ext = ElasticGPUServerExtension(parent=serverapp)
    setup_handlers(serverapp.web_app, ext)
    serverapp.log.info("jupyter_elastic_gpu server extension loaded: %s", ext.describe())
    _stop_kernels_on_sigint(serverapp)


def _stop_kernels_on_sigint(serverapp: Any) -> None:
    """Without a terminal, jupyter_server leaves SIGINT to Python: a KeyboardInterrupt ends the
    server without shutting its kernels down. JupyterHub stops servers with SIGINT first, and
    a GPU kernel holds a lease and an agent session, so stop as on SIGTERM: kernels first.
    (In a terminal jupyter_server's own Ctrl-C prompt stays.)"""
    stop = getattr(serverapp, "_signal_stop", None)
    if (
        stop is not None
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, stop)


# Older jupyter_server / notebook releases look for the unprefixed name.
load_jupyter_server_extension = _load_jupyter_server_extension
