"""Optional TLS on the data plane, and the one function clients use to open a session there.

With TLS the agent's main process cannot hand an encrypted stream to a session's worker (TLS
state does not cross processes), so a session connection is set up in two legs on one TCP
connection: the agent's main process terminates TLS, checks the hello (lease token, session
secret) and answers ``{"handover": "tls"}``; both ends close that TLS layer cleanly; the
worker, now holding the socket, sends one plaintext go-ahead byte and the client runs a fresh
handshake with it and repeats its hello there, where the worker checks the secret again. So
only an authenticated owner makes the agent spawn or reach a worker, and a connection hijacked
between the legs gets nothing without the secret. Inventory, interrupt and close are answered
by the main process inside its own TLS layer.

Clients turn TLS on with ``ELASTIC_GPU_TLS_CA`` (the CA that signed the agents' certificates),
plus ``ELASTIC_GPU_TLS_CERT``/``ELASTIC_GPU_TLS_KEY`` where agents require client certificates,
or all three at once with ``ELASTIC_GPU_TLS_DIR`` (a directory made by ``tls-certs``).
``ELASTIC_GPU_TLS_SERVER_NAME`` is the name agents' certificates must carry when it is not
the host kernels dial (agents on pod IPs share one name).
"""

from __future__ import annotations

import os
import socket
import ssl

from .frames import recv_frame, send_frame

GO_AHEAD = b"T"
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello


def client_files() -> dict:
    """The CA, certificate and key a client uses, from the environment ({} without TLS).

    ``ELASTIC_GPU_TLS_DIR`` names a directory made by ``jupyter-elastic-gpu tls-certs`` (its
    ca.crt, and client.crt/client.key when present); the single-file variables override it.
    """
    d = os.environ.get("ELASTIC_GPU_TLS_DIR")
    files = {}
    if d:
        files["ca"] = os.path.join(d, "ca.crt")
        if os.path.exists(os.path.join(d, "client.key")):
            files["cert"], files["key"] = (os.path.join(d, f"client.{x}") for x in ("crt", "key"))
    for role in ("ca", "cert", "key"):
        files[role] = os.environ.get(f"ELASTIC_GPU_TLS_{role.upper()}") or files.get(role)
    return {k: v for k, v in files.items() if v} if files.get("ca") else {}


def client_context() -> ssl.SSLContext | None:
    """The client's TLS context from the environment, or None where TLS is not configured."""
    files = client_files()
    if not files:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files["ca"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if "cert" in files:
            ctx.load_cert_chain(files["cert"], files.get("key"))
    except (OSError, ssl.SSLError) as e:
        named = ", ".join(f"{role} {path}" for role, path in files.items())
        raise TLSRefused(
            f"cannot use the TLS files set in the environment ({named}): {e}"
        ) from None
    return ctx


def server_context(cert: str, key: str | None = None, client_ca: str | None = None):
    """The agent's TLS context; with ``client_ca`` every client must show a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key or None)
    # No resumption tickets: nothing uses them, and a ticket arriving while the client's
    # receiver thread reads and its main thread writes is one more thing to go wrong.
    ctx.num_tickets = 0
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TLSRefused(ConnectionError):
    """The TLS handshake with an agent failed (wrong CA, plaintext agent, missing client cert)."""


def _wrap(ctx: ssl.SSLContext, sock: socket.socket, host: str) -> ssl.SSLSocket:
    # Agents whose addresses change (pods) can all carry one service name instead.
    name = os.environ.get("ELASTIC_GPU_TLS_SERVER_NAME") or host
    try:
        return ctx.wrap_socket(sock, server_hostname=name)
    except ssl.SSLError as e:
        sock.close()
        detail = getattr(e, "verify_message", None)
        why = f"{e.reason or e}" + (f" ({detail})" if detail else "")
        raise TLSRefused(
            f"TLS handshake with the GPU agent at {host} failed: {why}. Check that the agent "
            "runs with --tls-cert, that ELASTIC_GPU_TLS_CA is the CA that signed it, and that "
            f"the certificate names {name!r} (or set ELASTIC_GPU_TLS_SERVER_NAME to a name it has)"
        ) from None


def connect(host: str, port: int, timeout: float | None) -> socket.socket:
    """A connection to an agent: TLS when the environment configures it, else plain TCP."""
    sock = socket.create_connection((host, port), timeout=timeout)
    ctx = client_context()
    return _wrap(ctx, sock, host) if ctx else sock


def open_session(host: str, port: int, hello: dict, timeout: float | None):
    """Connect and send ``hello`` to the session's worker.

    Returns ``(sock, refusal)``: the socket whose next frame is the worker's answer to the
    hello, or the agent's refusal (a reply with ``error``) when it refused before handing over.
    """
    sock = connect(host, port, timeout)
    if not isinstance(sock, ssl.SSLSocket):
        send_frame(sock, hello)
        return sock, None
    try:
        try:
            send_frame(sock, hello)
            reply, _ = recv_frame(sock)
        except (ssl.SSLError, ConnectionError) as e:
            # Under TLS 1.3 a missing client certificate surfaces here, after the handshake.
            hint = (
                ""
                if "cert" in client_files()
                else "; if it requires client certificates, set ELASTIC_GPU_TLS_CERT and "
                "ELASTIC_GPU_TLS_KEY"
            )
            raise TLSRefused(
                f"the GPU agent at {host} ended the TLS connection before answering ({e}){hint}"
            ) from None
        if reply.get("handover") != "tls":
            sock.close()
            return None, reply
        sock.unwrap()
        sock = socket.socket(fileno=sock.detach())
        sock.settimeout(timeout)
        if sock.recv(1) != GO_AHEAD:
            raise ConnectionError("the agent's worker did not take over the connection")
        sock = _wrap(client_context(), sock, host)
        send_frame(sock, hello)
        return sock, None
    except BaseException:
        sock.close()
        raise
