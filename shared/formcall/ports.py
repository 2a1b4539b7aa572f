"""The collaborators the use cases take as arguments (the store is formcall.store.FormStore)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol


from formcall.models import PatientCall
from formcall.publisher import CallMessage


class Caller(Protocol):
    def create_call(self, call: PatientCall) -> tuple[str, str | None]: ...
    def get_call(self, vapi_call_id: str) -> dict[str, Any] | None: ...
    def find_call_for_form(self, form_id: str, *, created_after: datetime,
                           created_before: datetime) -> dict[str, Any] | None: ...


class Publisher(Protocol):
    def publish_call(self, message: CallMessage, *, destination: str) -> str: ...
    def enqueue_calls(self, messages: list[CallMessage], *, destination: str) -> int: ...
    def cancel(self, message_id: str) -> bool: ...
    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict: ...
