"""What the console's Act page does: plain database writes, as the clinic app would make them.

The stack's webhook forwarder turns each committed change of `forms` into schedule-form's
webhook, exactly as Supabase would, so nothing here talks to formcall directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from psycopg import AsyncConnection

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
MAX_DUE_SECONDS = 30 * 86400


class InvalidInput(ValueError):
    """A request the console refuses with 400; nothing was written."""


class NotFound(LookupError):
    """No such form (404)."""


class Conflict(ValueError):
    """The form is not in a state the action applies to (409); nothing was written."""


@dataclass(frozen=True)
class NewForm:
    """A test patient and form, validated."""

    full_name: str
    phone: str
    timezone: str
    title: str
    due_in_seconds: int

    @classmethod
    def parse(cls, fields: dict[str, str]) -> NewForm:
        full_name = fields.get("full_name", "").strip() or "Test Patient"
        title = fields.get("title", "").strip() or "Intake form"
        phone = fields.get("phone", "").strip()
        zone = fields.get("timezone", "").strip() or "UTC"
        if len(full_name) > 100 or len(title) > 200:
            raise InvalidInput("name (100) or title (200 characters) too long")
        if not E164.match(phone):
            raise InvalidInput("phone must be an E.164 number, e.g. +15550100123")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidInput(
                f"unknown time zone {zone!r} (an IANA name, e.g. America/New_York)"
            ) from None
        return cls(
            full_name=full_name,
            phone=phone,
            timezone=zone,
            title=title,
            due_in_seconds=parse_due_seconds(fields.get("due_in_seconds", "")),
        )


def parse_due_seconds(value: str) -> int:
    """Seconds from now (negative: already overdue), within 30 days either way."""
    try:
        seconds = int(value.strip())
    except ValueError:
        raise InvalidInput("due in seconds must be a whole number") from None
    if abs(seconds) > MAX_DUE_SECONDS:
        raise InvalidInput("due in seconds must be within 30 days of now")
    return seconds


async def create_test_form(conn: AsyncConnection, new: NewForm) -> str:
    """Insert a patient and one form due in N seconds, in one transaction; returns the form id."""
    async with conn.transaction():
        patient = await (
            await conn.execute(
                "insert into public.patients (full_name, phone, timezone) values (%s, %s, %s)"
                " returning id",
                (new.full_name, new.phone, new.timezone),
            )
        ).fetchone()
        form = await (
            await conn.execute(
                "insert into public.forms (patient_id, title, deadline)"
                " values (%s, %s, now() + make_interval(secs => %s)) returning id::text",
                (patient[0], new.title, new.due_in_seconds),
            )
        ).fetchone()
    return form[0]


async def submit_form(conn: AsyncConnection, form_id: str) -> None:
    """Mark the form submitted now, as the patient's submission would."""
    row = await (
        await conn.execute(
            "update public.forms set submitted_at = now() where id = %s and submitted_at is null"
            " returning id",
            (form_id,),
        )
    ).fetchone()
    if row is None:
        await _explain_missing(conn, form_id, "it is already submitted")


async def move_deadline(conn: AsyncConnection, form_id: str, due_in_seconds: int) -> None:
    """Set the form's deadline to N seconds from now."""
    row = await (
        await conn.execute(
            "update public.forms set deadline = now() + make_interval(secs => %s)"
            " where id = %s and submitted_at is null returning id",
            (due_in_seconds, form_id),
        )
    ).fetchone()
    if row is None:
        await _explain_missing(conn, form_id, "it is submitted: its deadline no longer matters")


async def _explain_missing(conn: AsyncConnection, form_id: str, conflict: str) -> None:
    exists = await (
        await conn.execute("select 1 from public.forms where id = %s", (form_id,))
    ).fetchone()
    if exists is None:
        raise NotFound(f"no form {form_id}")
    raise Conflict(f"form {form_id} was not changed: {conflict}")
