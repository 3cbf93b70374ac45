"""jupyter-elastic-gpu: remote, elastic GPU slices for JupyterHub kernels.

Components (one sub-package each):

- ``remote``: the kernel-side client that makes ``torch`` CUDA code run on an agent.
- ``agent``: the GPU-node process that executes sessions' ops on real tensors.
- ``broker``: the JupyterHub service that owns quotas, leases, the queue and the pool.
- ``provisioner``: the kernel provisioner, in-kernel lease hooks and GPU kernelspecs.
- ``serverext``: the single-user server extension behind the JupyterLab sidebar.
"""

__version__ = "0.1.0"
