"""What each console page shows, gathered from the database, the local QStash and the fake Vapi."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable
from typing import Any

from psycopg import AsyncConnection

from formcall_dev.console import journey, queries
from formcall_dev.console.actions import InvalidInput, NotFound
from formcall_dev.console.upstream import (
    PLAY_OUTCOMES,
    FakeVapiAdmin,
    LocalQStash,
    Refused,
    Unavailable,
)


async def optional(read: Awaitable[Any]) -> tuple[Any, str | None]:
    """A read whose failure shows as a note on the page rather than failing the page."""
    try:
        return await read, None
    except (Unavailable, Refused) as exc:
        return None, str(exc)


async def _nothing() -> None:
    return None


async def forms_view(
    conn: AsyncConnection, qstash: LocalQStash, *, status: str | None, outcome: str | None
) -> dict:
    have = await queries.features(conn)
    if status and status not in have.statuses:
        raise InvalidInput(f"unknown call status {status!r}")
    if outcome and outcome not in queries.OUTCOMES:
        raise InvalidInput(f"unknown outcome {outcome!r}")
    forms = await queries.list_forms(conn, have, status=status, outcome=outcome)
    counts = await queries.count_forms(conn)
    queued, note = await optional(qstash.queued())
    return {
        "forms": forms,
        "counts": counts,
        "have": have,
        "status": status,
        "outcome": outcome,
        "outcomes": queries.OUTCOMES,
        "messages": {m["messageId"]: m for m in queued or []},
        "qstash_note": note,
        "query": urllib.parse.urlencode(
            {k: v for k, v in (("status", status), ("outcome", outcome)) if v}
        ),
    }


async def journey_view(
    conn: AsyncConnection, qstash: LocalQStash, vapi: FakeVapiAdmin | None, form_id: str
) -> dict:
    have = await queries.features(conn)
    form = await queries.get_form(conn, have, form_id)
    if form is None:
        raise NotFound(f"no form {form_id}")
    events = await queries.form_events(conn, form_id)
    call_rows = await queries.form_calls(conn, have, form_id)
    ids = journey.message_ids(form, events)
    (
        (qstash_events, qstash_note),
        (dlq, _),
        (vapi_calls, vapi_note),
        (vapi_requests, _),
    ) = await asyncio.gather(
        optional(qstash.events(ids)),
        optional(qstash.dlq()),
        optional(vapi.calls() if vapi else _nothing()),
        optional(vapi.requests() if vapi else _nothing()),
    )
    call_ids = (
        {row["vapi_call_id"] for row in call_rows}
        | {form["vapi_call_id"]}
        | {event["detail"].get(key) for event in events for key in ("call_id", "vapi_call_id")}
    )
    calls = journey.calls_of_form(form_id, call_ids, vapi_calls or [])
    entries = journey.timeline(
        journey.audit_entries(events),
        journey.qstash_entries(qstash_events or []),
        journey.vapi_entries(journey.requests_of_form(form_id, vapi_requests or []), calls),
    )
    return {
        "form": form,
        "have": have,
        "entries": entries,
        "calls": calls,
        "call_rows": call_rows,
        "play_outcomes": PLAY_OUTCOMES,
        "dead_letters": journey.dead_letters_of_form(form_id, ids, dlq or []),
        "qstash_note": qstash_note,
        "vapi_note": vapi_note,
        "fake_vapi": vapi is not None,
        "back": f"/forms/{form_id}",
    }


async def qstash_view(qstash: LocalQStash) -> dict:
    (schedules, schedules_note), (queued, queued_note), (dlq, dlq_note) = await asyncio.gather(
        optional(qstash.schedules()), optional(qstash.queued()), optional(qstash.dlq())
    )
    return {
        "schedules": schedules or [],
        "queued": queued or [],
        "dlq": dlq or [],
        "notes": [n for n in (schedules_note, queued_note, dlq_note) if n],
        "back": "/qstash",
    }


async def calls_view(vapi: FakeVapiAdmin | None) -> dict:
    """The calls under way on the fake Vapi, and whether new ones ring until played."""
    view: dict[str, Any] = {
        "calls": [],
        "holding": None,
        "vapi_note": None,
        "play_outcomes": PLAY_OUTCOMES,
        "back": "/act",
    }
    if vapi is None:
        view["vapi_note"] = "the stack uses the real Vapi: calls are not playable here"
        return view
    (calls, note), (holding, _) = await asyncio.gather(
        optional(vapi.calls()), optional(vapi.holding())
    )
    view.update(
        calls=[c for c in calls or [] if c.get("status") != "ended"],
        holding=holding,
        vapi_note=note,
    )
    return view
