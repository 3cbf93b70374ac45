"""Stopping the one-command hub: nothing it started runs on, and it starts again at once.

The shipped ``config/jupyterhub_config.py`` runs in a temp state dir on free loopback ports with
a CPU agent; alice's server runs a GPU kernel that holds a worker on the agent, so the process
tree has every kind of process: Hub, proxy, broker, agent, worker, single-user server, kernel.
Stop times are printed at the end of the run ("lifecycle: measured stop times").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.e2e.support import HUB_CONFIG, DemoHub, WebsocketKernel, descendants, kill_tree

pytestmark = pytest.mark.timeout(400)

STOP_WITHIN = 10.0
STOP_TIMES: dict[str, float] = {}


def alive(pid: int) -> bool:
    """A zombie (exited, not yet reaped by init) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def wait_gone(pids, timeout: float, gone_at: dict | None = None) -> tuple[float, list[int]]:
    """(seconds until every pid was gone, those still alive at ``timeout``); ``gone_at``
    gets each pid's own time."""
    t0 = time.monotonic()
    gone_at = {} if gone_at is None else gone_at
    while True:
        now = time.monotonic() - t0
        left = []
        for p in pids:
            if p in gone_at:
                continue
            if alive(p):
                left.append(p)
            else:
                gone_at[p] = now
        if not left or now > timeout:
            return now, left
        time.sleep(0.05)


def roles(pids) -> dict[str, list[int]]:
    """The processes of a demo hub's tree by what they are."""
    out: dict[str, list[int]] = {}
    for pid in pids:
        cmd = cmdline(pid)
        role = (
            "proxy" if "configurable-http-proxy" in cmd
            else "broker" if "jupyter_elastic_gpu.broker" in cmd
            else "worker" if "jupyter_elastic_gpu.agent.worker" in cmd or "worker" in cmd.split()
            else "agent" if " agent " in f" {cmd} "
            else "single-user server" if "jupyterhub.singleuser" in cmd
            else "kernel" if "ipykernel" in cmd or "kernel-" in cmd
            else "other"
        )  # fmt: skip
        out.setdefault(role, []).append(pid)
    return out


@pytest.fixture
def busy_hub(tmp_path):
    """A demo hub with alice's server and a GPU kernel that has run a GPU op (so the agent
    holds a worker for it); the test stops it, the finalizer kills whatever is left."""
    hub = DemoHub(tmp_path)
    try:
        base = hub.spawn("alice")
        r = hub.server("POST", "alice", "api/kernels", json={"name": "python3-gpu-0.5"})
        assert r.status_code == 201, r.text
        k = WebsocketKernel(base, r.json()["id"], hub.token("alice"))
        try:
            k.wait_ready()
            code = "import torch\nprint((torch.ones(4, device='cuda') * 2).sum().item())"
            reply, outputs = k.execute(code)
            assert reply["status"] == "ok", (reply, outputs)
            # the shipped config names no broker URL: the kernel found it through the proxy
            reply, outputs = k.execute("import os; print(os.environ['ELASTIC_GPU_BROKER_URL'])")
            assert outputs[0]["text"] == f"{hub.url}/services/elastic-gpu/api/\n", outputs
        finally:
            k.close()
        hub.started = descendants(hub.proc.pid)
        yield hub
    finally:
        kill_tree(hub.proc, timeout=5)
        for pid in getattr(hub, "started", []):  # servers a second Hub adopted, if it failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def tree_of(hub: DemoHub) -> dict[str, list[int]]:
    tree = roles(descendants(hub.proc.pid))
    for role in ("proxy", "broker", "agent", "worker", "single-user server", "kernel"):
        assert tree.get(role), f"no {role} in the hub's process tree: {tree}"
    return tree


def report(tree) -> str:
    return "; ".join(f"{pid} {cmdline(pid)[:100]}" for pid in tree)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_every_process_of_the_hub_within_10s_without_a_traceback(busy_hub, sig):
    hub = busy_hub
    tree = tree_of(hub)
    pids = [hub.proc.pid] + [p for ps in tree.values() for p in ps]
    log_start = hub.log.stat().st_size
    if sig == signal.SIGINT:  # Ctrl-C in a terminal: to the foreground group (Hub and proxy)
        os.killpg(hub.proc.pid, sig)
    else:  # kill PID
        hub.proc.send_signal(sig)
    gone_at: dict[int, float] = {}
    took, left = wait_gone(pids, STOP_WITHIN, gone_at)
    hub.proc.wait(5)
    STOP_TIMES[f"{sig.name} on the hub: every process gone"] = took
    for role, ps in tree.items():
        STOP_TIMES[f"{sig.name} on the hub: {role}"] = max(gone_at.get(p, took) for p in ps)
    assert not left, f"still running {STOP_WITHIN:g}s after {sig.name}: {report(left)}"
    with open(hub.log, errors="replace") as f:
        f.seek(log_start)
        stop_log = f.read()
    assert "Traceback" not in stop_log, stop_log[-6000:]
    # the server shut its kernel down (not left to notice its parent's death), also on the
    # SIGINT JupyterHub stops servers with (serverext installs the handler: no terminal)
    assert "Shutting down 1 kernel" in stop_log, stop_log[-6000:]
    assert hub.proc.returncode in (0, -sig, 128 + sig), hub.proc.returncode


def test_a_killed_hub_takes_its_services_along_and_the_next_start_works(busy_hub, tmp_path):
    """kill -9 gives the Hub no chance to stop anything: the broker and agent notice their
    parent is gone, and the proxy is replaced by the next start on the same ports."""
    hub = busy_hub
    tree = tree_of(hub)
    services = tree["broker"] + tree["agent"] + tree["worker"]
    os.kill(hub.proc.pid, signal.SIGKILL)
    hub.proc.wait()
    took, left = wait_gone(services, STOP_WITHIN)
    STOP_TIMES["hub killed -9: broker, agent and worker gone"] = took
    assert not left, f"still running {STOP_WITHIN:g}s after the Hub's kill -9: {report(left)}"

    # the same state dir and ports, right away: the stale proxy is found and replaced
    t0 = time.monotonic()
    with open(hub.log, "ab") as out:
        hub.proc = subprocess.Popen(
            ["jupyterhub", "-f", str(HUB_CONFIG)],
            cwd=hub.tmp, env=hub.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    hub._tokens.clear()
    hub.wait(lambda: hub._get(f"{hub.url}/hub/api/").status_code == 200, 90, "the second Hub")
    hub.wait(
        lambda: any(a["alive"] for a in hub.broker("GET", "pool", "admin").json()["agents"]),
        90,
        "the agent of the second Hub in the pool",
    )
    STOP_TIMES["hub killed -9: second start serving with its agent"] = time.monotonic() - t0
    # the old proxy was replaced (its pid file), not left holding the ports
    assert not [p for p in tree["proxy"] if alive(p)], report(tree["proxy"])
    # alice's server and kernel ran on, as JupyterHub intends: the new Hub adopts them, and
    # stops them as its own
    server = hub.api("GET", "users/alice").json()["servers"][""]
    assert server["ready"], server
    assert hub.server("GET", "alice", "api/kernels").json(), "alice's kernel is gone"
    hub.api("DELETE", "users/alice/server")
    took, left = wait_gone(tree["single-user server"] + tree["kernel"], 30)
    assert not left, f"the second Hub did not stop alice's server: {report(left)}"


def test_a_port_still_held_by_another_process_is_one_line_saying_which_and_what_to_do(
    tmp_path,
):
    """An old proxy the pid file does not name (state dir deleted, another demo) or an old
    agent holds a port: the start fails at once, before anything is started, in one line."""
    import socket

    from jupyter_elastic_gpu.agent.local import free_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {
            **os.environ,
            "ELASTIC_GPU_STATE_DIR": str(tmp_path / "state"),
            "ELASTIC_GPU_BIND_URL": f"http://127.0.0.1:{free_port()}",
            "ELASTIC_GPU_HUB_PORT": str(free_port()),
            "ELASTIC_GPU_PROXY_API_PORT": str(free_port()),
            "ELASTIC_GPU_BROKER_PORT": str(free_port()),
            "ELASTIC_GPU_AGENT_PORT": str(port),
        }
        r = subprocess.run(
            ["jupyterhub", "-f", str(HUB_CONFIG)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 1, r
    out = (r.stdout + r.stderr).strip()
    assert out == (
        f"jupyterhub: port {port} (ELASTIC_GPU_AGENT_PORT) is already in use by pid "
        f"{os.getpid()}: {' '.join(cmdline(os.getpid()).split()[:3])}, perhaps left by an "
        f"earlier hub: stop it (kill {os.getpid()}), or choose other ports (see the top of the "
        "config file)"
    ), out
    assert not (tmp_path / "state" / "jupyterhub.sqlite").exists()  # nothing was started


def test_a_child_asking_to_leave_with_its_parent_is_gone_soon_after_a_kill_9():
    """``lifecycle.exit_with_parent``, what broker, agent and workers use: the watch fires
    when the parent dies by SIGKILL, which no handler of the parent's can report."""
    child_code = textwrap.dedent("""
        import time
        from jupyter_elastic_gpu.lifecycle import exit_with_parent
        assert exit_with_parent("test child", interval=0.1)
        print("ready", flush=True)
        time.sleep(60)
    """)
    parent_code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline() == "ready\\n"
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        took, left = wait_gone([child], STOP_WITHIN)
        assert not left, "the child outlived its parent by 10 s"
        assert took < 2, took  # polled every 0.1 s; SIGTERM ends a sleeping Python at once
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)



def test_an_agent_killed_9_takes_its_workers_along(make_agent):
    """A worker outlives no agent, even one killed -9 that cannot tell it: each watches its
    parent (here the agent's spare worker, the process a session's worker is made from)."""
    agent = make_agent(env={"ELASTIC_GPU_EXIT_WITH_PARENT": ""})  # the agent's own is off
    deadline = time.monotonic() + 60
    while not roles(descendants(agent.proc.pid)).get("worker"):
        assert time.monotonic() < deadline, roles(descendants(agent.proc.pid))
        time.sleep(0.2)
    workers = roles(descendants(agent.proc.pid))["worker"]
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait()
    took, left = wait_gone(workers, STOP_WITHIN)
    STOP_TIMES["agent killed -9: its workers gone"] = took
    assert not left, f"workers outlived their agent by {STOP_WITHIN:g} s: {report(left)}"
