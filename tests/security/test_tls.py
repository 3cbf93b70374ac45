"""TLS on the data plane, as a network attacker sees it.

An agent started with ``--tls-cert`` serves sessions, inventory, interrupts and closes over
TLS only; a sniffer on the path sees tensors and secrets in plaintext mode and nothing of
them under TLS; plaintext clients, clients without the client certificate, and clients
trusting another CA are refused with a reason; a kernel never sends its hello (its secret,
its lease token) to an agent our CA did not sign; and a connection hijacked between the
agent's leg and the worker's leg of the hand-over gets nothing without the session secret.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest

from jupyter_elastic_gpu.agent.certs import make_certs
from jupyter_elastic_gpu.protocol import tls
from jupyter_elastic_gpu.protocol.client import query_inventory
from jupyter_elastic_gpu.protocol.frames import recv_frame, send_frame
from tests.conftest import AgentProcess, free_port

MARKER = b"EGPU-TENSOR-PAYLOAD-7d1c"  # bytes of a tensor the sniffer looks for


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    """A CA and agent certificate that the deployment does not trust."""
    return make_certs(tmp_path_factory.mktemp("rogue"))


def tls_env(certs, client_cert=True):
    env = {"ELASTIC_GPU_TLS_CA": certs["ca"]["cert"]}
    if client_cert:
        env.update(
            ELASTIC_GPU_TLS_CERT=certs["client"]["cert"], ELASTIC_GPU_TLS_KEY=certs["client"]["key"]
        )
    return env


def tls_args(certs, mutual=True):
    args = ["--tls-cert", certs["agent"]["cert"], "--tls-key", certs["agent"]["key"]]
    return args + (["--tls-client-ca", certs["ca"]["cert"]] if mutual else [])


@pytest.fixture(scope="module")
def tls_agent(certs):
    a = AgentProcess(*tls_args(certs), "--session-grace", "2")
    yield a
    a.stop()


def client(address, code, env, timeout=120):
    """Run ``code`` in a kernel-like process attached to ``address`` with ``env``."""
    prog = "import torch\nfrom jupyter_elastic_gpu import remote\n" + textwrap.dedent(code)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU_TLS")}
    full_env.update(env, AGENT=address)
    return subprocess.run(
        [sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture
def tls_client_env(certs, monkeypatch):
    for k, v in tls_env(certs).items():
        monkeypatch.setenv(k, v)


TRAIN = """
    import os
    remote.attach(os.environ["AGENT"], fraction=0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    ref.load_state_dict(model.state_dict())
    model.cuda()
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for m, dev in ((model, "cuda"), (ref, "cpu")):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x.to(dev)), y.to(dev))
            loss.backward()
            opt.step()
        print(dev, loss.item())
    sess = remote.current_session()
    sess.release()                      # lease given back between "cells"
    print("after release", model[0].weight.sum().item() == ref[0].weight.sum().item())
    sess.interrupt()                    # the side channel, over TLS
    print("pid", os.getpid())
"""


def test_a_tls_agent_trains_and_answers_side_requests(tls_agent, certs, tls_client_env):
    tls_dir = os.path.dirname(certs["ca"]["cert"])  # the one-variable form: a tls-certs directory
    out = client(tls_agent.address, TRAIN, {"ELASTIC_GPU_TLS_DIR": tls_dir})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert abs(float(lines["cuda"]) - float(lines["cpu"])) < 1e-5, out.stdout
    assert lines["after"] == "release True"
    inv = query_inventory(tls_agent.address)  # inventory over TLS too
    assert inv["agent"]["address"] == tls_agent.address


def test_ctrl_c_over_tls_drops_the_queued_work(tls_agent, own_session, tls_client_env):
    """The interrupt travels beside the data connection, in its own TLS connection."""
    from tests.remote.test_cuda_semantics import ctrl_c_drops_queued_work

    with own_session(tls_agent.address, 0.25):
        ctrl_c_drops_queued_work(256)


class Sniffer:
    """A TCP relay on loopback that keeps every byte it forwards (a tap on the wire)."""

    def __init__(self, target_port):
        self.seen = bytearray()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.target = target_port
        self.links = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            self.links += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while data := a.recv(1 << 16):
                self.seen += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        """The network drops every connection through the tap (new ones still pass)."""
        for s in self.links:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.links = []

    def close(self):
        self.cut()
        self.lsock.close()


def test_a_dropped_tls_connection_reconnects_to_the_same_worker(
    certs, make_agent, own_session, tls_client_env
):
    import torch

    from jupyter_elastic_gpu.remote.session import AgentUnavailable

    agent = make_agent(*tls_args(certs), "--session-grace", "60")
    tap = Sniffer(agent.port)
    try:
        with own_session(tap.address, 0.25) as sess:
            x = torch.arange(6.0, device="cuda")
            assert x.sum().item() == 15
            pid = query_inventory(agent.address)["sessions"][0]["pid"]
            tap.cut()
            with pytest.raises(AgentUnavailable, match="lost the connection"):
                (x * 2).sum().item()
            # The next op reconnects through both TLS legs to the same worker: x is still there.
            assert (x * 2).sum().item() == 30
            [again] = query_inventory(agent.address)["sessions"]
            assert again["pid"] == pid and again["session"] == sess.session_id
    finally:
        tap.close()


SEND_SECRET_TENSOR = f"""
    import os
    sess = remote.attach(os.environ["AGENT"], fraction=0.25)
    t = torch.frombuffer(bytearray({MARKER!r} * 64), dtype=torch.uint8).cuda()
    back = (t + 0).cpu()
    assert bytes(back.numpy()[:{len(MARKER)}]) == {MARKER!r}
    print(sess.secret)
"""


@pytest.mark.parametrize("mode", ["plaintext", "tls"])
def test_a_sniffer_sees_tensors_and_secrets_only_without_tls(mode, certs, make_agent):
    agent = make_agent(*(tls_args(certs) if mode == "tls" else ()))
    tap = Sniffer(agent.port)
    try:
        out = client(tap.address, SEND_SECRET_TENSOR, tls_env(certs) if mode == "tls" else {})
        assert out.returncode == 0, out.stderr
        secret = out.stdout.split()[-1].encode()
    finally:
        tap.close()
    assert len(tap.seen) > 64 * len(MARKER)  # the tap did see the traffic
    leaked = [w for w in (MARKER, secret, b"aten::", b'"hello"') if w in tap.seen]
    if mode == "plaintext":  # the tap works: this is what TLS must hide
        assert leaked == [MARKER, secret, b"aten::", b'"hello"']
    else:
        assert leaked == []


SEND_BULK_TENSOR = f"""
    import os
    sess = remote.attach(os.environ["AGENT"], fraction=0.25)
    data = bytearray({MARKER!r} * ((3 << 20) // {len(MARKER)}))  # 3 MiB: over bulk streams
    t = torch.frombuffer(data, dtype=torch.uint8).cuda()
    back = (t + 0).cpu()
    assert bytes(back.numpy()) == bytes(data)
    print("streams", sess._bulk.count, sess._bulk.sent_x, sess._bulk.recv_x)
    print(sess.secret)
"""


@pytest.mark.parametrize("mode", ["plaintext", "tls"])
def test_bulk_streams_are_encrypted_like_the_session_connection(mode, certs, make_agent):
    """Large payloads leave the session's connection for its bulk streams (protocol/bulk.py):
    under TLS a tap on the wire sees none of their bytes either."""
    agent = make_agent(*(tls_args(certs) if mode == "tls" else ()))
    tap = Sniffer(agent.port)
    env = dict(tls_env(certs) if mode == "tls" else {}, ELASTIC_GPU_BULK_MIN_MIB="1")
    try:
        out = client(tap.address, SEND_BULK_TENSOR, env)
        assert out.returncode == 0, out.stderr
        assert "streams 4 1 1" in out.stdout, out.stdout  # one upload, one fetch, 4 streams
        secret = out.stdout.split()[-1].encode()
    finally:
        tap.close()
    assert len(tap.seen) > 6 << 20
    leaked = [w for w in (MARKER * 4, secret) if w in tap.seen]
    assert leaked == ([MARKER * 4, secret] if mode == "plaintext" else [])


def test_a_plaintext_client_is_told_the_agent_requires_tls(tls_agent):
    out = client(
        tls_agent.address,
        'remote.attach(__import__("os").environ["AGENT"])\n'
        'torch.ones(1, device="cuda").sum().item()',
        {},
    )
    assert out.returncode != 0
    assert "requires TLS" in out.stderr and "ELASTIC_GPU_TLS_CA" in out.stderr, out.stderr[-800:]
    assert "Traceback" in out.stderr and "PermissionError" in out.stderr


def test_without_a_client_certificate_a_mutual_tls_agent_refuses(tls_agent, certs):
    before = query_inventory_as(certs, tls_agent.address)["sessions"]
    out = client(
        tls_agent.address,
        'remote.attach(__import__("os").environ["AGENT"])\ntorch.ones(1, device="cuda").item()',
        tls_env(certs, client_cert=False),
    )
    assert out.returncode != 0
    assert "AgentUnavailable" in out.stderr and "ELASTIC_GPU_TLS_CERT" in out.stderr, out.stderr[
        -800:
    ]
    assert query_inventory_as(certs, tls_agent.address)["sessions"] == before


def query_inventory_as(certs, address):
    old = {k: os.environ.get(k) for k in tls_env(certs)}
    os.environ.update(tls_env(certs))
    try:
        return query_inventory(address)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_a_kernel_never_sends_its_hello_to_an_agent_our_ca_did_not_sign(certs, rogue, make_agent):
    impostor = make_agent(*tls_args(rogue, mutual=False))
    tap = Sniffer(impostor.port)
    try:
        out = client(
            tap.address,
            'remote.attach(__import__("os").environ["AGENT"])\ntorch.ones(1, device="cuda").item()',
            tls_env(certs),
        )
    finally:
        tap.close()
    assert out.returncode != 0
    assert "TLS handshake with the GPU agent" in out.stderr, out.stderr[-800:]
    assert "CERTIFICATE_VERIFY_FAILED" in out.stderr
    assert b"secret" not in tap.seen and b"hello" not in tap.seen
    assert query_inventory_as(rogue, impostor.address)["sessions"] == []


def test_a_connection_hijacked_between_the_legs_needs_the_secret(tls_agent, certs):
    """Leg 1 is the owner's (right secret); whoever runs leg 2 must show the secret again."""
    ctx = ssl.create_default_context(cafile=certs["ca"]["cert"])
    ctx.load_cert_chain(certs["client"]["cert"], certs["client"]["key"])
    host, port = tls_agent.address.rsplit(":", 1)

    def leg1(session, secret):
        s = ctx.wrap_socket(socket.create_connection((host, int(port)), 10), server_hostname=host)
        send_frame(s, {"op": "hello", "session": session, "secret": secret, "fraction": 0.25})
        assert recv_frame(s)[0] == {"handover": "tls"}
        s.unwrap()
        raw = socket.socket(fileno=s.detach())
        raw.settimeout(10)
        assert raw.recv(1) == tls.GO_AHEAD
        return ctx.wrap_socket(raw, server_hostname=host)

    # The owner opens the session and keeps a tensor there.
    owner = leg1("s-hijack", "right-secret")
    send_frame(owner, {"op": "hello", "session": "s-hijack", "secret": "right-secret"})
    assert recv_frame(owner)[0].get("ok")

    # The attacker let leg 1 pass (it carried the owner's secret) and takes over for leg 2.
    stolen = leg1("s-hijack", "right-secret")
    send_frame(stolen, {"op": "hello", "session": "s-hijack", "secret": "guessed"})
    err = recv_frame(stolen)[0]["error"]
    assert err["type"] == "PermissionError" and "wrong secret" in err["message"]
    stolen.close()

    # The owner's connection was not disturbed.
    send_frame(owner, {"op": "sync"})
    assert recv_frame(owner)[0].get("ok")
    owner.close()


@pytest.mark.parametrize("leaves", ["before the hand-over", "before the worker's handshake"])
def test_a_client_that_leaves_mid_hand_over_leaves_nothing_behind(leaves, tls_agent, certs):
    """A session opened by a client that vanishes between the legs is freed after the agent's
    grace period (2 s here), like any vanished client's."""
    import time

    ctx = ssl.create_default_context(cafile=certs["ca"]["cert"])
    ctx.load_cert_chain(certs["client"]["cert"], certs["client"]["key"])
    host, port = tls_agent.address.rsplit(":", 1)
    session = f"s-leaves-{len(leaves)}"
    s = ctx.wrap_socket(socket.create_connection((host, int(port)), 10), server_hostname=host)
    send_frame(s, {"op": "hello", "session": session, "secret": "x", "fraction": 0.25})
    assert recv_frame(s)[0] == {"handover": "tls"}
    if leaves == "before the worker's handshake":
        s.unwrap()
        raw = socket.socket(fileno=s.detach())
        raw.settimeout(10)
        assert raw.recv(1) == tls.GO_AHEAD
        raw.close()
    else:
        s.close()

    def listed():
        sessions = query_inventory_as(certs, tls_agent.address)["sessions"]
        return any(x["session"] == session for x in sessions)

    deadline = time.monotonic() + 20
    while listed() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listed()


def test_agents_on_changing_addresses_can_share_one_certificate_name(tmp_path, make_agent):
    pod_certs = make_certs(tmp_path, hosts=["gpu-agents.internal"])  # no IP in it
    agent = make_agent(*tls_args(pod_certs))
    code = 'remote.attach(__import__("os").environ["AGENT"])\nprint(torch.ones(2, device="cuda").sum().item())'
    refused = client(agent.address, code, tls_env(pod_certs))
    assert refused.returncode != 0 and "IP address mismatch" in refused.stderr, refused.stderr[
        -600:
    ]
    env = {**tls_env(pod_certs), "ELASTIC_GPU_TLS_SERVER_NAME": "gpu-agents.internal"}
    ok = client(agent.address, code, env)
    assert ok.returncode == 0 and ok.stdout.strip() == "2.0", ok.stderr[-600:]


def test_a_kernel_with_a_wrong_tls_setting_says_which_file(tls_agent, tmp_path):
    code = 'remote.attach(__import__("os").environ["AGENT"])\ntorch.ones(1, device="cuda").item()'
    out = client(tls_agent.address, code, {"ELASTIC_GPU_TLS_CA": str(tmp_path / "nope.crt")})
    assert out.returncode != 0
    assert "AgentUnavailable: cannot use the TLS files" in out.stderr, out.stderr[-600:]
    assert "nope.crt" in out.stderr


def test_check_says_how_an_agent_is_reached_and_what_is_missing(tls_agent, certs):
    def check(env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU_")}
        cmd = [sys.executable, "-m", "jupyter_elastic_gpu", "check", "--agent", tls_agent.address]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**full, **env})

    good = check(tls_env(certs))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "transport: TLS" in good.stdout and f"agent {tls_agent.address}: ok" in good.stdout
    bad = check({})
    assert bad.returncode == 1
    assert "transport: plaintext" in bad.stdout and "requires TLS" in bad.stdout


def test_an_agent_with_unreadable_tls_files_says_so(tmp_path):
    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "agent",
            "--device",
            "cpu",
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(tmp_path / "missing.crt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "cannot use the TLS files" in out.stderr and "missing.crt" in out.stderr
