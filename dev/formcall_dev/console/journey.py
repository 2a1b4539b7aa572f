"""One form's journey: its audit events, QStash messages and Vapi calls merged into one timeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Audit detail keys that name a QStash message of the form (a delivery's message id is as QStash's
# unsigned header said, hence "unverified").
MESSAGE_KEYS = ("message_id", "previous_message_id", "source_message_id", "unverified_message_id")

# What each formcall audit event means, and whether it is good news, a wait, or a failure.
EVENT_TONES = {
    "scheduled": "info",
    "rescheduled": "info",
    "cancelled": "info",
    "delivered": "info",
    "claimed": "info",
    "called": "ok",
    "skipped": "warn",
    "deferred": "warn",
    "released": "warn",
    "failed": "bad",
    "delivery_failed": "bad",
    "outcome_unknown": "bad",
    "extra_call": "bad",
    "call_ended": "info",
    "follow_up_scheduled": "warn",
    "capped": "warn",
    "opted_out": "bad",
}
QSTASH_STATES = {
    "CREATED": ("published", "info"),
    "ACTIVE": ("delivering", "info"),
    "DELIVERED": ("delivered", "ok"),
    "ERROR": ("attempt failed", "warn"),
    "RETRY": ("retry scheduled", "warn"),
    "FAILED": ("gave up: moved to the DLQ", "bad"),
    "CANCEL_REQUESTED": ("cancel requested", "info"),
    "CANCELED": ("cancelled", "info"),
}
# Event fields that are the event's identity or too noisy to show.
_QSTASH_HIDDEN = {
    "time",
    "messageId",
    "state",
    "url",
    "scheduleId",
    "label",
    "responseHeader",
    "header",
}


@dataclass(frozen=True)
class Entry:
    """One line of the timeline."""

    at: datetime
    source: str  # formcall, QStash or Vapi
    what: str
    detail: str
    tone: str  # info, ok, warn or bad
    reason: str = ""


def parse_time(value: Any) -> datetime | None:
    """A database timestamp, QStash milliseconds or a Vapi ISO string, as an aware UTC time."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, UTC)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            return None
    return None


def message_ids(form: dict, events: list[dict]) -> list[str]:
    """Every QStash message the form's row and audit trail name, in order of first mention."""
    found = [form.get("qstash_message_id")]
    for event in events:
        found += [event["detail"].get(key) for key in MESSAGE_KEYS]
    return list(dict.fromkeys(value for value in found if isinstance(value, str) and value))


def _form_ids_of(body: Any) -> set[str]:
    """The form ids a create-call body names: metadata.formId, and formIds (one call, N forms)."""
    overrides = body.get("assistantOverrides") if isinstance(body, dict) else None
    metadata = overrides.get("metadata") if isinstance(overrides, dict) else None
    if not isinstance(metadata, dict):
        return set()
    ids = {metadata.get("formId")} | set(metadata.get("formIds") or [])
    return {value for value in ids if isinstance(value, str)}


def calls_of_form(form_id: str, call_ids: set[str], calls: list[dict]) -> list[dict]:
    """The fake Vapi's calls for this form: by their metadata, or by a call id formcall recorded."""
    return [call for call in calls if call.get("id") in call_ids or form_id in _form_ids_of(call)]


def requests_of_form(form_id: str, requests: list[dict]) -> list[dict]:
    return [
        r for r in requests if r.get("form_id") == form_id or form_id in _form_ids_of(r.get("body"))
    ]


def dead_letters_of_form(form_id: str, ids: list[str], dlq: list[dict]) -> list[dict]:
    """DLQ entries of the form's messages, or whose body is a call-form request for the form."""

    def body_form(entry: dict) -> str | None:
        try:
            body = json.loads(entry.get("body") or "")
        except ValueError:
            return None
        return body.get("formId") if isinstance(body, dict) else None

    return [entry for entry in dlq if entry.get("messageId") in ids or body_form(entry) == form_id]


def _describe(detail: dict, hidden: set[str] = frozenset()) -> str:
    return ", ".join(
        f"{key} {value}"
        for key, value in detail.items()
        if key not in hidden and value not in (None, "", {}, [])
    )


def audit_entries(events: list[dict]) -> list[Entry]:
    entries = []
    for event in events:
        detail = event["detail"] or {}
        reason = str(detail.get("reason") or detail.get("error") or "")
        if event["event"] == "call_ended":
            # How the call ended is the point of this event: the class, then Vapi's words.
            reason = f"{detail.get('outcome')} ({detail.get('ended_reason')})"
        entries.append(
            Entry(
                at=parse_time(event["created_at"]),
                source="formcall",
                what=event["event"].replace("_", " "),
                detail=_describe(detail, {"reason", "error"}),
                tone=EVENT_TONES.get(event["event"], "info"),
                reason=reason,
            )
        )
    return entries


def qstash_entries(events: list[dict]) -> list[Entry]:
    entries = []
    for event in events:
        what, tone = QSTASH_STATES.get(event.get("state", ""), (event.get("state", "?"), "info"))
        at = parse_time(event.get("time"))
        if at is None:
            continue
        reason = str(event.get("error") or "")
        if event.get("responseBody"):
            # The endpoint's own answer says why (call-form's JSON error, a missing setting).
            reason += f": {str(event['responseBody'])[:300]}"
        entries.append(
            Entry(
                at=at,
                source="QStash",
                what=f"{what} · {event.get('messageId')}",
                detail=_describe(event, _QSTASH_HIDDEN | {"error", "responseBody"}),
                tone=tone,
                reason=reason,
            )
        )
    return entries


def vapi_entries(requests: list[dict], calls: list[dict]) -> list[Entry]:
    entries = []
    for request in requests:
        at = parse_time(request.get("at"))
        if at is None:
            continue
        outcome = request.get("outcome")
        if outcome == "placed":
            entries.append(
                Entry(
                    at=at,
                    source="Vapi",
                    what="call created",
                    detail=f"call {request.get('call_id')}",
                    tone="ok",
                )
            )
        elif outcome == "blocked":
            entries.append(
                Entry(
                    at=at,
                    source="Vapi",
                    what="call blocked",
                    tone="warn",
                    detail=f"call {request.get('call_id')}",
                    reason="all lines busy (concurrency limit)",
                )
            )
        else:
            entries.append(
                Entry(
                    at=at,
                    source="Vapi",
                    what="call refused",
                    tone="bad",
                    detail=f"HTTP {request.get('status')}",
                    reason=str(request.get("reason") or ""),
                )
            )
    for call in calls:
        ended = parse_time(call.get("endedAt"))
        if call.get("status") == "ended" and ended is not None:
            entries.append(
                Entry(
                    at=ended,
                    source="Vapi",
                    what="call ended",
                    detail=f"call {call.get('id')}",
                    tone="info",
                    reason=str(call.get("endedReason") or ""),
                )
            )
    return entries


def timeline(*parts: list[Entry]) -> list[Entry]:
    """All entries in time order (stable: at equal times, audit before QStash before Vapi)."""
    return sorted((entry for part in parts for entry in part), key=lambda entry: entry.at)
