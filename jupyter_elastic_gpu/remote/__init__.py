"""The kernel-side remote CUDA client: unchanged ``torch`` CUDA code runs on an agent's GPU.

``attach()`` installs the ``egpu`` PrivateUse1 backend (``backend``), maps the name "cuda"
onto it (``cuda_facade``, ``autocast``) and opens a session (``session``) whose lease is
taken at the first GPU op. The wire it speaks is ``jupyter_elastic_gpu.protocol``'s.
"""

from __future__ import annotations

import atexit
import os

from ..protocol.fraction import GPUFraction
from . import backend
from .backend import RemoteError, RemoteTensor
from .session import AgentUnavailable, DirectLease, RemoteSession

__all__ = ["attach", "detach", "current_session", "RemoteError", "RemoteTensor", "AgentUnavailable"]


def attach(
    agent: str | None = None,
    *,
    fraction: float | None = None,
    broker: str | None = None,
    token: str | None = None,
    session_id: str | None = None,
    secret: str | None = None,
    lease_provider=None,
) -> RemoteSession:
    """Make ``device="cuda"`` mean the remote GPU in this process.

    Nothing is contacted yet: the lease is taken, and the agent reached, at the first GPU op.
    Arguments default to the ``ELASTIC_GPU_*`` environment a GPU kernel is started with.
    """
    env = os.environ
    if fraction is None:
        fraction = GPUFraction(env.get("ELASTIC_GPU_FRACTION", 1), "$ELASTIC_GPU_FRACTION")
    fraction = GPUFraction(fraction)
    session_id = session_id or env.get("ELASTIC_GPU_SESSION")
    if lease_provider is None:
        broker = broker or (None if agent else env.get("ELASTIC_GPU_BROKER_URL"))
        agent = agent or env.get("ELASTIC_GPU_AGENT")
        if broker:
            from .lease import BrokerLease

            lease_provider = BrokerLease(broker, token or env.get("JUPYTERHUB_API_TOKEN"), fraction)
        elif agent:
            lease_provider = DirectLease(agent, fraction, token)
        else:
            raise ValueError(
                "attach() needs an agent address (HOST:PORT) or a broker URL "
                "(or ELASTIC_GPU_AGENT / ELASTIC_GPU_BROKER_URL in the environment)"
            )
    if backend._session is not None:
        detach()
    from . import cuda_facade

    sess = RemoteSession(
        lease_provider,
        session_id=session_id,
        fraction=fraction,
        secret=secret or env.get("ELASTIC_GPU_SESSION_SECRET"),
    )
    backend._session = sess
    cuda_facade.install(sess)
    return sess


def detach() -> None:
    """Free this process's remote state and give back its lease."""
    sess, backend._session = backend._session, None
    if sess is not None:
        sess.close()


def current_session() -> RemoteSession:
    return backend.current_session()


atexit.register(detach)
