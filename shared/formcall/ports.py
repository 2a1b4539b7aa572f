"""The collaborators the use cases take as arguments (the store is formcall.store.FormStore)."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from formcall.models import FormForCall
from formcall.publisher import CallMessage


class Caller(Protocol):
    def create_call(self, form: FormForCall) -> str: ...
    def find_call_for_form(self, form_id: str, *, created_after: datetime,
                           created_before: datetime) -> str | None: ...


class Publisher(Protocol):
    def publish_call(self, message: CallMessage, *, destination: str) -> str: ...
    def enqueue_calls(self, messages: list[CallMessage], *, destination: str) -> int: ...
    def cancel(self, message_id: str) -> bool: ...
    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict: ...
