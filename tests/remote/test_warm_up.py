"""The client's warm-up: what torch would import inside a session's first GPU ops is imported
from attach() on, in the background, and never strands a forked child."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(240)


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180
    )


def test_after_the_warm_up_first_gpu_ops_import_nothing_of_torch(agent):
    p = run(f"""
        import sys
        import torch
        from jupyter_elastic_gpu import remote
        remote.attach({agent.address!r}, fraction=0.25)
        print("warmed", remote.warm_up(timeout=120))
        before = set(sys.modules)
        torch.ones(1, device="cuda").sum().item()
        x = torch.randn(8, 8, device="cuda")  # random ops take another lazy import
        print("sum", torch.ones(8, 8, device="cuda").sum().item(), (x @ x).shape)
        print("imported", sorted(m for m in set(sys.modules) - before if m.startswith("torch")))
    """)
    assert p.returncode == 0, p.stderr
    assert "warmed True" in p.stdout and "sum 64.0 torch.Size([8, 8])" in p.stdout
    assert "imported []" in p.stdout


def test_a_child_forked_while_the_client_warms_up_can_import_what_it_was_importing():
    # attach() contacts nothing: no agent is needed to start the warm-up.
    p = run("""
        import os
        import torch
        from jupyter_elastic_gpu import remote
        remote.attach("127.0.0.1:9", fraction=0.25)
        pid = os.fork()  # at once: the warm-up is still importing
        if pid == 0:
            import torch._dynamo  # would wait forever on a lock held by a thread not forked
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    assert p.returncode == 0, p.stderr
    assert "child exit 0" in p.stdout
