"""``jupyter-elastic-gpu kernelspecs install|list|remove``: the "Python 3 (GPU: 0.5)" kernels.

One kernelspec per offered fraction, named ``python3-gpu-<fraction>``, each launching
``python -m jupyter_elastic_gpu.provisioner.kernel`` through the ``elastic-gpu-provisioner``
with ``{"gpu": <fraction>}``. The fractions come from ``--fractions``, else
``c.ElasticGPUKernelSpecs.fractions`` (``jupyter_elastic_gpu_config.py`` in a Jupyter config
directory), else the broker's offer (``GET me``), else 0.25, 0.5 and 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.application import JupyterApp
from jupyter_core.paths import jupyter_data_dir
from traitlets import Float, List, Unicode

from ..protocol.fraction import GPUFraction
from . import PROVISIONER_NAME, endpoints
from .provisioner import DEFAULT_GPU

DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)
KERNEL_MODULE = "jupyter_elastic_gpu.provisioner.kernel"


def spec_name(fraction: float, prefix: str = "python3-gpu-") -> str:
    return f"{prefix}{fraction:g}"


def spec_fraction(spec) -> float | None:
    """The GPU fraction of an elastic-gpu kernelspec (a KernelSpec or its dict), else None.

    The one reader of the stanza: the kernel picker, the server extension's status and the
    provisioner agree (no ``config.gpu``: the provisioner's default, one GPU)."""
    metadata = spec.get("metadata", {}) if isinstance(spec, dict) else getattr(spec, "metadata", {})
    prov = (metadata or {}).get("kernel_provisioner") or {}
    if prov.get("provisioner_name") != PROVISIONER_NAME:
        return None
    try:
        return GPUFraction((prov.get("config") or {}).get("gpu", DEFAULT_GPU))
    except ValueError:
        return None  # the provisioner refuses to launch it, with the reason


def logo_svg(fraction: float) -> str:
    # A chip with the slice size on it: tells the GPU kernels apart in the launcher.
    label = f"{fraction:g}"
    size = 26 if len(label) <= 2 else 20 if len(label) <= 3 else 15
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">'
        '<rect x="6" y="6" width="52" height="52" rx="8" fill="#76b900"/>'
        '<g stroke="#4a7400" stroke-width="3">'
        + "".join(
            f'<line x1="{x}" y1="0" x2="{x}" y2="6"/><line x1="{x}" y1="58" x2="{x}" y2="64"/>'
            for x in (18, 32, 46)
        )
        + "</g>"
        f'<text x="32" y="{32 + size * 0.36:.0f}" font-family="sans-serif" font-size="{size}" '
        f'font-weight="bold" fill="white" text-anchor="middle">{label}</text></svg>'
    )


def kernel_json(fraction: float, display_prefix: str, python: str) -> dict:
    return {
        "argv": [python, "-m", KERNEL_MODULE, "-f", "{connection_file}"],
        "display_name": f"{display_prefix} (GPU: {fraction:g})",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"gpu": fraction},
            },
        },
    }


def check_fractions(fractions) -> list[float]:
    out = []
    for f in fractions:
        f = float(GPUFraction(f))
        if f not in out:
            out.append(f)
    if not out:
        raise ValueError("no fractions to install")
    return sorted(out)


class ElasticGPUKernelSpecs(JupyterApp):
    """Installs, lists and removes the GPU kernelspecs."""

    name = "jupyter-elastic-gpu-kernelspecs"
    description = "Install, list and remove the 'Python 3 (GPU: 0.5)' kernelspecs."
    config_file_name = Unicode("jupyter_elastic_gpu_config", help="Config file basename.")

    fractions = List(
        Float(),
        help="Fractions to install kernelspecs for, e.g. [0.25, 0.5, 1, 2]. Empty: ask the "
        "broker (GET me → fractions), else 0.25, 0.5 and 1.",
    ).tag(config=True)
    name_prefix = Unicode("python3-gpu-", help="Kernelspec names are this + the fraction.").tag(
        config=True
    )
    display_prefix = Unicode("Python 3", help='Display names are this + " (GPU: <fraction>)".').tag(
        config=True
    )
    python = Unicode(
        sys.executable,
        help="Python that runs the kernel (it needs jupyter_elastic_gpu and torch). Default: this one.",
    ).tag(config=True)
    broker_timeout = Float(3.0, help="Seconds to wait for the broker's fractions.").tag(config=True)

    def broker_fractions(self) -> list[float]:
        broker, _ = endpoints.resolve()
        token = endpoints.hub_token()
        if not (broker and token):
            return []
        from ..broker.client import BrokerClient, BrokerError

        try:
            return list(
                BrokerClient(broker, token, timeout=self.broker_timeout).me().get("fractions") or []
            )
        except BrokerError as e:
            self.log.warning("Cannot ask the broker for its fractions (%s); using the defaults", e)
            return []

    def chosen_fractions(self, fractions=None) -> list[float]:
        return check_fractions(
            fractions or self.fractions or self.broker_fractions() or DEFAULT_FRACTIONS
        )

    def install(self, fractions=None, *, user=False, prefix=None) -> list[tuple[str, str]]:
        ksm = KernelSpecManager(parent=self)
        done = []
        for f in self.chosen_fractions(fractions):
            name = spec_name(f, self.name_prefix)
            with tempfile.TemporaryDirectory() as tmp:
                spec = kernel_json(f, self.display_prefix, self.python)
                Path(tmp, "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
                Path(tmp, "logo-svg.svg").write_text(logo_svg(f))
                dest = ksm.install_kernel_spec(tmp, name, user=user, prefix=prefix)
            done.append((name, dest))
        return done

    def gpu_specs(self, kernels_dir: str | None = None) -> dict[str, dict]:
        """Installed GPU kernelspecs: ``{name: {"fraction", "display_name", "resource_dir"}}``."""
        ksm = KernelSpecManager(parent=self)
        out = {}
        for name, model in ksm.get_all_specs().items():
            fraction = spec_fraction(model["spec"])
            if fraction is None:
                continue
            if (
                kernels_dir
                and Path(model["resource_dir"]).parent.resolve() != Path(kernels_dir).resolve()
            ):
                continue
            out[name] = {
                "fraction": fraction,
                "display_name": model["spec"].get("display_name", name),
                "resource_dir": model["resource_dir"],
            }
        return out

    def remove(self, names=(), *, kernels_dir: str | None = None) -> list[str]:
        specs = self.gpu_specs(kernels_dir)
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ValueError(f"not an installed GPU kernelspec: {', '.join(unknown)}")
        removed = []
        for name in names or sorted(specs):
            shutil.rmtree(specs[name]["resource_dir"])
            removed.append(name)
        return removed


def _kernels_dir(opts) -> str | None:
    if opts.user:
        return os.path.join(jupyter_data_dir(), "kernels")
    prefix = _prefix(opts)
    return os.path.join(prefix, "share", "jupyter", "kernels") if prefix else None


def _prefix(opts) -> str | None:
    return opts.prefix or (sys.prefix if opts.sys_prefix else None)


def _where(p: argparse.ArgumentParser, default_sys_prefix: bool) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--user", action="store_true", help="the user's Jupyter data directory")
    g.add_argument(
        "--sys-prefix",
        action="store_true",
        default=False,
        help="this Python environment (sys.prefix)" + (" (default)" if default_sys_prefix else ""),
    )
    g.add_argument("--prefix", metavar="P", help="P/share/jupyter/kernels")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="jupyter-elastic-gpu kernelspecs",
        description="Manage the 'Python 3 (GPU: <fraction>)' kernelspecs.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("install", help="install one kernelspec per GPU fraction")
    _where(pi, default_sys_prefix=True)
    pi.add_argument(
        "--fractions", help="comma-separated, e.g. 0.25,0.5,1 (default: config, broker, 0.25,0.5,1)"
    )
    pi.add_argument("--python", help="Python that runs the kernel (default: this one)")
    pi.add_argument("--config", help="a jupyter_elastic_gpu_config.py to read")
    pl = sub.add_parser("list", help="list the installed GPU kernelspecs")
    pl.add_argument("--json", action="store_true", help="as JSON")
    pr = sub.add_parser("remove", help="remove GPU kernelspecs (default: all of them)")
    pr.add_argument("names", nargs="*", help="kernelspec names, e.g. python3-gpu-0.5")
    _where(pr, default_sys_prefix=False)
    opts = p.parse_args(argv)

    app = ElasticGPUKernelSpecs()
    app.log_level = "WARN"
    if getattr(opts, "config", None):
        app.config_file = os.path.abspath(opts.config)
    app.load_config_file(suppress_errors=False)
    try:
        if opts.cmd == "install":
            if opts.python:
                app.python = opts.python
            fractions = [x for x in (opts.fractions or "").split(",") if x.strip()]
            prefix = _prefix(opts) if (opts.user or opts.prefix or opts.sys_prefix) else sys.prefix
            for name, dest in app.install(
                fractions, user=opts.user, prefix=None if opts.user else prefix
            ):
                print(f"Installed kernelspec {name} in {dest}")
        elif opts.cmd == "list":
            specs = app.gpu_specs()
            if opts.json:
                print(json.dumps(specs, indent=1))
            elif not specs:
                print("No GPU kernelspecs installed (jupyter-elastic-gpu kernelspecs install)")
            else:
                for name, s in sorted(specs.items(), key=lambda kv: kv[1]["fraction"]):
                    print(f"  {name:<20} {s['display_name']:<24} {s['resource_dir']}")
        else:
            for name in app.remove(opts.names, kernels_dir=_kernels_dir(opts)):
                print(f"Removed kernelspec {name}")
    except ValueError as e:
        print(f"jupyter-elastic-gpu kernelspecs: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
