"""The console's HTTP collaborators: the local QStash's API, the fake Vapi's admin API, check-forms.

Each answers plain JSON-shaped data; a service that cannot be reached, or answers 5xx, raises
`Unavailable` (the console answers 503, or shows a note in place of that part of a page).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx

PLAY_OUTCOMES = ("reached", "no_answer", "voicemail", "busy", "opt_out")


class Unavailable(RuntimeError):
    """A service the console reads did not answer usefully (unreachable, 5xx, not JSON)."""


class Refused(RuntimeError):
    """A service refused the request with a 4xx; `status` and its message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _call(http: httpx.AsyncClient, service: str, method: str, url: str, **kwargs) -> Any:
    try:
        answer = await http.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{service} not reachable ({type(exc).__name__})") from None
    if answer.status_code >= 500:
        raise Unavailable(f"{service} answered HTTP {answer.status_code}")
    if answer.status_code >= 400:
        raise Refused(
            answer.status_code, f"{service} answered HTTP {answer.status_code}: {answer.text[:300]}"
        )
    if not answer.content:
        return None
    try:
        return answer.json()
    except ValueError:
        return answer.text


class LocalQStash:
    """The local QStash's v2 API (and its local-only message list), with the stack's token."""

    def __init__(self, http: httpx.AsyncClient, *, url: str, token: str) -> None:
        self.http, self.url = http, url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    async def _get(self, path: str, **params) -> Any:
        return await _call(
            self.http, "QStash", "GET", self.url + path, params=params, headers=self._headers
        )

    async def schedules(self) -> list[dict]:
        return await self._get("/v2/schedules")

    async def queued(self) -> list[dict]:
        """Every message not yet delivered, retrying or in flight (local QStash only)."""
        return (await self._get("/v2/_local/messages"))["messages"]

    async def dlq(self) -> list[dict]:
        return (await self._get("/v2/dlq", count="100"))["messages"]

    async def events(self, message_ids: list[str]) -> list[dict]:
        """The log events of these messages (newest first, as QStash lists them)."""
        if not message_ids:
            return []
        return (await self._get("/v2/events", messageIds=message_ids, count="1000"))["events"]

    async def delete_dlq(self, dlq_id: str) -> None:
        await _call(
            self.http, "QStash", "DELETE", f"{self.url}/v2/dlq/{dlq_id}", headers=self._headers
        )

    async def retry_dlq(self, dlq_id: str) -> str:
        """Publish the dead letter again, as it was first published, then drop it from the DLQ.

        The local QStash has no DLQ-retry endpoint, so this is what the Upstash console's retry
        does, through the plain publish API. No deduplication id: a retry must not be
        swallowed as a duplicate of the message that failed.
        """
        message = await self._get(f"/v2/dlq/{dlq_id}")
        answer = await _call(
            self.http,
            "QStash",
            "POST",
            f"{self.url}/v2/publish/{message['url']}",
            content=_dead_letter_body(message),
            headers={**self._headers, **republish_headers(message)},
        )
        await self.delete_dlq(dlq_id)
        return answer["messageId"]


def _dead_letter_body(message: dict) -> bytes:
    if "bodyBase64" in message:
        return base64.b64decode(message["bodyBase64"])
    return (message.get("body") or "").encode()


def republish_headers(message: dict) -> dict[str, str]:
    """The publish headers that recreate a QStash message (a DLQ entry) as it was published."""
    headers = {
        "Upstash-Method": message.get("method", "POST"),
        "Upstash-Retries": str(message.get("maxRetries", 3)),
    }
    try:
        json.loads(message.get("body") or "")
        headers["Content-Type"] = "application/json"
    except ValueError:
        pass
    for name, values in (message.get("header") or {}).items():
        headers[f"Upstash-Forward-{name}"] = ", ".join(values)
    for kind, prefix in (
        ("callback", "Upstash-Callback"),
        ("failureCallback", "Upstash-Failure-Callback"),
    ):
        if message.get(kind):
            headers[prefix] = message[kind]
            for name, values in (message.get(kind + "Header") or {}).items():
                headers[f"{prefix}-Forward-{name}"] = ", ".join(values)
    if message.get("flowControlKey"):
        headers["Upstash-Flow-Control-Key"] = message["flowControlKey"]
        value = [
            f"{name}={message[name]}"
            for name in ("parallelism", "rate")
            if message.get(name) is not None
        ]
        if message.get("rate") is not None:
            value.append(f"period={message.get('period', 1)}s")
        headers["Upstash-Flow-Control-Value"] = ", ".join(value)
    if message.get("retryDelayExpression"):
        headers["Upstash-Retry-Delay"] = message["retryDelayExpression"]
    if message.get("label"):
        headers["Upstash-Label"] = message["label"]
    return headers


class FakeVapiAdmin:
    """The fake Vapi's admin API (`/_fake/*`), authenticated with the stack's Vapi key."""

    def __init__(self, http: httpx.AsyncClient, *, url: str, key: str) -> None:
        self.http, self.url = http, url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"}

    async def calls(self) -> list[dict]:
        return await _call(
            self.http, "the fake Vapi", "GET", f"{self.url}/_fake/calls", headers=self._headers
        )

    async def requests(self) -> list[dict]:
        return await _call(
            self.http, "the fake Vapi", "GET", f"{self.url}/_fake/requests", headers=self._headers
        )

    async def holding(self) -> bool:
        """Whether new calls ring until a patient is played (the fake's `hold` setting)."""
        stats = await _call(
            self.http, "the fake Vapi", "GET", f"{self.url}/_fake/stats", headers=self._headers
        )
        return bool(stats.get("hold"))

    async def hold(self, on: bool) -> None:
        await _call(
            self.http,
            "the fake Vapi",
            "POST",
            f"{self.url}/_fake/configure",
            json={"hold": on},
            headers=self._headers,
        )

    async def end_call(self, call_id: str, outcome: str) -> Any:
        """Play the patient: end a call that way; the fake Vapi then sends its reports."""
        return await _call(
            self.http,
            "the fake Vapi",
            "POST",
            f"{self.url}/_fake/calls/{call_id}/end",
            json={"outcome": outcome},
            headers=self._headers,
        )


async def trigger_sweep(http: httpx.AsyncClient, *, url: str, cron_secret: str) -> dict:
    """Run check-forms now, as the manual trigger does (GET with the CRON_SECRET bearer)."""
    return await _call(
        http,
        "check-forms",
        "GET",
        url,
        timeout=120,
        headers={"Authorization": f"Bearer {cron_secret}"},
    )
