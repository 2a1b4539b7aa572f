"""Vapi's REST API: create an outbound call, and find a call by form id after an unknown outcome.

Vapi's create-call has no idempotency key, so this client never retries `POST /call` itself;
a request that may have reached Vapi raises CallOutcomeUnknown instead.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from formcall.errors import CallOutcomeUnknown, VapiBusy, VapiRejected, VapiUnavailable
from formcall.models import FormForCall

# Vapi limits customer.name to 40 characters.
_NAME_MAX = 40
_LIST_PAGE = 1000


def _vapi_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after")
    return int(value) if value and value.isdigit() else None


def call_request(form: FormForCall, *, assistant_id: str, phone_number_id: str) -> dict[str, Any]:
    """The create-call body. The form id rides in assistantOverrides.metadata (no top-level metadata)."""
    return {
        "assistantId": assistant_id,
        "phoneNumberId": phone_number_id,
        "customer": {"number": form.phone, "name": form.patient_name[:_NAME_MAX]},
        "assistantOverrides": {
            "variableValues": {
                "patientName": form.patient_name,
                "formTitle": form.title,
                "deadline": form.deadline.astimezone(timezone.utc).isoformat(),
            },
            "metadata": {"formId": form.id},
        },
    }


class VapiClient:
    def __init__(self, *, base_url: str, api_key: str, assistant_id: str, phone_number_id: str,
                 timeout: float = 15.0, http: httpx.Client | None = None) -> None:
        self._assistant_id = assistant_id
        self._phone_number_id = phone_number_id
        self._http = http or httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def create_call(self, form: FormForCall) -> str:
        """Place the call and return Vapi's call id.

        Raises VapiUnavailable (no call placed, retry), VapiRejected (permanent) or
        CallOutcomeUnknown (the request may have been accepted).
        """
        body = call_request(form, assistant_id=self._assistant_id,
                            phone_number_id=self._phone_number_id)
        try:
            response = self._http.post("/call", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise VapiUnavailable("Vapi unreachable", cause=type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise CallOutcomeUnknown(type(exc).__name__) from exc

        status = response.status_code
        if status in (200, 201):
            try:
                call = response.json()
                call_id = call["id"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CallOutcomeUnknown(f"HTTP {status} without a call id") from exc
            limits = call.get("subscriptionLimits") or {}
            if limits.get("concurrencyBlocked"):
                # Created but never placed: Vapi ends it at once. Safe to try again shortly;
                # the spread keeps blocked deliveries from all coming back in the same second.
                raise VapiBusy("Vapi concurrency limit reached",
                               retry_after=random.randint(3, 8), call_id=call_id)
            return call_id
        if status == 429 or status >= 500:
            raise VapiUnavailable(f"Vapi answered HTTP {status}", retry_after=_retry_after(response))
        raise VapiRejected(f"Vapi rejected the call: HTTP {status}: {_error_text(response)}")

    def find_call_for_form(self, form_id: str, *, created_after: datetime,
                           created_before: datetime) -> str | None:
        """The id of a call made for form_id in the window, from Vapi's call list, or None."""
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
                metadata = (call.get("assistantOverrides") or {}).get("metadata") or {}
                blocked = (call.get("endedReason") or "").startswith("call.start.error")
                if metadata.get("formId") == form_id and not blocked:
                    return call["id"]
            if len(calls) < _LIST_PAGE:
                return None
            # Newest first: the next page ends just before the oldest call of this one.
            oldest = min(datetime.fromisoformat(c["createdAt"].replace("Z", "+00:00")) for c in calls)
            upper = oldest - timedelta(milliseconds=1)


def _error_text(response: httpx.Response) -> str:
    try:
        message = response.json().get("message")
    except ValueError:
        return response.text[:300]
    if isinstance(message, list):
        message = "; ".join(str(m) for m in message)
    return str(message)[:300]
