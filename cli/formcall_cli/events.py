"""Lambda events (Function URL / HTTP API payload 2.0) as QStash and users send them, and re-signing.

The files in events/ carry signatures made with a placeholder key and expire after five
minutes; `formcall sign-event` re-signs them with your keys so `sam local invoke -e` works.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

from formcall.signatures import sign


def http_event(
    *,
    method: str,
    path: str,
    body: str | bytes = "",
    headers: dict | None = None,
    query: dict | None = None,
    domain: str = "example.lambda-url.us-east-1.on.aws",
    base64_body: bool = False,
) -> dict:
    """A payload-2.0 event as a Lambda Function URL (or HTTP API $default stage) delivers it."""
    raw = body.encode() if isinstance(body, str) else body
    now = time.time()
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": urlencode(query or {}),
        "headers": {k.lower(): v for k, v in {"host": domain, **(headers or {})}.items()},
        "queryStringParameters": query or None,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": domain.split(".")[0],
            "domainName": domain,
            "domainPrefix": domain.split(".")[0],
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.10",
                "userAgent": "Upstash-QStash",
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "body": base64.b64encode(raw).decode() if base64_body else raw.decode(),
        "isBase64Encoded": base64_body,
    }


def event_body(event: dict) -> bytes:
    body = event.get("body") or ""
    return base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()


def event_url(event: dict) -> str:
    return f"https://{event['requestContext']['domainName']}{event['rawPath']}"


def sign_event(event: dict, *, key: str, url: str | None = None) -> dict:
    """A copy of `event` with a fresh Upstash-Signature for its body and URL (or `url`)."""
    signed = json.loads(json.dumps(event))
    signed["headers"]["upstash-signature"] = sign(
        key=key, url=url or event_url(event), body=event_body(event)
    )
    return signed


def sign_event_files(paths: list[Path], *, key: str, url: str | None = None) -> list[Path]:
    """Re-sign, in place, each event file that carries an Upstash-Signature."""
    changed = []
    for path in paths:
        event = json.loads(path.read_text())
        if "upstash-signature" not in {k.lower() for k in event.get("headers", {})}:
            continue
        event["headers"] = {k.lower(): v for k, v in event["headers"].items()}
        path.write_text(json.dumps(sign_event(event, key=key, url=url), indent=2) + "\n")
        changed.append(path)
    return changed


def webhook_headers(body: str | bytes, *, secret: str, now: float | None = None) -> dict[str, str]:
    """The headers the signed-webhooks trigger sends with `body` (tests and hand-made webhooks)."""
    from formcall.signatures import webhook_signature

    raw = body.encode() if isinstance(body, str) else body
    stamp = str(int(time.time() if now is None else now))
    return {
        "content-type": "application/json",
        "x-formcall-timestamp": stamp,
        "x-formcall-signature": webhook_signature(secret, timestamp=stamp, body=raw),
    }
