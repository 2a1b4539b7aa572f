"""Plain data passed between the store, the Vapi client and the use cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

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
class FormForCall:
    """A claimed form with what the call needs."""

    id: str
    title: str
    deadline: datetime
    patient_name: str
    phone: str
    timezone: str
    call_attempts: int
    claimed_at: datetime


@dataclass(frozen=True)
class Claim:
    outcome: Literal["claimed", "skipped", "not_found", "failed"]
    form: FormForCall | None = None
    reason: str | None = None
    due_in_seconds: float | None = None


@dataclass(frozen=True)
class OverdueForm:
    id: str
    deadline: datetime


@dataclass(frozen=True)
class StaleCall:
    id: str
    claimed_at: datetime
    call_attempts: int


@dataclass(frozen=True)
class CallResult:
    """What call-form answers: status is called, skipped, failed or unknown."""

    status: str
    form_id: str
    call_id: str | None = None
    reason: str | None = None


@dataclass
class SweepReport:
    found: int = 0
    enqueued: int = 0
    failed: int = 0
    reconciled: dict[str, int] = field(default_factory=dict)
