"""The broker: the JupyterHub service ``elastic-gpu`` that owns who may use which GPU slice.

It owns per-user and per-group limits (traitlets config), leases of GPU slices and their
signed lease tokens, the fair queue for requests that do not fit yet, the registry of agents
and their GPUs (the pool), expiry of leases whose kernel or agent went silent, usage
accounting (GPU-seconds) and Prometheus metrics. State lives in a SQLAlchemy database.

- :mod:`.scheduler`: quota, queue and placement decisions (pure, no I/O)
- :mod:`.db`: the tables; :mod:`.handlers`: the REST API; :mod:`.app`: the service itself
- :mod:`.client`: :class:`BrokerClient`, the synchronous client kernels and agents use
"""

from .client import BrokerClient, BrokerError

__all__ = ["BrokerClient", "BrokerError"]
