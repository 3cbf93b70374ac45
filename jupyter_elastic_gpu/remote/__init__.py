"""The kernel-side remote CUDA client: unchanged ``torch`` CUDA code runs on an agent's GPU.

``attach()`` installs the ``egpu`` PrivateUse1 backend (``backend``), maps the name "cuda"
onto it (``cuda_facade``, ``autocast``) and opens a session (``session``) whose lease is
taken at the first GPU op. The wire it speaks is ``jupyter_elastic_gpu.protocol``'s.
"""

from __future__ import annotations

import atexit
import importlib
import os
import threading
import time

from ..protocol.fraction import GPUFraction
from . import backend
from .backend import RemoteError, RemoteTensor
from .session import AgentUnavailable, DirectLease, RemoteSession

__all__ = [
    "attach",
    "detach",
    "current_session",
    "warm_up",
    "RemoteError",
    "RemoteTensor",
    "AgentUnavailable",
]


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
    warm_up(wait=False)
    return sess


def detach() -> None:
    """Free this process's remote state and give back its lease."""
    sess, backend._session = backend._session, None
    if sess is not None:
        sess.close()


def current_session() -> RemoteSession:
    return backend.current_session()


_warm: threading.Thread | None = None


def warm_up(wait: bool = True, timeout: float | None = None) -> bool:
    """Do now, in the background, what the first GPU op would otherwise pay for; with
    ``wait``, return once that is done (True) or ``timeout`` passed (False).

    ``attach()`` starts it: a kernel attaches at start, so by the first cell it is done.
    What it does is import what torch imports lazily inside the first ops, where native
    CUDA code never pays it (an import in progress is waited for, not repeated, so an op
    that comes early loses nothing):

    - ``torch.distributed.tensor``, with sympy and the symbolic-shapes machinery (about
      0.5-1 s): torch's DTensor check at the first op on any tensor subclass, i.e. at
      every session's first GPU op;
    - ``torch._dynamo`` (about 1 s more): the reference implementations of random ops,
      which give ``torch.randn(..., device="cuda")`` its result's shape here, are wrapped
      to keep dynamo out, and that wrapper imports it at its first call."""
    global _warm
    if _warm is None:
        _warm = threading.Thread(target=_warm_up, name="egpu-warm-up", daemon=True)
        _warm.start()
    if wait:
        _warm.join(timeout)
    return not _warm.is_alive()


warm_up_seconds: dict[str, float] = {}  # per module, for benchmarks (real_models first_op)


def _warm_up() -> None:
    # Most needed first: every first op waits for the DTensor check's import.
    for module in ("torch.distributed.tensor", "torch._dynamo"):
        t = time.perf_counter()
        try:
            importlib.import_module(module)
        except Exception:  # a torch without it: the first op has no such import either
            pass
        warm_up_seconds[module] = time.perf_counter() - t


def _finish_warm_up_before_fork() -> None:
    # A fork()ed child (DataLoader worker) inherits the import locks the warm-up holds, but
    # not the thread that would release them: its next import of those modules would hang.
    if _warm is not None and _warm.is_alive() and _warm is not threading.current_thread():
        _warm.join(30.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_finish_warm_up_before_fork)


atexit.register(detach)
