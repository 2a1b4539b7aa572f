"""Vapi's REST API: create an outbound call, look a call up, find a call by form id.

Vapi's create-call has no idempotency key, so this client never retries `POST /call` itself;
a request that may have reached Vapi raises CallOutcomeUnknown instead.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from formcall.errors import CallOutcomeUnknown, VapiBusy, VapiRejected, VapiUnavailable
from formcall.models import PatientCall

# Vapi limits customer.name to 40 characters.
_NAME_MAX = 40
_LIST_PAGE = 1000
# The server messages formcall follows a call by (call-events).
SERVER_MESSAGES = ["status-update", "end-of-call-report"]
# Vapi retries a failed delivery of a server message only with a backoff plan.
BACKOFF_PLAN = {"type": "exponential", "maxRetries": 5, "baseDelaySeconds": 2}
# How Vapi ends a call it created while every line was taken.
CONCURRENCY_BLOCKED = "call.start.error-subscription-concurrency-limit-reached"
LIVE = ("scheduled", "queued", "ringing", "in-progress", "forwarding")
# A provider's error text can quote the number dialled: anything like a phone number goes.
_PHONE_LIKE = re.compile(r"\+?\d[\d\s().-]{5,}\d")


def _vapi_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after")
    return int(value) if value and value.isdigit() else None


def server_override(*, url: str, secret: str, credential_id: str | None) -> dict[str, Any]:
    """`assistantOverrides.server`: where Vapi sends this call's messages, and how it proves itself.

    With an HMAC credential Vapi signs each message with the credential's secret; without one
    it sends the secret in the X-Vapi-Secret header (call-events checks either).
    """
    server: dict[str, Any] = {"url": url, "timeoutSeconds": 20, "backoffPlan": dict(BACKOFF_PLAN)}
    if credential_id:
        server["credentialId"] = credential_id
    else:
        server["headers"] = {"X-Vapi-Secret": secret}
    return server


def call_request(call: PatientCall, *, assistant_id: str, phone_number_id: str,
                 server: dict[str, Any]) -> dict[str, Any]:
    """The create-call body: one call about every form of the patient that is due.

    The form ids ride in assistantOverrides.metadata (Vapi's CreateCallDTO has no top-level
    metadata), so each server message and Vapi's call list name the forms.
    """
    first = call.forms[0]
    return {
        "assistantId": assistant_id,
        "phoneNumberId": phone_number_id,
        "customer": {"number": call.phone, "name": call.patient_name[:_NAME_MAX]},
        "assistantOverrides": {
            "variableValues": {
                "patientName": call.patient_name,
                "formTitle": first.title,
                "formTitles": ", ".join(form.title for form in call.forms),
                "formCount": len(call.forms),
                "deadline": first.deadline.astimezone(timezone.utc).isoformat(),
            },
            "metadata": {"formId": first.id, "formIds": call.form_ids},
            "server": server,
            "serverMessages": list(SERVER_MESSAGES),
        },
    }


def form_ids_of(call: dict[str, Any]) -> list[str]:
    """The form ids formcall put in a call's metadata (formIds, else the single formId)."""
    overrides = call.get("assistantOverrides")
    metadata = overrides.get("metadata") if isinstance(overrides, dict) else None
    if not isinstance(metadata, dict):
        return []
    ids = metadata.get("formIds")
    if isinstance(ids, list) and ids:
        return [i for i in ids if isinstance(i, str)]
    return [metadata["formId"]] if isinstance(metadata.get("formId"), str) else []


def redact(text: str, *, names: tuple[str, ...] = ()) -> str:
    """Provider text with phone numbers and the patient's names taken out (for storage only)."""
    text = _PHONE_LIKE.sub("[number]", text)
    for name in names:
        for part in (name, *name.split()):  # the whole name first, then what is left of it
            if len(part) >= 2:
                text = re.sub(re.escape(part), "[name]", text, flags=re.IGNORECASE)
    return text


class VapiClient:
    def __init__(self, *, base_url: str, api_key: str, assistant_id: str, phone_number_id: str,
                 server: dict[str, Any], timeout: float = 15.0,
                 http: httpx.Client | None = None) -> None:
        self._assistant_id = assistant_id
        self._phone_number_id = phone_number_id
        self._server = server
        self._http = http or httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def create_call(self, call: PatientCall) -> tuple[str, str | None]:
        """Place the call; returns Vapi's call id and status.

        Raises VapiUnavailable (no call placed, retry), VapiBusy (created, but ended for want
        of a line: no call), VapiRejected (permanent) or CallOutcomeUnknown (a call may exist:
        a 5xx is a failure after validation, a timeout or a dropped connection after sending).
        """
        body = call_request(call, assistant_id=self._assistant_id,
                            phone_number_id=self._phone_number_id, server=self._server)
        try:
            response = self._http.post("/call", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise VapiUnavailable("Vapi unreachable", cause=type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise CallOutcomeUnknown(type(exc).__name__) from exc

        status = response.status_code
        if status in (200, 201):
            try:
                answer = response.json()
                call_id = answer["id"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CallOutcomeUnknown(f"HTTP {status} without a call id") from exc
            limits = answer.get("subscriptionLimits") or {}
            if limits.get("concurrencyBlocked"):
                return self._blocked(call_id)
            return call_id, answer.get("status")
        if status == 429:
            raise VapiUnavailable(f"Vapi answered HTTP {status}", retry_after=_retry_after(response))
        if status >= 500:
            raise CallOutcomeUnknown(f"Vapi answered HTTP {status}")
        # The answer and the logs get the status only; the stored detail has no patient data.
        raise VapiRejected(f"Vapi rejected the call: HTTP {status}",
                           stored=redact(f"HTTP {status}: {_error_text(response)}",
                                         names=(call.patient_name,)))

    def _blocked(self, call_id: str) -> tuple[str, str | None]:
        """A call created while every line was busy: ended at once (no call), or queued (it is one).

        Vapi's guide says a blocked dial waits for a free line, its example answer says
        "queued": only the call itself tells which, so it is looked up.
        """
        try:
            call = self.get_call(call_id)
        except VapiUnavailable as exc:
            raise CallOutcomeUnknown(f"concurrency-blocked call not looked up: {exc}") from exc
        status = (call or {}).get("status")
        if call is None or (status == "ended" and call.get("endedReason") == CONCURRENCY_BLOCKED):
            # Never placed. Safe to try again shortly; the spread keeps blocked deliveries
            # from all coming back in the same second.
            raise VapiBusy("Vapi concurrency limit reached",
                           retry_after=random.randint(3, 8), call_id=call_id)
        # Queued for a line, or already under way (or over): the form's call.
        return call_id, status if status in LIVE else None

    def get_call(self, vapi_call_id: str) -> dict[str, Any] | None:
        """Vapi's record of a call (GET /call/{id}); None when Vapi has no such call."""
        try:
            response = self._http.get(f"/call/{vapi_call_id}")
        except httpx.TransportError as exc:
            raise VapiUnavailable("Vapi unreachable", cause=type(exc).__name__) from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise VapiUnavailable(f"Vapi call lookup answered HTTP {response.status_code}")
        try:
            call = response.json()
        except ValueError as exc:
            raise VapiUnavailable("Vapi call lookup answered no JSON") from exc
        return call if isinstance(call, dict) else None

    def find_call_for_form(self, form_id: str, *, created_after: datetime,
                           created_before: datetime) -> dict[str, Any] | None:
        """A call made for form_id in the window (from Vapi's call list, never a blocked one)."""
        upper = created_before
        while True:
            try:
                response = self._http.get("/call", params={
                    "assistantId": self._assistant_id,
                    "createdAtGe": _vapi_time(created_after),
                    "createdAtLe": _vapi_time(upper),
                    "limit": _LIST_PAGE,
                })
            except httpx.TransportError as exc:
                raise VapiUnavailable("Vapi unreachable", cause=type(exc).__name__) from exc
            if response.status_code != 200:
                raise VapiUnavailable(f"Vapi call list answered HTTP {response.status_code}")
            calls = response.json()
            for call in calls:
                blocked = (call.get("endedReason") or "").startswith("call.start.error")
                if form_id in form_ids_of(call) and not blocked:
                    return call
            if len(calls) < _LIST_PAGE:
                return None
            # Newest first: the next page ends just before the oldest call of this one.
            oldest = min(datetime.fromisoformat(c["createdAt"].replace("Z", "+00:00")) for c in calls)
            upper = oldest - timedelta(milliseconds=1)


def _error_text(response: httpx.Response) -> str:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        return response.text[:300]
    if isinstance(message, list):
        message = "; ".join(str(m) for m in message)
    return str(message)[:300]
