"""A small multi-host network on one machine: network namespaces joined by a bridge.

Every host is a namespace with one interface ``eth0`` (10.200.X.H/24) whose veth peer sits on
a bridge in a "switch" namespace of the same run. Nothing is added to the root namespace:
the test reaches a host by running a function on a thread that has joined that host's
namespace (``setns`` is per thread), and starts programs there with ``ip netns exec``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def netns_permitted() -> str | None:
    """None if this process may create network namespaces, else why not."""
    probe = f"egpu-probe-{uuid.uuid4().hex[:8]}"
    try:
        r = sh("ip", "netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"iproute2 unavailable: {e}"
    if r.returncode != 0:
        return f"'ip netns add' is not permitted here: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Net:
    """One run's namespaces. ``host(name, n)`` adds a host at 10.200.X.n; ``close()`` removes all."""

    def __init__(self, subnet: int | None = None):
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = subnet if subnet is not None else int(self.tag, 16) % 250 + 1
        self.switch = f"egpu-{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # name -> namespace
        self.ips: dict[str, str] = {}
        self.procs: list[subprocess.Popen] = []
        self._namespaces = []
        self._add_ns(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    def _add_ns(self, ns):
        sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def host(self, name: str, n: int) -> str:
        ns = f"egpu-{self.tag}-{name}"
        self._add_ns(ns)
        port = f"p{n}"
        # Created directly inside the two namespaces: no interface ever exists in the root one.
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            self.switch,
        )
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
        sh("ip", "-n", self.switch, "link", "set", port, "up")
        ip = f"10.200.{self.subnet}.{n}"
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self.hosts[name], self.ips[name] = ns, ip
        return ip

    # -- faults ------------------------------------------------------------------------------
    def _port(self, name: str) -> str:
        return f"p{self.ips[name].rsplit('.', 1)[1]}"

    def cut(self, name: str) -> str:
        """Drop every packet to and from host ``name`` (a pulled cable, not a closed socket).

        ``tc netem loss 100%`` where the kernel has netem; else the switch port goes down
        (the host's link loses carrier, peers see silence). Returns the method used.
        """
        r = sh(
            "ip",
            "netns",
            "exec",
            self.switch,
            "tc",
            "qdisc",
            "add",
            "dev",
            self._port(name),
            "root",
            "netem",
            "loss",
            "100%",
            check=False,
        )
        if r.returncode == 0:
            sh(
                "ip",
                "netns",
                "exec",
                self.hosts[name],
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "netem",
                "loss",
                "100%",
            )
            self._cut_by = "tc netem loss 100%"
        else:
            sh("ip", "-n", self.switch, "link", "set", self._port(name), "down")
            self._cut_by = "ip link set <switch port> down"
        return self._cut_by

    def heal(self, name: str) -> None:
        for ns, dev in ((self.switch, self._port(name)), (self.hosts[name], "eth0")):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        sh("ip", "-n", self.switch, "link", "set", self._port(name), "up")

    def pids(self, name: str) -> list[int]:
        r = sh("ip", "netns", "pids", self.hosts[name], check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_host(self, name: str) -> None:
        """SIGKILL every process on host ``name`` (the machine's software dies at once)."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- processes ---------------------------------------------------------------------------
    def popen(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[name], *cmd], start_new_session=True, **kw
        )
        self.procs.append(p)
        return p

    def call(self, name: str, fn, *args, timeout: float = 60.0, **kw):
        """Run ``fn(*args, **kw)`` on a thread inside host ``name``'s network namespace."""
        out: dict = {}

        def body():
            fd = os.open(f"/var/run/netns/{self.hosts[name]}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            try:
                out["value"] = fn(*args, **kw)
            except BaseException as e:  # re-raised on the caller's thread
                out["error"] = e

        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {name} took over {timeout}s")
        if "error" in out:
            raise out["error"]
        return out.get("value")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in list(self.hosts):
            self.kill_host(name)  # workers in their own sessions, anything left behind
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._namespaces):
            sh("ip", "netns", "del", ns, check=False)
