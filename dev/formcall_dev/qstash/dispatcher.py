"""The local QStash's delivery loop: claim, sign, send, retry, dead-letter, call back."""

from __future__ import annotations

import asyncio
import base64
import collections
import email.utils
import hashlib
import json
import logging
import math
import secrets
import ssl
import time
from dataclasses import dataclass, field

import certifi
import httpx
import jwt

from formcall_dev.qstash.headers import (
    BadRequest,
    MessageSpec,
    canonical_header,
    parse_duration,
    retry_delay_ms,
)
from formcall_dev.qstash.store import LEASE_S, Store, to_ms

log = logging.getLogger("formcall_dev.qstash")

MAX_BACKOFF_S = 86400.0
# QStash's plan limit for one HTTP attempt (free plan: 15 minutes); Upstash-Timeout shortens it.
DEFAULT_ATTEMPT_TIMEOUT_S = 900.0
MAX_STORED_RESPONSE_BYTES = 1024 * 1024
CONNECTIONS_PER_CLIENT = 4
# Reply headers QStash reads as "retry no sooner than"; larger than a day falls back to the backoff.
RETRY_AFTER_HEADERS = (
    "retry-after",
    "x-ratelimit-reset",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
# Forwarded headers QStash sets itself (or the HTTP layer owns) are not taken from the publisher.
RESERVED_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "user-agent",
    "upstash-signature",
    "upstash-message-id",
    "upstash-retried",
    "upstash-schedule-id",
    "upstash-caller-ip",
}


def sign(*, signing_key: str, url: str, body: bytes) -> str:
    """The Upstash-Signature JWT: HS256 over the key's UTF-8 bytes, claims as QStash sends them."""
    now = int(time.time())
    body_hash = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()
    claims = {
        "iss": "Upstash",
        "sub": url,
        "iat": now,
        "nbf": 0,
        "exp": now + 300,
        "jti": "jwt_" + secrets.token_hex(16),
        "body": body_hash,
    }
    return jwt.encode(claims, signing_key, algorithm="HS256")


def default_backoff_s(retried: int) -> float:
    """QStash's default wait before retry number `retried` (1 for the first retry)."""
    return min(MAX_BACKOFF_S, math.exp(2.5 * retried))


def retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds the endpoint asked to wait (seconds, HTTP date, 6m5s); None if absent or > 1 day."""
    for name in RETRY_AFTER_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parse_duration(value, name)
            except BadRequest:
                try:
                    seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
                except (TypeError, ValueError):
                    continue
        seconds = max(0.0, seconds)
        return seconds if seconds <= MAX_BACKOFF_S else None
    return None


def header_lists(headers: httpx.Headers) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for name, value in headers.multi_items():
        result.setdefault(canonical_header(name), []).append(value)
    return result


@dataclass
class Attempt:
    """What one delivery attempt got back: a response, or only an error."""

    status: int = 0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    body: bytes = b""
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None and 200 <= self.status < 300

    @property
    def non_retryable(self) -> bool:
        return (
            self.status == 489
            and self.headers.get("upstash-nonretryable-error", "").strip().lower() == "true"
        )


@dataclass
class FlowKey:
    """One flow-control key's limits (from its latest message) and what is running under it."""

    parallelism: int | None = None
    rate: int | None = None
    period_s: int = 1
    in_flight: int = 0
    max_in_flight: int = 0
    starts: collections.deque = field(default_factory=collections.deque)

    def allowance(self, now: float) -> int | None:
        """How many more deliveries may start now; None for unlimited."""
        limits = []
        if self.parallelism is not None:
            limits.append(self.parallelism - self.in_flight)
        if self.rate is not None:
            while self.starts and self.starts[0] <= now - self.period_s:
                self.starts.popleft()
            limits.append(self.rate - len(self.starts))
        return max(0, min(limits)) if limits else None


@dataclass
class DeliveryStats:
    attempted: int = 0
    delivered: int = 0
    failed: int = 0  # messages whose last attempt failed: they went to the DLQ
    failed_attempts: int = 0
    retries_scheduled: int = 0
    callbacks_queued: int = 0
    max_in_flight: int = 0

    def as_json(self) -> dict:
        return {
            "attempted": self.attempted,
            "delivered": self.delivered,
            "failed": self.failed,
            "failedAttempts": self.failed_attempts,
            "retriesScheduled": self.retries_scheduled,
            "callbacksQueued": self.callbacks_queued,
            "maxInFlight": self.max_in_flight,
        }


class Dispatcher:
    """Background delivery for one app: claims due rows, runs up to max_in_flight at once."""

    def __init__(
        self,
        store: Store,
        *,
        signing_key: str,
        time_scale: float,
        max_in_flight: int = 200,
        poll_s: float = 0.03,
    ) -> None:
        self.store = store
        self.signing_key = signing_key
        self.time_scale = time_scale
        self.max_in_flight = max_in_flight
        self.poll_s = poll_s
        self.owner = "dispatcher-" + secrets.token_hex(8)
        self.stats = DeliveryStats()
        self.flow: dict[str, FlowKey] = {}
        self._wake = asyncio.Event()
        # Running delivery tasks and the message id each one holds.
        self._deliveries: dict[asyncio.Task, str] = {}
        self._loops: list[asyncio.Task] = []
        self._clients: list[httpx.AsyncClient] = []
        self._sent = 0

    def wake(self) -> None:
        """Tell the loop there may be work now (a publish, a freed slot) before the next poll."""
        self._wake.set()

    def in_flight(self) -> int:
        return len(self._deliveries)

    def reset_stats(self) -> None:
        self.stats = DeliveryStats()
        for key in self.flow.values():
            key.max_in_flight = key.in_flight

    async def start(self) -> None:
        # httpcore's pool does work per request proportional to its size, so many small
        # clients deliver far faster than one client with hundreds of connections.
        # One TLS context for all of them: building one costs tens of milliseconds.
        tls = ssl.create_default_context(cafile=certifi.where())
        self._clients = [
            httpx.AsyncClient(
                limits=httpx.Limits(max_connections=None), follow_redirects=False, verify=tls
            )
            for _ in range(max(1, self.max_in_flight // CONNECTIONS_PER_CLIENT))
        ]
        self._loops = [
            asyncio.create_task(self._run(), name="local-qstash-dispatch"),
            asyncio.create_task(self._heartbeat(), name="local-qstash-leases"),
        ]

    async def stop(self) -> None:
        tasks = [*self._loops, *self._deliveries]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Deliveries cut short here are due again at once, for this or the next server.
        try:
            await self.store.release_leases(self.owner)
        finally:
            for client in self._clients:
                await client.aclose()

    # --- the loops

    async def _run(self) -> None:
        next_schedules = next_prune = 0.0
        while True:
            try:
                now = time.monotonic()
                if now >= next_schedules:
                    next_schedules = now + 0.5
                    if await self.store.fire_due_schedules():
                        self._wake.set()
                if now >= next_prune:
                    next_prune = now + 60
                    await self.store.prune_dedup()
                free = self.max_in_flight - len(self._deliveries)
                if free > 0:
                    blocked, allowances = self._flow_limits()
                    rows = await self.store.claim_due(
                        owner=self.owner, limit=free, blocked=blocked, allowances=allowances
                    )
                    for row in rows:
                        self._start(row)
                    if rows and len(rows) == free:
                        continue
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database may be restarting; keep the loop alive and try again shortly.
                log.exception("local QStash dispatch loop failed; retrying in 1 s")
                await asyncio.sleep(1)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _heartbeat(self) -> None:
        # Only deliveries still running here keep their lease; a row whose task died with an
        # unexpected error is left to expire and so is delivered again.
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self.store.extend_leases(self.owner, list(self._deliveries.values()))
            except Exception:
                log.exception("local QStash could not extend its delivery leases")

    def _flow_limits(self) -> tuple[list[str], dict[str, int]]:
        now = time.monotonic()
        blocked, allowances = [], {}
        for key, state in self.flow.items():
            allowance = state.allowance(now)
            if allowance == 0:
                blocked.append(key)
            elif allowance is not None:
                allowances[key] = allowance
        return blocked, allowances

    def _start(self, row: dict) -> None:
        key = row["flow_key"]
        if key is not None:
            state = self.flow.setdefault(key, FlowKey())
            state.parallelism, state.rate = row["flow_parallelism"], row["flow_rate"]
            state.period_s = row["flow_period_s"] or 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            state.starts.append(time.monotonic())
        task = asyncio.create_task(self._deliver(row))
        self._deliveries[task] = row["message_id"]
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._deliveries))
        task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self._deliveries.pop(task, None)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("local QStash delivery crashed", exc_info=task.exception())

    # --- one attempt

    async def _deliver(self, row: dict) -> None:
        try:
            attempt = await self._send(row)
        finally:
            if row["flow_key"] is not None:
                self.flow[row["flow_key"]].in_flight -= 1
                self._wake.set()
        await self._record(row, attempt)

    async def _send(self, row: dict) -> Attempt:
        headers = [
            (name, value)
            for name, values in row["header"].items()
            if name.lower() not in RESERVED_HEADERS
            for value in values
        ]
        if row["content_type"] is not None:
            headers = [(n, v) for n, v in headers if n.lower() != "content-type"]
            headers.append(("Content-Type", row["content_type"]))
        headers += [
            ("Upstash-Message-Id", row["message_id"]),
            ("Upstash-Retried", str(row["retried"])),
            ("User-Agent", "Upstash-QStash"),
            (
                "Upstash-Signature",
                sign(signing_key=self.signing_key, url=row["url"], body=row["body"]),
            ),
        ]
        if row["schedule_id"]:
            headers.append(("Upstash-Schedule-Id", row["schedule_id"]))
        if row["caller_ip"]:
            headers.append(("Upstash-Caller-Ip", row["caller_ip"]))
        timeout = row["timeout_s"] or DEFAULT_ATTEMPT_TIMEOUT_S
        self.stats.attempted += 1
        self._sent += 1
        client = self._clients[self._sent % len(self._clients)]
        try:
            response = await client.request(
                row["method"],
                row["url"],
                content=row["body"],
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            )
        except httpx.TimeoutException:
            return Attempt(error=f"timeout after {timeout:g}s")
        except Exception as exc:  # connection refused, protocol errors, bad header values
            return Attempt(error=f"{type(exc).__name__}: {exc}")
        return Attempt(
            status=response.status_code,
            headers=response.headers,
            body=response.content[:MAX_STORED_RESPONSE_BYTES],
        )

    async def _record(self, row: dict, attempt: Attempt) -> None:
        callbacks = self._callback(row, attempt) if attempt.error is None else []
        if attempt.succeeded:
            detail = {"responseStatus": attempt.status}
            if await self.store.finish_delivered(row, self.owner, detail, callbacks):
                self.stats.delivered += 1
                self.stats.callbacks_queued += len(callbacks)
            return

        self.stats.failed_attempts += 1
        retried = row["retried"] + 1
        detail = {
            "error": attempt.error or f"endpoint replied {attempt.status}",
            "responseStatus": attempt.status,
        }
        if attempt.error is None:
            detail |= {
                "responseHeader": header_lists(attempt.headers),
                "responseBody": attempt.body.decode("utf-8", "replace"),
            }
        if attempt.non_retryable or retried > row["max_retries"]:
            dlq_fields = {
                "responseStatus": attempt.status,
                "responseHeader": header_lists(attempt.headers),
            }
            try:
                dlq_fields["responseBody"] = attempt.body.decode("utf-8")
            except UnicodeDecodeError:
                dlq_fields["responseBodyBase64"] = base64.b64encode(attempt.body).decode()
            queued: list[MessageSpec] = []

            def followups(dlq_id: str) -> list[MessageSpec]:
                queued.extend(callbacks + self._failure_callback(row, attempt, dlq_id))
                return queued

            if await self.store.finish_failed(row, self.owner, detail, dlq_fields, followups):
                self.stats.failed += 1
                self.stats.callbacks_queued += len(queued)
            return

        wait_s = self._retry_wait(row, retried, attempt)
        if await self.store.finish_retry(row, self.owner, wait_s, detail, callbacks):
            self.stats.retries_scheduled += 1
            self.stats.callbacks_queued += len(callbacks)

    def _retry_wait(self, row: dict, retried: int, attempt: Attempt) -> float:
        # The endpoint's own Retry-After is a real-world instruction, so time_scale leaves it alone.
        asked = retry_after_s(attempt.headers) if attempt.error is None else None
        if asked is not None:
            return asked
        if row["retry_delay"]:
            seconds = retry_delay_ms(row["retry_delay"], retried - 1) / 1000
            seconds = min(MAX_BACKOFF_S, max(0.0, seconds)) if not math.isnan(seconds) else 0.0
        else:
            seconds = default_backoff_s(retried)
        return seconds * self.time_scale

    # --- callbacks

    def _callback_payload(self, row: dict, attempt: Attempt) -> dict:
        source_header = {name: list(values) for name, values in row["header"].items()}
        if row["content_type"] is not None:
            source_header["Content-Type"] = [row["content_type"]]
        payload = {
            "status": attempt.status,
            "header": header_lists(attempt.headers),
            "body": base64.b64encode(attempt.body).decode(),
            "maxRetries": row["max_retries"],
            "sourceMessageId": row["message_id"],
            "url": row["url"],
            "method": row["method"],
            "sourceHeader": source_header,
            "sourceBody": base64.b64encode(row["body"]).decode(),
            "notBefore": to_ms(row["not_before"]),
            "createdAt": to_ms(row["created_at"]),
        }
        # QStash omits retried on the first attempt; receivers read it with a default of 0.
        if row["retried"]:
            payload["retried"] = row["retried"]
        if row["schedule_id"]:
            payload["scheduleId"] = row["schedule_id"]
        if row["caller_ip"]:
            payload["callerIP"] = row["caller_ip"]
        return payload

    @staticmethod
    def _callback_spec(row: dict, settings: dict, payload: dict) -> MessageSpec:
        return MessageSpec(
            url=settings["url"],
            body=json.dumps(payload).encode(),
            method=settings["method"],
            content_type="application/json",
            header=settings["header"],
            max_retries=settings["retries"]
            if settings["retries"] is not None
            else row["max_retries"],
            timeout_s=settings["timeout_s"],
            retry_delay=settings["retry_delay"],
        )

    def _callback(self, row: dict, attempt: Attempt) -> list[MessageSpec]:
        """Upstash-Callback: called after every attempt that got an HTTP response."""
        if not row["callback"]:
            return []
        return [self._callback_spec(row, row["callback"], self._callback_payload(row, attempt))]

    def _failure_callback(self, row: dict, attempt: Attempt, dlq_id: str) -> list[MessageSpec]:
        if not row["failure_callback"]:
            return []
        payload = self._callback_payload(row, attempt) | {"dlqId": dlq_id}
        if attempt.error is not None:
            payload["error"] = attempt.error
        return [self._callback_spec(row, row["failure_callback"], payload)]


def describe(row: dict) -> dict:
    """A queued row for GET /v2/_local/messages: the message plus where it is in its life."""
    return {
        "messageId": row["message_id"],
        "url": row["url"],
        "method": row["method"],
        "state": row["state"],
        "retried": row["retried"],
        "maxRetries": row["max_retries"],
        "nextAttemptAt": to_ms(row["due_at"]) if row["state"] != "ACTIVE" else None,
        "leaseUntil": to_ms(row["due_at"]) if row["state"] == "ACTIVE" else None,
        "notBefore": to_ms(row["not_before"]),
        "createdAt": to_ms(row["created_at"]),
        "scheduleId": row["schedule_id"],
        "flowControlKey": row["flow_key"],
        "label": row["label"],
    }
