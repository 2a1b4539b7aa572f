"""Vapi's server messages: authenticate them, and read what formcall keeps of a call.

Only identifiers, status, endedReason, times, cost and `analysis.structuredData.optOut` are
read; transcripts, summaries and recordings (PHI) are never looked at, stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from formcall.errors import BadRequest, Unauthorized
from formcall.models import CallEvent
from formcall.outcomes import classify

# A signed message older (or further ahead) than this is refused: a captured one cannot be replayed.
MAX_AGE_SECONDS = 300
# The message types formcall follows a call by; any other is answered "ignored".
FOLLOWED = ("status-update", "end-of-call-report")
_LOOSE = ConfigDict(extra="ignore", frozen=True)


def verify_vapi_request(
    headers: Mapping[str, str],
    body: bytes,
    *,
    secret: str,
    credential_id: str | None,
    now: float | None = None,
) -> None:
    """Vapi's HMAC signature (with an HMAC credential) or its X-Vapi-Secret header; else 401.

    The signature is hex HMAC-SHA256 of "{x-timestamp}.{raw body}"; the timestamp may be in
    seconds or milliseconds. Both checks run in constant time.
    """
    if not credential_id:
        offered = headers.get("x-vapi-secret") or ""
        if not hmac.compare_digest(offered.encode(), secret.encode()):
            raise Unauthorized("unauthorized")
        return
    signature = (headers.get("x-signature") or "").strip().lower().removeprefix("sha256=")
    stamp = (headers.get("x-timestamp") or "").strip()
    if not signature or not stamp.isdigit() or len(stamp) > 16:
        raise Unauthorized("unauthorized")
    seconds = int(stamp) / 1000 if len(stamp) >= 12 else int(stamp)
    if abs((time.time() if now is None else now) - seconds) > MAX_AGE_SECONDS:
        raise Unauthorized("unauthorized")
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise Unauthorized("unauthorized")


class _Metadata(BaseModel):
    model_config = _LOOSE
    formId: str | None = None
    formIds: list[Any] | None = None


class _Overrides(BaseModel):
    model_config = _LOOSE
    metadata: _Metadata | None = None


class _Analysis(BaseModel):
    model_config = _LOOSE
    structuredData: dict[str, Any] | None = None


class _CallState(BaseModel):
    """What both a Call and a server message may say of a call's progress and end."""

    model_config = _LOOSE
    status: str | None = None
    endedReason: str | None = None
    startedAt: AwareDatetime | None = None
    endedAt: AwareDatetime | None = None
    cost: float | None = None
    analysis: _Analysis | None = None


class _Call(_CallState):
    """The parts of Vapi's Call formcall reads (a message's `call`, or GET /call/{id})."""

    id: str
    assistantOverrides: _Overrides | None = None


class _Message(_CallState):
    type: str
    call: _Call | None = None


class _Envelope(BaseModel):
    model_config = _LOOSE
    message: _Message


def _form_ids(call: _Call) -> tuple[str, ...]:
    """The form ids in the call's metadata that are UUIDs (anything else is not formcall's)."""
    metadata = call.assistantOverrides.metadata if call.assistantOverrides else None
    if metadata is None:
        return ()
    raw = metadata.formIds if metadata.formIds else [metadata.formId]
    ids = []
    for value in raw:
        try:
            ids.append(str(UUID(str(value))))
        except ValueError:
            continue
    return tuple(ids)


def _opted_out(analysis: _Analysis | None) -> bool:
    data = analysis.structuredData if analysis else None
    return data is not None and data.get("optOut") is True


def parse_server_message(body: bytes) -> tuple[str, CallEvent | None]:
    """The message type and, for a followed message about a call, what it says of the call."""
    try:
        message = _Envelope.model_validate_json(body).message
    except ValidationError:
        raise BadRequest('body must be a Vapi server message: {"message": {"type": ...}}') from None
    if message.type not in FOLLOWED or message.call is None:
        return message.type, None
    call = message.call
    ended = message.type == "end-of-call-report" or (
        message.status == "ended" and bool(message.endedReason)
    )
    reason = message.endedReason or call.endedReason
    return message.type, CallEvent(
        vapi_call_id=call.id,
        form_ids=_form_ids(call),
        status="ended" if message.type == "end-of-call-report" else message.status,
        ended_reason=reason if ended else None,
        outcome=classify(reason) if ended else None,
        started_at=message.startedAt or call.startedAt,
        ended_at=message.endedAt or call.endedAt,
        cost=message.cost if message.cost is not None else call.cost,
        opt_out=_opted_out(message.analysis) or _opted_out(call.analysis),
    )


def call_event_from_record(record: dict[str, Any]) -> CallEvent:
    """What Vapi's own record of a call (GET /call/{id}) says, as a call event."""
    call = _Call.model_validate(record)
    ended = call.status == "ended"
    return CallEvent(
        vapi_call_id=call.id,
        form_ids=_form_ids(call),
        status=call.status,
        ended_reason=call.endedReason if ended else None,
        outcome=classify(call.endedReason) if ended else None,
        started_at=call.startedAt,
        ended_at=call.endedAt,
        cost=call.cost,
        opt_out=_opted_out(call.analysis),
    )


def ended_without_record(vapi_call_id: str, at: datetime) -> CallEvent:
    """A placed call Vapi no longer knows: it ended, how is unknown (so: never connected)."""
    return CallEvent(
        vapi_call_id=vapi_call_id, status="ended", outcome="not_connected", ended_at=at
    )
