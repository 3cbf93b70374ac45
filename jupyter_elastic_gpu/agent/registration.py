"""Keep this agent in the broker's pool: register, then heartbeat inventory and sessions."""

from __future__ import annotations

import logging
import threading

from ..broker.client import BrokerClient, BrokerError

log = logging.getLogger("jupyter_elastic_gpu.agent")


class BrokerRegistration:
    def __init__(self, agent, broker_url: str, agent_token: str, *, advertise: str):
        self.agent, self.advertise = agent, advertise
        self.client = BrokerClient(broker_url, agent_token)
        self.interval = 5.0
        self._stop = threading.Event()

    def _report(self):
        inv = self.agent.inventory()
        return inv["gpus"], inv["sessions"]

    def _register(self) -> None:
        gpus, sessions = self._report()
        reply = self.client.register_agent(
            self.agent.agent_id, self.advertise, gpus, device=self.agent.device, sessions=sessions
        )
        self.interval = float(reply.get("heartbeat_interval", self.interval))
        log.info("registered with the broker as %s (%s)", self.agent.agent_id, self.advertise)

    def _loop(self) -> None:
        registered = False
        while not self._stop.is_set():
            try:
                if not registered:
                    self._register()
                    registered = True
                else:
                    gpus, sessions = self._report()
                    self.client.agent_heartbeat(self.agent.agent_id, gpus, sessions)
            except BrokerError as e:
                if e.status == 404:  # the broker forgot us (expired): register again
                    registered = False
                    continue
                if self._stop.is_set():  # stopping: the broker may well be gone first
                    break
                # one line per failure, however long the outage: the chain only when debugging
                what = "heartbeat to" if registered else "registering with"
                log.warning("%s the broker failed: %s; next try in %gs", what, e, self.interval)
                if e.detail:
                    log.debug("%s the broker: %s", what, e.detail)
            self._stop.wait(self.interval)

    def start(self) -> None:
        threading.Thread(target=self._loop, daemon=True, name="broker-registration").start()

    def halt(self) -> None:
        """No more heartbeats (and no warnings about them): the agent is stopping."""
        self._stop.set()

    def stop(self) -> None:
        """Leave the pool. Briefly: at a Hub's stop the broker is often gone already."""
        self._stop.set()
        try:
            self.client.deregister_agent(self.agent.agent_id, timeout=2)
        except BrokerError as e:
            log.info("not deregistered from the broker: %s", e)
