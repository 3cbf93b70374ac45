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
