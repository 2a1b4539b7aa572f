"""Run a function's Lambda handler on an event, build the signed events the tests send, and send
a signed call-form delivery over HTTP as QStash does."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

import httpx

from formcall.signatures import sign
from formcall_cli.events import http_event, sign_event
from formcall_dev.functions_server import load_function

DOMAIN = "abc123.lambda-url.us-east-1.on.aws"
EVENTS_DOMAIN = "events123.lambda-url.us-east-1.on.aws"


@dataclass
class LambdaContext:
    function_name: str = "formcall-test"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:formcall-test"
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict


def invoke(function: str, event: dict) -> Answer:
    """Run a function's Lambda handler (Mangum + Powertools) on an event."""
    result = load_function(function).handler(event, LambdaContext())
    body = result.get("body") or ""
    if result.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
    return Answer(result["statusCode"], json.loads(body) if body else {}, headers)


def call_form_event(
    form_id, *, key: str, path: str = "/", body: str | None = None, **kwargs
) -> dict:
    body = json.dumps({"formId": str(form_id)}) if body is None else body
    event = http_event(
        method="POST",
        path=path,
        body=body,
        domain=DOMAIN,
        headers={
            "content-type": "application/json",
            "upstash-message-id": "msg_" + secrets.token_hex(8),
            "upstash-retried": "0",
        },
        **kwargs,
    )
    return sign_event(event, key=key)


def failure_event(keys, form_id, *, status=503, retried=5, source="msg_src_1", body=None):
    """QStash's failure callback for a call-form message it gave up on, signed."""
    payload = {
        "status": status,
        "header": {"Content-Type": ["application/json"]},
        "body": base64.b64encode(
            json.dumps(body or {"error": "Vapi answered HTTP 503"}).encode()
        ).decode(),
        "retried": retried,
        "maxRetries": 5,
        "sourceMessageId": source,
        "url": f"https://{DOMAIN}/",
        "method": "POST",
        "sourceHeader": {"Content-Type": ["application/json"]},
        "sourceBody": base64.b64encode(json.dumps({"formId": form_id}).encode()).decode(),
        "notBefore": 0,
        "createdAt": 0,
        "dlqId": "1725323658779-0",
    }
    body = json.dumps(payload)
    url = f"https://{DOMAIN}/api/jobs/failed"
    return http_event(
        method="POST",
        path="/api/jobs/failed",
        body=body,
        domain=DOMAIN,
        headers={
            "content-type": "application/json",
            "upstash-signature": sign(key=keys.current_key, url=url, body=body.encode()),
        },
    )


def deliver(url: str, form_id: str, key: str) -> httpx.Response:
    """POST a form's call-form message to `url`, signed with `key`, as QStash delivers it."""
    body = json.dumps({"formId": form_id}).encode()
    return httpx.post(
        url,
        content=body,
        timeout=30,
        headers={
            "content-type": "application/json",
            "upstash-signature": sign(key=key, url=url, body=body),
        },
    )
