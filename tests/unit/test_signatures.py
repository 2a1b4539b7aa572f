"""Signature verification against tokens signed here (no mocks of the check itself)."""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from formcall.signatures import InvalidSignature, body_hash, sign, verify_signature

KEY = "sig_" + "a" * 28
NEXT = "sig_" + "b" * 28
URL = "https://x.lambda-url.us-east-1.on.aws/"
BODY = b'{"formId":"6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c11"}'


def verify(token, *, body=BODY, urls=(URL,), keys=(KEY, NEXT)):
    return verify_signature(token, body=body, urls=urls, keys=keys, leeway=5)


def test_valid_token_returns_claims():
    claims = verify(sign(key=KEY, url=URL, body=BODY))
    assert claims["iss"] == "Upstash" and claims["sub"] == URL


def test_next_key_verifies_during_rotation():
    assert verify(sign(key=NEXT, url=URL, body=BODY))["sub"] == URL


def test_body_hash_matches_qstash_format():
    # base64url of sha256 over the exact bytes; QStash adds '=' padding, verifiers strip it.
    assert body_hash(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
    token = sign(key=KEY, url=URL, body=b"")
    assert jwt.decode(token, options={"verify_signature": False})["body"].endswith("=")
    assert verify(token, body=b"")


@pytest.mark.parametrize("token_kwargs, verify_kwargs, reason", [
    ({}, {"body": BODY + b" "}, "body hash mismatch"),
    ({"url": URL + "api/other"}, {}, "subject is not this endpoint"),
    ({"now": time.time() - 301 - 10}, {}, "ExpiredSignatureError"),
    ({"iss": "NotUpstash"}, {}, "InvalidIssuerError"),
    ({"aud": "someone"}, {}, "InvalidAudienceError"),
    ({"key": "sig_" + "c" * 28}, {}, "InvalidSignatureError"),
])
def test_refusals_say_why(token_kwargs, verify_kwargs, reason):
    kwargs = {"key": KEY, "url": URL, "body": BODY} | token_kwargs
    with pytest.raises(InvalidSignature, match=reason):
        verify(sign(**kwargs), **verify_kwargs)


def test_empty_key_never_verifies_anything():
    # PyJWT will not sign with an empty key, so forge the token by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"iss": "Upstash", "sub": URL, "exp": int(time.time()) + 60,
                             "body": body_hash(BODY)}).encode())
    mac = b64(hmac.new(b"", f"{head}.{claims}".encode(), hashlib.sha256).digest())
    token = f"{head}.{claims}.{mac}"
    with pytest.raises(InvalidSignature, match="empty signing key"):
        verify(token, keys=("", ""))


def test_missing_body_claim_is_refused():
    token = jwt.encode({"iss": "Upstash", "sub": URL, "exp": time.time() + 60}, KEY.encode(),
                       algorithm="HS256")
    with pytest.raises(InvalidSignature, match="MissingRequiredClaimError"):
        verify(token)


def test_missing_token_is_refused():
    with pytest.raises(InvalidSignature, match="missing"):
        verify(None)


def test_trailing_slash_difference_is_tolerated():
    assert verify(sign(key=KEY, url=URL.rstrip("/"), body=BODY))


def test_configured_public_url_is_accepted_as_subject():
    custom = "https://calls.clinic.example/api/jobs/call-form"
    assert verify(sign(key=KEY, url=custom, body=BODY), urls=(URL, custom))
