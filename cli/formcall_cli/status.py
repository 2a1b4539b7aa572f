"""`formcall status`: schedules, the DLQ, forms, their calls and QStash messages, local or deployed.

The database is read directly (DATABASE_URL) or through Supabase's REST API (SUPABASE_URL and the
service_role key: a Supabase project gives no direct connection by default); QStash through its
public API (`/v2/schedules`, `/v2/dlq`, `/v2/messages/{id}`), which Upstash and the local QStash
both answer. Only the local QStash lists every queued message, so that table is shown for it alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

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
        f"{key}: {_text(value) if isinstance(value, dict) else as_text(value)}"
        for key, value in detail.items()
        if value is not None
    )


def as_text(value: object) -> str:
    """JSON as readable text, not a Python repr: `name: value, ...`, nested in parentheses."""
    if isinstance(value, dict) and value:
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


# --- Where the forms are read -----------------------------------------------------------------

FORM_COLUMNS = (
    "id",
    "deadline",
    "submitted_at",
    "call_status",
    "call_outcome",
    "call_attempts",
    "vapi_call_id",
    "last_call_error",
    "qstash_message_id",
)
CALL_COLUMNS = (
    "vapi_call_id",
    "status",
    "outcome",
    "ended_reason",
    "started_at",
    "ended_at",
    "cost",
)
# forms.call_status's check constraint (supabase/migrations).
CALL_STATUSES = ("pending", "calling", "called", "failed")
_TIMES = {
    "deadline",
    "submitted_at",
    "next_call_at",
    "opted_out_at",
    "started_at",
    "ended_at",
    "created_at",
}


class FormsReader(Protocol):
    """What status reads of the database, row by row as dicts."""

    def counts(self) -> dict[str, int]: ...
    def recent(self, limit: int) -> list[dict[str, Any]]: ...
    def form(self, form_id: str) -> dict[str, Any] | None: ...
    def calls(self, form_id: str) -> list[dict[str, Any]]: ...
    def events(self, form_id: str) -> list[dict[str, Any]]: ...


class PostgresReader:
    """A direct connection (DATABASE_URL): the local stack, or a database that gives one."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _rows(self, query: str, params: tuple = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(query, params).fetchall()

    def counts(self) -> dict[str, int]:
        rows = self._rows("select call_status, count(*) as n from forms group by 1")
        return {r["call_status"]: r["n"] for r in rows}

    def recent(self, limit: int) -> list[dict[str, Any]]:
        columns = ", ".join(FORM_COLUMNS)
        return self._rows(
            f"select {columns} from forms order by updated_at desc limit %s", (limit,)
        )

    def form(self, form_id: str) -> dict[str, Any] | None:
        columns = ", ".join(f"f.{c}" for c in FORM_COLUMNS)
        rows = self._rows(
            f"select {columns}, f.next_call_at, p.opted_out_at"
            " from forms f join patients p on p.id = f.patient_id where f.id = %s",
            (form_id,),
        )
        return rows[0] if rows else None

    def calls(self, form_id: str) -> list[dict[str, Any]]:
        columns = ", ".join(f"c.{c}" for c in CALL_COLUMNS)
        return self._rows(
            f"select {columns} from calls c join call_forms cf on cf.call_id = c.id"
            " where cf.form_id = %s order by c.created_at",
            (form_id,),
        )

    def events(self, form_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "select created_at, event, detail from form_call_events where form_id = %s order by id",
            (form_id,),
        )


class RestReader:
    """Supabase's REST API (PostgREST) with the service_role key: a deployed Supabase project."""

    def __init__(self, url: str, key: str, http: httpx.Client) -> None:
        self.base = url.rstrip("/") + "/rest/v1"
        self.http = http
        self.headers = {"apikey": key, "Authorization": f"Bearer {key}"}

    def _get(self, table: str, params: dict[str, str], *, count: bool = False) -> httpx.Response:
        headers = {**self.headers, **({"Prefer": "count=exact"} if count else {})}
        try:
            answer = self.http.get(f"{self.base}/{table}", params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise StatusError(
                f"Supabase unreachable at {self.base}: {type(exc).__name__}"
            ) from None
        if answer.status_code in (401, 403):
            raise StatusError("Supabase refused the key (SUPABASE_SERVICE_ROLE_KEY)")
        if not answer.is_success:
            code = _json(answer).get("code") if isinstance(_json(answer), dict) else None
            raise StatusError(f"Supabase answered HTTP {answer.status_code} on {table} ({code})")
        return answer

    def _rows(self, table: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return [_typed(row) for row in self._get(table, params).json()]

    def counts(self) -> dict[str, int]:
        counts = {}
        for status in CALL_STATUSES:
            answer = self._get(
                "forms", {"select": "id", "call_status": f"eq.{status}", "limit": "1"}, count=True
            )
            # Content-Range: 0-0/N, or */0 when nothing matched.
            total = int(answer.headers.get("content-range", "*/0").rsplit("/", 1)[1])
            if total:
                counts[status] = total
        return counts

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return self._rows(
            "forms",
            {"select": ",".join(FORM_COLUMNS), "order": "updated_at.desc", "limit": str(limit)},
        )

    def form(self, form_id: str) -> dict[str, Any] | None:
        select = ",".join((*FORM_COLUMNS, "next_call_at", "patient_id"))
        rows = self._rows("forms", {"select": select, "id": f"eq.{form_id}"})
        if not rows:
            return None
        form = rows[0]
        patient = form.pop("patient_id")
        (row,) = self._rows("patients", {"select": "opted_out_at", "id": f"eq.{patient}"}) or [{}]
        return {**form, "opted_out_at": row.get("opted_out_at")}

    def calls(self, form_id: str) -> list[dict[str, Any]]:
        links = self._rows("call_forms", {"select": "call_id", "form_id": f"eq.{form_id}"})
        if not links:
            return []
        ids = ",".join(str(link["call_id"]) for link in links)
        return self._rows(
            "calls",
            {"select": ",".join(CALL_COLUMNS), "id": f"in.({ids})", "order": "created_at.asc"},
        )

    def events(self, form_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "form_call_events",
            {"select": "created_at,event,detail", "form_id": f"eq.{form_id}", "order": "id.asc"},
        )


def _json(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """PostgREST's JSON times as datetimes, as a direct connection gives them."""
    return {
        k: datetime.fromisoformat(v) if k in _TIMES and isinstance(v, str) else v
        for k, v in row.items()
    }


@contextmanager
def reader(*, dsn: str | None, supabase_url: str | None, key: str | None) -> Iterator[FormsReader]:
    """A direct connection when DATABASE_URL is given, else Supabase's REST API."""
    if dsn:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                yield PostgresReader(conn)
        except psycopg.OperationalError as exc:
            raise StatusError(f"database unreachable: {str(exc).splitlines()[0]}") from None
        return
    if not (supabase_url and key):
        raise StatusError(
            "set DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY (Supabase's REST API)"
        )
    with httpx.Client(timeout=httpx.Timeout(15.0, connect=5.0)) as http:
        yield RestReader(supabase_url, key, http)


# --- The report -------------------------------------------------------------------------------


def show(
    console: Console,
    *,
    forms: FormsReader,
    qstash_url: str,
    token: str,
    form_id: str | None,
    limit: int = 20,
) -> None:
    if form_id is not None:
        try:
            uuid.UUID(form_id)
        except ValueError:
            raise StatusError(f"{form_id!r} is not a form id (a UUID)") from None
    # The database is read first: an unknown form or a refused key is the whole answer.
    if form_id:
        form = forms.form(form_id)
        if form is None:
            raise StatusError(f"no form {form_id}")
        calls, events = forms.calls(form_id), forms.events(form_id)
    else:
        counts, rows = forms.counts(), forms.recent(limit)
    qstash = QStashReader(qstash_url, token)
    _qstash_sections(console, qstash)
    if form_id:
        _history(console, qstash, form_id, form, calls, events)
    else:
        _forms(console, qstash, counts, rows)


class QStashReader:
    """QStash's public API with the token (the official client, and plain GETs where it has none)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token
        self.readable = True

    def message(self, message_id: str | None) -> str:
        """A form's one-time message as QStash has it: due when, or no longer queued."""
        if not message_id:
            return "-"
        if not self.readable:
            return "(QStash not readable)"
        try:
            answer = httpx.get(
                f"{self.url}/v2/messages/{message_id}",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=10,
            )
        except httpx.HTTPError as exc:
            return f"(QStash unreachable: {type(exc).__name__})"
        if answer.status_code == 404:
            return "not queued (delivered or cancelled)"
        if not answer.is_success:
            return f"(QStash answered HTTP {answer.status_code})"
        return f"queued, due {_ms(answer.json().get('notBefore')) or 'now'}"


def _qstash_sections(console: Console, qstash: QStashReader) -> None:
    from qstash import QStash
    from qstash.errors import QStashError

    client = QStash(qstash.token, base_url=qstash.url, retry=False)
    try:
        schedules = client.schedule.list()
        dlq = client.dlq.list().messages
    except (QStashError, httpx.HTTPError) as exc:
        console.print(f"[yellow]QStash at {qstash.url} not readable: {exc}[/]")
        qstash.readable = False
        return
    table = Table(title=f"schedules ({len(schedules)})")
    for column in ("id", "cron", "destination", "paused", "last", "next"):
        table.add_column(column)
    for s in schedules:
        table.add_row(
            s.schedule_id,
            s.cron,
            s.destination,
            as_text(s.paused),
            _ms(s.last_schedule_time),
            _ms(s.next_schedule_time),
        )
    print_table(console, table)
    _local_queue(console, qstash)
    table = Table(title=f"dead-letter queue ({len(dlq)})")
    for column in ("dlq id", "message id", "destination", "status", "response"):
        table.add_column(column)
    for m in dlq:
        table.add_row(
            m.dlq_id, m.message_id, m.url, str(m.response_status), (m.response_body or "")[:70]
        )
    print_table(console, table)


def _local_queue(console: Console, qstash: QStashReader) -> None:
    """Every queued message: an extra of the local QStash (QStash's API lists none)."""
    try:
        local = httpx.get(
            f"{qstash.url}/v2/_local/messages",
            headers={"Authorization": f"Bearer {qstash.token}"},
            timeout=10,
        )
    except httpx.HTTPError:
        return
    if local.status_code != 200:
        return
    messages = local.json()
    messages = messages.get("messages", messages) if isinstance(messages, dict) else messages
    table = Table(title=f"queued messages ({len(messages)}, the local QStash)")
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


def _forms(
    console: Console, qstash: QStashReader, counts: dict[str, int], rows: list[dict]
) -> None:
    table = Table(
        title="forms (newest changes first) — "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    )
    _id_column(table, "form id")
    for column in ("deadline", "submitted", "call", "outcome", "attempts"):
        table.add_column(column)
    _id_column(table, "vapi call")
    table.add_column("QStash message")
    table.add_column("last error")
    for row in rows:
        table.add_row(
            str(row["id"]),
            _at(row["deadline"]) or "none",
            "yes" if row["submitted_at"] else "",
            row["call_status"],
            row["call_outcome"] or "",
            str(row["call_attempts"]),
            row["vapi_call_id"] or "",
            qstash.message(row["qstash_message_id"]),
            (row["last_call_error"] or "")[:60],
        )
    print_table(console, table)


def _history(
    console: Console,
    qstash: QStashReader,
    form_id: str,
    form: dict,
    calls_made: list[dict],
    events: list[dict],
) -> None:
    console.print(f"form {form_id}")
    for label, value in (
        ("status", form["call_status"]),
        ("call outcome", form["call_outcome"] or "-"),
        ("attempts at the current call", form["call_attempts"]),
        ("deadline", _at(form["deadline"]) or "none"),
        ("next call", _at(form["next_call_at"]) or "-"),
        ("submitted", _at(form["submitted_at"]) or "no"),
        ("patient opted out", _at(form["opted_out_at"]) or "no"),
        ("last error", form["last_call_error"] or "-"),
        (
            "QStash message",
            (
                f"{form['qstash_message_id']}: {qstash.message(form['qstash_message_id'])}"
                if form["qstash_message_id"]
                else "none"
            ),
        ),
    ):
        console.print(f"  {label}: {value}")
    calls = Table(title="calls")
    _id_column(calls, "vapi call id")
    for column in ("status", "outcome", "ended reason", "started", "ended", "cost"):
        calls.add_column(column)
    for call in calls_made:
        calls.add_row(
            call["vapi_call_id"] or "(not placed yet)",
            call["status"],
            call["outcome"] or "",
            call["ended_reason"] or "",
            _at(call["started_at"]),
            _at(call["ended_at"]),
            "" if call["cost"] is None else f"${call['cost']:.4f}",
        )
    print_table(console, calls)
    table = Table(title="history")
    for column in ("time", "event", "detail"):
        table.add_column(column)
    for event in events:
        table.add_row(
            event["created_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            event["event"],
            _text(event["detail"]),
        )
    print_table(console, table)
