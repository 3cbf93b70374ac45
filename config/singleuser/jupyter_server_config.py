# Single-user server settings of the demo (config/jupyterhub_config.py puts this directory on
# the servers' JUPYTER_CONFIG_PATH). In your own deployment put the same lines in
# /etc/jupyter/jupyter_server_config.py of the single-user image.
c = get_config()  # noqa: F821

# The GPU sidebar's REST endpoints (pip install also drops a file that enables it).
c.ServerApp.jpserver_extensions = {"jupyter_elastic_gpu.serverext": True}

# The kernel picker offers only the "Python 3 (GPU: x)" kernels within the user's limit.
c.ServerApp.kernel_spec_manager_class = (
    "jupyter_elastic_gpu.provisioner.kernelspec_manager.ElasticGPUKernelSpecManager"
)
