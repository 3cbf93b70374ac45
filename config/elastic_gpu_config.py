# Broker config of the single-machine demo (config/jupyterhub_config.py starts the broker
# with it).  Edit and reload without a restart:  kill -HUP <broker pid>
#
# Limits are in GPUs: 1.0 = one whole GPU, 0.5 = half of one.  A user's limit is their
# entry in user_limits, else the largest group_limits entry among their JupyterHub groups,
# else default_limit.  See config/limits_example.py for every knob and docs/admin-guide.md.
import os
from pathlib import Path

c = get_config()  # noqa: F821  (provided by traitlets when it loads this file)

_state = Path(
    os.environ.get("ELASTIC_GPU_STATE_DIR")
    or Path(__file__).resolve().parent.parent / ".elastic-gpu-state"
)

# The slices offered, and the "Python 3 (GPU: x)" kernelspecs the hub config installs.
# The demo has one (emulated or real) GPU, so nothing above 1.
c.ElasticGPUBroker.fractions = [0.25, 0.5, 1.0]

# Demo users (config/jupyterhub_config.py):
#   alice  -> default_limit               0.5 GPU
#   bob    -> group "research"            1.0 GPU
#   carol  -> user_limits                 0.25 GPU
#   admin  -> user_limits (and Hub admin) 1.0 GPU, sees everyone's leases and usage
c.ElasticGPUBroker.default_limit = 0.5
c.ElasticGPUBroker.group_limits = {"research": 1.0}
c.ElasticGPUBroker.user_limits = {"carol": 0.25, "admin": 1.0}
c.ElasticGPUBroker.max_lease = 1.0

# A kernel that died without giving back its lease loses it after this many seconds.
c.ElasticGPUBroker.lease_heartbeat_timeout = 60
c.ElasticGPUBroker.queue_timeout = 600

# State: the SQLite file next to the Hub's.  Production: postgresql://...
c.ElasticGPUBroker.db_url = f"sqlite:///{_state / 'elastic_gpu.sqlite'}"

# lease_secret and agent_token come from $ELASTIC_GPU_LEASE_SECRET / $ELASTIC_GPU_AGENT_TOKEN,
# which the hub config reads from files it generated in the state dir at first start.
