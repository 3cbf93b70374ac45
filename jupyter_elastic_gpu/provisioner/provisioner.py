"""``ElasticGPUProvisioner``: a local kernel process that leases remote GPU slices.

The kernel runs on this CPU node like any ipykernel; what makes it a GPU kernel is its
environment (the ``ELASTIC_GPU_*`` variables of docs/contracts.md), which the remote client
inside the kernel reads. The lease itself is the kernel's business (taken at the first GPU
op of a cell, given back after it). The provisioner's extra duty is at the end: a kernel
that was killed (``kill -9``, OOM killer, restart with ``now=True``) cannot give back its
lease or free its agent session, so ``cleanup()`` does it for it. The broker's heartbeat
expiry and the agent's vanished-client grace are the backstops if even that fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Float, Unicode, validate

from ..protocol.client import close_session, is_listed
from ..protocol.fraction import GPUFraction
from . import endpoints

DEFAULT_GPU = 1.0  # a kernelspec of this provisioner without config.gpu gets one GPU


class ElasticGPUProvisioner(LocalProvisioner):
    """Launch an ipykernel on this node with a remote GPU slice of ``gpu`` GPUs."""

    gpu = Float(
        DEFAULT_GPU,
        help="GPUs this kernel leases while a cell runs GPU work: a share of one GPU "
        "(0.25, 0.5, 1) or whole GPUs (2). Normally set per kernelspec, in "
        'metadata.kernel_provisioner.config: {"gpu": 0.5}.',
    ).tag(config=True)
    broker_url = Unicode(
        "",
        help="Broker API URL (…/services/elastic-gpu/api/). Default: $ELASTIC_GPU_BROKER_URL; "
        "else, if no agent is set, derived from JupyterHub's $JUPYTERHUB_API_URL.",
    ).tag(config=True)
    agent = Unicode(
        "",
        help="HOST:PORT of an agent to use directly, without a broker or quotas (single-user "
        "mode, plain `jupyter lab`). Default: $ELASTIC_GPU_AGENT. A broker URL wins over it.",
    ).tag(config=True)
    linger = Float(
        None,
        allow_none=True,
        help="Seconds the kernel keeps its lease after a cell ends, in case the next cell starts "
        "right away (ELASTIC_GPU_LINGER in the kernel). None: the kernel's default (0.5 s).",
    ).tag(config=True)
    cleanup_timeout = Float(
        3.0,
        help="Seconds each broker/agent call may take when freeing a dead kernel's lease and "
        "session; an unreachable one is left to the broker's heartbeat expiry.",
    ).tag(config=True)

    session_close_timeout = Float(
        10.0,
        help="Seconds to wait, at most, for a dead kernel's agent session to be freed; longer than "
        "cleanup_timeout because the session's worker may still be starting (a kernel killed "
        "right after it got its lease).",
    ).tag(config=True)

    # The agent session's secret, fresh for each launch: with it the provisioner (and only
    # the kernel it launched) may free the session after the kernel died.
    session_secret = Unicode("", help="Secret of the running kernel's agent session (internal).")

    @validate("gpu")
    def _check_gpu(self, proposal):
        return float(GPUFraction(proposal["value"], "elastic-gpu-provisioner: gpu"))

    # Where the running kernel leases from, fixed at launch: cleanup must reach the same
    # broker with the same token even if the environment changed since.
    _broker = _agent = _token = ""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # The server's environment, plus what its kernel manager passes for this kernel.
        env = {**os.environ, **(kwargs.get("env") or {})}
        broker, agent = endpoints.resolve(self.broker_url, self.agent, env)
        token = endpoints.hub_token(env) if broker else ""
        if not (broker or agent):
            raise RuntimeError(
                "elastic-gpu-provisioner: no GPU broker or agent configured; set "
                "ELASTIC_GPU_BROKER_URL (under JupyterHub: or c.JupyterHub.public_url, the broker "
                "is then found through the proxy) or ELASTIC_GPU_AGENT=HOST:PORT, or "
                "c.ElasticGPUProvisioner.broker_url / .agent"
            )
        if broker and not token:
            raise RuntimeError(
                f"elastic-gpu-provisioner: the broker at {broker} needs a JupyterHub token "
                "(JUPYTERHUB_API_TOKEN) and this server has none; set ELASTIC_GPU_AGENT for "
                "single-user mode instead"
            )
        self._broker, self._agent, self._token = broker, agent, token
        self.session_secret = secrets.token_urlsafe(24)
        return await super().pre_launch(**kwargs)

    def _finalize_env(self, env: dict[str, str]) -> None:
        super()._finalize_env(env)
        broker, agent = self._broker, self._agent
        env["ELASTIC_GPU_FRACTION"] = f"{self.gpu:g}"
        env["ELASTIC_GPU_SESSION"] = self.kernel_id
        env["ELASTIC_GPU_SESSION_SECRET"] = self.session_secret
        kernel_name = getattr(self.parent, "kernel_name", "")
        if kernel_name:
            env["ELASTIC_GPU_KERNEL_NAME"] = kernel_name
        # Exactly one way to the GPU, so the kernel cannot pick the other by accident.
        if broker:
            env["ELASTIC_GPU_BROKER_URL"] = broker
            env.pop("ELASTIC_GPU_AGENT", None)
            env["JUPYTERHUB_API_TOKEN"] = self._token
        else:
            env["ELASTIC_GPU_AGENT"] = agent
            env.pop("ELASTIC_GPU_BROKER_URL", None)
        if self.linger is not None:
            env["ELASTIC_GPU_LINGER"] = f"{self.linger:g}"

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        secret, self.session_secret = self.session_secret, ""
        if not secret:
            return  # never launched
        try:
            await asyncio.to_thread(self.free_remote, secret)
        except Exception as e:  # never fail a shutdown over it: expiry is the backstop
            self.log.warning(
                "elastic-gpu: could not free kernel %s's GPU lease/session: %s", self.kernel_id, e
            )

    def free_remote(self, secret: str) -> None:
        """End this kernel's leases at the broker and its session on the agent(s)."""
        if self._agent:
            close_session(
                self._agent, self.kernel_id, secret, timeout=self.session_close_timeout
            )
            return
        from ..broker.client import BrokerClient

        client = BrokerClient(self._broker, self._token, timeout=self.cleanup_timeout)
        for lease in client.leases():
            if lease.get("session") == self.kernel_id and lease.get("state") != "ended":
                client.release(lease["id"])
                self.log.info(
                    "elastic-gpu: released lease %s of ended kernel %s", lease["id"], self.kernel_id
                )
        # The kernel gave its lease back between cells, but its tensors may still live on an
        # agent: look for the session on every live agent of the pool.
        alive = [a["address"] for a in client.pool().get("agents", []) if a.get("alive")]
        if not any(is_listed(address, self.kernel_id, self.cleanup_timeout) for address in alive):
            return
        # An agent that verifies lease tokens takes a hello only with a token for this session:
        # take a lease for the moment of the close (the broker places it on the agent that
        # holds the session). If none is free now, the agent's grace period frees the session.
        lease = client.request(self.kernel_id, self.gpu, kernel_name="(cleanup)")
        try:
            if lease["state"] == "granted":
                close_session(
                    lease["agent"]["address"], self.kernel_id, secret,
                    token=lease.get("token"), timeout=self.session_close_timeout,
                )  # fmt: skip
            else:
                self.log.info(
                    "elastic-gpu: no GPU free to close kernel %s's agent session now; the agent frees it "
                    "after its grace period", self.kernel_id,
                )  # fmt: skip
        finally:
            client.release(lease["id"])

    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        info["elastic_gpu"] = {
            "secret": self.session_secret,
            "broker": self._broker,
            "agent": self._agent,
        }
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        saved = provisioner_info.get("elastic_gpu") or {}
        self.session_secret = saved.get("secret", "")
        self._broker, self._agent = saved.get("broker", ""), saved.get("agent", "")
        self._token = endpoints.hub_token() if self._broker else ""
