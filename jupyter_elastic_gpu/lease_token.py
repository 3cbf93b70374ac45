"""Lease tokens: the broker's signed proof that a kernel may use given GPUs of an agent.

Format ``egl1.<b64url(json claims)>.<b64url(HMAC-SHA256 over "egl1.<claims part>")>``, with
claims ``lease``, ``user``, ``session``, ``agent``, ``gpus``, ``fraction``, ``iat``, ``exp``
(see docs/contracts.md). The broker signs; agents verify with the same shared secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

PREFIX = "egl1"


class LeaseTokenError(ValueError):
    """A token that must not be honoured: malformed, badly signed or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(signed_part: str, secret: bytes) -> str:
    return _b64(hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest())


def _secret(secret: bytes | str) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise LeaseTokenError("no lease secret configured")
    return secret


def sign(claims: dict, secret: bytes | str) -> str:
    """Return a token carrying ``claims`` (which must include ``exp``, unix seconds)."""
    if "exp" not in claims:
        raise ValueError("lease token claims need an 'exp' (unix seconds)")
    claims = {"iat": int(time.time()), **claims}
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed_part = f"{PREFIX}.{body}"
    return f"{signed_part}.{_mac(signed_part, _secret(secret))}"


def verify(token: str, secret: bytes | str, *, now: float | None = None) -> dict:
    """Return the claims of a valid, unexpired token; raise :class:`LeaseTokenError` otherwise."""
    if not isinstance(token, str):
        raise LeaseTokenError("malformed lease token: not a string")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise LeaseTokenError(f"malformed lease token: expected '{PREFIX}.<claims>.<signature>'")
    signed_part = f"{parts[0]}.{parts[1]}"
    # Check the signature before parsing, so nothing forged is ever decoded.
    try:
        good = hmac.compare_digest(_mac(signed_part, _secret(secret)), parts[2])
    except (TypeError, ValueError, UnicodeEncodeError):
        good = False
    if not good:
        raise LeaseTokenError("lease token has a bad signature (wrong secret or tampered)")
    try:
        claims = json.loads(_unb64(parts[1]))
    except ValueError as e:
        raise LeaseTokenError(f"malformed lease token claims: {e}") from None
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int | float):
        raise LeaseTokenError("malformed lease token claims: no numeric 'exp'")
    now = time.time() if now is None else now
    if now >= claims["exp"]:
        raise LeaseTokenError(
            f"lease token for lease {claims.get('lease')!r} expired {now - claims['exp']:.0f}s ago"
        )
    return claims
