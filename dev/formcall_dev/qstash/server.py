"""A local stand-in for Upstash QStash (the v2 REST API the `qstash` SDK uses), kept in PostgreSQL.

`create_app(dsn=..., token=..., current_signing_key=..., next_signing_key=...)` returns a
Starlette app; point the official client at it with `QStash(token, base_url=url)`. Every
/v2/* call needs `Authorization: Bearer <token>` (or `?qstash_token=`). All state lives in
one PostgreSQL schema, so a restarted server carries on with the same messages, retries,
schedules, deduplication ids and DLQ. Deliveries are signed like QStash's (HS256 JWT with
the current key, `sub` = destination, `body` = base64url SHA-256 of the body), carry
Upstash-Message-Id / -Retried / -Schedule-Id / -Caller-Ip and `User-Agent: Upstash-QStash`,
retry with QStash's backoff (min(1 day, e^(2.5 n)) seconds), honour Upstash-Retry-Delay,
Retry-After and 489 + `Upstash-NonRetryable-Error: true`, then move the message to the DLQ
and publish the failure callback. `time_scale` multiplies the backoff and Upstash-Retry-Delay
waits only (so tests can retry in milliseconds); delays, not-before times, Retry-After and
cron ticks run on the real clock. Up to 200 deliveries run at once; a due message is picked
up within about 30 ms.

Implemented: POST /v2/publish/{url}, POST /v2/batch, GET and DELETE /v2/messages/{id},
DELETE /v2/messages, POST /v2/schedules/{url}, GET /v2/schedules[/{id}],
DELETE /v2/schedules/{id}, PATCH or POST /v2/schedules/{id}/pause|resume,
GET /v2/dlq[/{dlqId}], DELETE /v2/dlq[/{dlqId}], GET /v2/keys, GET /v2/events (also /v2/logs).

Local-only extras, not part of QStash (same token):
- GET /v2/_local/messages: every queued, retrying or in-flight message with its state,
  retried count, next attempt time (or lease expiry while in flight).
- GET /v2/_local/stats: API requests by kind (publish, batch, batchMessages, schedules,
  cancel, dlq, reads, unsupported, unauthorized), deliveries (attempted, delivered, failed,
  failedAttempts, retriesScheduled, callbacksQueued, maxInFlight), current inFlight, queued,
  dlq and schedules counts, and per flow-control key its limits and maxInFlight.
  POST /v2/_local/stats/reset zeroes the counters. Counters are per server process.
- POST /v2/_local/schedules/{id}/trigger: fire a schedule now (its cron is unchanged);
  in-process, `await app.state.local_qstash.trigger_schedule_now(id)` does the same.

Simplifications compared with the real QStash:
- Only URL destinations: no URL groups (topics), queues/enqueue, `api` destinations, key
  rotation or flow-control management endpoints (they answer 400, 404 or 501).
- The destination host is not resolved at publish, and localhost destinations are allowed.
- No plan limits: no quotas or 429s, message size, delay and retry limits are not enforced;
  Upstash-Redact-Fields is accepted and ignored; DLQ entries and the event log are kept
  until deleted (no retention window).
- Flow-control limits (parallelism, rate per period) are enforced within one server
  process; two servers sharing a schema each apply them separately. Waiting messages stay
  queued. A key given with an empty value has no limits.
- Upstash-Callback is called after every attempt that got an HTTP response (connection
  errors and timeouts do not produce one); the failure callback is called once, after the
  last attempt, also for connection errors (status 0) and for 489 non-retryable replies.
  Payload times (notBefore, createdAt) are integers in ms; `retried` is left out when 0.
  Bare Upstash-Callback-Foo / Upstash-Failure-Callback-Foo headers are forwarded as Foo,
  like the -Forward- forms.
- A Retry-After (or X-RateLimit-Reset*) reply header is honoured as given, not scaled;
  a value over one day falls back to the normal backoff, as QStash documents.
- Redirects are not followed (a 3xx is a failed attempt). Connection errors and timeouts
  are recorded with responseStatus 0.
- Schedules: an overwrite keeps createdAt and the paused state and restarts the cron from
  now; ticks missed while no server ran collapse into a single trigger; the cron accepts
  five fields with an optional `CRON_TZ=<zone> ` prefix. lastScheduleStates is not kept.
- Cancelling a message in flight lets that attempt finish but stops any retry or callback.
- A delivery interrupted by a server stop is due again immediately; one lost in a crash
  becomes due again when its 30 s lease runs out (at-least-once, like QStash).
- Message `header` fields list the forwarded headers with the prefix removed, in Go's
  canonical case.
"""

from __future__ import annotations

import collections
import hmac
import json
import secrets
import urllib.parse
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from formcall_dev.qstash.dispatcher import Dispatcher, describe
from formcall_dev.qstash.headers import (
    SCHEDULE_ID_PATTERN,
    BadRequest,
    content_dedup_key,
    parse_message_headers,
    split_cron,
)
from formcall_dev.qstash.store import NotFound, Store, message_json, new_schedule_id, schedule_json

MAX_BATCH = 1000


def generate_dev_credentials() -> dict:
    """Fresh random credentials for one local stack (keys are 32 bytes, like QStash's)."""
    return {
        "QSTASH_TOKEN": "local_" + secrets.token_urlsafe(32),
        "QSTASH_CURRENT_SIGNING_KEY": "sig_" + secrets.token_urlsafe(21),
        "QSTASH_NEXT_SIGNING_KEY": "sig_" + secrets.token_urlsafe(21),
    }


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _destination(request: Request, prefix: str) -> str:
    """The destination pasted raw after `prefix`, with the request's query string as its own."""
    raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
    raw = raw_path.decode("utf-8", "replace")
    destination = raw[raw.index(prefix) + len(prefix) :]
    if not destination.lower().startswith(("http://", "https://")) and urllib.parse.unquote(
        destination
    ).lower().startswith(("http://", "https://")):
        # Some clients percent-encode the whole destination; QStash accepts that too.
        destination = urllib.parse.unquote(destination)
    query = request.scope.get("query_string", b"").decode("utf-8", "replace")
    # A token passed as ?qstash_token= is ours, not part of the destination's query.
    kept = [pair for pair in query.split("&") if pair and not pair.startswith("qstash_token=")]
    return destination + ("?" + "&".join(kept) if kept else "")


def _dedup_key(spec) -> str | None:
    if spec.dedup_id:
        return "id:" + spec.dedup_id
    return content_dedup_key(spec) if spec.content_dedup else None


def _int_param(request: Request, name: str, default: int | None, maximum: int | None = None):
    value = request.query_params.get(name)
    if value in (None, ""):
        return default
    if not value.isdigit():
        raise BadRequest(f"invalid {name}: {value!r}")
    return min(int(value), maximum) if maximum else int(value)


async def _json_body(request: Request):
    body = await request.body()
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from exc


class LocalQStash:
    """The app's state (store, dispatcher, credentials, request counters) and its route handlers."""

    def __init__(
        self,
        *,
        dsn: str,
        token: str,
        current_signing_key: str,
        next_signing_key: str,
        schema: str,
        time_scale: float,
    ) -> None:
        self.token = token.encode()
        self.current_signing_key = current_signing_key
        self.next_signing_key = next_signing_key
        self.store = Store(dsn, schema)
        self.dispatcher = Dispatcher(
            self.store, signing_key=current_signing_key, time_scale=time_scale
        )
        self.requests: collections.Counter[str] = collections.Counter()

    async def trigger_schedule_now(self, schedule_id: str) -> str:
        """Fire a schedule at once, outside its cron; returns the new message id."""
        message_id = await self.store.trigger_schedule(schedule_id)
        self.dispatcher.wake()
        return message_id

    # --- the one place that checks the token and maps errors to statuses

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        if given.lower().startswith("bearer "):
            given = given[7:].strip()
        else:
            given = request.query_params.get("qstash_token", "")
        return hmac.compare_digest(given.encode(), self.token)

    def endpoint(self, kind: str | None, handler):
        async def run(request: Request) -> Response:
            if not self._authorized(request):
                self.requests["unauthorized"] += 1
                return error(401, "unauthorized: invalid or missing QStash token")
            if kind:
                self.requests[kind] += 1
            try:
                return await handler(request)
            except BadRequest as exc:
                return error(400, str(exc))
            except NotFound as exc:
                return error(404, str(exc))

        return run

    def routes(self) -> list[Route]:
        e = self.endpoint
        return [
            Route("/v2/publish/{destination:path}", e("publish", self.publish), methods=["POST"]),
            Route("/v2/batch", e("batch", self.batch), methods=["POST"]),
            Route("/v2/messages/{message_id}", e("reads", self.get_message), methods=["GET"]),
            Route(
                "/v2/messages/{message_id}", e("cancel", self.cancel_message), methods=["DELETE"]
            ),
            Route("/v2/messages", e("cancel", self.cancel_messages), methods=["DELETE"]),
            Route(
                "/v2/schedules/{schedule_id}/pause",
                e("schedules", self.pause_schedule),
                methods=["PATCH", "POST"],
            ),
            Route(
                "/v2/schedules/{schedule_id}/resume",
                e("schedules", self.resume_schedule),
                methods=["PATCH", "POST"],
            ),
            Route("/v2/schedules", e("reads", self.list_schedules), methods=["GET"]),
            Route("/v2/schedules/{schedule_id}", e("reads", self.get_schedule), methods=["GET"]),
            Route(
                "/v2/schedules/{schedule_id}",
                e("schedules", self.delete_schedule),
                methods=["DELETE"],
            ),
            Route(
                "/v2/schedules/{destination:path}",
                e("schedules", self.create_schedule),
                methods=["POST"],
            ),
            Route("/v2/dlq", e("reads", self.list_dlq), methods=["GET"]),
            Route("/v2/dlq", e("dlq", self.delete_dlq_many), methods=["DELETE"]),
            Route("/v2/dlq/{dlq_id}", e("reads", self.get_dlq), methods=["GET"]),
            Route("/v2/dlq/{dlq_id}", e("dlq", self.delete_dlq), methods=["DELETE"]),
            Route("/v2/keys", e("reads", self.keys), methods=["GET"]),
            Route("/v2/events", e("reads", self.events), methods=["GET"]),
            Route("/v2/logs", e("reads", self.events), methods=["GET"]),
            Route("/v2/_local/messages", e(None, self.local_messages), methods=["GET"]),
            Route("/v2/_local/stats", e(None, self.local_stats), methods=["GET"]),
            Route("/v2/_local/stats/reset", e(None, self.reset_stats), methods=["POST"]),
            Route(
                "/v2/_local/schedules/{schedule_id}/trigger",
                e(None, self.trigger_schedule),
                methods=["POST"],
            ),
            Route("/v2/{rest:path}", e("unsupported", self.unsupported)),
        ]

    # --- messages

    async def publish(self, request: Request) -> Response:
        destination = _destination(request, "/v2/publish/")
        spec = parse_message_headers(
            request.headers.items(), url=destination, body=await request.body()
        )
        [(message_id, deduplicated)] = await self.store.publish(
            [spec], [_dedup_key(spec)], caller_ip=request.client.host if request.client else None
        )
        self.dispatcher.wake()
        if deduplicated:
            return JSONResponse({"messageId": message_id, "deduplicated": True}, status_code=202)
        return JSONResponse({"messageId": message_id})

    async def batch(self, request: Request) -> Response:
        elements = await _json_body(request)
        if not isinstance(elements, list):
            raise BadRequest("batch body must be a JSON array")
        if len(elements) > MAX_BATCH:
            raise BadRequest(f"a batch holds at most {MAX_BATCH} messages")
        self.requests["batchMessages"] += len(elements)
        answers: list[dict | None] = []
        specs, keys, slots = [], [], []
        for element in elements:
            try:
                spec = self._batch_spec(element)
            except BadRequest as exc:
                answers.append({"error": str(exc)})
                continue
            slots.append(len(answers))
            answers.append(None)
            specs.append(spec)
            keys.append(_dedup_key(spec))
        if specs:
            results = await self.store.publish(
                specs, keys, caller_ip=request.client.host if request.client else None
            )
            for slot, (message_id, deduplicated) in zip(slots, results, strict=True):
                answers[slot] = (
                    {"messageId": message_id, "deduplicated": True}
                    if deduplicated
                    else {"messageId": message_id}
                )
            self.dispatcher.wake()
        return JSONResponse(answers)

    @staticmethod
    def _batch_spec(element):
        if not isinstance(element, dict) or not isinstance(element.get("destination"), str):
            raise BadRequest("each batch element needs a string destination")
        if element.get("queue"):
            raise BadRequest("queues are not supported by the local QStash")
        headers = element.get("headers") or {}
        body = element.get("body")
        if not isinstance(headers, dict) or not isinstance(body, str | None):
            raise BadRequest("batch headers must be an object and body a string or null")
        return parse_message_headers(
            [(str(name), str(value)) for name, value in headers.items()],
            url=element["destination"],
            body=(body or "").encode(),
        )

    async def get_message(self, request: Request) -> Response:
        return JSONResponse(
            message_json(await self.store.get_message(request.path_params["message_id"]))
        )

    async def cancel_message(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        if not await self.store.cancel_messages([message_id]):
            raise NotFound(f"message {message_id} not found")
        return PlainTextResponse("OK", status_code=202)

    async def cancel_messages(self, request: Request) -> Response:
        data = await _json_body(request)
        ids = request.query_params.getlist("messageIds") or None
        if data is not None:
            if (
                not isinstance(data, dict)
                or set(data) - {"messageIds"}
                or not isinstance(data.get("messageIds", []), list)
            ):
                raise BadRequest('only {"messageIds": [...]} is supported by the local QStash')
            ids = [str(i) for i in data.get("messageIds", [])]
        return JSONResponse({"cancelled": await self.store.cancel_messages(ids)})

    # --- schedules

    async def create_schedule(self, request: Request) -> Response:
        destination = _destination(request, "/v2/schedules/")
        cron = request.headers.get("upstash-cron")
        if not cron:
            raise BadRequest("Upstash-Cron header is required")
        split_cron(cron)
        schedule_id = request.headers.get("upstash-schedule-id") or new_schedule_id()
        if not SCHEDULE_ID_PATTERN.fullmatch(schedule_id) or len(schedule_id) > 200:
            raise BadRequest("invalid schedule id: use letters, digits, '-', '_' and '.'")
        spec = parse_message_headers(
            request.headers.items(), url=destination, body=await request.body(), for_schedule=True
        )
        await self.store.upsert_schedule(
            schedule_id, spec, cron, caller_ip=request.client.host if request.client else None
        )
        return JSONResponse({"scheduleId": schedule_id})

    async def list_schedules(self, request: Request) -> Response:
        return JSONResponse([schedule_json(row) for row in await self.store.list_schedules()])

    async def get_schedule(self, request: Request) -> Response:
        return JSONResponse(
            schedule_json(await self.store.get_schedule(request.path_params["schedule_id"]))
        )

    async def delete_schedule(self, request: Request) -> Response:
        await self.store.delete_schedule(request.path_params["schedule_id"])
        return Response(status_code=200)

    async def pause_schedule(self, request: Request) -> Response:
        await self.store.set_schedule_paused(request.path_params["schedule_id"], True)
        return Response(status_code=200)

    async def resume_schedule(self, request: Request) -> Response:
        await self.store.set_schedule_paused(request.path_params["schedule_id"], False)
        return Response(status_code=200)

    # --- DLQ, keys, events

    async def list_dlq(self, request: Request) -> Response:
        messages, cursor = await self.store.list_dlq(
            filters=dict(request.query_params),
            cursor=_int_param(request, "cursor", None),
            count=_int_param(request, "count", 100, 100) or 100,
            latest_first=request.query_params.get("order") == "latestFirst",
        )
        answer: dict = {"messages": messages}
        if cursor is not None:
            answer["cursor"] = str(cursor)
        return JSONResponse(answer)

    async def get_dlq(self, request: Request) -> Response:
        return JSONResponse(await self.store.get_dlq(request.path_params["dlq_id"]))

    async def delete_dlq(self, request: Request) -> Response:
        dlq_id = request.path_params["dlq_id"]
        if not await self.store.delete_dlq([dlq_id]):
            raise NotFound(f"dlq message {dlq_id} not found")
        return Response(status_code=200)

    async def delete_dlq_many(self, request: Request) -> Response:
        data = await _json_body(request)
        ids = request.query_params.getlist("dlqIds")
        if data is not None:
            if not isinstance(data, dict) or not isinstance(data.get("dlqIds"), list):
                raise BadRequest('body must be {"dlqIds": [...]}')
            ids = [str(i) for i in data["dlqIds"]]
        return JSONResponse({"deleted": await self.store.delete_dlq(ids)})

    async def keys(self, request: Request) -> Response:
        return JSONResponse({"current": self.current_signing_key, "next": self.next_signing_key})

    async def events(self, request: Request) -> Response:
        events, cursor = await self.store.list_events(
            filters=dict(request.query_params),
            message_ids=request.query_params.getlist("messageIds"),
            cursor=_int_param(request, "cursor", None),
            count=_int_param(request, "count", 1000, 1000) or 1000,
        )
        answer: dict = {"events": events}
        if cursor is not None:
            answer["cursor"] = str(cursor)
        return JSONResponse(answer)

    async def unsupported(self, request: Request) -> Response:
        return error(
            404 if request.method == "GET" else 501,
            f"{request.method} {request.url.path} is not supported by the local QStash",
        )

    # --- local-only extras

    async def local_messages(self, request: Request) -> Response:
        rows = await self.store.list_queued()
        return JSONResponse(
            {"messages": [describe(row) for row in rows], "inFlight": self.dispatcher.in_flight()}
        )

    async def local_stats(self, request: Request) -> Response:
        counts = await self.store.counts()
        kinds = (
            "publish",
            "batch",
            "batchMessages",
            "schedules",
            "cancel",
            "dlq",
            "reads",
            "unsupported",
            "unauthorized",
        )
        return JSONResponse(
            {
                "requests": {kind: self.requests[kind] for kind in kinds},
                "deliveries": self.dispatcher.stats.as_json(),
                "inFlight": self.dispatcher.in_flight(),
                "queued": counts["queued"],
                "dlq": counts["dlq"],
                "schedules": counts["schedules"],
                "flowControl": {
                    key: {
                        "parallelism": state.parallelism,
                        "rate": state.rate,
                        "period": state.period_s,
                        "inFlight": state.in_flight,
                        "maxInFlight": state.max_in_flight,
                    }
                    for key, state in self.dispatcher.flow.items()
                },
            }
        )

    async def reset_stats(self, request: Request) -> Response:
        self.requests.clear()
        self.dispatcher.reset_stats()
        return JSONResponse({"reset": True})

    async def trigger_schedule(self, request: Request) -> Response:
        return JSONResponse(
            {"messageId": await self.trigger_schedule_now(request.path_params["schedule_id"])}
        )


def create_app(
    *,
    dsn: str,
    token: str,
    current_signing_key: str,
    next_signing_key: str,
    schema: str = "local_qstash",
    time_scale: float = 1.0,
) -> Starlette:
    """The local QStash as an ASGI app; its lifespan creates the schema and runs the dispatcher."""
    if not token:
        raise ValueError("token must not be empty")
    qstash = LocalQStash(
        dsn=dsn,
        token=token,
        current_signing_key=current_signing_key,
        next_signing_key=next_signing_key,
        schema=schema,
        time_scale=time_scale,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await qstash.store.create_schema()
        await qstash.dispatcher.start()
        try:
            yield
        finally:
            try:
                await qstash.dispatcher.stop()
            finally:
                await qstash.store.close()

    app = Starlette(routes=qstash.routes(), lifespan=lifespan)
    app.state.local_qstash = qstash
    return app
