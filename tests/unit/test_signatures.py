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


# --- Replay window (issue 14, finding 1) and the database webhooks' signature (finding 2) -----


def test_a_fresh_token_is_remembered_until_it_can_no_longer_pass():
    from formcall.signatures import TOKEN_LIFETIME, replay_window

    now = time.time()
    claims = verify(sign(key=KEY, url=URL, body=BODY, now=now))
    jti, until = replay_window(claims, now=now, leeway=5)
    assert jti == claims["jti"] and until == claims["iat"] + TOKEN_LIFETIME + 5


def test_a_long_lived_token_is_remembered_only_for_qstash_lifetime_and_refused_after_it():
    from formcall.signatures import TOKEN_LIFETIME, replay_window

    issued = int(time.time()) - TOKEN_LIFETIME - 6
    claims = verify(sign(key=KEY, url=URL, body=BODY, now=issued, ttl=3600))
    with pytest.raises(InvalidSignature, match="lifetime"):
        replay_window(claims, now=time.time(), leeway=5)
    assert replay_window(claims, now=issued + 10, leeway=5)[1] == issued + TOKEN_LIFETIME + 5


def test_the_webhook_signature_is_hmac_sha256_of_timestamp_dot_body():
    from formcall.signatures import webhook_signature

    expected = hmac.new(b"secret", b"1764580000." + BODY, hashlib.sha256).hexdigest()
    assert webhook_signature("secret", timestamp="1764580000", body=BODY) == "v1=" + expected


@pytest.mark.parametrize("age, accepted", [(0, True), (299, True), (301, False), (-59, True),
                                           (-61, False)])
def test_a_webhook_is_accepted_for_five_minutes(age, accepted):
    from formcall.signatures import verify_webhook, webhook_signature

    now = 1_764_580_000.0
    stamp = str(int(now - age))
    signature = webhook_signature("secret", timestamp=stamp, body=BODY)
    check = lambda: verify_webhook(secret="secret", timestamp=stamp,  # noqa: E731
                                   signatures=[signature], body=BODY, now=now)
    if accepted:
        check()
    else:
        with pytest.raises(InvalidSignature, match="window"):
            check()


@pytest.mark.parametrize("stamp", [None, "", "12a", "-5", "1" * 13, "\u0661\u0662"])
def test_a_webhook_timestamp_must_be_plain_digits(stamp):
    from formcall.signatures import verify_webhook

    with pytest.raises(InvalidSignature):
        verify_webhook(secret="secret", timestamp=stamp, signatures=["v1=00"], body=BODY,
                       now=time.time())
