"""Where the broker and the agent are, for the kernel server (provisioner, kernelspecs).

Precedence: an explicit broker URL, then an explicit agent address (single-user mode, no
quotas), then the broker derived from JupyterHub's environment of a single-user server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlparse

SERVICE_API = "services/elastic-gpu/api/"


def hub_broker_url(env: Mapping[str, str] = os.environ) -> str:
    """The broker API as a kernel reaches it under JupyterHub: through the Hub's proxy, at the
    public URL + ``services/elastic-gpu/api/``, the route JupyterHub adds for the service.

    JupyterHub tells a single-user server its public URL (``JUPYTERHUB_PUBLIC_URL``, e.g.
    ``https://hub.example.org/prefix/user/alice/``, and ``JUPYTERHUB_PUBLIC_HUB_URL``) when
    ``c.JupyterHub.public_url`` is set. Without it JupyterHub itself does not know the address
    its users reach the proxy by, and ``JUPYTERHUB_API_URL`` (the Hub's own port, 8081) serves
    no services, so nothing is derived: "" (the provisioner then says what to set).
    """
    base = env.get("JUPYTERHUB_BASE_URL") or "/"
    base = "/" + base.strip("/") + "/" if base.strip("/") else "/"
    for name in ("JUPYTERHUB_PUBLIC_HUB_URL", "JUPYTERHUB_PUBLIC_URL"):
        u = urlparse(env.get(name) or "")
        if u.scheme in ("http", "https") and u.netloc:
            return f"{u.scheme}://{u.netloc}{base}{SERVICE_API}"
    return ""


def resolve(
    broker_url: str = "", agent: str = "", env: Mapping[str, str] = os.environ
) -> tuple[str, str]:
    """``(broker_url, agent)``, exactly one of them non-empty, or both empty if nothing is set."""
    broker_url = broker_url or env.get("ELASTIC_GPU_BROKER_URL", "")
    if broker_url:
        return broker_url, ""
    agent = agent or env.get("ELASTIC_GPU_AGENT", "")
    if agent:
        return "", agent
    return hub_broker_url(env), ""


def hub_token(env: Mapping[str, str] = os.environ) -> str:
    """The single-user server's Hub token: kernels act as its user at the broker."""
    return env.get("JUPYTERHUB_API_TOKEN", "")
