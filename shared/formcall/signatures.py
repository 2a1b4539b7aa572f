"""Request signatures: QStash's (`Upstash-Signature`, an HS256 JWT over destination and body)
and formcall's database webhooks (`X-Formcall-Signature`, HMAC-SHA256 of timestamp and body).

QStash's are verified with PyJWT directly rather than qstash's Receiver, whose `url=None` skips
the subject check, whose clock tolerance does nothing and whose bytes bodies raise the wrong
error. The webhook signature is made in SQL (supabase/migrations/*_signed_webhooks.sql).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Sequence

import jwt


# QStash's token lifetime: `exp` is `iat` + 300 s (qstash.md, section 6). A token issued longer
# ago than that (beyond the clock tolerance) is refused, whatever its `exp` says.
TOKEN_LIFETIME = 300


class InvalidSignature(Exception):
    """Why a signature was refused (for logs; the caller only learns it was refused)."""


def body_hash(body: bytes) -> str:
    """base64url(sha256(body)) without padding, as QStash's `body` claim (padding stripped)."""
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


def _normalise(url: str) -> str:
    return url.rstrip("/")


def verify_with_key(token: str, *, key: str, body: bytes, urls: Iterable[str], leeway: int) -> dict:
    if not key:
        raise InvalidSignature("empty signing key")
    try:
        claims = jwt.decode(
            token, key.encode(), algorithms=["HS256"], issuer="Upstash", leeway=leeway,
            options={"require": ["iss", "sub", "exp", "body"], "verify_aud": True},
        )
    except jwt.PyJWTError as exc:
        raise InvalidSignature(f"{type(exc).__name__}: {exc}") from None
    subject = claims["sub"]
    if not isinstance(subject, str) or not any(
        hmac.compare_digest(_normalise(subject).encode(), _normalise(u).encode()) for u in urls
    ):
        raise InvalidSignature("subject is not this endpoint")
    claimed = claims["body"]
    if not isinstance(claimed, str) or not hmac.compare_digest(
        claimed.rstrip("=").encode(), body_hash(body).encode()
    ):
        raise InvalidSignature("body hash mismatch")
    return claims


def verify_signature(token: str | None, *, body: bytes, urls: Iterable[str], keys: Sequence[str],
                     leeway: int = 5) -> dict:
    """Return the claims if `token` was signed by one of `keys` for one of `urls` over `body`."""
    if not token:
        raise InvalidSignature("missing Upstash-Signature")
    urls = [u for u in urls if u]
    reasons = []
    for key in keys:
        try:
            return verify_with_key(token, key=key, body=body, urls=urls, leeway=leeway)
        except InvalidSignature as exc:
            reasons.append(str(exc))
    raise InvalidSignature(" / ".join(reasons) or "no signing key")


def replay_window(claims: dict, *, now: float, leeway: int) -> tuple[str, float]:
    """The token's `jti` and until when (unix seconds) it could still be accepted.

    Refuses a token without a string `jti` or an integer `iat`, or issued more than
    TOKEN_LIFETIME (plus `leeway`) ago: QStash's tokens always carry both, and the jti must be
    remembered for as long as the token is good, which the issue time bounds.
    """
    jti, issued = claims.get("jti"), claims.get("iat")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise InvalidSignature("missing or malformed jti")
    if isinstance(issued, bool) or not isinstance(issued, int):
        raise InvalidSignature("missing or malformed iat")
    if issued + TOKEN_LIFETIME + leeway < now:
        raise InvalidSignature("issued longer ago than QStash's token lifetime")
    return jti, min(float(claims["exp"]), issued + TOKEN_LIFETIME) + leeway


def sign(*, key: str, url: str, body: bytes, now: float | None = None, ttl: int = 300,
         **claims: object) -> str:
    """Make a QStash-format token (local QStash stand-ins, tests and `formcall sign-event`)."""
    issued = int(time.time() if now is None else now)
    payload = {"iss": "Upstash", "sub": url, "iat": issued, "nbf": 0, "exp": issued + ttl,
               "jti": f"jwt_{secrets.token_hex(12)}",
               "body": body_hash(body) + "=", **claims}
    return jwt.encode(payload, key.encode(), algorithm="HS256")


# A signed database webhook older than this is refused; one from the future by more than the
# clock tolerance too.
WEBHOOK_MAX_AGE = 300
WEBHOOK_CLOCK_TOLERANCE = 60


def webhook_signature(secret: str, *, timestamp: str, body: bytes) -> str:
    """`v1=` + hex HMAC-SHA256(secret, f"{timestamp}.{body}"), as the webhook trigger signs."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_webhook(*, secret: str, timestamp: str | None, signatures: Sequence[str], body: bytes,
                   now: float) -> None:
    """Raise InvalidSignature unless exactly one signature, fresh and made with `secret`."""
    if not secret:
        raise InvalidSignature("empty webhook secret")
    if len(signatures) != 1:
        raise InvalidSignature("not exactly one X-Formcall-Signature")
    if not timestamp or not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise InvalidSignature("missing or malformed X-Formcall-Timestamp")
    age = now - int(timestamp)
    if age > WEBHOOK_MAX_AGE or age < -WEBHOOK_CLOCK_TOLERANCE:
        raise InvalidSignature("webhook timestamp outside the accepted window")
    expected = webhook_signature(secret, timestamp=timestamp, body=body)
    if not hmac.compare_digest(signatures[0].strip().encode(), expected.encode()):
        raise InvalidSignature("webhook signature mismatch")
