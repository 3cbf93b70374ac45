import pytest

from jupyter_elastic_gpu.lease_token import LeaseTokenError, sign, verify

SECRET = b"s3cret"


def test_roundtrip_and_format():
    token = sign({"lease": "L", "user": "u", "gpus": [0], "exp": 2000}, SECRET)
    assert token.startswith("egl1.") and token.count(".") == 2
    claims = verify(token, SECRET, now=1999)
    assert claims["lease"] == "L" and claims["gpus"] == [0] and "iat" in claims


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda t: t + "x", "bad signature"),
        (lambda t: t.replace("egl1", "egl2", 1), "malformed"),
        (lambda t: "a.b", "malformed"),
        (lambda t: t.rsplit(".", 1)[0] + ".", "bad signature"),
        (lambda t: 42, "not a string"),
    ],
)
def test_rejections_are_clear(mangle, message):
    token = sign({"lease": "L", "exp": 2000}, SECRET)
    with pytest.raises(LeaseTokenError, match=message):
        verify(mangle(token), SECRET, now=1000)


def test_wrong_secret_and_expiry():
    token = sign({"lease": "L", "exp": 2000}, SECRET)
    with pytest.raises(LeaseTokenError, match="bad signature"):
        verify(token, b"other", now=1000)
    with pytest.raises(LeaseTokenError, match="expired"):
        verify(token, SECRET, now=2000)


def test_tampered_claims_fail_signature():
    import base64
    import json

    token = sign({"lease": "L", "user": "alice", "exp": 2000}, SECRET)
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["user"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(LeaseTokenError, match="bad signature"):
        verify(f"{head}.{forged}.{sig}", SECRET, now=1000)
