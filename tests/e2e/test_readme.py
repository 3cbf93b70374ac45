"""What README promises matches what ships: the setup line is what CI runs, the demo users
and passwords are the config's, the links resolve, the configs load."""

from __future__ import annotations

import ast
import os
import re
import subprocess

from traitlets.config.loader import PyFileConfigLoader

from .support import DEMO_PASSWORDS, REPO

README = (REPO / "README.md").read_text()
CI = REPO / ".ci" / "run"


def code_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1).strip()


def test_one_setup_line_and_ci_runs_exactly_it():
    setup = code_block_after("## Setup")
    assert "\n" not in setup, "README's setup must be ONE line"
    ci = CI.read_text()
    for cmd in (c.strip() for c in setup.split("&&")):
        assert cmd in ci, f".ci/run does not run {cmd!r}"
    assert "torch==2.13.0" in setup
    for text in (setup, ci):
        assert "download.pytorch.org" not in text  # only binder/ may use the CPU index


def test_ci_script_is_strict_bash():
    assert os.access(CI, os.X_OK)
    text = CI.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "ruff check" in text and "python -m pytest" in text and '"$rc" -eq 5' in text
    assert subprocess.run(["bash", "-n", str(CI)]).returncode == 0


def test_start_and_test_commands():
    assert code_block_after("## Start a hub") == "jupyterhub -f config/jupyterhub_config.py"
    assert code_block_after("## Test") == "python -m pytest"
    assert "jupyter-elastic-gpu run --gpu 0.5 --agent" in README


def test_demo_users_and_passwords_match_the_config():
    tree = ast.parse((REPO / "config" / "jupyterhub_config.py").read_text())
    (passwords,) = [
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEMO_PASSWORDS"
    ]
    assert passwords == DEMO_PASSWORDS
    for user, password in passwords.items():
        assert f"| `{user}` | `{password}` |" in README


def test_demo_limits_match_the_readme():
    cfg = PyFileConfigLoader("elastic_gpu_config.py", path=str(REPO / "config")).load_config()
    broker = cfg.ElasticGPUBroker
    assert broker.default_limit == 0.5  # alice
    assert broker.group_limits["research"] == 1.0  # bob
    assert broker.user_limits["carol"] == 0.25 and broker.user_limits["admin"] == 1.0
    assert "| `bob` | `bob-demo` | 1.0 | from his group `research` |" in README


def test_example_configs_load():
    from jupyter_elastic_gpu.broker.app import ElasticGPUBroker

    for name in ("limits_example.py", "elastic_gpu_config.py"):
        cfg = PyFileConfigLoader(name, path=str(REPO / "config")).load_config()
        ElasticGPUBroker(config=cfg).check_config()
    compile((REPO / "config" / "jupyterhub_config.production.py").read_text(), "prod", "exec")
    compile((REPO / "config" / "singleuser" / "jupyter_server_config.py").read_text(), "su", "exec")


def test_links_resolve():
    docs = [REPO / "README.md"] + [
        REPO / "docs" / n for n in ("user-guide.md", "admin-guide.md", "architecture.md")
    ]
    docs.append(REPO / "config" / "agent.md")
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_state_dir_is_gitignored():
    assert ".elastic-gpu-state/" in (REPO / ".gitignore").read_text().splitlines()
