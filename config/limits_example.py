# Example broker config: GPU limits, fractions and lease policy (c.ElasticGPUBroker.*).
#
# Use it as the broker's config file:
#   - managed by the Hub:  "command": [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", "/etc/jupyterhub/limits.py"]
#   - standalone:          jupyter-elastic-gpu broker -f limits.py
# Reload after editing, without dropping any lease:  kill -HUP <broker pid>
# Bad values (negative limits, a fraction that fits no GPU, a misspelt key) stop the broker
# at start-up with the offending name; on reload they are logged and the old config is kept.
# Full reference: docs/broker.md.
c = get_config()  # noqa: F821

# -- What can be asked for ----------------------------------------------------------------------
# Slices offered: shares of ONE GPU (<= 1: its memory is capped at that share, compute is
# shared) or WHOLE GPUs of one agent (> 1, integers). One "Python 3 (GPU: x)" kernelspec per
# entry (jupyter-elastic-gpu kernelspecs install --fractions 0.25,0.5,1,2).
c.ElasticGPUBroker.fractions = [0.25, 0.5, 1, 2]

# Cap on any single lease, whatever the user's limit (None: no cap). Here nobody gets more
# than 2 GPUs in one kernel even if their limit is 4.
c.ElasticGPUBroker.max_lease = 2

# -- Limits: GPUs a user may hold AT THE SAME TIME, over all their kernels ----------------------
# Kernels hold a slice only while a cell runs GPU work, so a limit of 0.5 still lets a user
# keep ten notebooks open; it caps how many of them compute at once.
# Resolution order: user_limits[user], else the largest group_limits[g] over the user's
# JupyterHub groups, else default_limit.
c.ElasticGPUBroker.default_limit = 0.5

c.ElasticGPUBroker.group_limits = {
    "students": 0.25,  # a quarter GPU each: 4 students share one GPU at full tilt
    "research": 2.0,  # two whole GPUs (or four 0.5 kernels running at once)
    "gpu-power-users": 4.0,
}

# A user's own entry beats their groups, in both directions:
c.ElasticGPUBroker.user_limits = {
    "alice": 1.0,  # more than her group
    "mallory": 0.0,  # no GPU at all (her GPU kernels get a clear 403 at the first GPU op)
}

# Broker admins besides the Hub's admins (see everyone's leases, usage, /metrics).
c.ElasticGPUBroker.admin_users = {"gpu-operator"}

# -- Queue and expiry ----------------------------------------------------------------------------
# A request that fits the limit but not the pool (or whose user's other kernels hold the
# limit) waits in a fair queue: users take turns, each user's requests FIFO.
c.ElasticGPUBroker.queue_timeout = 900  # seconds a cell may wait for a slice (0: forever)
# A kernel that died without giving back its lease loses it after this long without heartbeat.
c.ElasticGPUBroker.lease_heartbeat_timeout = 60
# An agent silent this long leaves the pool, and its leases end (reason "agent-lost").
c.ElasticGPUBroker.agent_heartbeat_timeout = 30

# -- Where state lives ---------------------------------------------------------------------------
# SQLite is fine for one machine; use PostgreSQL when the Hub runs elsewhere or in production.
c.ElasticGPUBroker.db_url = "sqlite:///elastic_gpu.sqlite"
# c.ElasticGPUBroker.db_url = "postgresql://elastic_gpu:PASSWORD@db.internal:5432/elastic_gpu"

# Secrets: leave unset here and pass $ELASTIC_GPU_LEASE_SECRET / $ELASTIC_GPU_AGENT_TOKEN in the
# service's environment (from files or a secret store), so they never land in a config repo.
# c.ElasticGPUBroker.lease_secret = open("/etc/elastic-gpu/lease-secret").read().strip()
# c.ElasticGPUBroker.agent_token = open("/etc/elastic-gpu/agent-token").read().strip()

# /metrics without a token, e.g. for a Prometheus inside a private network.
c.ElasticGPUBroker.authenticate_prometheus = True
