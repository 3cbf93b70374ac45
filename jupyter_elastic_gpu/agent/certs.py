"""``jupyter-elastic-gpu tls-certs``: a private CA plus agent and client certificates.

The same shape as JupyterHub's ``internal_ssl``: one CA that only this deployment trusts,
agents with certificates naming the hosts kernels dial, and (for mutual TLS) one client
certificate that kernels present. Keys never leave the directory they are written to.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, key, cert) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path.with_suffix(".key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(subject, key, issuer, issuer_key, days, *, ca=False, hosts=(), usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return b.sign(issuer_key, hashes.SHA256())


DEFAULT_HOSTS = ("localhost", "127.0.0.1", "elastic-gpu-agent")


def make_certs(out: str | os.PathLike, hosts=DEFAULT_HOSTS, days=365) -> dict:
    """Write ca/agent/client ``.crt`` + ``.key`` under ``out``; return the paths by role."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("jupyter-elastic-gpu CA")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, days, ca=True)
    _write(out / "ca", ca_key, ca)
    for role, usage, names in (
        ("agent", ExtendedKeyUsageOID.SERVER_AUTH, list(hosts)),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cn = f"jupyter-elastic-gpu {role}"
        _write(
            out / role, key, _issue(_name(cn), key, ca_name, ca_key, days, hosts=names, usage=usage)
        )
    return {
        role: {"cert": str(out / f"{role}.crt"), "key": str(out / f"{role}.key")}
        for role in ("ca", "agent", "client")
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="jupyter-elastic-gpu tls-certs",
        description="Make a private CA and certificates for TLS between kernels and agents.",
    )
    p.add_argument("--out", required=True, help="directory to write ca/agent/client .crt and .key")
    p.add_argument(
        "--host",
        action="append",
        help="a host name or IP kernels use to reach the agents, or the one name they all share "
        "(ELASTIC_GPU_TLS_SERVER_NAME); repeat. Default: localhost, 127.0.0.1, elastic-gpu-agent",
    )
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    opts = p.parse_args(argv)
    paths = make_certs(opts.out, opts.host or DEFAULT_HOSTS, opts.days)
    print(
        f"agents:  jupyter-elastic-gpu agent --tls-cert {paths['agent']['cert']} "
        f"--tls-key {paths['agent']['key']} [--tls-client-ca {paths['ca']['cert']}]\n"
        f"kernels: ELASTIC_GPU_TLS_CA={paths['ca']['cert']} "
        f"[ELASTIC_GPU_TLS_CERT={paths['client']['cert']} "
        f"ELASTIC_GPU_TLS_KEY={paths['client']['key']}]"
    )
    return 0
