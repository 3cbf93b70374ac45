"""GPU kernels against an agent used directly (plain `jupyter lab`, single-user mode, no broker)."""

from __future__ import annotations

import asyncio
import time

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from .conftest import agent_session, wait_until


def direct(agent, **extra) -> Config:
    return Config({"ElasticGPUProvisioner": {"agent": agent.address, **extra}})


def test_kernel_environment(make_kernel, direct_agent):
    k = make_kernel(config=direct(direct_agent, linger=0.25))
    reply, out = k.run(
        "import os\nfor v in ('FRACTION', 'SESSION', 'AGENT', 'BROKER_URL', 'LINGER', 'KERNEL_NAME'):\n"
        "    print(v, os.environ.get('ELASTIC_GPU_' + v))"
    )
    assert reply["status"] == "ok", out
    assert "FRACTION 0.5\n" in out
    assert "SESSION None\n" in out, "child processes must not inherit the kernel's session"
    assert f"AGENT {direct_agent.address}\n" in out
    assert "BROKER_URL None\n" in out
    assert "LINGER 0.25\n" in out
    assert "KERNEL_NAME python3-gpu-0.5\n" in out
    reply, out = k.run(
        "from jupyter_elastic_gpu.remote import current_session\nprint(current_session().session_id)"
    )
    assert out.strip() == k.id


def test_lease_only_while_gpu_cells_run(make_kernel, direct_agent):
    k = make_kernel(config=direct(direct_agent))
    addr = direct_agent.address
    # The facade is there before any lease: nothing on the agent yet.
    reply, out = k.run(
        "import torch\nprint(torch.cuda.is_available(), torch.randn(100).sum().item() != 0)"
    )
    assert reply["status"] == "ok" and "True True" in out, out
    assert agent_session(addr, k.id) is None, "a CPU-only cell must not take a lease"

    msg_id = k.submit(
        "t = torch.ones(3, device='cuda')\nprint(t.sum().item())\nimport time; time.sleep(1.5)"
    )
    wait_until(
        lambda: (agent_session(addr, k.id) or {}).get("attached"), what="attached during the cell"
    )
    out = k.collect(msg_id)
    assert k.reply(msg_id)["status"] == "ok"
    wait_until(
        lambda: agent_session(addr, k.id)["attached"] is False,
        timeout=5,
        what="released after the cell",
    )
    # Tensors outlive the lease: the next GPU cell finds them.
    reply, out = k.run("print((t * 2).sum().item())")
    assert reply["status"] == "ok" and "6.0" in out, out


def test_linger_keeps_the_lease_for_a_quick_next_cell(make_kernel, direct_agent):
    k = make_kernel(config=direct(direct_agent, linger=1.5))
    reply, out = k.run(
        "import torch\nfrom jupyter_elastic_gpu.remote import current_session\n"
        "attaches = []\ncurrent_session().on_attach.append(lambda s: attaches.append(1))\n"
        "x = torch.ones(4, device='cuda'); print(x.sum().item())"
    )
    assert reply["status"] == "ok", out
    reply, out = k.run("print((x + 1).sum().item(), len(attaches))")  # within the linger
    assert "8.0 1" in out, out
    wait_until(
        lambda: agent_session(direct_agent.address, k.id)["attached"] is False,
        timeout=10,
        what="released",
    )
    reply, out = k.run("print((x + 2).sum().item(), len(attaches))")  # after it: a new lease
    assert "12.0 2" in out, out


def test_interrupt_long_remote_work_then_next_cell_works(make_kernel, direct_agent):
    k = make_kernel(config=direct(direct_agent))
    reply, _ = k.run(
        "import torch\na = torch.randn(1200, 1200, device='cuda')\nprint(a.sum().item())"
    )
    assert reply["status"] == "ok"
    # Ops stream asynchronously: the cell then blocks in .item() while the agent grinds.
    msg_id = k.submit(
        "for _ in range(30):\n    a = (a @ a).tanh()\nprint('queued', flush=True)\n"
        "print(a.sum().item())"
    )
    k.wait_for_output(msg_id, "queued")  # the work is on its way; the cell waits for it next
    t0 = time.monotonic()
    k.km.interrupt_kernel()
    reply = k.reply(msg_id, timeout=30)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert time.monotonic() - t0 < 5, "the interrupt must end the cell promptly"
    k.collect(msg_id)
    reply, out = k.run("print(torch.ones(2, device='cuda').sum().item(), a.shape)", timeout=120)
    assert reply["status"] == "ok" and "2.0 torch.Size([1200, 1200])" in out, out


def test_restart_and_shutdown_free_remote_state(kernels_dir, direct_agent):
    """AsyncKernelManager: a killed kernel's agent session is freed by the provisioner."""
    addr = direct_agent.address

    async def main():
        km = AsyncKernelManager(
            kernel_name="python3-gpu-0.25",
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]),
            config=direct(direct_agent),
        )
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive(
                "import torch\nbig = torch.ones(1 << 20, device='cuda')\nbig.sum().item()"
            )
            assert reply["content"]["status"] == "ok"
            assert agent_session(addr, km.kernel_id) is not None
            # now=True kills the kernel process: it cannot close its session itself.
            await km.restart_kernel(now=True)
            assert agent_session(addr, km.kernel_id) is None, (
                "restart must free the session's state"
            )
            await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive(
                "import torch\nprint(torch.ones(3, device='cuda').sum().item(), 'big' in dir())"
            )
            assert reply["content"]["status"] == "ok"
            assert agent_session(addr, km.kernel_id) is not None
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=False)
        assert agent_session(addr, km.kernel_id) is None, "shutdown must free the session's state"

    asyncio.run(main())
