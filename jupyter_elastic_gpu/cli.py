"""``jupyter-elastic-gpu`` (also ``jupyter elastic-gpu``): agent, broker, kernelspecs, run, check, tls-certs."""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def _agent(argv):
    p = argparse.ArgumentParser(
        prog="jupyter-elastic-gpu agent",
        description="Serve GPU slices to remote kernels on this node.",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="execute on CUDA GPUs, or on the CPU (laptops, CI, Binder); auto picks CUDA if present",
    )
    p.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT for the data plane")
    p.add_argument("--agent-id", default=None, help="stable id of this agent in the broker's pool")
    p.add_argument(
        "--broker-url",
        default=os.environ.get("ELASTIC_GPU_BROKER_URL"),
        help="register with this broker API URL and heartbeat to it",
    )
    p.add_argument(
        "--agent-token",
        default=None,
        help="token for registering with the broker (default: $ELASTIC_GPU_AGENT_TOKEN)",
    )
    p.add_argument(
        "--advertise", default=None, help="HOST:PORT clients should use, if not --listen"
    )
    p.add_argument("--lease-secret", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--lease-secret-file",
        default=None,
        help="file with the broker's lease-signing secret; without one the agent is open to anyone",
    )
    p.add_argument(
        "--cpu-memory-gib",
        type=float,
        default=16.0,
        help="in --device cpu mode, the memory of the emulated GPU that slices are cut from",
    )
    p.add_argument(
        "--session-grace",
        type=float,
        default=60.0,
        help="seconds a session whose client vanished is kept before it is freed",
    )
    p.add_argument(
        "--swap-policy",
        choices=["pressure", "ahead", "always", "never"],
        default="pressure",
        help="when to move idle sessions' tensors to host memory: when another session needs "
        "the GPU memory (default), after a detach when the next slice of that size would not "
        "fit (off the next attach's path), at every detach, or never",
    )
    p.add_argument(
        "--swap-arena-gib",
        type=float,
        default=None,
        help="host memory kept pinned for swapped-out sessions, so a swap-out runs at PCIe "
        "speed (default on a GPU node: 1/8 of host memory, at most 16; 0: none, each swap "
        "allocates its own)",
    )
    p.add_argument(
        "--spare-workers",
        type=int,
        default=1,
        help="worker processes kept started (torch imported) for new sessions, so a kernel's "
        "first GPU op does not wait for one to start; 0 starts each on demand",
    )
    p.add_argument(
        "--allow-namespace",
        action="append",
        help="also allow ops of this torch.ops namespace (aten, prims and torchvision always are)",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        help="PEM certificate (chain) of this agent: the data plane then takes TLS connections only "
        "(clients set ELASTIC_GPU_TLS_CA); `jupyter-elastic-gpu tls-certs` makes a set",
    )
    p.add_argument(
        "--tls-key", default=None, help="private key of --tls-cert, if not in the same file"
    )
    p.add_argument(
        "--tls-client-ca",
        default=None,
        help="also require a client certificate signed by this CA (mutual TLS, as JupyterHub's "
        "internal_ssl does); kernels then set ELASTIC_GPU_TLS_CERT and ELASTIC_GPU_TLS_KEY",
    )
    opts = p.parse_args(argv)
    if (opts.tls_key or opts.tls_client_ca) and not opts.tls_cert:
        p.error("--tls-key and --tls-client-ca need --tls-cert")
    from .agent.server import run_agent

    run_agent(opts)


def _run(argv):
    p = argparse.ArgumentParser(
        prog="jupyter-elastic-gpu run",
        description="Run a Python program with a remote GPU as 'cuda'.",
    )
    p.add_argument(
        "--gpu", type=float, default=1.0, help="GPU fraction to lease (0.25, 0.5, 1, 2...)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--agent", help="HOST:PORT of an agent to use directly (no broker)")
    g.add_argument("--broker", help="broker API URL; the lease is taken with $JUPYTERHUB_API_TOKEN")
    p.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- python script.py [args] (or -- script.py)"
    )
    opts = p.parse_args(argv)
    cmd = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if cmd[:1] and os.path.basename(cmd[0]).startswith("python"):
        cmd = cmd[1:]
    if not cmd:
        p.error("nothing to run: give -- python SCRIPT.py [ARGS]")
    if not (
        opts.agent
        or opts.broker
        or os.environ.get("ELASTIC_GPU_AGENT")
        or os.environ.get("ELASTIC_GPU_BROKER_URL")
    ):
        p.error("give --agent HOST:PORT or --broker URL")
    from . import remote

    remote.attach(opts.agent, fraction=opts.gpu, broker=opts.broker)
    # sys.path[0] is what `python` makes it: the script's folder (sibling modules import),
    # else the working directory; never this command's own folder.
    sys.argv = cmd
    if cmd[0] == "-m":
        if len(cmd) < 2:
            p.error("-m needs a module name")
        sys.argv = cmd[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
    elif cmd[0] == "-c":
        if len(cmd) < 2:
            p.error("-c needs a program")
        sys.argv = ["-c", *cmd[2:]]
        sys.path[0] = ""
        exec(compile(cmd[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(cmd[0]))
        runpy.run_path(cmd[0], run_name="__main__")


def _broker(argv):
    from .broker.app import main

    main(argv)


def _kernelspecs(argv):
    from .provisioner.kernelspecs import main

    return main(argv)


def _check(argv):
    from .remote.check import main

    return main(argv)


def _tls_certs(argv):
    from .agent.certs import main

    return main(argv)


COMMANDS = {
    "agent": _agent,
    "run": _run,
    "broker": _broker,
    "kernelspecs": _kernelspecs,
    "tls-certs": _tls_certs,
    "check": _check,
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: jupyter-elastic-gpu {agent,broker,kernelspecs,run,check,tls-certs} ...\n\n"
            "  agent        serve GPU slices on this node (--device cuda|cpu)\n"
            "  broker       the quota/lease service (normally started by JupyterHub)\n"
            "  kernelspecs  install 'Python 3 (GPU: 0.5)' kernelspecs\n"
            "  run          run a Python program with a remote GPU: run --gpu 0.5 --agent H:P -- python x.py\n"
            "  check        can this process reach its broker and agents (TLS, tokens)?\n"
            "  tls-certs    make a CA and certificates for TLS on the data plane",
            file=sys.stderr,
        )
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
