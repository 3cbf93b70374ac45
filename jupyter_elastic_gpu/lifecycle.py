"""Process lifetime: leave with the parent instead of running on as an orphan.

A process the Hub (or the agent) started must not outlive it: a Hub killed with -9 would
otherwise leave its broker and agent holding their ports, and the next start fails.
``PR_SET_PDEATHSIG`` cannot be used: it fires when the parent *thread* that forked exits
(the agent starts workers from short-lived threads), and JupyterHub's spawner offers no hook
to set it. So a daemon thread polls ``getppid()``: cheap, portable, and it notices within
``interval`` seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

log = logging.getLogger("jupyter_elastic_gpu")

# Set by the shipped Hub config for its managed services; off by default, so that a broker or
# agent started from a shell (nohup, tmux) keeps running when that shell goes.
EXIT_WITH_PARENT_ENV = "ELASTIC_GPU_EXIT_WITH_PARENT"


def exit_with_parent_requested() -> bool:
    return os.environ.get(EXIT_WITH_PARENT_ENV, "") not in ("", "0", "false", "no")


def exit_with_parent(what: str, *, interval: float = 1.0, grace: float = 5.0) -> bool:
    """Stop this process once its parent dies: SIGTERM to itself first (so its own handler
    tells clients and closes files), and if it is still here ``grace`` seconds later, exit.

    Returns False where there is no parent to watch (already orphaned, or PID 1's child).
    """
    parent = os.getppid()
    if parent <= 1:
        return False

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("%s: parent process %d is gone; stopping", what, parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    return True


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` (a bind fails; SO_REUSEADDR as servers use)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (Linux /proc; None where it cannot be told)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc") if inodes else ()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid)
        except OSError:
            continue
    return None


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: " + " ".join(a.decode(errors="replace") for a in args[:3] if a)


def check_ports(ports: dict[str, tuple[str, int]], *, replaceable=(), wait: float = 5.0):
    """One line saying which port is taken by what and what to do, or None if all are free.

    ``ports`` maps a description ("public URL http://...") to ``(host, port)``; a port held by
    a pid in ``replaceable`` (the proxy JupyterHub's pid file names: it stops that one itself)
    is fine. Services of a Hub that was just killed leave with it within a few seconds, so a
    taken port is looked at again for ``wait`` seconds before it counts.
    """
    deadline = time.monotonic() + wait
    while True:
        taken = [
            (what, port)
            for what, (host, port) in ports.items()
            if port_in_use(host, port) and listening_pid(port) not in replaceable
        ]
        if not taken or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if not taken:
        return None
    what, port = taken[0]
    pid = listening_pid(port)
    holder = f" by {describe(pid)}" if pid else ""
    stop = f"stop it (kill {pid})" if pid else "stop the process holding it"
    return (
        f"port {port} ({what}) is already in use{holder}, perhaps left by an earlier hub: "
        f"{stop}, or choose other ports (see the top of the config file)"
    )
