"""`jupyter-elastic-gpu run` gives any Python program the remote GPU, no Jupyter needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_run_puts_an_unchanged_cuda_script_on_the_agent(agent, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import sys, torch
        assert torch.cuda.is_available()
        model = torch.nn.Linear(4, 1).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        x, y = torch.randn(64, 4).cuda(), torch.randn(64, 1).cuda()
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
        print("device", model.weight.device, "args", sys.argv[1:], "loss", round(loss.item(), 4))
    """)
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "run",
            "--gpu",
            "0.5",
            "--agent",
            agent.address,
            "--",
            "python",
            str(script),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "device cuda:0 args ['--epochs', '1'] loss" in p.stdout


def test_run_explains_what_is_missing():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "run",
            "--gpu",
            "0.5",
            "--",
            "python",
            "x.py",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU")},
    )
    assert p.returncode == 2 and "--agent HOST:PORT or --broker URL" in p.stderr
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "run",
            "--gpu",
            "0.5",
            "--agent",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "nothing to run" in p.stderr


def _run(agent, *command, cwd=None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "run",
            "--agent",
            agent.address,
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )


def test_run_behaves_like_python(agent, tmp_path):
    """Sibling modules import, __file__/__name__/argv are Python's, exit codes pass through."""
    (tmp_path / "data.py").write_text("VALUE = 42\n")
    (tmp_path / "main.py").write_text(
        textwrap.dedent("""
        import sys, data
        print("path0", sys.path[0], "value", data.VALUE, "file", __file__, "argv", sys.argv)
        if __name__ == "__main__":
            sys.exit(int(sys.argv[1]))
    """)
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    p = _run(agent, "python", str(tmp_path / "main.py"), "3", cwd=elsewhere)
    assert p.returncode == 3, p.stderr
    assert f"path0 {tmp_path} value 42 file {tmp_path / 'main.py'}" in p.stdout
    assert f"argv ['{tmp_path / 'main.py'}', '3']" in p.stdout

    p = _run(agent, "python", "-m", "data", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = _run(
        agent, "python", "-c", "import sys, data; print(sys.argv, data.VALUE)", "x", cwd=tmp_path
    )
    assert p.returncode == 0 and "['-c', 'x'] 42" in p.stdout, p.stderr

    (tmp_path / "boom.py").write_text("raise ValueError('boom')\n")
    p = _run(agent, "python", str(tmp_path / "boom.py"))
    assert p.returncode == 1 and "Traceback" in p.stderr and "ValueError: boom" in p.stderr
