"""`formcall status`: schedules, queued messages, DLQ, forms and their calls (QStash and the database)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import httpx
import psycopg
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


class StatusError(Exception):
    pass


def _at(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _id_column(table: Table, name: str) -> None:
    # Ids are what a user copies into the next command: never cut or wrapped.
    table.add_column(name, no_wrap=True, min_width=36)


def _text(detail) -> str:
    """An event's detail as `key: value` text (JSON objects are not for reading)."""
    if not isinstance(detail, dict):
        return "" if detail is None else str(detail)
    return ", ".join(
        f"{key}: {_text(value) if isinstance(value, dict) else value}"
        for key, value in detail.items()
        if value is not None
    )


def as_text(value: object) -> str:
    """JSON as readable text, not a Python repr: `name: value, ...`, nested in parentheses."""
    if isinstance(value, dict):
        return ", ".join(
            f"{name}: ({as_text(item)})"
            if isinstance(item, dict) and item
            else f"{name}: {as_text(item)}"
            for name, item in value.items()
        )
    if isinstance(value, list):
        return "[" + ", ".join(as_text(item) for item in value) + "]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None or value == {} else str(value)


def print_table(console: Console, table: Table) -> None:
    """Print a table at its natural width, every cell whole, however narrow the output.

    Rich otherwise squeezes columns to fit the terminal (80 columns when not one), cutting ids
    and times with "…" or squeezing columns away; a table wider than the terminal folds there
    for the eye, and a pipe or log gets its lines whole.
    """
    natural = Measurement.get(console, console.options.update(width=100_000), table).maximum
    console.print(_AtWidth(table, max(console.width, natural)), crop=False)


class _AtWidth:
    """Renders a table at a given width (Console.print's own width may only narrow it)."""

    def __init__(self, table: Table, width: int) -> None:
        self.table, self.width = table, width

    def __rich_console__(self, console: Console, options):
        yield from console.render(self.table, options.update(width=self.width))


def _ms(value: int | None) -> str:
    if not value:
        return ""
    return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ms(value: int | None) -> str:
    if not value:
        return ""
    return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def show(
    console: Console, *, dsn: str, qstash_url: str, token: str, form_id: str | None, limit: int = 20
) -> None:
    if form_id is not None:
        try:
            uuid.UUID(form_id)
        except ValueError:
            raise StatusError(f"{form_id!r} is not a form id (a UUID)") from None
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            # An unknown form is the answer, before any table: nothing else is printed.
            if form_id:
                _form_exists(conn, form_id)
            _qstash_sections(console, qstash_url, token)
            if form_id:
                _history(console, conn, form_id)
            else:
                _forms(console, conn, limit)
    except psycopg.OperationalError as exc:
        raise StatusError(f"database unreachable: {str(exc).splitlines()[0]}") from None


def _qstash_sections(console: Console, url: str, token: str) -> None:
    from qstash import QStash
    from qstash.errors import QStashError

    client = QStash(token, base_url=url, retry=False)
    try:
        schedules = client.schedule.list()
        dlq = client.dlq.list().messages
    except (QStashError, httpx.HTTPError) as exc:
        console.print(f"[yellow]QStash at {url} not readable: {exc}[/]")
        return
    table = Table(title=f"schedules ({len(schedules)})")
    for column in ("id", "cron", "destination", "paused", "last", "next"):
        table.add_column(column)
    for s in schedules:
        table.add_row(
            s.schedule_id,
            s.cron,
            s.destination,
            str(s.paused),
            _ms(s.last_schedule_time),
            _ms(s.next_schedule_time),
        )
    print_table(console, table)

    local = httpx.get(
        f"{url}/v2/_local/messages", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    if local.status_code == 200:
        messages = local.json()
        messages = messages.get("messages", messages) if isinstance(messages, dict) else messages
        table = Table(title=f"queued messages ({len(messages)})")
        for column in ("message id", "destination", "state", "retried", "next attempt", "body"):
            table.add_column(column)
        for m in messages:
            table.add_row(
                str(m.get("messageId")),
                str(m.get("url")),
                str(m.get("state")),
                str(m.get("retried", m.get("attempts", ""))),
                _ms(m.get("nextAttemptAt") or m.get("notBefore")),
                str(m.get("body", ""))[:60],
            )
        print_table(console, table)
    else:
        console.print(
            "queued messages: QStash's API does not list pending messages "
            "(see the Upstash console); shown for the local QStash only"
        )

    table = Table(title=f"dead-letter queue ({len(dlq)})")
    for column in ("dlq id", "message id", "destination", "status", "response"):
        table.add_column(column)
    for m in dlq:
        table.add_row(
            m.dlq_id, m.message_id, m.url, str(m.response_status), (m.response_body or "")[:70]
        )
    print_table(console, table)


def _forms(console: Console, conn, limit: int) -> None:
    counts = dict(conn.execute("select call_status, count(*) from forms group by 1").fetchall())
    rows = conn.execute(
        "select id, deadline, submitted_at is not null, call_status, call_outcome, call_attempts,"
        " vapi_call_id, last_call_error from forms order by updated_at desc limit %s",
        (limit,),
    ).fetchall()
    table = Table(
        title="forms (newest changes first) — "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    )
    _id_column(table, "form id")
    for column in ("deadline", "submitted", "call", "outcome", "attempts"):
        table.add_column(column)
    _id_column(table, "vapi call")
    table.add_column("last error")
    for fid, deadline, submitted, state, outcome, attempts, call_id, error in rows:
        table.add_row(
            str(fid),
            _at(deadline) or "none",
            "yes" if submitted else "",
            state,
            outcome or "",
            str(attempts),
            call_id or "",
            (error or "")[:60],
        )
    print_table(console, table)


def _form_exists(conn, form_id: str) -> None:
    if conn.execute("select 1 from forms where id = %s", (form_id,)).fetchone() is None:
        raise StatusError(f"no form {form_id}")


def _history(console: Console, conn, form_id: str) -> None:
    form = conn.execute(
        "select f.call_status, f.call_outcome, f.call_attempts, f.deadline, f.next_call_at,"
        " f.submitted_at, p.opted_out_at, f.last_call_error"
        " from forms f join patients p on p.id = f.patient_id where f.id = %s",
        (form_id,),
    ).fetchone()
    if form is None:
        raise StatusError(f"no form {form_id}")
    state, outcome, attempts, deadline, next_call, submitted, opted_out, error = form
    console.print(f"form {form_id}")
    for label, value in (
        ("status", state),
        ("call outcome", outcome or "-"),
        ("attempts at the current call", attempts),
        ("deadline", _at(deadline) or "none"),
        ("next call", _at(next_call) or "-"),
        ("submitted", _at(submitted) or "no"),
        ("patient opted out", _at(opted_out) or "no"),
        ("last error", error or "-"),
    ):
        console.print(f"  {label}: {value}")
    calls = Table(title="calls")
    _id_column(calls, "vapi call id")
    for column in ("status", "outcome", "ended reason", "started", "ended", "cost"):
        calls.add_column(column)
    for vapi_id, status, call_outcome, reason, started, ended, cost in conn.execute(
        "select c.vapi_call_id, c.status, c.outcome, c.ended_reason, c.started_at,"
        " c.ended_at, c.cost from calls c join call_forms cf on cf.call_id = c.id"
        " where cf.form_id = %s order by c.created_at",
        (form_id,),
    ):
        calls.add_row(
            vapi_id or "(not placed yet)",
            status,
            call_outcome or "",
            reason or "",
            _at(started),
            _at(ended),
            "" if cost is None else f"${cost:.4f}",
        )
    print_table(console, calls)
    table = Table(title="history")
    for column in ("time", "event", "detail"):
        table.add_column(column)
    for at, event, detail in conn.execute(
        "select created_at, event, detail from form_call_events where form_id = %s order by id",
        (form_id,),
    ):
        table.add_row(
            at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], event, _text(detail)
        )
    print_table(console, table)
