"""The HTTP edge of every function: request capture, settings, authentication, error mapping, Lambda entry.

Each request loads its function's settings model once, here, and the handler passes it (or
its parts) down; the verifiers below take the keys and secrets they check against.

Errors become statuses here and nowhere else. QStash retries any non-2xx, so only transient
faults answer 5xx (503); permanent ones answer 489 with `Upstash-NonRetryable-Error: true`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, SecretStr
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from formcall import settings
from formcall.errors import FormcallError, PayloadTooLarge, Replayed, TransientFailure, Unauthorized
from formcall.observability import logger
from formcall.signatures import InvalidSignature, replay_window, verify_signature, verify_webhook
from formcall.store import FormStore

# QStash messages to formcall are tiny; anything bigger is not ours.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Incoming:
    """What a handler needs of a request; `url` is scheme://host/path without the query."""

    method: str
    url: str
    headers: Headers
    query: QueryParams
    body: bytes


@dataclass(frozen=True)
class Reply:
    payload: dict[str, Any]
    status: int = 200
    headers: dict[str, str] | None = None


# A function's handler: the request and its function's settings, loaded for this request.
Handler = Callable[[Incoming, Any], Reply]


def error_reply(exc: Exception) -> Reply:
    if isinstance(exc, FormcallError):
        headers: dict[str, str] = {}
        if exc.status == 489:
            headers["Upstash-NonRetryable-Error"] = "true"
        if isinstance(exc, TransientFailure) and exc.retry_after:
            headers["Retry-After"] = str(exc.retry_after)
        public = {k: v for k, v in exc.detail.items() if k in ("formId", "settings", "callId")}
        return Reply({"error": exc.public_message, **public}, exc.status, headers)
    return Reply({"error": "internal error"}, 500)


def _endpoint(handler: Handler, model: type[BaseModel]):
    def handle(incoming: Incoming) -> Reply:
        # In the thread pool: loading may read the formcall secrets (a network call).
        return handler(incoming, settings.load(model))

    async def endpoint(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                raise PayloadTooLarge(f"body larger than {MAX_BODY_BYTES} bytes")
            incoming = Incoming(
                method=request.method,
                url=str(request.url.replace(query="")),
                headers=request.headers,
                query=request.query_params,
                body=body,
            )
            reply = await run_in_threadpool(handle, incoming)
        except FormcallError as exc:
            log = logger.error if exc.status >= 500 else logger.warning
            log(
                "request refused",
                extra={
                    "status": exc.status,
                    "error": exc.public_message,
                    **{k: v for k, v in exc.detail.items() if k in ("formId", "settings", "cause")},
                },
            )
            reply = error_reply(exc)
        except Exception:
            logger.exception("unexpected error")
            reply = error_reply(Exception())
        # The path only: a query string may carry the setup secret.
        logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.url.path,
                "status": reply.status,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return JSONResponse(reply.payload, reply.status, reply.headers)

    return endpoint


def create_app(
    handler: Handler, *, settings: type[BaseModel], paths: Iterable[str], methods: list[str]
) -> Starlette:
    """One function's app: the handler on its root path and on its design paths.

    Each request loads `settings` (the function's model) once and hands it to the handler.
    """
    endpoint = _endpoint(handler, settings)
    routes = [Route(path, endpoint, methods=methods) for path in ["/", *paths]]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (404, 405) as JSON like every other answer."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    return JSONResponse({"error": exc.detail}, exc.status_code, exc.headers)


def lambda_handler(app: Starlette):
    """Wrap the app for Lambda (Function URL and HTTP API 2.0 events) with Powertools."""
    from aws_lambda_powertools.logging import correlation_paths
    from mangum import Mangum

    from formcall.observability import metrics

    asgi = Mangum(app, lifespan="off")

    # log_event=False whatever POWERTOOLS_LOGGER_LOG_EVENT says: the event carries the setup
    # secret in its query string and the secrets' headers.
    @logger.inject_lambda_context(
        correlation_id_path=correlation_paths.LAMBDA_FUNCTION_URL, clear_state=True, log_event=False
    )
    @metrics.log_metrics(capture_cold_start_metric=True)
    def handler(event: dict, context: Any) -> dict:
        return asgi(event, context)

    return handler


def verify_qstash(
    incoming: Incoming,
    *,
    keys: settings.ReceiverSettings,
    public_url: str | None,
    store: FormStore,
) -> dict:
    """Check Upstash-Signature against this endpoint's URL (derived or configured) and the raw body.

    Then accept the token once: a valid token used again (a captured delivery replayed) is
    refused with 409 before anything is read or written, so replays cannot spend a form's
    attempts. QStash's own retries carry fresh tokens and pass.
    """
    tokens = incoming.headers.getlist("upstash-signature")
    if len(tokens) > 1:
        raise Unauthorized("invalid signature")
    try:
        claims = verify_signature(
            tokens[0] if tokens else None,
            body=incoming.body,
            urls=[incoming.url, public_url or ""],
            keys=[
                keys.QSTASH_CURRENT_SIGNING_KEY.get_secret_value(),
                keys.QSTASH_NEXT_SIGNING_KEY.get_secret_value(),
            ],
            leeway=keys.QSTASH_CLOCK_TOLERANCE,
        )
        jti, good_until = replay_window(claims, now=time.time(), leeway=keys.QSTASH_CLOCK_TOLERANCE)
    except InvalidSignature as exc:
        logger.warning("signature refused", extra={"reason": str(exc)})
        raise Unauthorized("invalid signature") from None
    if not store.accept_qstash_token(jti, expires_at=datetime.fromtimestamp(good_until, UTC)):
        logger.warning("replayed QStash token refused")
        raise Replayed("replayed token")
    _authenticated(incoming)
    return claims


def _authenticated(incoming: Incoming) -> None:
    """Only an authenticated request's message id becomes the log correlation id."""
    message_id = incoming.headers.get("upstash-message-id")
    if message_id:
        logger.set_correlation_id(message_id[:128])


def _require_secret(expected: str, offered: list[str]) -> None:
    if not any(hmac.compare_digest(value.encode(), expected.encode()) for value in offered):
        raise Unauthorized("unauthorized")


def _bearer(incoming: Incoming) -> list[str]:
    authorization = incoming.headers.get("authorization", "")
    return [authorization[7:].strip()] if authorization[:7].lower() == "bearer " else []


def require_cron_secret(
    incoming: Incoming, *, secret: SecretStr, allow_query: bool = False
) -> None:
    """Accept `Authorization: Bearer <CRON_SECRET>` (or `?secret=` where allowed), constant time."""
    expected = secret.get_secret_value()
    query = [incoming.query["secret"]] if allow_query and "secret" in incoming.query else []
    _require_secret(expected, _bearer(incoming) + query)


def require_signed_webhook(incoming: Incoming, *, secret: SecretStr) -> None:
    """Accept a database webhook signed with WEBHOOK_SECRET within the last 5 minutes.

    The trigger (supabase/migrations/*_signed_webhooks.sql) sends `X-Formcall-Timestamp` and
    `X-Formcall-Signature: v1=<hex HMAC-SHA256 of "{timestamp}.{body}">`; the secret itself
    never travels, so a captured webhook is good for minutes, not forever.
    """
    try:
        verify_webhook(
            secret=secret.get_secret_value(),
            timestamp=incoming.headers.get("x-formcall-timestamp"),
            signatures=incoming.headers.getlist("x-formcall-signature"),
            body=incoming.body,
            now=time.time(),
        )
    except InvalidSignature as exc:
        logger.warning("webhook refused", extra={"reason": str(exc)})
        raise Unauthorized("unauthorized") from None
