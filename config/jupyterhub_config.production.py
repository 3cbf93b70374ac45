# jupyter-elastic-gpu: the shape of a production JupyterHub config.
#
# NOT runnable as is: replace every "example" value, install the authenticator and spawner
# you choose (`pip install oauthenticator jupyterhub-kubespawner psycopg2-binary`), and read
# docs/admin-guide.md. On Kubernetes with Zero to JupyterHub, the same settings are in
# deploy/kubernetes/z2jh-values.yaml (z2jh writes most of the Hub config for you).
#
# Layout:  Hub + proxy + broker (this host / the hub pod)
#          single-user servers on CPU nodes (KubeSpawner pods here)
#          one agent per GPU node (config/agent.md, deploy/kubernetes/agent-daemonset.yaml)
#          PostgreSQL for the Hub and the broker
import os
import sys

c = get_config()  # noqa: F821

# -- Public endpoint and TLS -------------------------------------------------------------------
# Terminate TLS either here (certificate files below) or, more commonly, in front of the proxy
# (an ingress / load balancer) and leave these unset. Browsers, `jupyter-elastic-gpu run
# --broker https://hub.example.org/services/elastic-gpu/api/` and the sidebar all use this URL.
c.JupyterHub.bind_url = "https://0.0.0.0:443"
c.JupyterHub.ssl_cert = "/etc/jupyterhub/tls/fullchain.pem"
c.JupyterHub.ssl_key = "/etc/jupyterhub/tls/privkey.pem"
# The Hub API must be reachable from single-user pods (and the broker):
c.JupyterHub.hub_bind_url = "http://0.0.0.0:8081"
c.JupyterHub.hub_connect_url = "http://hub.jupyterhub.svc.cluster.local:8081"

# -- State: PostgreSQL, secrets from the environment / a secret store -----------------------
c.JupyterHub.db_url = os.environ[
    "JUPYTERHUB_DB_URL"
]  # postgresql://jupyterhub:...@db:5432/jupyterhub
c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/jupyterhub_cookie_secret"  # mode 600
# c.ConfigurableHTTPProxy.auth_token comes from $CONFIGPROXY_AUTH_TOKEN

# -- Authentication: a real one ------------------------------------------------------------------
# e.g. GitHub / GitLab / Google / generic OIDC with oauthenticator, or LDAP.
c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.client_id = os.environ.get("OAUTH_CLIENT_ID", "example-client-id")
c.GenericOAuthenticator.client_secret = os.environ.get("OAUTH_CLIENT_SECRET", "")
c.GenericOAuthenticator.oauth_callback_url = "https://hub.example.org/hub/oauth_callback"
c.GenericOAuthenticator.authorize_url = "https://sso.example.org/oauth2/authorize"
c.GenericOAuthenticator.token_url = "https://sso.example.org/oauth2/token"
c.GenericOAuthenticator.userdata_url = "https://sso.example.org/oauth2/userinfo"
c.GenericOAuthenticator.username_claim = "preferred_username"
# Groups drive GPU limits (c.ElasticGPUBroker.group_limits): let the IdP manage them.
c.GenericOAuthenticator.manage_groups = True
c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"
c.GenericOAuthenticator.allowed_groups = {"ml-team", "research", "students"}
c.GenericOAuthenticator.admin_groups = {"jupyterhub-admins"}

# -- The broker: managed Hub service "elastic-gpu" ----------------------------------------------
# It listens on all interfaces so that agents (GPU nodes) and single-user servers (CPU nodes)
# reach it directly; browsers reach it through the proxy at /services/elastic-gpu/.
# Its own config (limits, fractions, db_url = PostgreSQL): config/limits_example.py.
c.JupyterHub.services = [
    {
        "name": "elastic-gpu",
        "url": "http://hub.jupyterhub.svc.cluster.local:8090",
        "command": [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu.broker",
            "-f",
            "/etc/jupyterhub/elastic_gpu_config.py",
            "--bind-url=http://0.0.0.0:8090",
        ],
        "environment": {
            # from your secret store; the same lease secret goes to every agent
            "ELASTIC_GPU_LEASE_SECRET": os.environ["ELASTIC_GPU_LEASE_SECRET"],
            "ELASTIC_GPU_AGENT_TOKEN": os.environ["ELASTIC_GPU_AGENT_TOKEN"],
            "ELASTIC_GPU_DB_URL": os.environ["ELASTIC_GPU_DB_URL"],  # postgresql://...
        },
    },
]
c.JupyterHub.load_roles = [
    {
        "name": "elastic-gpu-service",
        "scopes": ["read:users", "read:groups"],
        "services": ["elastic-gpu"],
    },
    {"name": "user", "scopes": ["self", "access:services!service=elastic-gpu"]},
]
c.Spawner.server_token_scopes = [
    "access:services!service=elastic-gpu",
    "users:activity!user",
    "access:servers!server",
]

# -- Single-user servers: CPU pods with KubeSpawner ---------------------------------------------
# The image: your usual single-user image + CPU torch (same minor version as the agents') +
# jupyter-elastic-gpu, with at build time:
#     jupyter-elastic-gpu kernelspecs install --sys-prefix --fractions 0.25,0.5,1,2
# and in /etc/jupyter/jupyter_server_config.py (see config/singleuser/):
#     c.ServerApp.kernel_spec_manager_class = "jupyter_elastic_gpu.provisioner.kernelspec_manager.ElasticGPUKernelSpecManager"
c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
c.KubeSpawner.image = "registry.example.com/singleuser-elastic-gpu:0.1.0"
c.KubeSpawner.namespace = "jupyterhub"
c.KubeSpawner.node_selector = {"node-role.example.com/cpu": "true"}  # never on GPU nodes
c.KubeSpawner.cpu_guarantee = 0.5
c.KubeSpawner.cpu_limit = 4
c.KubeSpawner.mem_guarantee = "2G"
c.KubeSpawner.mem_limit = "8G"
c.KubeSpawner.default_url = "/lab"
c.KubeSpawner.environment = {
    # kernels and the sidebar reach the broker directly (no proxy hop)
    "ELASTIC_GPU_BROKER_URL": "http://hub.jupyterhub.svc.cluster.local:8090/services/elastic-gpu/api/",
}
# Single-user pods must reach the broker (8090) and the agents (7070): allow it in your
# NetworkPolicies (deploy/kubernetes/z2jh-values.yaml has the rules).

# Without Kubernetes: any spawner works the same way (SystemdSpawner, DockerSpawner,
# BatchSpawner on CPU nodes), as long as the servers get ELASTIC_GPU_BROKER_URL and can
# reach the broker and the agents.

c.JupyterHub.cleanup_servers = False  # keep users' servers across Hub restarts
