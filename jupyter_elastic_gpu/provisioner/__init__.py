"""GPU kernels: the ``elastic-gpu-provisioner``, the kernel it launches, and the kernel picker.

This package owns everything between "the user picks *Python 3 (GPU: 0.5)*" and "a cell's
first GPU op takes a lease":

- ``provisioner``: ``ElasticGPUProvisioner`` launches the ipykernel on this (CPU) node with
  the ``ELASTIC_GPU_*`` environment the remote client reads, and frees the kernel's lease
  and agent session when the kernel ends, however it ended.
- ``kernel``: ``python -m jupyter_elastic_gpu.provisioner.kernel -f {connection_file}``,
  ipykernel with the remote client attached before the first cell.
- ``hooks``: the in-kernel lease lifecycle (give the lease back shortly after a cell ends,
  show queue waits in the cell's output).
- ``kernelspecs``: ``jupyter-elastic-gpu kernelspecs install|list|remove``.
- ``kernelspec_manager``: ``ElasticGPUKernelSpecManager`` hides kernelspecs above the
  user's GPU limit.
- ``endpoints``: where the broker / agent are, from config and the JupyterHub environment.
"""

from .provisioner import ElasticGPUProvisioner

PROVISIONER_NAME = "elastic-gpu-provisioner"

__all__ = ["ElasticGPUProvisioner", "PROVISIONER_NAME"]
