"""Who may use a session: lease tokens signed by the broker, bound to one user and session."""

from __future__ import annotations

import hmac


class HelloRejected(Exception):
    pass


def check_hello(
    hello: dict, lease_secret: bytes | None, agent_id: str, session: str, owner: str | None
) -> dict:
    """Validate a client's hello; return the lease claims (empty in open mode)."""
    if not isinstance(hello, dict) or hello.get("session") != session:
        raise HelloRejected("hello does not name this session")
    if lease_secret is None:
        return {}  # open mode: no broker, every client on the network is trusted
    token = hello.get("token")
    if not isinstance(token, str):
        raise HelloRejected("this agent requires a lease token from the broker")
    from ..lease_token import LeaseTokenError, verify

    try:
        claims = verify(token, lease_secret)
    except LeaseTokenError as e:
        raise HelloRejected(f"lease token rejected: {e}") from None
    if not hmac.compare_digest(str(claims.get("session")).encode(), session.encode()):
        raise HelloRejected("lease token was issued for another session")
    if claims.get("agent") != agent_id:
        raise HelloRejected(
            f"lease token was issued for agent {claims.get('agent')!r}, not {agent_id!r}"
        )
    if owner is not None and claims.get("user") != owner:
        raise HelloRejected("this session belongs to another user")
    return claims
