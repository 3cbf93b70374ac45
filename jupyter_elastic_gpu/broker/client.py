"""Synchronous client of the broker's REST API, for kernels (leases) and agents (registration)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import requests


def describe_wait(lease: dict, stop: str = "interrupt the kernel") -> str:
    """A queued lease, for a person: what is asked, who holds it, where it is in the queue,
    and how to stop waiting (``stop``: what to do, in the words of where this is shown)."""
    want = f"{lease.get('fraction', 0):g}"
    if lease.get("reason") == "quota":
        holders = []
        for b in lease.get("blocked_by") or []:
            who = b.get("notebook") or f"kernel {str(b.get('session', '?'))[:8]}"
            holders.append(f"{who} ({b.get('fraction', 0):g} GPU)")
        why = "your GPU quota is in use" + (" by " + ", ".join(holders) if holders else "")
        after = "It starts by itself when their cells end"
    else:
        why = "all GPU slices of the pool are busy"
        after = "It starts by itself when a slice frees up"
    return (
        f"Waiting for a {want} GPU slice: {why}. Position {lease.get('position')} in the queue. "
        f"{after}; {stop} to stop waiting."
    )


class BrokerError(Exception):
    """The broker refused (``status`` is its HTTP status) or could not be reached (``None``).

    ``reason``: ``unreachable`` (no answer), ``refused`` (4xx), ``broker_error`` (5xx),
    ``bad_answer`` (a redirect or a body that is not JSON: probably not the broker's URL).
    The message stays one short line (what failed, where, why); ``detail`` has the rest."""

    def __init__(
        self, message: str, status: int | None = None, reason: str | None = None, detail: str = ""
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason or (
            "unreachable" if status is None else "broker_error" if status >= 500 else "refused"
        )
        self.detail = detail  # an unreachable broker's whole exception chain, for debug logs


def connection_reason(e: BaseException) -> str:
    """The root cause of a failed connection in a few words ("connection refused", "timed
    out"), not urllib3's nested ``HTTPConnectionPool(...): Max retries exceeded ...``."""
    if isinstance(e, requests.Timeout):
        return "timed out"
    seen, todo = set(), [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror.lower()
        if "Name or service not known" in str(cur) or "nodename nor servname" in str(cur):
            return "unknown host"
        todo += [cur.__cause__, cur.__context__, getattr(cur, "reason", None)]
        todo += [a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)]
    return type(e).__name__


class BrokerClient:
    """``url`` is the API base (``.../services/elastic-gpu/api/``); ``token`` a Hub or agent token."""

    def __init__(
        self, url: str, token: str, *, timeout: float = 10.0, connect_timeout: float | None = None
    ):
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout  # None: ``timeout`` for connecting too
        self._local = threading.local()  # requests.Session is not safe to share across threads

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers["Accept"] = "application/json"
            if self.token:
                s.headers["Authorization"] = f"token {self.token}"
        return s

    def _call(self, method: str, path: str, body=None, params=None, timeout=None):
        url = self.url + path
        read = timeout or self.timeout
        try:
            r = self._session().request(
                method,
                url,
                json=body,
                params=params,
                timeout=(self.connect_timeout, read) if self.connect_timeout else read,
                allow_redirects=False,  # the API never redirects: a redirect is the wrong URL
            )
        except requests.RequestException as e:
            raise BrokerError(
                f"cannot reach the broker at {self.url}: {connection_reason(e)}", detail=repr(e)
            ) from None
        if r.status_code == 204:
            return None
        try:
            data = r.json()
        except ValueError:
            if r.status_code < 400:
                raise BrokerError(
                    f"the broker at {url} answered {r.status_code} without JSON "
                    "(is this the broker's API URL?)",
                    r.status_code,
                    "bad_answer",
                ) from None
            data = {"message": r.text[:500] or r.reason}
        if r.status_code >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            raise BrokerError(message or f"broker answered {r.status_code}", r.status_code)
        if r.status_code >= 300:
            raise BrokerError(
                f"the broker at {url} answered {r.status_code} (is this the broker's API URL?)",
                r.status_code,
                "bad_answer",
            )
        return data

    # -- users and kernels -----------------------------------------------------------------
    def me(self) -> dict:
        return self._call("GET", "me")

    def pool(self) -> dict:
        return self._call("GET", "pool")

    def leases(self, all: bool = False) -> list[dict]:
        return self._call("GET", "leases", params={"all": "true"} if all else None)["leases"]

    def lease(self, lease_id: str, wait: float = 0) -> dict:
        """The lease; with ``wait``, answers as soon as its state or queue position changes."""
        params = {"wait": f"{wait:g}"} if wait else None
        return self._call("GET", f"leases/{lease_id}", params=params, timeout=self.timeout + wait)[
            "lease"
        ]

    def usage(self, since: float | None = None) -> dict:
        return self._call("GET", "usage", params={"since": since} if since is not None else None)

    def request(self, session: str, fraction: float, *, kernel_name=None, notebook=None) -> dict:
        """Ask for a lease without waiting: it comes back granted or queued."""
        body = {"session": session, "fraction": fraction}
        if kernel_name is not None:
            body["kernel_name"] = kernel_name
        if notebook is not None:
            body["notebook"] = notebook
        return self._call("POST", "leases", body)["lease"]

    def acquire(
        self,
        session: str,
        fraction: float,
        *,
        kernel_name: str | None = None,
        notebook: str | None = None,
        on_wait: Callable[[dict], None] | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """A granted lease, waiting in the queue as long as needed (or ``timeout`` seconds).

        ``on_wait(lease)`` is called whenever the queue position or reason changes; setting
        ``cancel`` (or any exception, e.g. KeyboardInterrupt) leaves the queue.
        """
        lease = self.request(session, fraction, kernel_name=kernel_name, notebook=notebook)
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        try:
            while lease["state"] == "queued":
                if (lease["position"], lease["reason"]) != seen:
                    seen = (lease["position"], lease["reason"])
                    if on_wait:
                        on_wait(lease)
                if cancel is not None and cancel.is_set():
                    raise BrokerError("cancelled while waiting for a GPU")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BrokerError(f"no GPU within {timeout:g}s (queue position {seen[0]})", 408)
                # Short polls when cancellable, so an interrupt takes effect quickly.
                chunk = 1.0 if cancel is not None else 10.0
                lease = self.lease(lease["id"], wait=min(chunk, left) if left else chunk)
        except BaseException:
            if lease["state"] == "queued":
                try:
                    self.release(lease["id"])
                except BrokerError:
                    pass  # the broker will drop the unpolled request by itself
            raise
        if lease["state"] != "granted":
            reasons = {
                "timeout": "waited longer than the broker's queue timeout",
                "limit": "the admin lowered the limit below this request",
                "abandoned": "the request was not polled in time",
            }
            why = reasons.get(lease["reason"], lease["reason"])
            raise BrokerError(f"lease request for {fraction:g} GPU ended: {why}", 408)
        return lease

    def heartbeat(self, lease_id: str) -> dict:
        """Keep the lease alive; the answer carries a refreshed token."""
        return self._call("POST", f"leases/{lease_id}/heartbeat")["lease"]

    def release(self, lease_id: str) -> None:
        self._call("DELETE", f"leases/{lease_id}")

    # -- agents -----------------------------------------------------------------------------
    def register_agent(
        self, agent_id: str, address: str, gpus: list[dict], *, device: str = "cuda", sessions=None
    ) -> dict:
        body = {"id": agent_id, "address": address, "device": device, "gpus": gpus}
        if sessions is not None:
            body["sessions"] = sessions
        return self._call("POST", "agents", body)

    def agent_heartbeat(self, agent_id: str, gpus: list[dict] | None = None, sessions=None) -> dict:
        body = {}
        if gpus is not None:
            body["gpus"] = gpus
        if sessions is not None:
            body["sessions"] = sessions
        return self._call("POST", f"agents/{agent_id}/heartbeat", body)

    def deregister_agent(self, agent_id: str, timeout: float | None = None) -> None:
        self._call("DELETE", f"agents/{agent_id}", timeout=timeout)

    def agents(self) -> list[dict]:
        return self._call("GET", "agents")["agents"]
