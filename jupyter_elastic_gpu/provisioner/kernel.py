"""The GPU kernel: ``python -m jupyter_elastic_gpu.provisioner.kernel -f {connection_file}``.

A plain IPython kernel whose ``device="cuda"`` is the remote GPU slice named by the
``ELASTIC_GPU_*`` environment the provisioner sets (docs/contracts.md), with the lease
lifecycle of ``hooks`` around every cell.
"""

from __future__ import annotations

import faulthandler
import signal

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp

from .. import __version__
from .hooks import GPUCellHooks


class ElasticGPUKernel(IPythonKernel):
    implementation = "elastic-gpu"
    implementation_version = __version__

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gpu_hooks = GPUCellHooks(self.shell)
        self.gpu_hooks.start()


class ElasticGPUKernelApp(IPKernelApp):
    name = "elastic-gpu-kernel"


def main(argv=None) -> None:
    # `kill -USR1 <kernel pid>` prints every thread's stack to the kernel's stderr (the
    # server log): where a kernel that hangs on its remote GPU is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ElasticGPUKernelApp.launch_instance(argv=argv, kernel_class=ElasticGPUKernel)


if __name__ == "__main__":
    main()
