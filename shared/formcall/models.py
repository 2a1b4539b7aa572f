"""Plain data passed between the store, the Vapi client and the use cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from formcall.errors import BadRequest


class CallFormRequest(BaseModel):
    """The body QStash delivers to call-form."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    formId: UUID

    @classmethod
    def parse(cls, body: bytes) -> CallFormRequest:
        try:
            return cls.model_validate_json(body)
        except ValidationError as exc:
            kind = exc.errors()[0]["type"]
            if kind in ("json_invalid", "json_type") or not body.strip():
                raise BadRequest('body must be JSON like {"formId": "<uuid>"}') from None
            if kind == "model_type":
                raise BadRequest("body must be a JSON object") from None
            if kind == "missing":
                raise BadRequest("formId is required") from None
            raise BadRequest("formId must be a UUID") from None


@dataclass(frozen=True)
class FormOnCall:
    """One form a call is about."""

    id: str
    title: str
    deadline: datetime
    call_attempts: int


@dataclass(frozen=True)
class PatientCall:
    """A claimed call: the patient and every form of theirs that was due, in deadline order."""

    call_id: str
    patient_id: str
    patient_name: str
    phone: str
    timezone: str
    claimed_at: datetime
    forms: tuple[FormOnCall, ...]

    @property
    def form_ids(self) -> list[str]:
        return [form.id for form in self.forms]


@dataclass(frozen=True)
class MessageToCancel:
    form_id: str
    message_id: str


@dataclass(frozen=True)
class Claim:
    outcome: Literal["claimed", "skipped", "capped", "not_found", "failed"]
    call: PatientCall | None = None
    reason: str | None = None
    due_in_seconds: float | None = None
    # capped: the earliest moment the caps allow a call, and the patient's zone.
    until: datetime | None = None
    timezone: str = "UTC"
    # skipped because the patient opted out: the messages of their forms to cancel.
    cancel: tuple[MessageToCancel, ...] = ()
    # no_line: seconds until the line ledger expects a line to free at the latest.
    retry_after: int | None = None
    # skipped in_progress: the call that holds the form (to reconcile when it is stale).
    open_call: StaleCall | None = None


@dataclass(frozen=True)
class CallEvent:
    """What Vapi said about a call (a server message, or its call record), as formcall keeps it.

    `outcome` is set once the call ended (formcall.outcomes classifies the endedReason).
    """

    vapi_call_id: str
    form_ids: tuple[str, ...] = ()
    status: str | None = None
    ended_reason: str | None = None
    outcome: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    cost: float | None = None
    opt_out: bool = False


@dataclass(frozen=True)
class FollowUp:
    """A form due for another call: one message at next_call_at (or the window's opening)."""

    form_id: str
    next_call_at: datetime
    timezone: str


@dataclass(frozen=True)
class RecordedEvent:
    status: Literal["recorded", "ignored"]
    call_id: str | None = None
    reason: str | None = None
    ended: bool = False
    duplicate: bool = False
    outcome: str | None = None
    follow_ups: tuple[FollowUp, ...] = ()
    # The patient opted out with this event: their waiting forms' messages to cancel.
    opted_out: bool = False
    cancel: tuple[MessageToCancel, ...] = ()


@dataclass(frozen=True)
class OverdueForm:
    id: str
    deadline: datetime
    timezone: str = "UTC"


@dataclass(frozen=True)
class ScheduleState:
    """A form as scheduling and the calling window see it.

    due_at is when the form is next due: its deadline, or a later next call (a follow-up, or
    a patient over a cap).
    """

    id: str
    deadline: datetime | None
    submitted: bool
    call_status: str
    message_id: str | None
    scheduled_deadline: datetime | None
    timezone: str
    due: bool
    next_call_at: datetime | None = None
    due_at: datetime | None = None
    opted_out: bool = False


@dataclass(frozen=True)
class StaleCall:
    """A claim whose Vapi answer was never recorded (or not yet)."""

    call_id: str
    claimed_at: datetime
    form_ids: tuple[str, ...]
    placed: bool = False
    unknown: bool = True


@dataclass(frozen=True)
class OpenCall:
    """A placed call whose end was never reported."""

    call_id: str
    vapi_call_id: str


@dataclass(frozen=True)
class CallResult:
    """What call-form answers: status is called, skipped, deferred or unknown."""

    status: str
    form_id: str
    call_id: str | None = None
    reason: str | None = None
    until: datetime | None = None


@dataclass
class SweepReport:
    found: int = 0
    enqueued: int = 0
    failed: int = 0
    reconciled: dict[str, int] = field(default_factory=dict)
    # Placed calls whose end was looked up in Vapi (lost reports): ended, still open, unresolved.
    outcomes: dict[str, int] = field(default_factory=dict)


class WebhookPayload(BaseModel):
    """A Supabase Database Webhook for the forms table."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["INSERT", "UPDATE", "DELETE"]
    table: Literal["forms"]
    schema_: str = Field(default="public", alias="schema")
    record: dict | None = None
    old_record: dict | None = None

    @classmethod
    def parse(cls, body: bytes) -> WebhookPayload:
        try:
            payload = cls.model_validate_json(body)
        except ValidationError as exc:
            kind = exc.errors()[0]
            if kind["type"] in ("json_invalid", "json_type", "model_type"):
                raise BadRequest("body must be a Supabase Database Webhook (JSON object)") from None
            raise BadRequest(f"bad webhook field: {'.'.join(map(str, kind['loc']))}") from None
        row = payload.old_record if payload.type == "DELETE" else payload.record
        if not isinstance(row, dict):
            raise BadRequest("webhook has no row")
        try:
            UUID(str(row.get("id")))
        except ValueError:
            raise BadRequest("webhook row id must be a UUID") from None
        return payload

    def form_id(self) -> str:
        row = self.old_record if self.type == "DELETE" else self.record
        return str(UUID(str(row["id"])))

    def schedule_unchanged(self) -> bool:
        """An UPDATE that touched neither the deadline nor the submission needs no work."""
        if self.type != "UPDATE" or not self.old_record:
            return False
        return all(self.record.get(k) == self.old_record.get(k) for k in ("deadline", "submitted_at"))
