"""Test-only stand-in for ``elastic-gpu-provisioner``: launches the kernel locally.

The server extension under test only reads the kernelspec's provisioner metadata; the real
provisioner (another component) is tested on its own.
"""

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Float


class ShimGPUProvisioner(LocalProvisioner):
    gpu = Float(0.0, help="the slice the kernelspec asks for").tag(config=True)
