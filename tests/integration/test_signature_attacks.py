"""Attacks on QStash signatures, each its own test, on every QStash-signed endpoint.

test_call_form.py already refuses, on call-form: a tampered body, an expired token, a
check-forms token (subject), another issuer, a wrong key, no signature, `alg: none`, HS512, a
future `nbf` and two comma-joined signature headers. This file adds what it lacks: the same
keys, algorithms and claims on check-forms and failure-callback, case variants of `none`, an
asymmetric algorithm, an empty key, expiry at the clock tolerance's edge, a future `iat`,
missing or mistyped claims, a key offered in the token's header, tokens replayed to the other
endpoints, a body swapped under a valid token, two real signature headers over HTTP and
API Gateway's base64 bodies. Every refusal is 401 `invalid signature` with no Vapi request and
no database write.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest

from formcall import clients
from formcall.signatures import body_hash, sign
from formcall_cli.events import http_event
from tests.support.lambda_handlers import DOMAIN, invoke
from tests.support.reads import form_events, form_row

ENDPOINTS = {
    # function: (path, body for a form)
    "call_form": ("/api/jobs/call-form", lambda form: json.dumps({"formId": form})),
    "check_forms": ("/api/cron/check-forms", lambda form: ""),
    "failure_callback": ("/api/jobs/failed", lambda form: failure_body(form)),
}
REFUSED = {"error": "invalid signature"}


def failure_body(form_id: str, source: str = "msg_attack_1") -> str:
    return json.dumps(
        {
            "status": 503,
            "retried": 5,
            "maxRetries": 5,
            "sourceMessageId": source,
            "body": base64.b64encode(b'{"error": "Vapi answered HTTP 503"}').decode(),
            "sourceBody": base64.b64encode(json.dumps({"formId": form_id}).encode()).decode(),
            "url": f"https://{DOMAIN}/api/jobs/call-form",
            "method": "POST",
            "dlqId": "1-0",
        }
    )


@pytest.fixture
def signed_env(stack_env, monkeypatch, vapi, keys):
    monkeypatch.setenv("FAILURE_CALLBACK_URL", f"https://{DOMAIN}/api/jobs/failed")
    # test_secrets.py rotates the session's fake Vapi key and leaves it rotated.
    vapi.api_key = keys.vapi_key
    clients.reset()
    return stack_env


def url_of(function: str) -> str:
    return f"https://{DOMAIN}{ENDPOINTS[function][0]}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, key: bytes | None, digest=hashlib.sha256) -> str:
    """A compact JWS built by hand (PyJWT refuses to make some of these)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims_for(function: str, signed_body: str, changes: dict | None = None) -> dict:
    now = int(time.time())
    claims = {
        "iss": "Upstash",
        "sub": url_of(function),
        "iat": now,
        "nbf": 0,
        "exp": now + 300,
        "jti": "jwt_attack",
        "body": body_hash(signed_body.encode()) + "=",
    }
    claims.update(changes or {})
    return {k: v for k, v in claims.items() if v is not None}


def event(function: str, body: str, token: str | None, *, base64_body: bool = False) -> dict:
    headers = {
        "content-type": "application/json",
        "upstash-message-id": "msg_attack",
        "upstash-retried": "0",
    }
    if token is not None:
        headers["upstash-signature"] = token
    return http_event(
        method="POST",
        path=ENDPOINTS[function][0],
        body=body,
        headers=headers,
        domain=DOMAIN,
        base64_body=base64_body,
    )


def assert_refused(answer, vapi, conn, form) -> None:
    assert (answer.status, answer.body) == (401, REFUSED)
    assert vapi.requests == []
    assert form_row(conn, form)["call_status"] == "pending"
    assert form_events(conn, form) == []


@pytest.fixture(params=list(ENDPOINTS))
def function(request) -> str:
    return request.param


def test_a_valid_token_is_accepted_on_each_endpoint(
    signed_env, vapi, conn, due_form, keys, function
):
    # The control: every attack below differs from this in one respect only.
    body = ENDPOINTS[function][1](due_form)
    answer = invoke(
        function,
        event(function, body, sign(key=keys.current_key, url=url_of(function), body=body.encode())),
    )
    assert answer.status == 200


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_case_is_refused(signed_env, vapi, conn, due_form, keys, function, alg):
    body = ENDPOINTS[function][1](due_form)
    token = hand_made({"alg": alg, "typ": "JWT"}, claims_for(function, body), None)
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


@pytest.mark.parametrize("alg, digest", [("HS384", hashlib.sha384), ("HS512", hashlib.sha512)])
def test_another_hmac_algorithm_with_the_right_key_is_refused(
    signed_env, vapi, conn, due_form, keys, function, alg, digest
):
    body = ENDPOINTS[function][1](due_form)
    token = hand_made(
        {"alg": alg, "typ": "JWT"}, claims_for(function, body), keys.current_key.encode(), digest
    )
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_an_asymmetric_algorithm_is_refused(signed_env, vapi, conn, due_form, keys, function):
    from cryptography.hazmat.primitives.asymmetric import rsa

    body = ENDPOINTS[function][1](due_form)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims_for(function, body), private, algorithm="RS256")
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_a_key_offered_in_the_token_header_is_ignored(
    signed_env, vapi, conn, due_form, keys, function
):
    # jwk / jku / kid injection: the attacker's own key, announced in the header.
    body = ENDPOINTS[function][1](due_form)
    attacker = b"attacker-key-of-thirty-two-bytes!!"
    header = {
        "alg": "HS256",
        "typ": "JWT",
        "kid": "../../dev/null",
        "jku": "https://attacker.example/keys",
        "jwk": {"kty": "oct", "k": b64url(attacker)},
    }
    token = hand_made(header, claims_for(function, body), attacker)
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_a_token_signed_with_an_empty_key_is_refused(
    signed_env, vapi, conn, due_form, keys, function
):
    body = ENDPOINTS[function][1](due_form)
    token = hand_made({"alg": "HS256", "typ": "JWT"}, claims_for(function, body), b"")
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_a_token_signed_with_a_wrong_key_is_refused(
    signed_env, vapi, conn, due_form, keys, function
):
    body = ENDPOINTS[function][1](due_form)
    token = sign(key="sig_" + "w" * 28, url=url_of(function), body=body.encode())
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_an_expired_token_is_refused_past_the_clock_tolerance(
    signed_env, vapi, conn, due_form, keys, function
):
    body = ENDPOINTS[function][1](due_form)
    # QSTASH_CLOCK_TOLERANCE is 5 s: expired 10 s ago is refused.
    token = sign(
        key=keys.current_key, url=url_of(function), body=body.encode(), now=time.time() - 310
    )
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_a_token_expired_within_the_clock_tolerance_is_accepted(
    signed_env, vapi, conn, due_form, keys
):
    body = ENDPOINTS["call_form"][1](due_form)
    token = sign(
        key=keys.current_key, url=url_of("call_form"), body=body.encode(), now=time.time() - 302
    )
    assert invoke("call_form", event("call_form", body, token)).status == 200


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_not_yet_valid_is_refused(signed_env, vapi, conn, due_form, keys, function, claim):
    body = ENDPOINTS[function][1](due_form)
    token = sign(
        key=keys.current_key,
        url=url_of(function),
        body=body.encode(),
        **{claim: int(time.time()) + 120},
    )
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


@pytest.mark.parametrize(
    "changes",
    [
        {"iss": "Someone"},
        {"iss": "upstash"},
        {"iss": None},
        {"sub": None},
        {"exp": None},
        {"body": None},
        {"sub": ["https://x"]},
        {"body": 42},
        {"exp": "never"},
        {"aud": "formcall"},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_a_changed_missing_or_mistyped_claim_is_refused(
    signed_env, vapi, conn, due_form, keys, function, changes
):
    body = ENDPOINTS[function][1](due_form)
    token = hand_made(
        {"alg": "HS256", "typ": "JWT"},
        claims_for(function, body, changes),
        keys.current_key.encode(),
    )
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


@pytest.mark.parametrize(
    "issued_for, replayed_to",
    [
        ("call_form", "failure_callback"),
        ("failure_callback", "call_form"),
        ("call_form", "check_forms"),
        ("check_forms", "failure_callback"),
    ],
)
def test_a_token_replayed_to_another_endpoint_is_refused(
    signed_env, vapi, conn, due_form, keys, issued_for, replayed_to
):
    # The body is the target's own, so only the subject differs.
    body = ENDPOINTS[replayed_to][1](due_form)
    token = sign(key=keys.current_key, url=url_of(issued_for), body=body.encode())
    assert_refused(invoke(replayed_to, event(replayed_to, body, token)), vapi, conn, due_form)


def test_a_token_for_another_host_is_refused(signed_env, vapi, conn, due_form, keys, function):
    body = ENDPOINTS[function][1](due_form)
    token = sign(
        key=keys.current_key,
        url=url_of(function).replace(DOMAIN, "other.example"),
        body=body.encode(),
    )
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_a_body_swapped_under_a_valid_token_is_refused(
    signed_env, vapi, conn, due_form, keys, function
):
    other = "6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c11"
    signed_body = ENDPOINTS[function][1](other) or "{}"
    token = sign(key=keys.current_key, url=url_of(function), body=signed_body.encode())
    swapped = ENDPOINTS[function][1](due_form) or " "
    assert_refused(invoke(function, event(function, swapped, token)), vapi, conn, due_form)


def test_a_body_with_whitespace_changed_is_refused(signed_env, vapi, conn, due_form, keys):
    # The hash is over the raw bytes: re-serialised JSON is a different body.
    body = json.dumps({"formId": due_form})
    token = sign(key=keys.current_key, url=url_of("call_form"), body=body.encode())
    respaced = json.dumps({"formId": due_form}, separators=(",", ":"))
    assert_refused(invoke("call_form", event("call_form", respaced, token)), vapi, conn, due_form)


@pytest.mark.parametrize(
    "token",
    [
        "",
        " ",
        "a.b.c",
        "Bearer x",
        "..",
        "x" * 20_000,
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "\u00e9t\u00e9.\u00e9t\u00e9.x",
    ],
)
def test_garbage_tokens_are_refused(signed_env, vapi, conn, due_form, keys, function, token):
    body = ENDPOINTS[function][1](due_form)
    assert_refused(invoke(function, event(function, body, token)), vapi, conn, due_form)


def test_two_signature_headers_over_http_are_refused(
    signed_env, vapi, conn, due_form, keys, function_server, function
):
    # Through uvicorn, where repeated headers stay separate (Lambda joins them with commas,
    # which test_call_form.py covers): two valid tokens are still refused.
    path, make_body = ENDPOINTS[function]
    body = make_body(due_form).encode()
    token = sign(key=keys.current_key, url=f"{function_server}{path}", body=body)
    headers = [
        ("content-type", "application/json"),
        ("upstash-signature", token),
        ("upstash-signature", token),
    ]
    answer = httpx.post(f"{function_server}{path}", content=body, headers=headers, timeout=30)
    assert (answer.status_code, answer.json()) == (401, REFUSED)
    assert vapi.requests == []
    assert form_events(conn, due_form) == []
    one = httpx.post(f"{function_server}{path}", content=body, headers=headers[:2], timeout=30)
    assert one.status_code == 200  # the control: one of them alone is accepted


def test_base64_body_signed_as_its_encoded_text_is_refused(
    signed_env, vapi, conn, due_form, keys, function
):
    # API Gateway may hand the body base64-encoded; the signature covers the decoded bytes.
    body = ENDPOINTS[function][1](due_form) or "{}"
    encoded = base64.b64encode(body.encode())
    token = sign(key=keys.current_key, url=url_of(function), body=encoded)
    answer = invoke(function, event(function, body, token, base64_body=True))
    assert_refused(answer, vapi, conn, due_form)


def test_base64_body_changed_after_signing_is_refused(
    signed_env, vapi, conn, due_form, keys, function
):
    body = ENDPOINTS[function][1](due_form) or "{}"
    token = sign(key=keys.current_key, url=url_of(function), body=body.encode())
    answer = invoke(function, event(function, body + " ", token, base64_body=True))
    assert_refused(answer, vapi, conn, due_form)


def test_base64_body_signed_over_the_decoded_bytes_is_accepted(
    signed_env, vapi, conn, due_form, keys, function
):
    body = ENDPOINTS[function][1](due_form)
    token = sign(key=keys.current_key, url=url_of(function), body=body.encode())
    assert invoke(function, event(function, body, token, base64_body=True)).status == 200
