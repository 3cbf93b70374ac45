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
    """The broker API under JupyterHub: ``JUPYTERHUB_API_URL``'s host + the service prefix.

    ``JUPYTERHUB_PUBLIC_URL`` wins when the Hub sets it (its API host may not route
    services); ``JUPYTERHUB_BASE_URL`` keeps a Hub served under a prefix working.
    """
    api = env.get("JUPYTERHUB_PUBLIC_URL") or env.get("JUPYTERHUB_API_URL") or ""
    u = urlparse(api)
    if not (u.scheme and u.netloc):
        return ""
    base = env.get("JUPYTERHUB_BASE_URL") or "/"
    base = "/" + base.strip("/") + "/" if base.strip("/") else "/"
    return f"{u.scheme}://{u.netloc}{base}{SERVICE_API}"


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
