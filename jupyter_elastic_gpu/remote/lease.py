"""Leases from the broker for a remote session: wait in the queue, heartbeat while held."""

from __future__ import annotations

import sys
import threading

from ..broker.client import BrokerClient, BrokerError, describe_wait


class BrokerLease:
    """Lease provider that asks the broker (with the user's Hub token) for each attach."""

    def __init__(
        self,
        url: str,
        token: str | None,
        fraction: float,
        *,
        kernel_name=None,
        notebook=None,
        heartbeat_interval: float = 5.0,
        on_wait=None,
    ):
        if not token:
            raise ValueError(
                "a broker needs a JupyterHub token (JUPYTERHUB_API_TOKEN) to lease a GPU"
            )
        self.client = BrokerClient(url, token)
        self.fraction, self.kernel_name, self.notebook = fraction, kernel_name, notebook
        self.heartbeat_interval = heartbeat_interval
        self.on_wait = on_wait or (
            lambda lease: print(describe_wait(lease, "press Ctrl-C"), file=sys.stderr, flush=True)
        )
        self.cancel = threading.Event()  # set from an interrupt to leave the queue
        self.lease: dict | None = None
        self._stop = threading.Event()

    def acquire(self, session) -> dict:
        self._stop.set()  # a lease lost with its connection must not keep a heartbeat thread
        self.cancel.clear()
        try:
            lease = self.client.acquire(
                session.session_id,
                self.fraction,
                kernel_name=self.kernel_name,
                notebook=self.notebook,
                on_wait=self.on_wait,
                cancel=self.cancel,
            )
        except BrokerError as e:
            raise RuntimeError(f"no GPU slice: {e}") from None
        self.lease = lease
        self._stop = threading.Event()
        threading.Thread(
            target=self._heartbeat,
            args=(lease["id"], self._stop, session),
            daemon=True,
            name="egpu-lease-heartbeat",
        ).start()
        return {
            "address": lease["agent"]["address"],
            "token": lease["token"],
            "fraction": lease["fraction"],
            "lease": lease["id"],
        }

    def _heartbeat(self, lease_id, stop, session):
        while not stop.wait(self.heartbeat_interval):
            try:
                lease = self.client.heartbeat(lease_id)
            except BrokerError:
                continue  # the broker may be restarting: running work goes on; expiry is its call
            if lease.get("token") and not stop.is_set():
                session.renew(lease["token"])  # the agent stops serving an expired token

    def release(self) -> None:
        self._stop.set()
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                self.client.release(lease["id"])
            except BrokerError:
                pass  # an unreleased lease expires when its heartbeats stop
